"""Approval rules and requests, and quotas."""
