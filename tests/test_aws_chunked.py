"""The incremental aws-chunked decoder: AWS's signed example, botocore's unsigned-trailer bodies."""

from __future__ import annotations

import hashlib
import io
import os

import pytest
from botocore.httpchecksum import AwsChunkedWrapper, Crc32Checksum, Sha256Checksum

from stdaemon.s3 import checksums as s3_checksums, sigv4
from stdaemon.s3.aws_chunked import AwsChunkedDecoder, ChunkedError

SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
SEED = "4f232c4386841ef735655705268965c44a0e4690baa4adea153f7db9fa80a0a9"
AWS_EXAMPLE = (
    b"10000;chunk-signature=ad80c730a21e5b8d04586a2213dd63b9a0e99e0e2307b0ade35a65485a288648\r\n"
    + b"a" * 65536 + b"\r\n"
    + b"400;chunk-signature=0055627c9e194cb4542bae2aa5492e3c1575bbb81b612b7d234b86a503ef5497\r\n"
    + b"a" * 1024 + b"\r\n"
    + b"0;chunk-signature=b6c6ea8a5354eaf15b3cb7646744f4275b71ea724fed81ceb9323e279d449df9\r\n\r\n"
)


def _signer():
    key = sigv4.signing_key(SECRET, "20130524", "us-east-1", "s3")
    return sigv4.ChunkSigner(key, "20130524T000000Z", "20130524/us-east-1/s3/aws4_request", SEED)


def _decode(decoder, body, slice_size):
    out = bytearray()
    for start in range(0, len(body), slice_size):
        for piece in decoder.feed(body[start:start + slice_size]):
            out += piece
    decoder.finish()
    return bytes(out)


@pytest.mark.parametrize("slice_size", [1, 7, 100, 4096, 65536, 1 << 20])
def test_aws_signed_example_decodes_in_any_slicing(slice_size):
    decoder = AwsChunkedDecoder(signer=_signer(), decoded_length=66560)
    assert _decode(decoder, AWS_EXAMPLE, slice_size) == b"a" * 66560
    assert decoder.done


def test_tampered_chunk_signature_and_data_are_refused():
    bad_sig = AWS_EXAMPLE.replace(b"ad80c730", b"ad80c731")
    with pytest.raises(ChunkedError) as err:
        _decode(AwsChunkedDecoder(signer=_signer()), bad_sig, 4096)
    assert err.value.code == "SignatureDoesNotMatch"
    bad_data = AWS_EXAMPLE[:200] + b"b" + AWS_EXAMPLE[201:]
    with pytest.raises(ChunkedError) as err:
        _decode(AwsChunkedDecoder(signer=_signer()), bad_data, 4096)
    assert err.value.code == "SignatureDoesNotMatch"


@pytest.mark.parametrize("cut", [10, 90, 60000, len(AWS_EXAMPLE) - 3])
def test_truncated_bodies_are_incomplete(cut):
    with pytest.raises(ChunkedError) as err:
        _decode(AwsChunkedDecoder(signer=_signer()), AWS_EXAMPLE[:cut], 1000)
    assert err.value.code in ("IncompleteBody", "SignatureDoesNotMatch")


def _botocore_body(data: bytes, checksum_cls, name: str, chunk_size=None) -> bytes:
    wrapper = AwsChunkedWrapper(io.BytesIO(data), checksum_cls=checksum_cls, checksum_name=name,
                                chunk_size=chunk_size)
    return wrapper.read()


@pytest.mark.parametrize("size", [0, 1, 1000, 1024 * 1024, 3 * 1024 * 1024 + 17])
def test_botocore_unsigned_trailer_bodies(size):
    data = os.urandom(size)
    body = _botocore_body(data, Crc32Checksum, "x-amz-checksum-crc32")
    decoder = AwsChunkedDecoder(trailer_names=["x-amz-checksum-crc32"], decoded_length=size)
    assert _decode(decoder, body, 8192) == data
    assert decoder.trailers["x-amz-checksum-crc32"] == s3_checksums.checksum_b64("crc32", data)


def test_botocore_sha256_trailer_and_bad_checksum():
    data = os.urandom(50000)
    body = _botocore_body(data, Sha256Checksum, "x-amz-checksum-sha256", chunk_size=8192)
    decoder = AwsChunkedDecoder(trailer_names=["x-amz-checksum-sha256"])
    assert _decode(decoder, body, 333) == data
    corrupted = body.replace(data[:50], bytes(50), 1)
    with pytest.raises(ChunkedError) as err:
        _decode(AwsChunkedDecoder(trailer_names=["x-amz-checksum-sha256"]), corrupted, 333)
    assert err.value.code == "BadDigest"


def test_missing_trailer_wrong_length_and_malformed_sizes():
    data = b"hello world"
    body = _botocore_body(data, Crc32Checksum, "x-amz-checksum-crc32")
    without_trailer = body.split(b"0\r\n")[0] + b"0\r\n\r\n"
    with pytest.raises(ChunkedError) as err:
        _decode(AwsChunkedDecoder(trailer_names=["x-amz-checksum-crc32"]), without_trailer, 5)
    assert err.value.code == "IncompleteBody"
    with pytest.raises(ChunkedError) as err:
        _decode(AwsChunkedDecoder(trailer_names=["x-amz-checksum-crc32"], decoded_length=12), body, 5)
    assert err.value.code == "IncompleteBody"
    for bad in (b"zz\r\nabc\r\n0\r\n\r\n", b"3\r\nabcdef\r\n0\r\n\r\n", b"3\nabc\r\n0\r\n\r\n",
                b"f" * 5000 + b"\r\n"):
        with pytest.raises(ChunkedError):
            _decode(AwsChunkedDecoder(), bad, 7)


def test_size_cap_is_enforced_before_the_data_arrives():
    decoder = AwsChunkedDecoder(max_decoded=100)
    with pytest.raises(ChunkedError) as err:
        decoder.feed(b"1000\r\n")
    assert err.value.code == "EntityTooLarge"


def test_signed_trailer_variant():
    signer = _signer()
    data = b"x" * 3000
    chunk_sig = signer.chunk_signature(SEED, hashlib.sha256(data).hexdigest())
    final_sig = signer.chunk_signature(chunk_sig, sigv4.EMPTY_SHA256)
    crc = s3_checksums.checksum_b64("crc32", data)
    trailer_sig = signer.trailer_signature(final_sig, hashlib.sha256(f"x-amz-checksum-crc32:{crc}\n".encode()).hexdigest())
    body = (b"bb8;chunk-signature=" + chunk_sig.encode() + b"\r\n" + data + b"\r\n"
            + b"0;chunk-signature=" + final_sig.encode() + b"\r\n"
            + f"x-amz-checksum-crc32:{crc}\r\nx-amz-trailer-signature:{trailer_sig}\r\n\r\n".encode())
    decoder = AwsChunkedDecoder(signer=signer, trailer_names=["x-amz-checksum-crc32"], signed_trailer=True)
    assert _decode(decoder, body, 100) == data
    forged = body.replace(trailer_sig.encode(), b"0" * 64)
    with pytest.raises(ChunkedError) as err:
        _decode(AwsChunkedDecoder(signer=signer, trailer_names=["x-amz-checksum-crc32"], signed_trailer=True),
                forged, 100)
    assert err.value.code == "SignatureDoesNotMatch"


def test_checksum_algorithms_match_reference_check_values():
    expected = {"crc32": "cbf43926", "crc32c": "e3069283", "crc64nvme": "ae8b14860a799888",
                "sha1": hashlib.sha1(b"123456789").hexdigest(), "sha256": hashlib.sha256(b"123456789").hexdigest()}
    for algorithm, hex_digest in expected.items():
        state = s3_checksums.new_checksum(algorithm)
        state.update(b"1234")
        state.update(b"56789")
        assert state.digest().hex() == hex_digest
    assert s3_checksums.algorithm_from_header("X-Amz-Checksum-CRC32C") == "crc32c"
    assert s3_checksums.algorithm_from_header("x-amz-checksum-md5") is None


def _signed_body(signer, sizes):
    """A signed aws-chunked body with chunks of the given sizes (then the final empty chunk)."""
    out, previous = [], SEED
    for size in list(sizes) + [0]:
        data = b"z" * size
        previous = signer.chunk_signature(previous, hashlib.sha256(data).hexdigest())
        out.append(b"%x;chunk-signature=%s\r\n%s\r\n" % (size, previous.encode(), data))
    return b"".join(out)


@pytest.mark.parametrize("sizes", [[8192, 8192, 1], [100_000, 8192], [1], [5], [8192] * 20])
def test_chunks_of_at_least_8_kib_except_the_last(sizes):
    decoder = AwsChunkedDecoder(signer=_signer())
    assert _decode(decoder, _signed_body(_signer(), sizes), 3000) == b"z" * sum(sizes)


@pytest.mark.parametrize("sizes", [[1, 1], [8191, 8192], [8192, 100, 8192], [1] + [8192] * 3])
def test_a_short_chunk_before_the_last_is_refused(sizes):
    with pytest.raises(ChunkedError) as err:
        _decode(AwsChunkedDecoder(signer=_signer()), _signed_body(_signer(), sizes), 4096)
    assert err.value.code == "InvalidChunkSizeError"
    unsigned = b"".join(b"%x\r\n%s\r\n" % (n, b"u" * n) for n in sizes) + b"0\r\n\r\n"
    with pytest.raises(ChunkedError) as err:
        _decode(AwsChunkedDecoder(), unsigned, 4096)
    assert err.value.code == "InvalidChunkSizeError"


def test_decoder_state_stays_bounded_for_any_chunking():
    """What the decoder keeps between calls does not grow with the number of chunks: 1 000 chunks
    of 8 KiB leave the same state as 10, and nothing per chunk is kept."""
    import sys

    def state_size(decoder):
        return sum(sys.getsizeof(v) for v in vars(decoder).values())

    sizes = []
    for count in (10, 1000):
        decoder = AwsChunkedDecoder(signer=_signer())
        body = _signed_body(_signer(), [8192] * count)
        for start in range(0, len(body), 65536):
            decoder.feed(body[start:start + 65536])
        sizes.append(state_size(decoder))
        decoder.finish()
    assert sizes[1] <= sizes[0] + 64


def test_decoded_pieces_are_views_of_the_input_not_copies():
    data = os.urandom(3 * 65536 + 5)
    body = _botocore_body(data, Crc32Checksum, "x-amz-checksum-crc32")
    decoder = AwsChunkedDecoder(trailer_names=["x-amz-checksum-crc32"], decoded_length=len(data))
    batch = bytearray(body)
    pieces = decoder.feed(batch)
    decoder.finish()
    assert b"".join(pieces) == data
    assert pieces and all(isinstance(piece, memoryview) and piece.obj is batch for piece in pieces)
