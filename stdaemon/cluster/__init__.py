"""Several instances on one Redis: job events relayed between them, run-once timers leased."""
