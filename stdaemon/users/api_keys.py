"""API keys: ``st_…`` tokens stored only as SHA-256 hashes, and the Principal.

Pure: making a key and its hash.  Storing, looking up and revoking keys is SQL
(:mod:`stdaemon.users.store`); the first start creates an ``admin`` user and an
admin key there and writes the key once to ``<state>/config/cloud/admin.key``
(mode 0600); only the path is logged.  Keys may expire and can be revoked.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from typing import Optional

KEY_PREFIX = "st_"


@dataclass(frozen=True)
class Principal:
    """Who is calling: a user acting with a role (from a key or a session)."""

    user_id: int
    username: str
    role: str
    key_id: Optional[int] = None
    via: str = "api_key"      # api_key | session

    @property
    def actor(self) -> str:
        return self.username


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()
