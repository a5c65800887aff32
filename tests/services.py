"""Helpers for tests that start real services (redis, tinyproxy, moto, bao, chromium)."""

from __future__ import annotations

import os
import shutil
import socket

import pytest


def require_binary(name: str) -> str:
    """Path of ``name``; a missing binary fails under CI=true and skips otherwise."""
    path = shutil.which(name)
    if path is None:
        for prefix in ("/usr/sbin", "/usr/local/sbin", "/sbin"):
            candidate = os.path.join(prefix, name)
            if os.access(candidate, os.X_OK):
                path = candidate
                break
    if path is None:
        missing(f"required binary {name!r} is not installed (see scripts/test)")
    return path


def missing(message: str) -> None:
    """A facility a test needs is not there: a failure under CI=true (CI must run every test),
    a skip on a developer's machine."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1 (for services that need one up front)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
