"""Who calls the S3 surface, decided from the request head alone (S8, S19).

Everything an S3 request is authenticated with is in its head: the SigV4 ``Authorization`` header
(its seed signature covers the headers and the declared payload hash), a presigned V4 or V2 query
string, a V2 ``Authorization: AWS key:sig`` header, the plain ``X-Upload-Token`` /
``X-SimpleTuner-Secret`` header, or an operator's API key. So the storage surface decides *before
the body is read* (``StorageSurface.body_policy`` → ``admit``) and refuses strangers without storing
a byte of what they send; only what can be checked as bytes arrive (the payload hash, chunk
signatures, checksums) is left to the upload itself.

:class:`S3Authenticator` is used both before the body (uploads and other requests with a body) and
by the handlers of body-less requests, so the rules live in one place:

* an operator principal (API key, or a console session) with role ``operator``/``admin`` reads
  everything; ``admin`` also writes;
* a job's upload credential (SigV4/SigV2, or the plain secret header) is valid only while the job
  is live, for its own prefix, plus read-only access to the prefix of the job it resumes from;
* SimpleTuner's publisher signs with the placeholder access key ``local`` *and* sends the secret in
  ``X-SimpleTuner-Secret``: when the secret header is present it authenticates, and a signature by
  a key that was never issued is ignored (a signature by another issued key is refused).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

from stdaemon.http.root import client_ip
from stdaemon.logs import get_logger
from stdaemon.s3 import sigv4
from stdaemon.s3.credentials import UploadCredential, UploadCredentials
from stdaemon.s3.errors import S3Error, access_denied
from stdaemon.s3.keys import key_under_prefix
from stdaemon.users.auth import Authenticator

if TYPE_CHECKING:  # the audit capability's type (its service imports nothing of S3)
    from stdaemon.audit.service import AuditLog

log = get_logger("stdaemon.http.s3_auth")

TOKEN_HEADERS = ("x-upload-token", "x-simpletuner-secret")


def unknown_key(access_key: str) -> S3Error:
    return S3Error("InvalidAccessKeyId", "The AWS Access Key Id you provided does not exist in our records.",
                   AWSAccessKeyId=access_key)


@dataclass
class Caller:
    kind: str  # "job" | "operator"
    credential: Any = None
    #: the verified signature claim (``None`` for operators and for the plain secret header)
    claim: Optional[sigv4.AuthClaim] = None
    #: verifies the chunk-signature chain of a signed streaming body
    signer: Optional[sigv4.ChunkSigner] = None
    can_write: bool = False
    #: prefixes of the job's bucket it may also read (the job it resumes from)
    read_prefixes: tuple = ()

    @property
    def job_id(self) -> Optional[str]:
        return self.credential.job_id if self.kind == "job" else None

    def allowed(self, bucket: str, key: str, write: bool = False) -> bool:
        if self.kind == "operator":
            return True
        if bucket != self.credential.bucket:
            return False
        if key_under_prefix(key, self.credential.prefix):
            return True
        return not write and any(key_under_prefix(key, prefix) for prefix in self.read_prefixes)

    def list_scope(self, bucket: str, prefix: str) -> Optional[str]:
        """The readable prefix a job's listing of ``prefix`` stays inside (its own, or the one of the
        job it resumes from), ``None`` when it may not list there. ``job-1`` (no slash) is allowed
        and filtered to ``job-1/``."""
        if self.kind == "operator":
            return ""
        if bucket != self.credential.bucket:
            return None
        for scope in (self.credential.prefix, *self.read_prefixes):
            if prefix.startswith(scope) or (prefix and scope.startswith(prefix) and len(prefix) >= len(scope) - 1):
                return scope
        return None

    def listing_scope(self, bucket: str, prefix: str) -> Optional[str]:
        """:meth:`list_scope`, and for a listing of a parent of the job's prefix (``""``, ``job``)
        the job's own prefix: only its own entries are shown (s3fs checks the bucket with a
        listing of its root)."""
        scope = self.list_scope(bucket, prefix)
        if scope is None and bucket == self.credential.bucket and self.credential.prefix.startswith(prefix):
            return self.credential.prefix
        return scope


def parsed_headers(request: Any) -> dict[str, list[str]]:
    """The request's headers as ``{lower-case name: [values]}``, each value decoded one character
    per wire byte (Latin-1): what SigV4 signs and what the checksum scan, the stored metadata and
    the conditions read. Built once per request (the head is complete before anything asks) and
    kept on the request; callers only read it."""
    headers = request.requestHeaders
    kept = getattr(request, "_s3_headers", None)
    if kept is not None and kept[0] is headers:
        return kept[1]
    parsed = sigv4.headers_from_raw(headers.getAllRawHeaders())
    try:
        request._s3_headers = (headers, parsed)
    except AttributeError:  # a request object that takes no attributes: parse again next time
        pass
    return parsed


def first(headers: dict[str, list[str]], name: str) -> Optional[str]:
    """The first value of a lower-case header ``name`` in :func:`parsed_headers`."""
    values = headers.get(name)
    return values[0] if values else None


def header_items(headers: dict[str, list[str]]):
    """``(lower-case name, value)`` pairs of :func:`parsed_headers`, in the order they arrived."""
    return ((name, value) for name, values in headers.items() for value in values)


def header_pairs(headers: Any):
    """``(lower-case name, value)`` pairs of a twisted ``Headers`` (prefer :func:`parsed_headers`,
    which decodes them once per request)."""
    for name, values in headers.getAllRawHeaders():
        for value in values:
            yield name.decode("latin-1").lower(), value.decode("latin-1")


def presents_principal(headers: dict[str, list[str]]) -> bool:
    """The head (:func:`parsed_headers`) carries what an operator authenticates with (API key,
    bearer token, session cookie)."""
    if headers.get("x-api-key") or headers.get("cookie"):
        return True
    authorization = (first(headers, "authorization") or "").strip()
    return authorization[:7].lower() == "bearer "


class S3Authenticator:
    """The S3 surface's authentication rules (``StorageSurface.auth``).

    ``principal_auth`` authenticates operators (API keys, console sessions); ``denied`` records a
    refusal (the surface's :meth:`~stdaemon.s3.http.StorageSurface.denied`, which audits it)."""

    def __init__(self, credentials: UploadCredentials, principal_auth: Authenticator, clock: Any,
                 path_prefix: str, denied: Callable[..., None]):
        self.credentials = credentials
        self.principal_auth = principal_auth
        self.clock = clock  # IReactorTime
        self.path_prefix = path_prefix
        self.denied = denied

    async def principal_from_head(self, request: Any, method: bytes) -> Any:
        """The operator principal of a request whose body has not been read (the root has not
        authenticated it yet). ``None`` when it presents none or a wrong one."""
        if not presents_principal(parsed_headers(request)):
            return None
        request.method = method  # not set before the body; the session strategy checks CSRF by it
        try:
            return await self.principal_auth.authenticate(request)
        except Exception:  # a CSRF refusal, a bad cookie: not an operator
            return None

    async def authenticate(self, request: Any, method: str, raw_path: str, raw_query: str,
                           principal: Any = None, target: str = "") -> Caller:
        """The caller, or ``S3Error``/``sigv4.SignatureError`` (audited as ``upload.denied``)."""
        if principal is not None:
            if principal.role not in ("admin", "operator"):
                raise access_denied()
            return Caller("operator", can_write=principal.role == "admin")
        headers = parsed_headers(request)
        claim = sigv4.parse_request_auth(method, raw_path, raw_query, headers)
        now = self.clock.seconds()
        token = next((value for value in (first(headers, name) for name in TOKEN_HEADERS) if value), None)
        if token:
            cred = await self.credentials.lookup_token(token.strip())
            if cred is None or not cred.active(now) or not await self.credentials.check_job_active(cred):
                self.denied(request, "bad upload token", target=target)
                raise access_denied()
            verified, signer = None, None
            if claim is not None:
                if claim.access_key == cred.access_key_id:
                    verified, signer = claim, self._verify(request, claim, cred, now, target)
                elif await self.credentials.lookup(claim.access_key) is not None:
                    self.denied(request, "signed by another credential than the upload token", claim.access_key,
                                target)
                    raise access_denied()
                # else: a placeholder key (SimpleTuner signs with "local"); the secret proved possession
            return await self._job_caller(cred, verified, signer)
        if claim is None:
            raise access_denied()
        cred = await self.credentials.lookup(claim.access_key)
        if cred is None:
            self.denied(request, "unknown access key", claim.access_key, target)
            raise unknown_key(claim.access_key)
        if not cred.active(now) or not await self.credentials.check_job_active(cred):
            self.denied(request, "revoked or expired credentials", claim.access_key, target)
            raise unknown_key(claim.access_key)
        signer = self._verify(request, claim, cred, now, target)
        return await self._job_caller(cred, claim, signer)

    def _verify(self, request: Any, claim: sigv4.AuthClaim, cred: Any, now: float, target: str) -> Any:
        try:
            return sigv4.verify_claim(claim, cred.secret, now, path_prefix=self.path_prefix)
        except sigv4.SignatureError as exc:
            self.denied(request, f"signature: {exc.code}", claim.access_key, target)
            raise

    async def _job_caller(self, cred: UploadCredential, claim: Optional[sigv4.AuthClaim], signer: Any) -> Caller:
        extra = tuple(await self.credentials.read_prefixes(cred))
        return Caller("job", credential=cred, claim=claim, signer=signer, can_write=True, read_prefixes=extra)


def record_denial(audit: "AuditLog", trusted_proxies: Any, request: Any, reason: str, access_key: str = "",
                  target: str = "") -> None:
    """Log and audit a refused request (``upload.denied``), sampled so a flood stays bounded."""
    ip = getattr(request, "client_ip", "") or None
    if ip is None and getattr(request, "channel", None) is not None:
        # before the body: the root has not derived it yet
        ip = client_ip(request, trusted_proxies)
    log.info("S3 request refused: {reason}", reason=reason, ip=ip)
    channel = getattr(request, "channel", None)
    method = getattr(request, "method", None) or getattr(channel, "_command", b"PUT")
    if not target:
        path = getattr(request, "path", None) or getattr(channel, "_path", b"") or b""
        target = path.decode("latin-1", "replace")
    fields = dict(actor="anonymous", ip=ip, target=target[:200], action=method.decode("latin-1", "replace"),
                  details={"reason": reason, "access_key_id": access_key[:64]})
    audit.record_soon("upload.denied", sampled=True, **fields)
