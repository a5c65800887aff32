"""The S3-compatible endpoint: authentication, uploads, the object store, credentials."""
