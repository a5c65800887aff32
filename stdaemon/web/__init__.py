"""stdaemon.web."""
