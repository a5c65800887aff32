"""stdaemon.http."""
