"""Property tests: arbitrary input to the S3 pure modules fails only in the documented ways."""

from __future__ import annotations

import os

from hypothesis import given, settings
from hypothesis import strategies as st

from stdaemon.s3 import sigv4
from stdaemon.s3.aws_chunked import AwsChunkedDecoder, ChunkedError
from stdaemon.s3.keys import InvalidKey, validate_key
from stdaemon.s3.xml_documents import MalformedXML, parse_complete_multipart, parse_delete
from stdaemon.s3.objects import Bucket

text = st.text(max_size=200)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.integers(min_value=1, max_value=50), st.booleans(),
       st.integers(min_value=1, max_value=16))
def test_decoder_raises_only_chunked_errors(data, slice_size, signed, min_chunk):
    signer = sigv4.ChunkSigner(b"k" * 32, "20130524T000000Z", "20130524/us-east-1/s3/aws4_request", "0" * 64)
    decoder = AwsChunkedDecoder(trailer_names=["x-amz-checksum-crc32"], signer=signer if signed else None,
                                max_decoded=1000, min_chunk=min_chunk)
    try:
        for start in range(0, len(data), slice_size):
            decoder.feed(data[start:start + slice_size])
        decoder.finish()
    except ChunkedError as err:
        assert err.code in {"IncompleteBody", "InvalidRequest", "SignatureDoesNotMatch", "EntityTooLarge",
                            "BadDigest", "InvalidChunkSizeError"}


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["authorization", "x-amz-date", "x-amz-content-sha256", "date", "host"]),
                       st.lists(text, min_size=1, max_size=2)),
       text, st.sampled_from(["GET", "PUT", "POST"]))
def test_auth_parsing_raises_only_signature_errors(headers, query, method):
    try:
        claim = sigv4.parse_request_auth(method, "/api/cloud/storage/outputs/k", query, headers)
        if claim is not None:
            sigv4.verify_claim(claim, "secret", 1_700_000_000.0, path_prefix="/api/cloud/storage")
    except sigv4.SignatureError as err:
        assert err.code and err.message


@settings(max_examples=500, deadline=None)
@given(st.text(min_size=1, max_size=300))
def test_accepted_keys_stay_inside_the_bucket(key):
    root = os.path.abspath("/srv/bucket-root")
    bucket = Bucket("outputs", root)
    try:
        validate_key(key)
        path = bucket.object_path(key)
    except InvalidKey:
        return
    assert os.path.commonpath([root, path]) == root and path != root
    assert os.path.normpath(path) == path


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_xml_parsers_raise_only_malformed_xml(data):
    for parser in (parse_complete_multipart, parse_delete):
        try:
            parser(data)
        except MalformedXML:
            pass
