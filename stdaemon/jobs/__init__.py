"""Training jobs: submission, the one job-update path, the poller, job reads and log streams."""
