"""The web console's static files."""
