"""Durable small-file writes (S0: acknowledged data is on disk).

Blocking; call from a thread pool.  A file is written under a temporary name
in its own directory (``mkstemp``: mode 0600), fsynced, renamed over the old
one and the directory fsynced, so a reader -- or a restart after ``kill -9``
-- sees the old or the new file, never part of one.
"""

from __future__ import annotations

import os
import tempfile


def fsync_path(path: "str | os.PathLike[str]") -> None:
    """Flush a file's data (and metadata) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(directory: "str | os.PathLike[str]") -> None:
    """Make a rename or an unlink in ``directory`` durable.  Best effort: some file systems
    cannot open or fsync a directory, and there the rename is as durable as they allow."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: str, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically and durably (mode 0600)."""
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(directory)
