"""Keys that every instance sharing one database must hold, checked against that database.

The audit HMAC key and the key that encrypts stored upload-credential secrets are an instance's
own (a secret from the secrets stores, or a 0600 key file created on first start). Instances that
share one database (PostgreSQL, S20) must use the same keys: audit entries written under another
key never verify, so the chain would fork in meaning, and credentials encrypted under another key
cannot be read, so a trainer's upload would fail on one instance and work on the other.

At start each instance compares a fingerprint of each key with the one recorded in the database
(the first instance to start records it). A fingerprint is HMAC-SHA256 of a fixed label under the
key, cut to 128 bits: it tells whether two keys are equal and nothing about the key.

Pure SQL helpers over the ``settings`` table (namespace ``key_fingerprints``); the decision of what a
difference means is the caller's (``start_capabilities``): with a shared database it stops
start-up; with the embedded one the operator replaced a key file on purpose and the new
fingerprint is recorded.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any, Mapping

from stdaemon.store import settings

NAMESPACE = "key_fingerprints"
LABEL = b"stdaemon key fingerprint v1"


def fingerprint(key: bytes) -> str:
    return hmac.new(key, LABEL, hashlib.sha256).hexdigest()[:32]


def compare_and_record(conn: Any, fingerprints: Mapping[str, str], now: float,
                       replace: bool) -> dict[str, str]:
    """Record each ``name: fingerprint`` not yet in the database; return ``{name: recorded}`` for
    those whose recorded fingerprint differs. With ``replace``, a differing one is overwritten
    (it is still returned)."""
    recorded = settings.read_namespace(conn, NAMESPACE)
    differing = {}
    for name, value in fingerprints.items():
        known = recorded.get(name)
        if known == value:
            continue
        if known is not None:
            differing[name] = str(known)
            if not replace:
                continue
        settings.write_key(conn, NAMESPACE, name, value, now)
    return differing
