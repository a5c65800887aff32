"""Health: the component registry and the /health surfaces."""
