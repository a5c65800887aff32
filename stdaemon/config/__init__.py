"""stdaemon.config."""
