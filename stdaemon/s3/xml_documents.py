"""S3 XML documents: responses, error bodies, and the CompleteMultipartUpload request (pure)."""

from __future__ import annotations

import time
import xml.etree.ElementTree as ET
from typing import Iterable, Optional
from urllib.parse import quote
from xml.sax.saxutils import escape

NS = "http://s3.amazonaws.com/doc/2006-03-01/"
HEADER = b'<?xml version="1.0" encoding="UTF-8"?>\n'

#: HTTP status of each S3 error code this daemon answers with.
ERROR_STATUS = {
    "AccessDenied": 403,
    "AuthorizationHeaderMalformed": 400,
    "AuthorizationQueryParametersError": 400,
    "BucketAlreadyOwnedByYou": 409,
    "BadDigest": 400,
    "EntityTooLarge": 400,
    "EntityTooSmall": 400,
    "IncompleteBody": 400,
    "InternalError": 500,
    "InvalidAccessKeyId": 403,
    "InvalidArgument": 400,
    "InvalidChunkSizeError": 403,
    "InvalidBucketName": 400,
    "InvalidDigest": 400,
    "InvalidPart": 400,
    "InvalidPartNumber": 416,
    "InvalidPartOrder": 400,
    "MetadataTooLarge": 400,
    "InvalidRange": 416,
    "InvalidRequest": 400,
    "KeyTooLongError": 400,
    "MalformedXML": 400,
    "MethodNotAllowed": 405,
    "MissingContentLength": 411,
    "NoSuchBucket": 404,
    "NoSuchKey": 404,
    "NoSuchUpload": 404,
    "NotImplemented": 501,
    "OperationAborted": 409,
    "PreconditionFailed": 412,
    "RequestTimeTooSkewed": 403,
    "ServiceUnavailable": 503,
    "SignatureDoesNotMatch": 403,
    "SlowDown": 503,
    "XAmzContentSHA256Mismatch": 400,
}


def iso8601(seconds: float) -> str:
    millis = int(round((seconds - int(seconds)) * 1000)) % 1000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


def http_date(seconds: float) -> str:
    return time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(seconds))


def _el(name: str, value) -> str:
    return f"<{name}>{escape(str(value))}</{name}>"


def _doc(root: str, body: str, namespace: bool = True) -> bytes:
    ns = f' xmlns="{NS}"' if namespace else ""
    return HEADER + f"<{root}{ns}>{body}</{root}>".encode("utf-8")


def error(code: str, message: str, request_id: str = "", resource: str = "", **extra) -> bytes:
    parts = [_el("Code", code), _el("Message", message)]
    for name, value in extra.items():
        if value is not None:
            parts.append(_el(name, value))
    if resource:
        parts.append(_el("Resource", resource))
    if request_id:
        parts.append(_el("RequestId", request_id))
    return _doc("Error", "".join(parts), namespace=False)


def status_for(code: str) -> int:
    return ERROR_STATUS.get(code, 400)


def owner(owner_id: str = "stdaemon", name: str = "stdaemon") -> str:
    return f"<Owner>{_el('ID', owner_id)}{_el('DisplayName', name)}</Owner>"


def list_buckets(buckets: Iterable[tuple[str, float]]) -> bytes:
    items = "".join(
        f"<Bucket>{_el('Name', name)}{_el('CreationDate', iso8601(created))}</Bucket>" for name, created in buckets
    )
    return _doc("ListAllMyBucketsResult", owner() + f"<Buckets>{items}</Buckets>")


def _encode(value: str, url: bool) -> str:
    return quote(value, safe="/~") if url else value


def _contents(objects, url: bool, with_owner: bool) -> str:
    out = []
    for obj in objects:
        out.append(
            "<Contents>"
            + _el("Key", _encode(obj.key, url))
            + _el("LastModified", iso8601(obj.last_modified))
            + _el("ETag", obj.etag)
            + _el("Size", obj.size)
            + (owner() if with_owner else "")
            + _el("StorageClass", "STANDARD")
            + "</Contents>"
        )
    return "".join(out)


def _prefixes(prefixes, url: bool) -> str:
    return "".join(f"<CommonPrefixes>{_el('Prefix', _encode(p, url))}</CommonPrefixes>" for p in prefixes)


def list_objects_v2(bucket: str, page: dict, prefix: str, delimiter: str, max_keys: int, url: bool,
                    continuation_token: Optional[str], next_token: Optional[str], start_after: Optional[str],
                    fetch_owner: bool = False) -> bytes:
    body = [_el("Name", bucket), _el("Prefix", _encode(prefix, url))]
    if start_after:
        body.append(_el("StartAfter", _encode(start_after, url)))
    if continuation_token:
        body.append(_el("ContinuationToken", continuation_token))
    body.append(_el("KeyCount", len(page["contents"]) + len(page["prefixes"])))
    body.append(_el("MaxKeys", max_keys))
    if delimiter:
        body.append(_el("Delimiter", _encode(delimiter, url)))
    if url:
        body.append(_el("EncodingType", "url"))
    body.append(_el("IsTruncated", "true" if page["truncated"] else "false"))
    if next_token:
        body.append(_el("NextContinuationToken", next_token))
    body.append(_contents(page["contents"], url, fetch_owner))
    body.append(_prefixes(page["prefixes"], url))
    return _doc("ListBucketResult", "".join(body))


def list_objects_v1(bucket: str, page: dict, prefix: str, delimiter: str, max_keys: int, url: bool,
                    marker: str) -> bytes:
    body = [_el("Name", bucket), _el("Prefix", _encode(prefix, url)), _el("Marker", _encode(marker, url)),
            _el("MaxKeys", max_keys)]
    if delimiter:
        body.append(_el("Delimiter", _encode(delimiter, url)))
    if url:
        body.append(_el("EncodingType", "url"))
    body.append(_el("IsTruncated", "true" if page["truncated"] else "false"))
    if page["truncated"] and delimiter:
        body.append(_el("NextMarker", _encode(page["next_marker"], url)))
    body.append(_contents(page["contents"], url, True))
    body.append(_prefixes(page["prefixes"], url))
    return _doc("ListBucketResult", "".join(body))


def initiate_multipart(bucket: str, key: str, upload_id: str) -> bytes:
    return _doc("InitiateMultipartUploadResult", _el("Bucket", bucket) + _el("Key", key) + _el("UploadId", upload_id))


#: ``x-amz-checksum-<algorithm>`` → the element name S3 uses in XML documents.
CHECKSUM_ELEMENTS = {"crc32": "ChecksumCRC32", "crc32c": "ChecksumCRC32C", "crc64nvme": "ChecksumCRC64NVME",
                     "sha1": "ChecksumSHA1", "sha256": "ChecksumSHA256"}


def complete_multipart(location: str, bucket: str, key: str, etag: str, checksums: Optional[dict] = None,
                       checksum_type: str = "") -> bytes:
    body = _el("Location", location) + _el("Bucket", bucket) + _el("Key", key) + _el("ETag", etag)
    for algorithm, value in (checksums or {}).items():
        if algorithm in CHECKSUM_ELEMENTS:
            body += _el(CHECKSUM_ELEMENTS[algorithm], value)
    if checksum_type:
        body += _el("ChecksumType", checksum_type)
    return _doc("CompleteMultipartUploadResult", body)


def list_parts(bucket: str, key: str, upload_id: str, parts, max_parts: int, marker: int, truncated: bool,
               next_marker: int) -> bytes:
    body = [_el("Bucket", bucket), _el("Key", key), _el("UploadId", upload_id), owner().replace("Owner", "Initiator"),
            owner(), _el("StorageClass", "STANDARD"), _el("PartNumberMarker", marker),
            _el("NextPartNumberMarker", next_marker), _el("MaxParts", max_parts),
            _el("IsTruncated", "true" if truncated else "false")]
    for part in parts:
        body.append(
            "<Part>" + _el("PartNumber", part.part_number) + _el("LastModified", iso8601(part.last_modified))
            + _el("ETag", part.etag) + _el("Size", part.size)
            + "".join(_el(CHECKSUM_ELEMENTS[a], v) for a, v in (part.checksums or {}).items() if a in CHECKSUM_ELEMENTS)
            + "</Part>"
        )
    return _doc("ListPartsResult", "".join(body))


def list_uploads(bucket: str, uploads) -> bytes:
    body = [_el("Bucket", bucket), _el("KeyMarker", ""), _el("UploadIdMarker", ""), _el("MaxUploads", 1000),
            _el("IsTruncated", "false")]
    for upload_id, upload in uploads:
        body.append("<Upload>" + _el("Key", upload.get("key", "")) + _el("UploadId", upload_id)
                    + _el("Initiated", iso8601(float(upload.get("initiated", 0)))) + "</Upload>")
    return _doc("ListMultipartUploadsResult", "".join(body))


class MalformedXML(ValueError):
    pass


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _parse(data: bytes, root_name: str) -> ET.Element:
    """The root element of a request body, refused unless well-formed, without DTDs and named
    ``root_name``."""
    if b"<!DOCTYPE" in data or b"<!ENTITY" in data:
        raise MalformedXML("DTDs are not accepted")
    try:
        root = ET.fromstring(data)
    except ET.ParseError:
        raise MalformedXML("not well-formed") from None
    if _local(root.tag) != root_name:
        raise MalformedXML("unexpected root element")
    return root


def parse_complete_multipart(data: bytes) -> list[tuple[int, str, dict]]:
    """``[(part number, etag, {checksum name: value})]`` in document order."""
    root = _parse(data, "CompleteMultipartUpload")
    parts = []
    for part in root:
        if _local(part.tag) != "Part":
            continue
        fields = {_local(child.tag): (child.text or "").strip() for child in part}
        try:
            number = int(fields["PartNumber"])
            etag = fields["ETag"]
        except (KeyError, ValueError):
            raise MalformedXML("each Part needs a PartNumber and an ETag") from None
        checksums = {k: v for k, v in fields.items() if k.startswith("Checksum")}
        parts.append((number, etag, checksums))
    return parts


def parse_delete(data: bytes) -> tuple[list[str], bool]:
    """``(keys, quiet)`` of a DeleteObjects request body."""
    root = _parse(data, "Delete")
    keys, quiet = [], False
    for child in root:
        name = _local(child.tag)
        if name == "Quiet":
            quiet = (child.text or "").strip().lower() == "true"
        elif name == "Object":
            key = next((c.text or "" for c in child if _local(c.tag) == "Key"), None)
            if key is None:
                raise MalformedXML("each Object needs a Key")
            keys.append(key)
    return keys, quiet


def delete_result(deleted: Iterable[str], errors: Iterable[tuple[str, str, str]]) -> bytes:
    body = "".join(f"<Deleted>{_el('Key', key)}</Deleted>" for key in deleted)
    body += "".join(f"<Error>{_el('Key', key)}{_el('Code', code)}{_el('Message', message)}</Error>"
                    for key, code, message in errors)
    return _doc("DeleteResult", body)


def access_control_policy() -> bytes:
    """The fixed ACL of every bucket and object: the owner has FULL_CONTROL, nobody else anything."""
    grantee = ('<Grantee xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xsi:type="CanonicalUser">'
               f"{_el('ID', 'stdaemon')}{_el('DisplayName', 'stdaemon')}</Grantee>")
    return _doc("AccessControlPolicy",
                owner() + f"<AccessControlList><Grant>{grantee}{_el('Permission', 'FULL_CONTROL')}</Grant>"
                "</AccessControlList>")


def empty_tagging() -> bytes:
    return _doc("Tagging", "<TagSet></TagSet>")


def versioning_configuration() -> bytes:
    """A bucket whose versioning was never enabled: an empty configuration, as S3 answers."""
    return _doc("VersioningConfiguration", "")


def location_constraint() -> bytes:
    """``us-east-1`` is answered as an empty constraint, as S3 does."""
    return _doc("LocationConstraint", "")
