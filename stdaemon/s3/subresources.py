"""Which S3 operation a request names, from its method, level and query (pure).

S3 multiplexes dozens of operations onto a handful of paths: ``PUT /bucket/key?acl`` is
PutObjectAcl, not PutObject. A server that ignores a sub-resource it does not know treats such a
request as the plain object operation — ``aws s3api put-object-acl`` would then overwrite the object
with an empty body, ``put-object-tagging`` with the tagging XML, ``delete-object-tagging`` would
delete the object. So every sub-resource S3 defines is recognised here, and :func:`classify`
tells the surface which operation a request is: one it implements (:data:`IMPLEMENTED`), or one
it must refuse with ``501 NotImplemented`` before reading the body or changing anything.

The names come from the S3 API reference (the query parameters that select an operation); the
table is hand-written because no maintained Python library exposes this mapping for servers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

#: Every query parameter S3 uses to select an operation on a bucket or an object.
SUBRESOURCES = frozenset({
    "accelerate", "acl", "analytics", "attributes", "cors", "delete", "encryption",
    "intelligent-tiering", "inventory", "legal-hold", "lifecycle", "location", "logging",
    "metadataConfiguration", "metadataTable", "metrics", "notification", "object-lock",
    "ownershipControls", "policy", "policyStatus", "publicAccessBlock", "renameObject",
    "replication", "requestPayment", "restore", "retention", "select", "select-type", "session",
    "tagging", "torrent", "uploadId", "uploads", "versioning", "versions", "website",
})

BUCKET = "bucket"
OBJECT = "object"

#: (level, method, sub-resource or "") → the S3 operation this daemon implements.
#: ``HEAD`` is listed where it differs from ``GET``. Anything absent answers 501 NotImplemented
#: (``CreateBucket``/``DeleteBucket`` are answered by the surface: buckets are configured).
IMPLEMENTED: dict[tuple[str, str, str], str] = {
    (BUCKET, "GET", ""): "ListObjects/ListObjectsV2",
    (BUCKET, "HEAD", ""): "HeadBucket",
    (BUCKET, "PUT", ""): "CreateBucket (answers BucketAlreadyOwnedByYou)",
    (BUCKET, "GET", "location"): "GetBucketLocation",
    (BUCKET, "GET", "uploads"): "ListMultipartUploads",
    (BUCKET, "POST", "delete"): "DeleteObjects",
    (BUCKET, "GET", "acl"): "GetBucketAcl (fixed: owner FULL_CONTROL)",
    (BUCKET, "GET", "versioning"): "GetBucketVersioning (never enabled)",
    (OBJECT, "GET", ""): "GetObject",
    (OBJECT, "HEAD", ""): "HeadObject",
    (OBJECT, "PUT", ""): "PutObject",
    (OBJECT, "DELETE", ""): "DeleteObject",
    (OBJECT, "POST", "uploads"): "CreateMultipartUpload",
    (OBJECT, "PUT", "uploadId"): "UploadPart",
    (OBJECT, "POST", "uploadId"): "CompleteMultipartUpload",
    (OBJECT, "DELETE", "uploadId"): "AbortMultipartUpload",
    (OBJECT, "GET", "uploadId"): "ListParts",
    (OBJECT, "HEAD", "uploadId"): "ListParts",
    (OBJECT, "GET", "acl"): "GetObjectAcl (fixed: owner FULL_CONTROL)",
    (OBJECT, "PUT", "acl"): "PutObjectAcl (only the canned 'private' ACL, which changes nothing)",
    (OBJECT, "GET", "tagging"): "GetObjectTagging (objects carry no tags)",
}

#: Methods S3 defines on its paths; any other answers 405 MethodNotAllowed.
METHODS = ("GET", "HEAD", "PUT", "POST", "DELETE")


@dataclass(frozen=True)
class Operation:
    level: str              # BUCKET | OBJECT
    method: str             # upper case
    subresource: str        # "" for the plain operation
    name: Optional[str]     # the implemented operation, None when it must answer 501

    @property
    def implemented(self) -> bool:
        return self.name is not None


def subresource_of(query_names: Iterable[str]) -> str:
    """The sub-resource a query names ("" for none). ``uploadId`` wins over ``uploads`` and
    ``partNumber`` is an argument, not an operation; with several, the first known one in
    sorted order is returned so the answer never depends on parameter order."""
    names = {n for n in query_names if n in SUBRESOURCES}
    if not names:
        return ""
    if "uploadId" in names and len(names) == 1:
        return "uploadId"
    others = sorted(names - {"uploadId"})
    return others[0] if others else "uploadId"


def classify(level: str, method: str, query_names: Iterable[str]) -> Operation:
    method = method.upper()
    sub = subresource_of(query_names)
    name = IMPLEMENTED.get((level, method, sub))
    if name is None and method == "HEAD":
        name = IMPLEMENTED.get((level, "GET", sub)) if sub else None
    return Operation(level, method, sub, name)


def not_implemented_message(op: Operation) -> str:
    what = f"?{op.subresource}" if op.subresource else "this operation"
    return f"{op.method} {what} on {'an' if op.level == OBJECT else 'a'} {op.level} is not implemented by this endpoint; nothing was changed"
