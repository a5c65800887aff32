"""The S3-compatible storage surface (S8), path-style under ``/api/cloud/storage``: routes, the
request parsed, the S3 service (:mod:`stdaemon.s3.service`, ``app.s3``) called, the S3 answer
shaped. Errors are S3 XML documents with S3 codes and statuses (:mod:`stdaemon.s3.errors`).

Size: a little over 500 lines because every S3 operation's route is here, each a few lines of
parse-call-answer; the work they call lives in the modules named below.

Request flow for an upload (PutObject / UploadPart):

1. when the headers are complete (``body_policy`` → ``admit``), before a byte of the body is
   read, the caller is authenticated from the head (:mod:`stdaemon.s3.auth`: SigV4
   header/presigned, SigV2, operator API key, ``X-Upload-Token``/``X-SimpleTuner-Secret``) and
   the key checked against its scope; a refusal is answered at once and nothing is stored.
2. admitted, the surface installs an :class:`~stdaemon.s3.uploads.UploadSink` as
   ``request.content``, which decodes, hashes and writes the body off the reactor thread as it
   arrives, with flat memory.
3. when the body is complete the handler waits for the sink, verifies the payload hash and
   checksums (:mod:`stdaemon.s3.digests`), and only then renames the temp file into place
   (:mod:`stdaemon.s3.objects`). Any failure deletes the temp file: nothing partial is ever visible.

Downloads are sent by :mod:`stdaemon.s3.downloads`.
"""

from __future__ import annotations

import hmac
from typing import Any, Optional

from klein import Klein
from twisted.internet import defer
from twisted.web.server import NOT_DONE_YET

from stdaemon.app import App
from stdaemon.http.errors import ApiError
from stdaemon.http.request import BodyPolicy, RejectBody
from stdaemon.http.root import client_ip
from stdaemon.http.surface import PUBLIC, Response, Surface, route
from stdaemon.logs import get_logger
from stdaemon.s3 import (
    checksums as s3_checksums, digests, subresources as s3_subresources, xml_documents as s3_xml, sigv4,
)
from stdaemon.s3.answers import S3Headers, api_error_document, xml_error
from stdaemon.s3.auth import Caller, S3Authenticator, header_items, parsed_headers, record_denial
from stdaemon.s3.downloads import get_object, gone
from stdaemon.s3.errors import (
    REASONS, S3Error, access_denied, as_s3_error, internal_error, malformed_xml, missing_bucket,
)
from stdaemon.s3.keys import InvalidKey, validate_key
from stdaemon.s3.listing import continuation_token, parse_listing
from stdaemon.s3.multipart import MAX_PART_SIZE
from stdaemon.s3.parsing import (
    PREFIX, SMALL_BODY, query_of, read_small_body, split, stored_metadata, verify_small_body,
    write_conditions,
)
from stdaemon.s3.service import Target
from stdaemon.s3.uploads import UploadSink

log = get_logger("stdaemon.http.storage")

GIB = 1024 ** 3
#: PutObject's single-request limit (S3: 5 GiB); larger objects use multipart.
MAX_PUT_BYTES = 5 * GIB
#: Slack for aws-chunked framing on top of the decoded limit.
CHUNK_OVERHEAD = 64 * 1024 * 1024


class StorageSurface(Surface):
    """Reads ``app.s3``, ``app.upload_credentials`` and ``app.auth`` when built; ``app.audit``,
    ``app.trusted_proxies`` and ``app.rate_limit_middleware`` when a request is refused."""

    app = Klein()
    prefixes = (PREFIX,)

    def __init__(self, ctx: App, max_put_bytes: int = MAX_PUT_BYTES):
        super().__init__(ctx)
        self.s3 = ctx.s3
        self.max_put_bytes = max_put_bytes
        self.auth = S3Authenticator(ctx.upload_credentials, ctx.auth, ctx.clock, PREFIX, self.denied)

    def _max_size(self, target: Target) -> int:
        """The largest body an upload to ``target`` may store (a part, or a whole object)."""
        return MAX_PART_SIZE if target.upload_id else self.max_put_bytes

    def rate_limit_exempt(self, request: Any, match: Any) -> bool:
        """UploadPart of a multipart upload in progress is not counted by the
        rate limiter: a checkpoint of a few GiB is hundreds of parts, and
        counting each against the storage rule (50/min per IP) would fail any
        large upload from a non-loopback client.  The CreateMultipartUpload
        that started the upload was counted, and a part still has to pass
        the upload's SigV4 authentication."""
        if request.method != b"PUT":
            return False
        upload_id = request.args.get(b"uploadId")
        part_number = request.args.get(b"partNumber")
        bucket = match.args.get("bucket")
        if not upload_id or not part_number or not bucket:
            return False
        try:
            return self.s3.upload_in_progress(bucket, upload_id[0].decode("ascii"))
        except UnicodeDecodeError:
            return False

    def body_policy(self, method: bytes, raw_path: bytes, headers: Any, match: Any) -> BodyPolicy:
        def too_large(limit: int) -> tuple[bytes, bytes]:
            return b"application/xml", s3_xml.error("EntityTooLarge",
                                                    "Your proposed upload exceeds the maximum allowed size")

        def admit_small(request: Any, length: Optional[int]) -> Optional[defer.Deferred]:
            if length == 0:
                return None  # nothing to store: the handler authenticates
            return defer.ensureDeferred(self.admit(request, raw_path, None, None, length, match))

        small = BodyPolicy(max_bytes=SMALL_BODY, too_large=too_large, admit=admit_small)
        if method.upper() != b"PUT":
            return small
        self.s3.refresh_buckets()
        try:
            path_only, raw_query, bucket, key = split(raw_path)
        except S3Error:
            return small
        if not key:
            return small
        query = dict(sigv4.parse_query(raw_query))
        names = [n.decode("latin-1") for n in query]
        if s3_subresources.subresource_of(names) not in ("", "uploadId"):
            # PutObjectAcl, PutObjectTagging, …: a small XML body, never an object upload
            return small
        upload_id = query.get(b"uploadId")
        target = Target(bucket, key)
        error = None
        if upload_id is not None:
            target.upload_id = upload_id.decode("latin-1")
            try:
                target.part_number = int(query.get(b"partNumber", b"0"))
            except ValueError:
                error = S3Error("InvalidArgument", "Part number must be an integer between 1 and 10000, inclusive")
        try:
            validate_key(key)
        except InvalidKey as exc:
            error = S3Error(exc.code, exc.message)
        if headers.getRawHeaders(b"x-amz-copy-source"):
            error = S3Error("NotImplemented", "Copying objects is not supported by this endpoint", 400)
        limit = (MAX_PART_SIZE if upload_id is not None else self.max_put_bytes) + CHUNK_OVERHEAD

        def admit(request: Any, length: Optional[int]) -> defer.Deferred:
            return defer.ensureDeferred(self.admit(request, raw_path, target, error, length, match))

        def sink(request: Any, length: Optional[int]) -> UploadSink:
            return UploadSink(self.s3, request, length, target, self._max_size(target),
                              getattr(request, "s3_caller", None))

        return BodyPolicy(max_bytes=limit, sink_factory=sink, too_large=too_large, admit=admit)

    # -- authentication ------------------------------------------------------------------------

    async def admit(self, request: Any, raw_uri: bytes, target: Optional[Target], error: Optional[S3Error],
                    length: Optional[int], match: Any = None) -> None:
        """Before the body: authenticate the caller from the head and, for an upload, check what is
        certain to fail (scope, key, size). Raises ``RejectBody`` (S3 XML) to refuse; otherwise the
        caller is kept as ``request.s3_caller`` for the handler. A refusal counts against the
        client's rate limit as the request would have after its body (the root never sees it);
        once over the limit the answer is ``SlowDown`` (429) instead."""
        channel = request.channel
        method = getattr(channel, "_command", b"PUT")
        try:
            raw_path, raw_query, bucket, key = split(raw_uri)
            principal = await self.auth.principal_from_head(request, method)
            caller = await self.auth.authenticate(request, method.decode("latin-1"), raw_path, raw_query,
                                                  principal, target=raw_path)
            if target is not None:
                if not self.s3.has_bucket(bucket):
                    raise missing_bucket(bucket)
                if not caller.allowed(bucket, key, write=True) or not caller.can_write:
                    self.denied(request, "key outside the credential's prefix", target=raw_path)
                    raise access_denied()
                if error is not None:
                    raise error
                streaming = (request.requestHeaders.getRawHeaders(b"x-amz-decoded-content-length")
                             or b"aws-chunked" in b",".join(request.requestHeaders.getRawHeaders(b"content-encoding")
                                                            or []).lower())
                if length is not None and not streaming \
                        and length > self._max_size(target):
                    raise S3Error("EntityTooLarge", "Your proposed upload exceeds the maximum allowed size")
        except Exception as exc:
            try:
                err = as_s3_error(exc)
            except Exception:
                log.failure("S3 admission failed")
                err = internal_error()
            headers = {}
            if err.status < 500:
                slow_down = await self._count_refusal(request, raw_uri, match)
                if slow_down is not None:
                    err, headers = slow_down
            body = s3_xml.error(err.code, err.message, "", "", **err.extra)
            raise RejectBody(err.status, REASONS.get(err.status, b"Error"), b"application/xml", body,
                             headers) from None
        request.s3_caller = caller

    async def _count_refusal(self, request: Any, raw_uri: bytes, match: Any) -> Optional[tuple]:
        """Count a refused request with the rate limiter; ``(S3Error, headers)`` when over the limit."""
        limiter = self.ctx.rate_limit_middleware
        if match is None:
            return None
        # what the limiter reads, before the request line was handed to the request
        request.path = raw_uri.split(b"?", 1)[0]
        request.args = {}
        request.client_ip = request.client_ip or client_ip(request, self.ctx.trusted_proxies)
        try:
            await limiter(request, match)
        except ApiError as exc:
            if exc.status != 429:
                return None
            return S3Error("SlowDown", "Please reduce your request rate.", 429), dict(exc.headers)
        except Exception:
            log.failure("Rate limiting a refused S3 request failed")
        return None

    async def authenticate(self, request: Any, raw_path: str, raw_query: str) -> Caller:
        """The caller of a request: admitted before its body (``request.s3_caller``) or
        authenticated now from its head (requests without a body)."""
        caller = getattr(request, "s3_caller", None)
        if caller is not None:
            return caller
        return await self.auth.authenticate(request, request.method.decode("latin-1"), raw_path, raw_query,
                                            getattr(request, "principal", None))

    def denied(self, request: Any, reason: str, access_key: str = "", target: str = "") -> None:
        """Audit a refused request (``upload.denied``), sampled so a flood stays bounded."""
        record_denial(self.ctx.audit, self.ctx.trusted_proxies, request, reason, access_key, target)

    def render_api_error(self, request: Any, error: Any) -> bytes:
        """What the root answers on S3 paths (405 for a method S3 does not have, 429 from the rate
        limiter, …) as an S3 XML error that SDKs parse (and retry, for ``SlowDown``)."""
        return api_error_document(request, error)

    # -- routes --------------------------------------------------------------------------------

    @route(app, PREFIX, methods=("GET", "HEAD"), access=PUBLIC)
    async def list_buckets(self, request: Any) -> Any:
        return await self._dispatch(request, self._list_buckets)

    @route(app, PREFIX + "/", methods=("GET", "HEAD"), access=PUBLIC)
    async def list_buckets_slash(self, request: Any) -> Any:
        return await self._dispatch(request, self._list_buckets)

    @route(app, PREFIX + "/<bucket>", methods=s3_subresources.METHODS, access=PUBLIC)
    async def bucket(self, request: Any, bucket: str) -> Any:
        return await self._dispatch(request, self._bucket)

    @route(app, PREFIX + "/<bucket>/", methods=s3_subresources.METHODS, access=PUBLIC)
    async def bucket_slash(self, request: Any, bucket: str) -> Any:
        return await self._dispatch(request, self._bucket)

    @route(app, PREFIX + "/<bucket>/<path:key>", methods=s3_subresources.METHODS, access=PUBLIC)
    async def object(self, request: Any, bucket: str, key: str) -> Any:
        return await self._dispatch(request, self._object)

    async def _dispatch(self, request: Any, handler: Any) -> Any:
        if not isinstance(request.responseHeaders, S3Headers):
            request.responseHeaders = S3Headers(dict(request.responseHeaders.getAllRawHeaders()))
        request.setHeader("x-amz-request-id", getattr(request, "correlation_id", ""))
        if not isinstance(getattr(request, "content", None), UploadSink):
            self.s3.refresh_buckets()
        resource = ""
        try:
            raw_path, raw_query, bucket, key = split(request.uri)
            resource = f"/{bucket}/{key}" if key else (f"/{bucket}" if bucket else "/")
            return await handler(request, raw_path, raw_query, bucket, key)
        except Exception as exc:
            content = getattr(request, "content", None)
            if isinstance(content, UploadSink):
                await content.discard()
            if gone(request):
                # the client hung up (Klein cancels the handler): nobody to answer, nothing to log
                log.debug("S3 request ended by the client: {error!r}", error=exc)
                return NOT_DONE_YET
            try:
                err = as_s3_error(exc)
            except Exception:
                log.failure("S3 request failed")
                err = internal_error()
            if request.method == b"HEAD":
                request.setResponseCode(err.status)
                request.setHeader("x-amz-error-code", err.code)
                return Response(body=b"", status=err.status)
            return xml_error(request, err, resource)

    async def _delete_objects(self, request: Any, caller: Caller, bucket: str) -> Any:
        body = read_small_body(request)
        verify_small_body(request, caller, body)
        try:
            keys, quiet = s3_xml.parse_delete(body)
        except s3_xml.MalformedXML:
            raise malformed_xml() from None
        if len(keys) > 1000:
            raise S3Error("MalformedXML", "A DeleteObjects request may name at most 1000 keys")
        deleted, errors = await self.s3.delete_objects(caller, bucket, keys)
        return Response(body=s3_xml.delete_result([] if quiet else deleted, errors), content_type="application/xml")

    async def _list_buckets(self, request, raw_path, raw_query, bucket, key) -> Any:
        caller = await self.authenticate(request, raw_path, raw_query)
        buckets = await self.s3.list_buckets(caller)
        return Response(body=s3_xml.list_buckets(buckets), content_type="application/xml")

    async def _bucket(self, request, raw_path, raw_query, bucket, key) -> Any:
        caller = await self.authenticate(request, raw_path, raw_query)
        if not self.s3.has_bucket(bucket):
            raise missing_bucket(bucket)
        query = query_of(raw_query)
        op = s3_subresources.classify(s3_subresources.BUCKET, request.method.decode("latin-1"), query)
        own_bucket = caller.kind == "operator" or caller.credential.bucket == bucket
        if not op.implemented:
            raise S3Error("NotImplemented", s3_subresources.not_implemented_message(op))
        if op.method == "PUT" and not op.subresource:
            # CreateBucket: buckets are configured, never created; S3 clients (rclone by default)
            # create the bucket before their first upload and take this answer as success
            if not own_bucket:
                raise access_denied()
            raise S3Error("BucketAlreadyOwnedByYou", "Your previous request to create the named bucket "
                          "succeeded and you already own it.", BucketName=bucket)
        if op.method == "POST":
            return await self._delete_objects(request, caller, bucket)
        if op.subresource in ("location", "acl", "versioning"):
            if not own_bucket:
                raise access_denied()
            body = {"location": s3_xml.location_constraint, "acl": s3_xml.access_control_policy,
                    "versioning": s3_xml.versioning_configuration}[op.subresource]()
            return Response(body=body, content_type="application/xml")
        if op.method == "HEAD":
            if not own_bucket:
                raise access_denied()
            return Response(body=b"", headers={"x-amz-bucket-region": "us-east-1"})
        if op.subresource == "uploads":
            if caller.kind != "operator":
                raise access_denied()
            uploads = await self.s3.list_uploads(bucket)
            return Response(body=s3_xml.list_uploads(bucket, uploads), content_type="application/xml")
        prefix = query.get("prefix", "")
        scope = None
        if caller.kind == "job":
            scope = caller.listing_scope(bucket, prefix)
            if scope is None:
                raise access_denied()
        listing = parse_listing(query)
        page = await self.s3.list_page(bucket, listing.prefix, listing.delimiter, listing.after, listing.max_keys,
                                       scope)
        if listing.v2:
            body = s3_xml.list_objects_v2(bucket, page, listing.prefix, listing.delimiter, listing.max_keys,
                                          listing.url, listing.token, continuation_token(page),
                                          listing.start_after, fetch_owner=listing.fetch_owner)
        else:
            body = s3_xml.list_objects_v1(bucket, page, listing.prefix, listing.delimiter, listing.max_keys,
                                          listing.url, listing.after)
        return Response(body=body, content_type="application/xml")

    async def _object(self, request, raw_path, raw_query, bucket, key) -> Any:
        method = request.method.decode("latin-1").upper()
        caller = await self.authenticate(request, raw_path, raw_query)
        if not self.s3.has_bucket(bucket):
            raise missing_bucket(bucket)
        if not caller.allowed(bucket, key, write=method not in ("GET", "HEAD")):
            self.denied(request, "key outside the credential's prefix")
            raise access_denied()
        if method in ("PUT", "POST", "DELETE") and not caller.can_write:
            raise access_denied()
        query = query_of(raw_query)
        try:
            validate_key(key)
        except InvalidKey:
            if method in ("GET", "HEAD"):
                raise S3Error("NoSuchKey", "The specified key does not exist.", Key=key) from None
            raise
        if query.get("versionId", "null") != "null":
            # versioning is never enabled: "null" is the only version an object has, and a
            # DeleteObject naming another version must not delete the current one
            raise S3Error("InvalidArgument", "Invalid version id specified", ArgumentName="versionId",
                          ArgumentValue=query["versionId"][:128])
        op = s3_subresources.classify(s3_subresources.OBJECT, method, query)
        if not op.implemented:
            if op.method == "POST" and not op.subresource:
                raise S3Error("InvalidRequest", "This POST request is not supported")
            raise S3Error("NotImplemented", s3_subresources.not_implemented_message(op))
        if op.subresource in ("acl", "tagging"):
            return await self._object_subresource(request, caller, bucket, key, op)
        if method == "PUT":
            return await self._put(request, caller, bucket, key, query)
        if method == "POST":
            if op.subresource == "uploads":
                return await self._create_multipart(request, bucket, key)
            return await self._complete_multipart(request, caller, bucket, key, query["uploadId"])
        if method == "DELETE":
            if op.subresource == "uploadId":
                await self.s3.abort_multipart(bucket, key, query["uploadId"])
            else:
                await self.s3.delete(bucket, key)
            return Response(body=b"", status=204)
        if op.subresource == "uploadId":
            return await self._list_parts(request, bucket, key, query)
        return await get_object(self.s3, request, bucket, key, query)

    async def _object_subresource(self, request: Any, caller: Caller, bucket: str, key: str,
                                  op: s3_subresources.Operation) -> Any:
        """The fixed ACL and empty tag set every object has; ``PUT ?acl`` accepts only the canned
        ``private`` ACL (what every object already is) and changes nothing."""
        await self.s3.head(bucket, key)  # NoSuchKey when absent
        if op.method == "PUT":
            body = read_small_body(request)
            verify_small_body(request, caller, body)
            canned = (request.getHeader("x-amz-acl") or "").strip().lower()
            grants = any(name.startswith("x-amz-grant-") for name in parsed_headers(request))
            if canned != "private" or grants or body.strip():
                raise S3Error("NotImplemented", "Only the canned 'private' ACL is supported; objects are private "
                              "to their job and the operators. Nothing was changed.")
            return Response(body=b"")
        body = s3_xml.access_control_policy() if op.subresource == "acl" else s3_xml.empty_tagging()
        return Response(body=body, content_type="application/xml")

    # -- uploads -------------------------------------------------------------------------------

    async def _put(self, request: Any, caller: Caller, bucket: str, key: str, query: dict) -> Any:
        sink = request.content
        if not isinstance(sink, UploadSink):
            raise S3Error("InvalidRequest", "The request body could not be read")
        target = sink.target
        now = self.s3.clock.seconds()

        def verify_and_commit(pending: Any) -> tuple:
            # in the s3-io thread, in the same call that wrote and fsynced the body: one hop per object
            checksums, response_headers = self._verified(request, sink, pending)
            if target.upload_id:
                part = self.s3.place_part(target, pending, checksums, now)
                return part.size, False, part.etag, response_headers
            content_type, system, user = stored_metadata(request)
            conditions = write_conditions(request)
            info = self.s3.place_object(bucket, key, pending, checksums, content_type, user, system, conditions,
                                        now)
            return info.size, True, info.etag, response_headers

        size, object_completed, etag, response_headers = await sink.finished(verify_and_commit)
        sink.committed(size, object_completed=object_completed)
        response_headers["ETag"] = etag
        return Response(body=b"", headers=response_headers)

    @staticmethod
    def _verified(request: Any, sink: UploadSink, pending: Any) -> tuple[dict, dict]:
        """The body's digests checked against what the client sent: ``(checksums, response headers)``;
        ``S3Error`` on a mismatch. Pure computation on the request's headers."""
        headers = request.requestHeaders
        # chunk signatures were verified as the chunks arrived (the signer was known before the body)
        payload_hash = (headers.getRawHeaders(b"x-amz-content-sha256") or [b""])[0].decode("latin-1").strip()
        if sink.decoder is not None and payload_hash not in sigv4.STREAMING_PAYLOADS \
                and payload_hash not in ("", sigv4.UNSIGNED_PAYLOAD):
            # aws-chunked without a streaming payload hash: only the unsigned trailer form is acceptable
            raise digests.sha256_mismatch()
        if len(payload_hash) == 64 and sink.decoder is None:
            digests.check_payload_sha256(payload_hash, pending.sha256.hexdigest() if pending.sha256 is not None
                                         else None)
        md5_header = request.getHeader("content-md5")
        if md5_header is not None:
            digests.check_content_md5(md5_header, pending.md5.digest(), strict_length=True)
        checksums = {}
        for algorithm in sink.checksum_algorithms:
            given = (headers.getRawHeaders(f"x-amz-checksum-{algorithm}") or [""])[0].strip()
            computed = pending.checksum_b64(algorithm)
            if not hmac.compare_digest(given.encode(), computed.encode()):
                raise digests.checksum_mismatch(algorithm)
            checksums[algorithm] = computed
        if sink.decoder is not None:
            for name, value in sink.decoder.trailers.items():
                algorithm = s3_checksums.algorithm_from_header(name)
                if algorithm:
                    checksums[algorithm] = value
        response_headers = {}
        for algorithm, value in checksums.items():
            response_headers[f"x-amz-checksum-{algorithm}"] = value
        return checksums, response_headers

    async def _create_multipart(self, request: Any, bucket: str, key: str) -> Any:
        algorithm = request.getHeader("x-amz-checksum-algorithm")
        if algorithm and algorithm.lower() not in s3_checksums.ALGORITHMS:
            raise S3Error("InvalidArgument", "Checksum algorithm provided is unsupported.")
        checksum_type = (request.getHeader("x-amz-checksum-type") or "").upper() or None
        if checksum_type not in (None, "COMPOSITE", "FULL_OBJECT"):
            raise S3Error("InvalidArgument", "Value for x-amz-checksum-type header is invalid.")
        content_type, system, user = stored_metadata(request)
        upload_id = await self.s3.create_multipart(bucket, key, content_type, user,
                                                   algorithm.lower() if algorithm else None, system, checksum_type)
        headers = {}
        if algorithm:
            headers["x-amz-checksum-algorithm"] = algorithm
        if checksum_type:
            headers["x-amz-checksum-type"] = checksum_type
        return Response(body=s3_xml.initiate_multipart(bucket, key, upload_id), headers=headers,
                        content_type="application/xml")

    async def _complete_multipart(self, request: Any, caller: Caller, bucket: str, key: str, upload_id: str) -> Any:
        body = read_small_body(request)
        # x-amz-checksum-* on Complete describe the object, not this XML body
        verify_small_body(request, caller, body, checksums=False)
        try:
            parts = s3_xml.parse_complete_multipart(body)
        except s3_xml.MalformedXML:
            raise malformed_xml() from None
        object_checksum = None
        for name, value in header_items(parsed_headers(request)):
            algorithm = s3_checksums.algorithm_from_header(name)
            if algorithm:
                object_checksum = (algorithm, value)
        info = await self.s3.complete_multipart(bucket, key, upload_id, parts, object_checksum,
                                                write_conditions(request))
        location = f"{PREFIX}/{bucket}/{key}"
        headers = {}
        for algorithm, value in info.checksums.items():
            headers[f"x-amz-checksum-{algorithm}"] = value
        if info.checksum_type:
            headers["x-amz-checksum-type"] = info.checksum_type
        return Response(body=s3_xml.complete_multipart(location, bucket, key, info.etag, info.checksums,
                                                       info.checksum_type),
                        headers=headers, content_type="application/xml")

    async def _list_parts(self, request: Any, bucket: str, key: str, query: dict) -> Any:
        upload, parts = await self.s3.list_parts(bucket, key, query["uploadId"])
        try:
            marker = int(query.get("part-number-marker", "0") or 0)
            max_parts = min(int(query.get("max-parts", "1000") or 1000), 1000)
        except ValueError:
            raise S3Error("InvalidArgument", "part-number-marker and max-parts must be integers") from None
        remaining = [p for p in parts if p.part_number > marker]
        page = remaining[:max_parts]
        truncated = len(remaining) > max_parts
        next_marker = page[-1].part_number if page else marker
        return Response(body=s3_xml.list_parts(bucket, key, query["uploadId"], page, max_parts, marker, truncated,
                                               next_marker), content_type="application/xml")
