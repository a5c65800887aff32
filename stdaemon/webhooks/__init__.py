"""Provider and trainer webhooks: signatures, replay protection, the job-update path."""
