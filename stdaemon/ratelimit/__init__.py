"""Rate limiting: rules, the sliding window, the SQLite/Redis backends, the middleware."""
