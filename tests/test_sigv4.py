"""SigV4/SigV2 verification against AWS's published examples and botocore's own signers."""

from __future__ import annotations

import calendar
import hashlib
from urllib.parse import urlsplit

import pytest
from botocore.auth import HmacV1Auth, HmacV1QueryAuth, S3SigV4Auth, S3SigV4QueryAuth, SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from stdaemon.s3 import sigv4
from stdaemon.s3.sigv4 import SignatureError

SUITE_KEY = "AKIDEXAMPLE"
SUITE_SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
SUITE_DATE = "20150830T123600Z"
S3_KEY = "AKIAIOSFODNN7EXAMPLE"
S3_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
S3_DATE = "20130524T000000Z"
S3_NOW = float(calendar.timegm((2013, 5, 24, 0, 0, 0)))

# Inputs and expected signatures of the AWS Signature Version 4 test suite (service "service").
SUITE_VECTORS = [
    ("get-vanilla", "GET", "/", "", {}, "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"),
    ("post-vanilla", "POST", "/", "", {}, "5da7c1a2acd57cee7505fc6676e4e544621c30862966e37dddb68e92efbe5d6b"),
    ("get-vanilla-query-order-key-case", "GET", "/", "Param2=value2&Param1=value1", {},
     "b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500"),
    ("post-header-value-case", "POST", "/", "", {"my-header1": ["VALUE1"]},
     "cdbc9802e29d2942e5e10b5bccfdd67c5f22c7c4e8ae67b53629efa58b974b7d"),
    ("get-header-value-trim", "GET", "/", "", {"my-header1": [" value1"], "my-header2": ['"a   b   c"']},
     "acc3ed3afb60bb290fc8d2dd0098b9911fcaa05412b367055dee359757a9c736"),
    ("get-unreserved", "GET", "/-._~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz", "", {},
     "07ef7494c76fa4850883e2b006601f940f8a34d404d0cfa977f52a65bbf5f24f"),
]


@pytest.mark.parametrize("name,method,path,query,extra,expected", SUITE_VECTORS, ids=[v[0] for v in SUITE_VECTORS])
def test_aws_sigv4_test_suite(name, method, path, query, extra, expected):
    headers = {"host": ["example.amazonaws.com"], "x-amz-date": [SUITE_DATE], **extra}
    signed = sorted(headers)
    canonical = sigv4.canonical_request(method, path, query, headers, signed, sigv4.EMPTY_SHA256, normalize_path=True)
    scope = "20150830/us-east-1/service/aws4_request"
    key = sigv4.signing_key(SUITE_SECRET, "20150830", "us-east-1", "service")
    assert sigv4.sign(key, sigv4.string_to_sign(SUITE_DATE, scope, canonical)) == expected


def test_suite_canonical_request_and_string_to_sign():
    headers = {"host": ["example.amazonaws.com"], "x-amz-date": [SUITE_DATE]}
    canonical = sigv4.canonical_request("GET", "/", "Param2=value2&Param1=value1", headers,
                                        ["host", "x-amz-date"], sigv4.EMPTY_SHA256)
    assert canonical == (
        "GET\n/\nParam1=value1&Param2=value2\nhost:example.amazonaws.com\nx-amz-date:20150830T123600Z\n\n"
        "host;x-amz-date\ne3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    )
    sts = sigv4.string_to_sign(SUITE_DATE, "20150830/us-east-1/service/aws4_request", canonical)
    assert sts.endswith("816cd5b414d056048ba4f7c5386d6e0533120fb1fcfa93762cf0fc39e2cf19e0")


# The S3 documentation's examples (bucket examplebucket, 2013-05-24), verified end to end.
S3_HEADER_VECTORS = [
    ("GET object with range", "GET", "/test.txt", "", {"range": ["bytes=0-9"]}, sigv4.EMPTY_SHA256,
     "host;range;x-amz-content-sha256;x-amz-date",
     "f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"),
    ("PUT object", "PUT", "/test%24file.text", "",
     {"date": ["Fri, 24 May 2013 00:00:00 GMT"], "x-amz-storage-class": ["REDUCED_REDUNDANCY"]},
     hashlib.sha256(b"Welcome to Amazon S3.").hexdigest(),
     "date;host;x-amz-content-sha256;x-amz-date;x-amz-storage-class",
     "98ad721746da40c64f1a55b78f14c238d841ea1380cd77a1b5971af0ece108bd"),
    ("GET lifecycle", "GET", "/", "lifecycle", {}, sigv4.EMPTY_SHA256,
     "host;x-amz-content-sha256;x-amz-date", "fea454ca298b7da1c68078a5d1bdbfbbe0d65c699e0f91ac7a200a0136783543"),
    ("list objects", "GET", "/", "max-keys=2&prefix=J", {}, sigv4.EMPTY_SHA256,
     "host;x-amz-content-sha256;x-amz-date", "34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7"),
]


def _s3_headers(extra, payload, signed, signature):
    headers = {
        "host": ["examplebucket.s3.amazonaws.com"],
        "x-amz-date": [S3_DATE],
        "x-amz-content-sha256": [payload],
        **extra,
        "authorization": [
            f"AWS4-HMAC-SHA256 Credential={S3_KEY}/20130524/us-east-1/s3/aws4_request,"
            f"SignedHeaders={signed},Signature={signature}"
        ],
    }
    return headers


@pytest.mark.parametrize("name,method,path,query,extra,payload,signed,signature", S3_HEADER_VECTORS,
                         ids=[v[0] for v in S3_HEADER_VECTORS])
def test_s3_documentation_examples_verify(name, method, path, query, extra, payload, signed, signature):
    claim = sigv4.parse_request_auth(method, path, query, _s3_headers(extra, payload, signed, signature))
    assert claim.kind == "v4-header" and claim.access_key == S3_KEY
    assert sigv4.verify_claim(claim, S3_SECRET, S3_NOW) is None
    with pytest.raises(SignatureError) as err:
        sigv4.verify_claim(claim, S3_SECRET + "x", S3_NOW)
    assert err.value.code == "SignatureDoesNotMatch"


def test_s3_presigned_documentation_example():
    query = ("X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20130524%2Fus-east-1%2Fs3"
             "%2Faws4_request&X-Amz-Date=20130524T000000Z&X-Amz-Expires=86400&X-Amz-SignedHeaders=host"
             "&X-Amz-Signature=aeeed9bbccd4d02ee5c0109b86d86835f995330da4c265957d157751f604d404")
    claim = sigv4.parse_request_auth("GET", "/test.txt", query, {"host": ["examplebucket.s3.amazonaws.com"]})
    assert claim.kind == "v4-query"
    sigv4.verify_claim(claim, S3_SECRET, S3_NOW + 3600)
    with pytest.raises(SignatureError) as err:
        sigv4.verify_claim(claim, S3_SECRET, S3_NOW + 86401)
    assert err.value.code == "AccessDenied"
    tampered = sigv4.parse_request_auth("GET", "/test2.txt", query, {"host": ["examplebucket.s3.amazonaws.com"]})
    with pytest.raises(SignatureError) as err:
        sigv4.verify_claim(tampered, S3_SECRET, S3_NOW)
    assert err.value.code == "SignatureDoesNotMatch"


def test_streaming_seed_signature_documentation_example():
    headers = {
        "host": ["s3.amazonaws.com"], "x-amz-date": [S3_DATE], "x-amz-storage-class": ["REDUCED_REDUNDANCY"],
        "x-amz-content-sha256": [sigv4.STREAMING_SIGNED], "content-encoding": ["aws-chunked"],
        "x-amz-decoded-content-length": ["66560"], "content-length": ["66824"],
        "authorization": [
            "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request,SignedHeaders="
            "content-encoding;content-length;host;x-amz-content-sha256;x-amz-date;x-amz-decoded-content-length;"
            "x-amz-storage-class,Signature=4f232c4386841ef735655705268965c44a0e4690baa4adea153f7db9fa80a0a9"
        ],
    }
    claim = sigv4.parse_request_auth("PUT", "/examplebucket/chunkObject.txt", "", headers)
    signer = sigv4.verify_claim(claim, S3_SECRET, S3_NOW)
    assert signer.seed_signature.startswith("4f232c43")
    first = signer.chunk_signature(signer.seed_signature, hashlib.sha256(b"a" * 65536).hexdigest())
    assert first == "ad80c730a21e5b8d04586a2213dd63b9a0e99e0e2307b0ade35a65485a288648"
    second = signer.chunk_signature(first, hashlib.sha256(b"a" * 1024).hexdigest())
    assert second == "0055627c9e194cb4542bae2aa5492e3c1575bbb81b612b7d234b86a503ef5497"
    final = signer.chunk_signature(second, sigv4.EMPTY_SHA256)
    assert final == "b6c6ea8a5354eaf15b3cb7646744f4275b71ea724fed81ceb9323e279d449df9"


def test_clock_skew_and_malformed_headers():
    claim = sigv4.parse_request_auth("GET", "/test.txt", "", _s3_headers(
        {"range": ["bytes=0-9"]}, sigv4.EMPTY_SHA256, "host;range;x-amz-content-sha256;x-amz-date",
        "f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"))
    with pytest.raises(SignatureError) as err:
        sigv4.verify_claim(claim, S3_SECRET, S3_NOW + 16 * 60)
    assert err.value.code == "RequestTimeTooSkewed"
    sigv4.verify_claim(claim, S3_SECRET, S3_NOW - 14 * 60)
    for bad in ("AWS4-HMAC-SHA256 Credential=x", "AWS4-HMAC-SHA256 Credential=a/b/c/d/e, SignedHeaders=host, "
                "Signature=00", "Basic abc", "AWS4-HMAC-SHA256 Credential=K/20130524/us-east-1/s3/aws4_request, "
                "SignedHeaders=x-amz-date;host, Signature=" + "0" * 64):
        with pytest.raises(SignatureError):
            sigv4.parse_request_auth("GET", "/", "", {"authorization": [bad], "x-amz-date": [S3_DATE],
                                                      "x-amz-content-sha256": ["UNSIGNED-PAYLOAD"]})
    assert sigv4.parse_request_auth("GET", "/", "", {"host": ["h"]}) is None


# ---------------------------------------------------------------- botocore as an independent oracle

ENDPOINT = "http://127.0.0.1:8080/api/cloud/storage"


def _wire(request):
    """What a server sees from a prepared botocore request: method, raw path, raw query, headers."""
    prepared = request.prepare()
    split = urlsplit(prepared.url)
    headers = {"host": [split.netloc]}
    for name, value in prepared.headers.items():
        headers.setdefault(name.lower(), []).append(value if isinstance(value, str) else value.decode())
    return prepared.method, split.path, split.query, headers


def _botocore_now():
    import datetime

    return datetime.datetime.now(datetime.timezone.utc).timestamp()


@pytest.mark.parametrize("url,method,body,extra", [
    (ENDPOINT + "/outputs/job-1/model%20file%2B1.bin", "PUT", b"payload bytes", {"Content-Type": "text/plain"}),
    (ENDPOINT + "/outputs?list-type=2&prefix=job-1%2F&delimiter=%2F&encoding-type=url", "GET", b"", {}),
    (ENDPOINT + "/outputs/job-1/big.bin?uploads", "POST", b"", {"x-amz-meta-note": "caf\u00e9".encode().decode("latin-1")}),
    (ENDPOINT + "/outputs/job-1/big.bin?partNumber=2&uploadId=abc", "PUT", b"x" * 1000, {}),
])
def test_botocore_s3sigv4_header_signatures_verify(url, method, body, extra):
    creds = Credentials("STKEYID", "secret/with+chars")
    request = AWSRequest(method=method, url=url, data=body, headers=dict(extra))
    request.context["payload_signing_enabled"] = True
    S3SigV4Auth(creds, "s3", "us-east-1").add_auth(request)
    m, path, query, headers = _wire(request)
    claim = sigv4.parse_request_auth(m, path, query, headers)
    assert claim.kind == "v4-header"
    assert claim.payload_hash == hashlib.sha256(body).hexdigest()
    sigv4.verify_claim(claim, "secret/with+chars", _botocore_now())
    with pytest.raises(SignatureError):
        sigv4.verify_claim(claim, "other", _botocore_now())


def test_botocore_generic_sigv4_verifies():
    creds = Credentials("STKEYID", "s3cr3t")
    request = AWSRequest(method="GET", url=ENDPOINT + "/outputs?prefix=a%20b", headers={})
    request.headers["X-Amz-Content-SHA256"] = sigv4.UNSIGNED_PAYLOAD
    SigV4Auth(creds, "s3", "eu-west-1").add_auth(request)
    claim = sigv4.parse_request_auth(*_wire(request))
    sigv4.verify_claim(claim, "s3cr3t", _botocore_now())


def test_botocore_presigned_v4_verifies_and_expires():
    creds = Credentials("STKEYID", "s3cr3t")
    request = AWSRequest(method="GET", url=ENDPOINT + "/outputs/job-1/f%C3%BC.txt?response-content-type=text%2Fplain")
    S3SigV4QueryAuth(creds, "s3", "us-east-1", expires=60).add_auth(request)
    claim = sigv4.parse_request_auth(*_wire(request))
    assert claim.kind == "v4-query" and claim.expires == 60
    now = _botocore_now()
    sigv4.verify_claim(claim, "s3cr3t", now)
    with pytest.raises(SignatureError) as err:
        sigv4.verify_claim(claim, "s3cr3t", now + 3600)
    assert err.value.code == "AccessDenied"


def test_botocore_sigv2_query_and_header_verify():
    creds = Credentials("STKEYID", "s3cr3t")
    request = AWSRequest(method="GET", url=ENDPOINT + "/outputs/job-1/a%20b.txt?versionId=3")
    HmacV1QueryAuth(creds, expires=120).add_auth(request)
    m, path, query, headers = _wire(request)
    claim = sigv4.parse_request_auth(m, path, query, headers)
    assert claim.kind == "v2-query"
    sigv4.verify_claim(claim, "s3cr3t", claim.expires - 60)
    with pytest.raises(SignatureError) as err:
        sigv4.verify_claim(claim, "s3cr3t", claim.expires + 1)
    assert err.value.code == "AccessDenied"
    with pytest.raises(SignatureError):
        sigv4.verify_claim(claim, "wrong", claim.expires - 60)

    request = AWSRequest(method="PUT", url=ENDPOINT + "/outputs/job-1/x", data=b"abc",
                         headers={"Content-Type": "text/plain", "x-amz-meta-a": "1"})
    HmacV1Auth(creds).add_auth(request)
    claim = sigv4.parse_request_auth(*_wire(request))
    assert claim.kind == "v2-header"
    sigv4.verify_claim(claim, "s3cr3t", _botocore_now())


def test_uri_encode_and_canonical_query():
    assert sigv4.uri_encode("a b/c~d+e$\u00e9", encode_slash=False) == "a%20b/c~d%2Be%24%C3%A9"
    assert sigv4.uri_encode("a/b") == "a%2Fb"
    assert sigv4.canonical_query("uploads") == "uploads="
    assert sigv4.canonical_query("b=2&a=1&X-Amz-Signature=zz", exclude=("X-Amz-Signature",)) == "a=1&b=2"
    assert sigv4.canonical_query("p=a%2fb") == "p=a%2Fb"


def _dated_claim(day: str, secret: str, key_day: str | None = None):
    """The S3 documentation's ranged GET signed on ``day`` (YYYYMMDD) with a key derived for
    ``key_day`` (default: the same day)."""
    amz_date = day + "T000000Z"
    signed = "host;range;x-amz-content-sha256;x-amz-date"
    headers = {"host": ["examplebucket.s3.amazonaws.com"], "x-amz-date": [amz_date],
               "x-amz-content-sha256": [sigv4.EMPTY_SHA256], "range": ["bytes=0-9"]}
    canonical = sigv4.canonical_request("GET", "/test.txt", "", headers, signed.split(";"), sigv4.EMPTY_SHA256)
    scope = f"{day}/us-east-1/s3/aws4_request"
    key = sigv4.signing_key(secret, key_day or day, "us-east-1", "s3")
    signature = sigv4.sign(key, sigv4.string_to_sign(amz_date, scope, canonical))
    headers["authorization"] = [f"AWS4-HMAC-SHA256 Credential={S3_KEY}/{scope},SignedHeaders={signed},"
                                f"Signature={signature}"]
    return sigv4.parse_request_auth("GET", "/test.txt", "", headers)


def test_cached_signing_key_still_refuses_a_wrong_signature_a_changed_secret_or_date():
    sigv4._derived_key.cache_clear()
    claim = _dated_claim("20130524", S3_SECRET)
    assert claim.signature == "f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"  # the AWS example
    sigv4.verify_claim(claim, S3_SECRET, S3_NOW)
    sigv4.verify_claim(claim, S3_SECRET, S3_NOW)
    assert sigv4._derived_key.cache_info().hits >= 2  # the key was derived once, then served from the cache

    wrong = claim.signature[:-1] + ("0" if claim.signature[-1] != "0" else "1")
    tampered = sigv4.AuthClaim(**{**claim.__dict__, "signature": wrong})
    hits = sigv4._derived_key.cache_info().hits
    with pytest.raises(SignatureError) as err:
        sigv4.verify_claim(tampered, S3_SECRET, S3_NOW)
    assert err.value.code == "SignatureDoesNotMatch"
    assert sigv4._derived_key.cache_info().hits == hits + 1  # refused with the cached key

    with pytest.raises(SignatureError) as err:  # the secret changed (a re-issued credential)
        sigv4.verify_claim(claim, S3_SECRET + "x", S3_NOW)
    assert err.value.code == "SignatureDoesNotMatch"

    next_day = S3_NOW + 86400
    sigv4.verify_claim(_dated_claim("20130525", S3_SECRET), S3_SECRET, next_day)
    # signed on the 25th with the 24th's (cached) key: refused
    with pytest.raises(SignatureError) as err:
        sigv4.verify_claim(_dated_claim("20130525", S3_SECRET, key_day="20130524"), S3_SECRET, next_day)
    assert err.value.code == "SignatureDoesNotMatch"
    assert sigv4._derived_key.cache_info().currsize <= sigv4.SIGNING_KEY_CACHE_SIZE


def test_signing_key_cache_is_bounded():
    sigv4._derived_key.cache_clear()
    for index in range(sigv4.SIGNING_KEY_CACHE_SIZE + 50):
        sigv4.signing_key(f"secret-{index}", "20130524", "us-east-1", "s3")
    assert sigv4._derived_key.cache_info().currsize == sigv4.SIGNING_KEY_CACHE_SIZE
    assert sigv4.signing_key("secret-0", "20130524", "us-east-1", "s3") == \
        sigv4._derived_key.__wrapped__("secret-0", "20130524", "us-east-1", "s3")
