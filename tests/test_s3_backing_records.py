"""The pure rules of the s3 storage backend's records: whole-object CRCs combined from the parts'
CRCs, records that describe another object ignored, Complete's checks, upload and part names."""

from __future__ import annotations

import os

import pytest

from stdaemon.s3 import backing_records as records, checksums as s3_checksums
from stdaemon.s3.errors import StorageError
from stdaemon.s3.keys import InvalidKey
from stdaemon.s3.objects import ObjectInfo

MIB = 1024 * 1024


@pytest.mark.parametrize("algorithm", ["crc32", "crc32c", "crc64nvme"])
def test_a_whole_object_crc_is_combined_from_the_parts_crcs(algorithm):
    parts = [os.urandom(n) for n in (5 * MIB, 1, 77_777, 0, 3)]
    metas = [{"checksums": {algorithm: s3_checksums.checksum_b64(algorithm, p)}, "size": len(p)} for p in parts]
    assert records.combined_crc(algorithm, metas) == s3_checksums.checksum_b64(algorithm, b"".join(parts))
    # the CRC32 every part records serves when the client sent no per-part checksum
    if algorithm == "crc32":
        bare = [{"crc32": m["checksums"]["crc32"], "size": m["size"]} for m in metas]
        assert records.combined_crc("crc32", bare) == s3_checksums.checksum_b64("crc32", b"".join(parts))
    metas[2]["checksums"] = {}
    assert records.combined_crc(algorithm, metas) is None  # a part without it: cannot be combined
    assert records.combined_crc("sha256", metas) is None


def test_full_object_checksum_given_on_complete_is_checked_before_assembly():
    parts = [os.urandom(5 * MIB), b"tail"]
    metas = [{"checksums": {}, "crc32": s3_checksums.checksum_b64("crc32", p), "size": len(p)} for p in parts]
    whole = s3_checksums.checksum_b64("crc32", b"".join(parts))
    assert records.object_checksums({}, metas, ("crc32", whole)) == ({"crc32": whole}, "FULL_OBJECT", None)
    with pytest.raises(StorageError) as err:
        records.object_checksums({}, metas, ("crc32", s3_checksums.checksum_b64("crc32", b"other")))
    assert err.value.code == "BadDigest"
    # a SHA checksum cannot be combined: it is computed over the assembled object
    assert records.object_checksums({}, metas, ("sha256", "x")) == ({}, "FULL_OBJECT", ("sha256", "x"))


def test_a_record_answers_only_for_the_object_it_describes():
    info = ObjectInfo(key="job-1/a", size=3, etag='"md5"', last_modified=10.0, content_type="text/plain",
                      metadata={"step": "1"})
    record = records.object_record(info, '"backing"')
    assert records.object_info("job-1/a", record, '"backing"', 3, 99.0, None) == info
    # overwritten by another tool (another backing ETag), or a record of another key: derived answers
    derived = records.object_info("job-1/a", record, '"other"', 3, 99.0, "image/png")
    assert (derived.etag, derived.metadata, derived.content_type, derived.last_modified) == ('"other"', {},
                                                                                             "image/png", 99.0)
    assert records.object_info("job-1/b", record, '"backing"', 3, 99.0, None).etag == '"backing"'
    assert records.answered_etag(record, "job-1/a", '"backing"') == '"md5"'
    assert records.answered_etag(record, "job-1/a", '"other"') == '"other"'
    assert records.answered_etag(None, "job-1/a", '"x-2"') == '"x-2"'


def test_complete_checks_parts_as_the_local_store_does():
    part = {"md5": "a" * 32, "size": 5 * MIB, "checksums": {"crc32": "AAAAAA=="}}
    small = {"md5": "b" * 32, "size": 10, "checksums": {}}
    found = {1: part, 2: small, 3: small}
    assert records.check_complete([(1, '"' + "a" * 32 + '"'), (2, "b" * 32)], found) == [part, small]

    def code(parts):
        with pytest.raises(StorageError) as err:
            records.check_complete(parts, found)
        return err.value.code

    assert code([]) == "MalformedXML"
    assert code([(2, "b" * 32), (1, "a" * 32)]) == "InvalidPartOrder"
    assert code([(1, "c" * 32)]) == "InvalidPart"
    assert code([(4, "a" * 32)]) == "InvalidPart"
    assert code([(1, "a" * 32, {"ChecksumCRC32": "BBBBBB=="})]) == "InvalidPart"
    assert code([(2, "b" * 32), (3, "b" * 32)]) == "EntityTooSmall"


def test_names_keys_and_content_types():
    assert records.upload_id_of("p/.stdaemon/outputs/uploads/" + "0f" * 16 + ".json") == "0f" * 16
    assert records.upload_id_of("p/.stdaemon/outputs/uploads/nothex.json") is None
    assert records.part_number_of("p/uploads/" + "0f" * 16 + "/00042.json") == 42
    assert records.part_number_of("p/uploads/x/42.json") is None
    for key in (".stdaemon/x", "a/.stdaemon-folder", "../x", ""):
        with pytest.raises(InvalidKey):
            records.check_key(key)
    assert records.native_content_type("application/x-www-form-urlencoded; charset=utf-8") == "binary/octet-stream"
    assert records.native_content_type("image/png") == "image/png"
    assert records.native_content_type(None) == "binary/octet-stream"
