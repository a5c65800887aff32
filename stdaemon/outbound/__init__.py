"""Outbound HTTP: the one client factory (proxy, CA bundle, TLS), CONNECT tunnels, breakers, retries."""
