"""Standard Webhooks verification, checked against the ``standardwebhooks``
package (an independent implementation) as the signing oracle."""

from __future__ import annotations

import base64
from datetime import datetime, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs
from standardwebhooks import Webhook

from stdaemon.webhooks import signature as ws

SECRET = "whsec_" + base64.b64encode(b"stdaemon-test-webhook-secret-32b").decode()
OTHER = "whsec_" + base64.b64encode(b"another-secret-for-rotation-test").decode()
NOW = 1_750_000_000


def oracle_headers(secret: str, msg_id: str, timestamp: int, body: bytes) -> dict:
    signature = Webhook(secret).sign(msg_id, datetime.fromtimestamp(timestamp, tz=timezone.utc),
                                     body.decode())
    return {"webhook-id": msg_id, "webhook-timestamp": str(timestamp), "webhook-signature": signature}


def test_a_delivery_signed_by_the_oracle_verifies():
    body = b'{"id":"p1","status":"succeeded"}'
    result = ws.verify(SECRET, oracle_headers(SECRET, "msg_1", NOW, body), body, NOW)
    assert result.valid and result.reason == ws.REASON_OK
    assert result.webhook_id == "msg_1" and result.timestamp == NOW


def test_our_signer_agrees_with_the_oracle():
    body = b'{"a": 1}'
    ours = ws.sign(ws.decode_secret(SECRET), "msg_9", NOW, body)
    assert ours == oracle_headers(SECRET, "msg_9", NOW, body)["webhook-signature"]


@settings(max_examples=50, deadline=None)
@given(body=hs.text(max_size=200), msg_id=hs.from_regex(r"msg_[A-Za-z0-9]{1,30}", fullmatch=True),
       skew=hs.integers(min_value=-300, max_value=300))
def test_oracle_signatures_verify_within_tolerance(body, msg_id, skew):
    raw = body.encode()
    headers = oracle_headers(SECRET, msg_id, NOW + skew, raw)
    assert ws.verify(SECRET, headers, raw, NOW).valid


@pytest.mark.parametrize("skew", [301, -301, 100_000])
def test_stale_or_future_timestamps_are_refused(skew):
    body = b"{}"
    headers = oracle_headers(SECRET, "msg_1", NOW + skew, body)
    assert ws.verify(SECRET, headers, body, NOW).reason == ws.REASON_STALE


def test_every_v1_entry_is_tried_and_other_versions_skipped():
    body = b'{"x":1}'
    good = oracle_headers(SECRET, "msg_2", NOW, body)["webhook-signature"]
    other = oracle_headers(OTHER, "msg_2", NOW, body)["webhook-signature"]
    headers = {"webhook-id": "msg_2", "webhook-timestamp": str(NOW),
               "webhook-signature": f"v1a,AAAA {other} {good}"}
    assert ws.verify(SECRET, headers, body, NOW).valid
    headers["webhook-signature"] = f"v2,AAAA {other}"
    assert ws.verify(SECRET, headers, body, NOW).reason == ws.REASON_MISMATCH
    headers["webhook-signature"] = "v2,AAAA"
    assert ws.verify(SECRET, headers, body, NOW).reason == ws.REASON_NO_V1


def test_tampered_body_id_or_timestamp_fail():
    body = b'{"status":"succeeded"}'
    headers = oracle_headers(SECRET, "msg_3", NOW, body)
    assert ws.verify(SECRET, headers, b'{"status":"failed"}', NOW).reason == ws.REASON_MISMATCH
    assert ws.verify(SECRET, dict(headers, **{"webhook-id": "msg_4"}), body, NOW).reason == ws.REASON_MISMATCH
    assert ws.verify(SECRET, dict(headers, **{"webhook-timestamp": str(NOW + 1)}), body,
                     NOW).reason == ws.REASON_MISMATCH
    assert ws.verify(OTHER, headers, body, NOW).reason == ws.REASON_MISMATCH


@pytest.mark.parametrize("headers,reason", [
    ({}, ws.REASON_MISSING_HEADERS),
    ({"webhook-id": "m", "webhook-timestamp": str(NOW)}, ws.REASON_MISSING_HEADERS),
    ({"webhook-id": "m", "webhook-timestamp": "soon", "webhook-signature": "v1,AAAA"},
     ws.REASON_MALFORMED_TIMESTAMP),
    ({"webhook-id": "m", "webhook-timestamp": "-5", "webhook-signature": "v1,AAAA"},
     ws.REASON_MALFORMED_TIMESTAMP),
    ({"webhook-id": "m", "webhook-timestamp": "1e9", "webhook-signature": "v1,AAAA"},
     ws.REASON_MALFORMED_TIMESTAMP),
    ({"webhook-id": "m", "webhook-timestamp": str(NOW), "webhook-signature": "garbage"},
     ws.REASON_MALFORMED_SIGNATURE),
    ({"webhook-id": "m", "webhook-timestamp": str(NOW), "webhook-signature": "v1,"},
     ws.REASON_MALFORMED_SIGNATURE),
    ({"webhook-id": "m", "webhook-timestamp": str(NOW), "webhook-signature": "v1,not base64!"},
     ws.REASON_MALFORMED_SIGNATURE),
    ({"webhook-id": "m", "webhook-timestamp": str(NOW), "webhook-signature": "   "},
     ws.REASON_MALFORMED_SIGNATURE),
    ({"webhook-id": "m", "webhook-timestamp": str(NOW), "webhook-signature": "v1,é"},
     ws.REASON_MALFORMED_SIGNATURE),
    ({"webhook-id": "x" * 300, "webhook-timestamp": str(NOW), "webhook-signature": "v1,AAAA"},
     ws.REASON_MALFORMED_ID),
    ({"webhook-id": b"\xff", "webhook-timestamp": str(NOW), "webhook-signature": "v1,AAAA"},
     ws.REASON_MALFORMED_ID),
])
def test_malformed_headers_give_a_specific_reason(headers, reason):
    result = ws.verify(SECRET, headers, b"{}", NOW)
    assert not result.valid and result.reason == reason


def test_headers_are_found_in_any_case():
    body = b"{}"
    headers = {k.title(): v for k, v in oracle_headers(SECRET, "msg_5", NOW, body).items()}
    assert ws.verify(SECRET, headers, body, NOW).valid


@pytest.mark.parametrize("secret", ["", "whsec_", "whsec_***", 12345, b"\xff\xfe"])
def test_a_bad_secret_is_reported_not_raised(secret):
    body = b"{}"
    headers = oracle_headers(SECRET, "msg_6", NOW, body)
    assert ws.verify(secret, headers, body, NOW).reason == ws.REASON_BAD_SECRET


def test_a_secret_without_prefix_is_accepted():
    body = b"{}"
    headers = oracle_headers(SECRET, "msg_7", NOW, body)
    assert ws.verify(SECRET[len("whsec_"):], headers, body, NOW).valid


@settings(max_examples=200, deadline=None)
@given(headers=hs.dictionaries(hs.sampled_from(["webhook-id", "webhook-timestamp", "webhook-signature"]),
                               hs.one_of(hs.text(max_size=60), hs.binary(max_size=30))),
       body=hs.binary(max_size=100), now=hs.floats(allow_nan=True, allow_infinity=True))
def test_never_raises(headers, body, now):
    result = ws.verify(SECRET, headers, body, now)
    assert isinstance(result.reason, str)
