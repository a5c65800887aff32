"""Secrets from the environment, a file, AWS Secrets Manager and Vault."""
