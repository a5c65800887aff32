"""What instances say to each other over Redis, and when they retry (pure).

A relayed job event is one JSON object on the events channel::

    {"v": 1, "origin": "<instance>/<boot>", "n": <sequence of that origin>,
     "type": "job", "user_id": <int|null>, "data": {<public job fields>}}

``origin`` is unique per process (an instance id plus a random boot part), so a
restarted instance is a new origin; ``n`` grows by one per event of that origin,
which lets a receiver drop a message it has already seen (a publish retried
after a lost reply).  Anything else on the channel is refused by
:func:`decode_event` and counted by the caller, never delivered.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Iterable, Optional

VERSION = 1
MAX_MESSAGE_BYTES = 64 * 1024
_TYPE = re.compile(r"^[a-z][a-z0-9_.]{0,31}$")


@dataclass(frozen=True)
class RelayedEvent:
    origin: str
    number: int
    type: str
    user_id: Optional[int]
    data: dict


class BadMessage(ValueError):
    """A message on the events channel that is not a relayed event."""


def encode_event(origin: str, number: int, event_type: str, user_id: Optional[int], data: dict) -> str:
    return json.dumps({"v": VERSION, "origin": origin, "n": number, "type": event_type,
                       "user_id": user_id, "data": data}, separators=(",", ":"), default=str)


def decode_event(message: Any, fields: Iterable[str]) -> RelayedEvent:
    """The event in ``message`` with only the public ``fields`` of its data, or :class:`BadMessage`."""
    if isinstance(message, bytes):
        try:
            message = message.decode("utf-8")
        except UnicodeDecodeError:
            raise BadMessage("not UTF-8") from None
    if not isinstance(message, str) or len(message) > MAX_MESSAGE_BYTES:
        raise BadMessage("not a text message of at most 64 KiB")
    try:
        body = json.loads(message)
    except ValueError:
        raise BadMessage("not JSON") from None
    if not isinstance(body, dict) or body.get("v") != VERSION:
        raise BadMessage("not a version 1 event")
    origin, number, event_type = body.get("origin"), body.get("n"), body.get("type")
    user_id, data = body.get("user_id"), body.get("data")
    if not isinstance(origin, str) or not 0 < len(origin) <= 200:
        raise BadMessage("no origin")
    if not isinstance(number, int) or isinstance(number, bool) or number < 1:
        raise BadMessage("no sequence number")
    if not isinstance(event_type, str) or not _TYPE.match(event_type):
        raise BadMessage("no event type")
    if user_id is not None and (not isinstance(user_id, int) or isinstance(user_id, bool)):
        raise BadMessage("user_id is not a number")
    if not isinstance(data, dict):
        raise BadMessage("no data")
    allowed = set(fields)
    return RelayedEvent(origin, number, event_type, user_id, {k: v for k, v in data.items() if k in allowed})


def backoff_delay(failures: int, initial: float, maximum: float, jitter: float = 0.0) -> float:
    """Seconds before the next connection attempt after ``failures`` failed ones in a row:
    ``initial`` doubling up to ``maximum``; ``jitter`` in [-1, 1] spreads it by up to 10 %."""
    base = min(maximum, initial * (2.0 ** min(max(failures - 1, 0), 30)))
    return max(0.0, base * (1.0 + 0.1 * max(-1.0, min(1.0, jitter))))


def lease_key(namespace: str, timer: str) -> str:
    return f"{namespace}:lease:{timer}"


def events_channel(namespace: str) -> str:
    return f"{namespace}:events"
