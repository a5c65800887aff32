"""AWS request signatures as S3 clients send them (pure, no I/O).

Size: about 600 lines in one module on purpose: the four signature forms below share the canonical
request, the claim (:class:`AuthClaim`) and the time-window checks, and :func:`verify_claim` is
their one entry point; split apart, each half would need the other's internals.

Covers what boto3/botocore and the AWS CLI produce against a path-style S3 endpoint:

* Signature V4 in the ``Authorization`` header (``AWS4-HMAC-SHA256 Credential=…``),
* presigned Signature V4 query strings (``X-Amz-Algorithm=AWS4-HMAC-SHA256&…``),
* the Signature V2 query form (``AWSAccessKeyId=…&Signature=…&Expires=…``) that
  ``generate_presigned_url`` still produces by default, and the V2 header form
  (``Authorization: AWS key:signature``),
* the signing-key derivation and the chunk-signature chain of ``aws-chunked`` bodies
  (``STREAMING-AWS4-HMAC-SHA256-PAYLOAD[-TRAILER]``).

The module never looks up secrets: :func:`parse_request_auth` extracts *who* claims to sign a
request (an :class:`AuthClaim`), the caller finds that key's secret, and
:func:`verify_claim` checks the signature and the time window. Every failure is a
:class:`SignatureError` carrying the S3 error code to answer with.

Headers are passed as a mapping of lower-case names to lists of raw values (what
``twisted.web.http_headers.Headers.getAllRawHeaders`` gives once names are lower-cased). Paths
and query strings are passed exactly as they arrived on the wire (still percent-encoded): S3
signs the path without normalising it.
"""

from __future__ import annotations

import base64
import calendar
import hashlib
import hmac
import posixpath
import re
import time
from dataclasses import dataclass
from email.utils import parsedate_tz, mktime_tz
from functools import lru_cache
from typing import Iterable, Mapping, Sequence
from urllib.parse import unquote_to_bytes

ALGORITHM = "AWS4-HMAC-SHA256"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
STREAMING_SIGNED = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD"
STREAMING_SIGNED_TRAILER = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER"
STREAMING_UNSIGNED_TRAILER = "STREAMING-UNSIGNED-PAYLOAD-TRAILER"
STREAMING_PAYLOADS = frozenset({STREAMING_SIGNED, STREAMING_SIGNED_TRAILER, STREAMING_UNSIGNED_TRAILER})

#: Largest accepted difference between a request's signing time and the server clock (S3 uses 15 min).
MAX_SKEW_SECONDS = 15 * 60
#: Longest lifetime of a presigned V4 URL (7 days, as S3).
MAX_PRESIGN_EXPIRES = 7 * 24 * 3600

_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.~")
_AMZ_DATE_RE = re.compile(r"^\d{8}T\d{6}Z$")
_HEX64_RE = re.compile(r"^[0-9a-f]{64}$")

#: Sub-resources that take part in the Signature V2 canonical resource (as S3 defines them).
V2_SUBRESOURCES = frozenset(
    {
        "acl", "accelerate", "analytics", "cors", "defaultObjectAcl", "delete", "inventory",
        "lifecycle", "location", "logging", "metrics", "notification", "object-lock",
        "partNumber", "policy", "replication", "requestPayment", "response-cache-control",
        "response-content-disposition", "response-content-encoding", "response-content-language",
        "response-content-type", "response-expires", "restore", "select", "select-type",
        "storageClass", "tagging", "torrent", "uploadId", "uploads", "versionId", "versioning",
        "versions", "website",
    }
)


class SignatureError(Exception):
    """A request's authentication is missing, malformed, stale or wrong.

    ``code`` is the S3 error code (``SignatureDoesNotMatch``, ``AccessDenied``, …); ``message``
    is safe to return to the client (it never contains the secret or the expected signature).
    """

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


# --------------------------------------------------------------------------- encoding helpers


def uri_encode(value: str | bytes, encode_slash: bool = True) -> str:
    """Percent-encode like AWS: unreserved characters kept, everything else ``%XX`` upper-case."""
    data = value.encode("utf-8") if isinstance(value, str) else value
    out = []
    for byte in data:
        if byte in _UNRESERVED or (byte == 0x2F and not encode_slash):
            out.append(chr(byte))
        else:
            out.append("%%%02X" % byte)
    return "".join(out)


def parse_query(raw_query: str) -> list[tuple[bytes, bytes]]:
    """Split a raw query string into percent-decoded ``(name, value)`` byte pairs, in order."""
    pairs = []
    if not raw_query:
        return pairs
    for item in raw_query.split("&"):
        if not item:
            continue
        name, _, value = item.partition("=")
        pairs.append((unquote_to_bytes(name), unquote_to_bytes(value)))
    return pairs


def canonical_query(raw_query: str, exclude: Iterable[str] = ()) -> str:
    """The SigV4 canonical query string: each name and value re-encoded, sorted, ``=`` always present."""
    skip = {name.encode() for name in exclude}
    encoded = sorted(
        (uri_encode(name), uri_encode(value)) for name, value in parse_query(raw_query) if name not in skip
    )
    return "&".join(f"{name}={value}" for name, value in encoded)


def canonical_uri(raw_path: str, normalize: bool = False) -> str:
    """The SigV4 canonical URI.

    S3 (``normalize=False``) signs the path as sent. Other AWS services (the generic test suite)
    remove dot segments and encode each segment a second time.
    """
    if not raw_path:
        return "/"
    if not normalize:
        return raw_path
    decoded = unquote_to_bytes(raw_path).decode("utf-8", "surrogateescape")
    normalized = posixpath.normpath(decoded)
    if normalized.startswith("//"):
        normalized = "/" + normalized.lstrip("/")
    if decoded.endswith("/") and normalized != "/":
        normalized += "/"
    # remove duplicate slashes inside the path
    normalized = re.sub("/+", "/", normalized)
    once = uri_encode(normalized.encode("utf-8", "surrogateescape"), encode_slash=False)
    return uri_encode(once, encode_slash=False)


def _trim(value: str) -> str:
    return " ".join(value.split())


def canonical_headers(headers: Mapping[str, Sequence[str]], signed_headers: Sequence[str]) -> str:
    """``name:value\\n`` for each signed header (values trimmed, repeated headers joined by ``,``)."""
    lines = []
    for name in signed_headers:
        values = headers.get(name)
        if values is None:
            raise SignatureError("SignatureDoesNotMatch", f"signed header {name!r} is missing")
        lines.append(f"{name}:{','.join(_trim(v) for v in values)}\n")
    return "".join(lines)


def canonical_request(
    method: str,
    raw_path: str,
    raw_query: str,
    headers: Mapping[str, Sequence[str]],
    signed_headers: Sequence[str],
    payload_hash: str,
    *,
    normalize_path: bool = False,
    exclude_query: Iterable[str] = (),
) -> str:
    return "\n".join(
        [
            method.upper(),
            canonical_uri(raw_path, normalize_path),
            canonical_query(raw_query, exclude_query),
            canonical_headers(headers, signed_headers),
            ";".join(signed_headers),
            payload_hash,
        ]
    )


def string_to_sign(amz_date: str, scope: str, canonical: str) -> str:
    digest = hashlib.sha256(canonical.encode("utf-8", "surrogateescape")).hexdigest()
    return f"{ALGORITHM}\n{amz_date}\n{scope}\n{digest}"


#: Derived signing keys kept (one per credential, day, region and service in use).
SIGNING_KEY_CACHE_SIZE = 256


def signing_key(secret: str, date: str, region: str, service: str) -> bytes:
    """``kSigning`` = HMAC chain over date, region, service and ``aws4_request``.

    The four HMACs are the same for every request a credential signs on one day, so the result is
    kept in a bounded in-process cache keyed by all four inputs (a changed secret or date derives a
    new key). The cache is never logged or exported; it holds nothing the credential store does not."""
    return _derived_key(secret, date, region, service)


@lru_cache(maxsize=SIGNING_KEY_CACHE_SIZE)
def _derived_key(secret: str, date: str, region: str, service: str) -> bytes:
    key = ("AWS4" + secret).encode("utf-8")
    for part in (date, region, service, "aws4_request"):
        key = hmac.new(key, part.encode("utf-8"), hashlib.sha256).digest()
    return key


def sign(key: bytes, text: str) -> str:
    return hmac.new(key, text.encode("utf-8"), hashlib.sha256).hexdigest()


def chunk_string_to_sign(amz_date: str, scope: str, previous_signature: str, chunk_sha256: str) -> str:
    return "\n".join(
        ["AWS4-HMAC-SHA256-PAYLOAD", amz_date, scope, previous_signature, EMPTY_SHA256, chunk_sha256]
    )


def trailer_string_to_sign(amz_date: str, scope: str, previous_signature: str, trailer_sha256: str) -> str:
    return "\n".join(["AWS4-HMAC-SHA256-TRAILER", amz_date, scope, previous_signature, trailer_sha256])


@dataclass(frozen=True)
class ChunkSigner:
    """The state needed to verify an ``aws-chunked`` body's chunk-signature chain."""

    key: bytes
    amz_date: str
    scope: str
    seed_signature: str

    def chunk_signature(self, previous: str, chunk_sha256: str) -> str:
        return sign(self.key, chunk_string_to_sign(self.amz_date, self.scope, previous, chunk_sha256))

    def trailer_signature(self, previous: str, trailer_sha256: str) -> str:
        return sign(self.key, trailer_string_to_sign(self.amz_date, self.scope, previous, trailer_sha256))


# --------------------------------------------------------------------------- dates


@lru_cache(maxsize=64)
def parse_amz_date(value: str) -> float:
    """``20150830T123600Z`` → POSIX seconds. Raises ``SignatureError`` when malformed.

    Concurrent requests signed in the same second carry the same value: the last few are kept."""
    if not _AMZ_DATE_RE.match(value or ""):
        raise SignatureError("AccessDenied", "X-Amz-Date must be in the ISO8601 basic format")
    try:
        parsed = time.strptime(value, "%Y%m%dT%H%M%SZ")
    except ValueError:
        raise SignatureError("AccessDenied", "X-Amz-Date is not a valid date") from None
    return float(calendar.timegm(parsed))


def parse_http_date(value: str) -> float | None:
    """An HTTP date as POSIX seconds; ``None`` when malformed or outside years 1-9999."""
    parsed = parsedate_tz(value or "")
    if parsed is None:
        return None
    try:
        return float(mktime_tz(parsed))
    except (ValueError, OverflowError):  # "Fri, 01 Jan 99999 …": datetime stops at 9999
        return None


def format_amz_date(seconds: float) -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(seconds))


def _seconds(text: str) -> int | None:
    """A decimal count (``Expires``, ``X-Amz-Expires``) or ``None``: digits only, and few enough
    for a date (Python refuses to convert strings of thousands of digits)."""
    if not text.isdigit() or not text.isascii() or len(text) > 15:
        return None
    return int(text)


# --------------------------------------------------------------------------- claims


@dataclass(frozen=True)
class Credential:
    access_key: str
    date: str
    region: str
    service: str

    @property
    def scope(self) -> str:
        return f"{self.date}/{self.region}/{self.service}/aws4_request"


def parse_credential(value: str) -> Credential:
    parts = value.split("/")
    if len(parts) != 5 or not all(parts) or parts[4] != "aws4_request":
        raise SignatureError(
            "AuthorizationHeaderMalformed", "Credential must be <key>/<date>/<region>/<service>/aws4_request"
        )
    if not re.match(r"^\d{8}$", parts[1]):
        raise SignatureError("AuthorizationHeaderMalformed", "the credential date is not YYYYMMDD")
    return Credential(parts[0], parts[1], parts[2], parts[3])


@dataclass(frozen=True)
class AuthClaim:
    """Who claims to have signed a request, and everything needed to check it."""

    kind: str  # "v4-header" | "v4-query" | "v2-query" | "v2-header"
    access_key: str
    signature: str
    method: str
    raw_path: str
    raw_query: str
    headers: Mapping[str, Sequence[str]]
    credential: Credential | None = None
    signed_headers: tuple[str, ...] = ()
    amz_date: str = ""
    expires: int = 0  # v4-query: lifetime in seconds; v2-query: absolute POSIX time
    payload_hash: str = UNSIGNED_PAYLOAD

    @property
    def streaming(self) -> bool:
        return self.payload_hash in STREAMING_PAYLOADS


def _first(headers: Mapping[str, Sequence[str]], name: str) -> str | None:
    values = headers.get(name)
    if not values:
        return None
    return values[0]


def _query_dict(raw_query: str) -> dict[str, str]:
    result: dict[str, str] = {}
    for name, value in parse_query(raw_query):
        result.setdefault(name.decode("utf-8", "replace"), value.decode("utf-8", "replace"))
    return result


def parse_authorization_header(value: str) -> tuple[Credential, tuple[str, ...], str]:
    """Parse ``AWS4-HMAC-SHA256 Credential=…, SignedHeaders=…, Signature=…``."""
    algorithm, _, rest = value.strip().partition(" ")
    if algorithm != ALGORITHM:
        raise SignatureError("AuthorizationHeaderMalformed", "unsupported authorization algorithm")
    fields = {}
    for item in rest.split(","):
        name, sep, field_value = item.strip().partition("=")
        if sep:
            fields[name.strip()] = field_value.strip()
    try:
        credential = parse_credential(fields["Credential"])
        signed = tuple(fields["SignedHeaders"].split(";"))
        signature = fields["Signature"]
    except KeyError as missing:
        raise SignatureError("AuthorizationHeaderMalformed", f"missing {missing.args[0]}") from None
    if not signed or any(not h or h != h.lower() for h in signed) or list(signed) != sorted(signed):
        raise SignatureError("AuthorizationHeaderMalformed", "SignedHeaders must be sorted lower-case names")
    if not _HEX64_RE.match(signature):
        raise SignatureError("AuthorizationHeaderMalformed", "Signature must be 64 hex digits")
    return credential, signed, signature


def parse_request_auth(
    method: str, raw_path: str, raw_query: str, headers: Mapping[str, Sequence[str]]
) -> AuthClaim | None:
    """Find the signature a request carries (``None`` when it carries none)."""
    authorization = _first(headers, "authorization")
    query = _query_dict(raw_query) if raw_query else {}
    common = dict(method=method.upper(), raw_path=raw_path, raw_query=raw_query, headers=headers)
    if authorization is not None:
        if authorization.startswith(ALGORITHM):
            credential, signed, signature = parse_authorization_header(authorization)
            amz_date = _first(headers, "x-amz-date")
            if amz_date is None:
                date_header = _first(headers, "date")
                parsed = parse_http_date(date_header) if date_header else None
                if parsed is None:
                    raise SignatureError("AccessDenied", "AWS authentication requires a valid Date or x-amz-date header")
                amz_date = format_amz_date(parsed)
            payload = _first(headers, "x-amz-content-sha256")
            if payload is None:
                raise SignatureError("InvalidRequest", "missing required header x-amz-content-sha256")
            if "host" not in signed:
                raise SignatureError("AccessDenied", "the host header must be signed")
            return AuthClaim(
                kind="v4-header", access_key=credential.access_key, signature=signature,
                credential=credential, signed_headers=signed, amz_date=amz_date,
                payload_hash=payload, **common,
            )
        if authorization.startswith("AWS "):
            key, sep, signature = authorization[4:].strip().rpartition(":")
            if not sep or not key or not signature:
                raise SignatureError("AccessDenied", "malformed AWS authorization header")
            return AuthClaim(kind="v2-header", access_key=key, signature=signature, **common)
        raise SignatureError("AccessDenied", "unsupported Authorization scheme")
    if "X-Amz-Algorithm" in query or "X-Amz-Signature" in query or "X-Amz-Credential" in query:
        if query.get("X-Amz-Algorithm") != ALGORITHM:
            raise SignatureError("AuthorizationQueryParametersError", "X-Amz-Algorithm must be AWS4-HMAC-SHA256")
        try:
            credential = parse_credential(query["X-Amz-Credential"])
            amz_date = query["X-Amz-Date"]
            expires_text = query["X-Amz-Expires"]
            signed = tuple(query["X-Amz-SignedHeaders"].split(";"))
            signature = query["X-Amz-Signature"]
        except KeyError as missing:
            raise SignatureError(
                "AuthorizationQueryParametersError", f"query-string authentication requires {missing.args[0]}"
            ) from None
        except SignatureError as err:
            raise SignatureError("AuthorizationQueryParametersError", err.message) from None
        expires = _seconds(expires_text)
        if expires is None:
            raise SignatureError("AuthorizationQueryParametersError", "X-Amz-Expires must be a number of seconds")
        if expires < 1 or expires > MAX_PRESIGN_EXPIRES:
            raise SignatureError(
                "AuthorizationQueryParametersError", "X-Amz-Expires must be between 1 and 604800 seconds"
            )
        if not _HEX64_RE.match(signature):
            raise SignatureError("AuthorizationQueryParametersError", "X-Amz-Signature must be 64 hex digits")
        if "host" not in signed:
            raise SignatureError("AccessDenied", "the host header must be signed")
        payload = query.get("X-Amz-Content-Sha256") or _first(headers, "x-amz-content-sha256") or UNSIGNED_PAYLOAD
        return AuthClaim(
            kind="v4-query", access_key=credential.access_key, signature=signature, credential=credential,
            signed_headers=signed, amz_date=amz_date, expires=expires, payload_hash=payload, **common,
        )
    if "AWSAccessKeyId" in query or "Signature" in query:
        try:
            key = query["AWSAccessKeyId"]
            signature = query["Signature"]
            expires_text = query["Expires"]
        except KeyError as missing:
            raise SignatureError("AccessDenied", f"query-string authentication requires {missing.args[0]}") from None
        expires = _seconds(expires_text)
        if expires is None:
            raise SignatureError("AccessDenied", "Expires must be a POSIX time in seconds")
        return AuthClaim(kind="v2-query", access_key=key, signature=signature, expires=expires, **common)
    return None


# --------------------------------------------------------------------------- verification


def v2_string_to_sign(claim: AuthClaim, date_or_expires: str, resource_path: str | None = None) -> str:
    """The Signature V2 string to sign (header form uses Date, query form uses Expires).

    ``resource_path`` overrides the path of the canonical resource: botocore signs
    ``/<bucket>/<key>`` without the endpoint's own path prefix.
    """
    query = parse_query(claim.raw_query)
    query_values = {n.decode("utf-8", "replace"): v.decode("utf-8", "replace") for n, v in query}
    query_form = claim.kind == "v2-query"

    def standard(name: str) -> str:
        if query_form and name in query_values:
            return query_values[name].strip()
        return (_first(claim.headers, name) or "").strip()

    amz: dict[str, list[str]] = {}
    for name, values in claim.headers.items():
        if name.startswith("x-amz-"):
            amz.setdefault(name, []).extend(v.strip() for v in values)
    if query_form:
        for name, value in query_values.items():
            lowered = name.lower()
            if lowered.startswith("x-amz-"):
                amz.setdefault(lowered, []).append(value.strip())
    if not query_form and "x-amz-date" in amz:
        date_or_expires = ""
    lines = [claim.method, standard("content-md5"), standard("content-type"), date_or_expires]
    lines.extend(f"{name}:{','.join(amz[name])}" for name in sorted(amz))
    resource = resource_path if resource_path is not None else (claim.raw_path or "/")
    subresources = []
    for item in claim.raw_query.split("&") if claim.raw_query else []:
        name, sep, value = item.partition("=")
        if name in V2_SUBRESOURCES:
            subresources.append((name, unquote_to_bytes(value).decode("utf-8", "replace") if sep else None))
    if subresources:
        subresources.sort(key=lambda pair: pair[0])
        resource += "?" + "&".join(name if value is None else f"{name}={value}" for name, value in subresources)
    lines.append(resource)
    return "\n".join(lines)


def _v2_signature(secret: str, text: str) -> str:
    digest = hmac.new(secret.encode("utf-8"), text.encode("utf-8", "surrogateescape"), hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


def _does_not_match() -> SignatureError:
    return SignatureError(
        "SignatureDoesNotMatch",
        "The request signature we calculated does not match the signature you provided. "
        "Check your key and signing method.",
    )


def _compare(expected: str, given: str) -> bool:
    return hmac.compare_digest(expected.encode("utf-8", "replace"), given.encode("utf-8", "replace"))


def _endpoint_readings(claim: AuthClaim, path_prefix: str):
    """``(path, headers)`` as a client with an endpoint under ``path_prefix`` may have signed them.

    Most clients (botocore, rclone, the AWS CLI) sign the path they send. s3fs-fuse (``url=`` with
    a path) sends the full path but signs it without the prefix; s3cmd (``host_base =
    host:port/prefix``) does the same and signs the prefix as part of the ``host`` value."""
    yield claim.raw_path, claim.headers
    if not path_prefix or not claim.raw_path.startswith(path_prefix + "/") or "host" not in claim.headers:
        return
    short = claim.raw_path[len(path_prefix):]
    yield short, claim.headers
    headers = dict(claim.headers)
    headers["host"] = [value + path_prefix for value in claim.headers["host"]]
    yield short, headers


def _header_readings(headers: Mapping[str, Sequence[str]], signed: Sequence[str]):
    """The ways a client may have turned non-ASCII header values into signed bytes.

    Header values arrive here decoded as Latin-1 (one character per wire byte), and the canonical
    request is hashed as UTF-8. That is what botocore does: it signs the UTF-8 of a ``str`` value
    but sends it Latin-1 encoded (``http.client``), so ``é`` is signed as C3 A9 and sent as E9.
    Most other SDKs (Go, JavaScript, Java, rclone) send UTF-8 on the wire and sign those very
    bytes, as S3 itself canonicalises what it received: the second reading restores the wire
    bytes. Only requests with a non-ASCII signed header value are checked twice."""
    yield headers
    values = [v for name in signed for v in headers.get(name, ())]
    if all(v.isascii() for v in values):
        return
    try:
        yield {name: [v.encode("latin-1").decode("utf-8", "surrogateescape") for v in vs]
               for name, vs in headers.items()}
    except UnicodeEncodeError:  # values not built from wire bytes: nothing else to try
        return


def verify_claim(claim: AuthClaim, secret: str, now: float, max_skew: float = MAX_SKEW_SECONDS,
                 path_prefix: str = "") -> ChunkSigner | None:
    """Check ``claim`` with the key's ``secret`` at time ``now``.

    Returns the :class:`ChunkSigner` for a signed streaming body (``None`` otherwise). Raises
    :class:`SignatureError` with ``RequestTimeTooSkewed``, ``AccessDenied`` (expired) or
    ``SignatureDoesNotMatch``.
    """
    if claim.kind in ("v4-header", "v4-query"):
        assert claim.credential is not None
        signed_at = parse_amz_date(claim.amz_date)
        if claim.amz_date[:8] != claim.credential.date:
            raise SignatureError("SignatureDoesNotMatch", "the credential date does not match X-Amz-Date")
        if claim.kind == "v4-header":
            if abs(now - signed_at) > max_skew:
                raise SignatureError(
                    "RequestTimeTooSkewed", "The difference between the request time and the current time is too large."
                )
            exclude = ()
        else:
            if signed_at - now > max_skew:
                raise SignatureError("AccessDenied", "Request is not valid yet")
            if now > signed_at + claim.expires:
                raise SignatureError("AccessDenied", "Request has expired")
            exclude = ("X-Amz-Signature",)
        scope = claim.credential.scope
        key = signing_key(secret, claim.credential.date, claim.credential.region, claim.credential.service)
        # the readings are tried in order and the first that matches ends the search (which reading
        # matched tells nothing about the secret; each comparison is constant-time)
        if not any(
            _compare(sign(key, string_to_sign(claim.amz_date, scope, canonical_request(
                claim.method, raw_path, claim.raw_query, headers, claim.signed_headers,
                claim.payload_hash, exclude_query=exclude,
            ))), claim.signature)
            for raw_path, signed_as in _endpoint_readings(claim, path_prefix)
            for headers in _header_readings(signed_as, claim.signed_headers)
        ):
            raise _does_not_match()
        if claim.kind == "v4-header" and claim.payload_hash in (STREAMING_SIGNED, STREAMING_SIGNED_TRAILER):
            return ChunkSigner(key=key, amz_date=claim.amz_date, scope=scope, seed_signature=claim.signature)
        return None
    if claim.kind == "v2-query":
        if now > claim.expires:
            raise SignatureError("AccessDenied", "Request has expired")
        date_text = str(claim.expires)
    elif claim.kind == "v2-header":
        date_text = _first(claim.headers, "x-amz-date") or _first(claim.headers, "date") or ""
        signed_at = parse_http_date(date_text)
        if signed_at is None:
            raise SignatureError("AccessDenied", "AWS authentication requires a valid Date or x-amz-date header")
        if abs(now - signed_at) > max_skew:
            raise SignatureError(
                "RequestTimeTooSkewed", "The difference between the request time and the current time is too large."
            )
        date_text = _first(claim.headers, "date") or ""
    else:  # pragma: no cover - parse_request_auth never builds another kind
        raise SignatureError("AccessDenied", "unsupported authentication")
    # The canonical resource is the path as signed: with an endpoint under a path prefix,
    # botocore signs "/<bucket>/<key>" (the prefix stripped); other clients sign the full path.
    candidates = [None]
    if path_prefix and claim.raw_path.startswith(path_prefix + "/"):
        candidates.insert(0, claim.raw_path[len(path_prefix):])
    matched = False
    for resource in candidates:
        if _compare(_v2_signature(secret, v2_string_to_sign(claim, date_text, resource)), claim.signature):
            matched = True
    if not matched:
        raise _does_not_match()
    return None


def headers_from_pairs(pairs: Iterable[tuple[str | bytes, str | bytes]]) -> dict[str, list[str]]:
    """Build the lower-case ``name -> [values]`` mapping this module expects."""
    result: dict[str, list[str]] = {}
    for name, value in pairs:
        if isinstance(name, bytes):
            name = name.decode("latin-1")
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        result.setdefault(name.lower(), []).append(value)
    return result


def headers_from_raw(items: Iterable[tuple[bytes, Sequence[bytes]]]) -> dict[str, list[str]]:
    """:func:`headers_from_pairs` of ``Headers.getAllRawHeaders()`` (a name and its values), each
    value decoded one character per byte (Latin-1)."""
    result: dict[str, list[str]] = {}
    for name, values in items:
        decoded = [value.decode("latin-1") for value in values]
        key = name.decode("latin-1").lower()
        known = result.get(key)
        if known is None:
            result[key] = decoded
        else:
            known.extend(decoded)
    return result
