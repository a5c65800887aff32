"""stdaemon.clients."""
