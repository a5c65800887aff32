"""Users, API keys, sessions, sign-in and CSRF."""
