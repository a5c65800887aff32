"""The tamper-evident audit log (HMAC chain), its sampler, retention and surface."""
