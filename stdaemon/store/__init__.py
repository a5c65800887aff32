"""stdaemon.store."""
