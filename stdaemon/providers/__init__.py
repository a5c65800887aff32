"""Providers: the Replicate client, provider settings and model versions."""
