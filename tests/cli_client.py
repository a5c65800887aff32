"""SimpleTuner's CLI as the daemon sees it, for the contract tests.

``simpletuner cloud …`` (SimpleTuner 4.10.1, ``simpletuner/cli/cloud/api.py``)
sends every call through one helper: ``urllib.request`` with
``Content-Type: application/json``, ``Accept: application/json`` and
``X-API-Key: $SIMPLETUNER_API_KEY``, a JSON body only when it has data, and
parses every answer as JSON (``detail`` from error bodies).  :class:`CliClient`
sends the same bytes with the same library (on a thread, so the reactor keeps
serving), and the ``expect_*`` helpers check the fields a command reads with
the type it needs (a ``None`` where the CLI slices a string or formats a
number is the crash the tests are there to catch).

The real CLI cannot run here: ``simpletuner.cli`` imports
``simpletuner.helpers.log_format``, which imports ``torch`` at module level.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from typing import Any, Optional

from twisted.internet import threads

ISO_MS_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


class CliClient:
    def __init__(self, base_url: str, api_key: Optional[str]):
        self.base_url = base_url
        self.api_key = api_key

    def _send(self, method: str, endpoint: str, data: Any, timeout: float) -> tuple[int, Any]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["X-API-Key"] = self.api_key
        body = json.dumps(data).encode("utf-8") if data is not None else None
        request = urllib.request.Request(self.base_url + endpoint, data=body, headers=headers,
                                         method=method)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, json.loads(response.read().decode("utf-8"))
        except urllib.error.HTTPError as error:
            raw = error.read().decode("utf-8")
            try:
                return error.code, json.loads(raw)
            except ValueError:
                return error.code, raw

    async def call(self, method: str, endpoint: str, data: Any = None, timeout: float = 30) -> tuple[int, Any]:
        """``(status, parsed JSON)`` exactly as ``cloud_api_request`` would get it."""
        return await threads.deferToThread(self._send, method, endpoint, data, timeout)

    async def ok(self, method: str, endpoint: str, data: Any = None) -> Any:
        """A call the CLI treats as success (2xx, a JSON body)."""
        status, body = await self.call(method, endpoint, data)
        assert 200 <= status < 300, (method, endpoint, status, body)
        assert isinstance(body, (dict, list)), body
        return body

    async def error(self, method: str, endpoint: str, data: Any = None) -> tuple[int, str]:
        """A call the CLI reports as an error: it prints ``detail``, which must be text."""
        status, body = await self.call(method, endpoint, data)
        assert status >= 400, (method, endpoint, status, body)
        assert isinstance(body, dict) and isinstance(body.get("detail"), str) and body["detail"], body
        return status, body["detail"]

    def _follow(self, endpoint: str, timeout: float) -> tuple[list[str], Optional[str]]:
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
        if self.api_key:
            headers["X-API-Key"] = self.api_key
        request = urllib.request.Request(self.base_url + endpoint, headers=headers)
        printed: list[str] = []
        buffer = ""
        with urllib.request.urlopen(request, timeout=timeout) as response:
            while True:
                chunk = response.read(1)
                if not chunk:
                    return printed, None
                buffer += chunk.decode("utf-8", errors="replace")
                while "\n\n" in buffer:
                    message, buffer = buffer.split("\n\n", 1)
                    data = [line[6:] for line in message.split("\n") if line.startswith("data: ")]
                    if "event: done" in message:
                        return printed, data[0] if data else None
                    printed.extend(data)

    async def follow(self, endpoint: str, timeout: float = 30) -> tuple[list[str], Optional[str]]:
        """``jobs logs --follow``: the ``data:`` lines printed and the final status
        of the ``event: done`` message (None if the stream ended without one)."""
        return await threads.deferToThread(self._follow, endpoint, timeout)


def is_iso(value: Any) -> bool:
    return isinstance(value, str) and bool(ISO_MS_UTC.match(value))


_KINDS = {
    "str": lambda v: isinstance(v, str),
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "num": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "bool": lambda v: isinstance(v, bool),
    "list": lambda v: isinstance(v, list),
    "dict": lambda v: isinstance(v, dict),
    "iso": is_iso,
}


def expect(record: Any, **fields: str) -> None:
    """Each named field present with the given kind: ``str``, ``int``, ``num``,
    ``bool``, ``list``, ``dict``, ``iso``; a ``?`` suffix also allows None
    (or the field being absent, where the CLI reads it with a default)."""
    assert isinstance(record, dict), record
    for name, kind in fields.items():
        optional = kind.endswith("?")
        kind = kind.rstrip("?")
        if optional and record.get(name) is None:
            continue
        assert name in record, f"{name} missing from {record}"
        assert _KINDS[kind](record[name]), f"{name}={record[name]!r} is not {kind} in {record}"
