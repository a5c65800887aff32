"""Key validation and the storage engine (files, sidecars, multipart, cleanup)."""

from __future__ import annotations

import hashlib
import os

import pytest

from stdaemon.s3.keys import InvalidKey, key_under_prefix, validate_bucket, validate_key
from stdaemon.s3.completion import MIN_PART_SIZE
from stdaemon.s3.multipart import StorageEngine
from stdaemon.s3.objects import StorageError

BAD_KEYS = [
    "", "../etc/passwd", "a/../../b", "a/./b", "/abs", "a\\b", "a\x00b", "a\nb", "%2e%2e/x", "a/%2E%2E/b",
    "%252e%252e/x", "..", ".", "C:/x", "a//b", "x" * 1025, "\u00e9" * 513,
]


@pytest.mark.parametrize("key", BAD_KEYS, ids=range(len(BAD_KEYS)))
def test_bad_keys_are_refused(key):
    with pytest.raises(InvalidKey):
        validate_key(key)


def test_good_keys_and_prefix_scope():
    for key in ("job-1/model.safetensors", "a b/c+d/\u00e9t\u00e9.bin", "x" * 1024, "...hidden/..a", "a.b/c..d"):
        assert validate_key(key) == key
    assert key_under_prefix("job-1/a", "job-1/")
    assert key_under_prefix("job-1/a", "job-1")
    assert not key_under_prefix("job-10/a", "job-1")
    assert not key_under_prefix("other/job-1/a", "job-1/")
    assert validate_bucket("outputs") == "outputs"
    for bad in ("a", "UPPER", "../x", "a..b", "x" * 64):
        with pytest.raises(InvalidKey):
            validate_bucket(bad)


@pytest.fixture
def engine(tmp_path):
    return StorageEngine({"outputs": str(tmp_path / "outputs")})


def _put(engine, key, data, now=100.0, **kw):
    pending = engine.begin_put("outputs", key)
    pending.write(data)
    return engine.commit_put("outputs", key, pending, now, **kw)


def test_put_get_head_delete(engine, tmp_path):
    info = _put(engine, "job-1/dir/file.bin", b"hello", content_type="text/plain", metadata={"a": "1"})
    assert info.etag == '"%s"' % hashlib.md5(b"hello").hexdigest()
    assert (tmp_path / "outputs" / "job-1" / "dir" / "file.bin").read_bytes() == b"hello"
    head = engine.head("outputs", "job-1/dir/file.bin")
    assert (head.size, head.content_type, head.metadata) == (5, "text/plain", {"a": "1"})
    fh, _ = engine.open_read("outputs", "job-1/dir/file.bin")
    with fh:
        assert fh.read() == b"hello"
    engine.delete("outputs", "job-1/dir/file.bin")
    with pytest.raises(StorageError) as err:
        engine.head("outputs", "job-1/dir/file.bin")
    assert err.value.code == "NoSuchKey"
    assert not (tmp_path / "outputs" / "job-1").exists()
    with pytest.raises(StorageError) as err:
        engine.head("nope", "x")
    assert err.value.code == "NoSuchBucket"


def test_aborted_put_leaves_nothing(engine, tmp_path):
    pending = engine.begin_put("outputs", "job-1/partial.bin")
    pending.write(b"x" * 1000)
    pending.abort()
    assert engine.iter_keys("outputs") == []
    assert os.listdir(tmp_path / "outputs" / ".stdaemon" / "tmp") == []
    with pytest.raises(InvalidKey):
        engine.begin_put("outputs", "../escape")
    with pytest.raises(InvalidKey):
        engine.begin_put("outputs", ".stdaemon/meta/x")


def test_listing_with_prefix_delimiter_and_pages(engine):
    for key in ["a/1", "a/2", "a/b/3", "b/4", "c", "a\u00e9/5"]:
        _put(engine, key, key.encode())
    page = engine.list_objects("outputs", prefix="a/", delimiter="/")
    assert [o.key for o in page["contents"]] == ["a/1", "a/2"]
    assert page["prefixes"] == ["a/b/"]
    page = engine.list_objects("outputs", delimiter="/")
    assert [o.key for o in page["contents"]] == ["c"]
    assert page["prefixes"] == ["a/", "a\u00e9/", "b/"]
    keys, after = [], ""
    while True:
        page = engine.list_objects("outputs", start_after=after, max_keys=2)
        keys += [o.key for o in page["contents"]]
        if not page["truncated"]:
            break
        after = page["next_marker"]
    assert keys == ["a/1", "a/2", "a/b/3", "a\u00e9/5", "b/4", "c"]


def test_file_and_directory_conflicts_are_refused(engine):
    _put(engine, "x/y", b"1")
    with pytest.raises(StorageError):
        _put(engine, "x/y/z", b"2")
    with pytest.raises(StorageError):
        _put(engine, "x", b"3")
    assert engine.iter_keys("outputs") == ["x/y"]


def test_multipart_out_of_order_parts_and_etag(engine):
    upload_id = engine.create_multipart("outputs", "job-1/big.bin", 10.0, content_type="application/x-test")
    parts_data = {1: os.urandom(MIN_PART_SIZE), 2: os.urandom(MIN_PART_SIZE), 3: b"tail"}
    etags = {}
    for number in (3, 1, 2):
        pending = engine.begin_part("outputs", "job-1/big.bin", upload_id, number)
        pending.write(parts_data[number])
        etags[number] = engine.commit_part("outputs", "job-1/big.bin", upload_id, number, pending, 11.0).etag
    _, listed = engine.list_parts("outputs", "job-1/big.bin", upload_id)
    assert [p.part_number for p in listed] == [1, 2, 3]
    with pytest.raises(StorageError) as err:
        engine.complete_multipart("outputs", "job-1/big.bin", upload_id, [(2, etags[2]), (1, etags[1])], 12.0)
    assert err.value.code == "InvalidPartOrder"
    with pytest.raises(StorageError) as err:
        engine.complete_multipart("outputs", "job-1/big.bin", upload_id, [(1, etags[1]), (2, etags[1])], 12.0)
    assert err.value.code == "InvalidPart"
    with pytest.raises(StorageError) as err:
        engine.complete_multipart("outputs", "job-1/big.bin", upload_id, [(1, etags[1]), (3, etags[3]),
                                                                         (4, etags[3])], 12.0)
    assert err.value.code in ("InvalidPart", "EntityTooSmall")
    assert engine.iter_keys("outputs") == []  # nothing visible yet
    info = engine.complete_multipart("outputs", "job-1/big.bin", upload_id,
                                     [(n, etags[n]) for n in (1, 2, 3)], 12.0)
    digest = hashlib.md5(b"".join(hashlib.md5(parts_data[n]).digest() for n in (1, 2, 3))).hexdigest()
    assert info.etag == f'"{digest}-3"'
    fh, head = engine.open_read("outputs", "job-1/big.bin")
    with fh:
        assert hashlib.sha256(fh.read()).digest() == hashlib.sha256(b"".join(parts_data[n] for n in (1, 2, 3))).digest()
    assert head.content_type == "application/x-test" and head.etag == info.etag
    with pytest.raises(StorageError) as err:
        engine.list_parts("outputs", "job-1/big.bin", upload_id)
    assert err.value.code == "NoSuchUpload"


def test_small_non_last_part_abort_and_stale_cleanup(engine):
    upload_id = engine.create_multipart("outputs", "k", 0.0)
    for number in (1, 2):
        pending = engine.begin_part("outputs", "k", upload_id, number)
        pending.write(b"small")
        engine.commit_part("outputs", "k", upload_id, number, pending, 1.0)
    _, parts = engine.list_parts("outputs", "k", upload_id)
    with pytest.raises(StorageError) as err:
        engine.complete_multipart("outputs", "k", upload_id, [(p.part_number, p.etag) for p in parts], 2.0)
    assert err.value.code == "EntityTooSmall"
    engine.abort_multipart("outputs", "k", upload_id)
    with pytest.raises(StorageError):
        engine.begin_part("outputs", "k", upload_id, 1)
    old = engine.create_multipart("outputs", "old", 0.0)
    fresh = engine.create_multipart("outputs", "fresh", 900.0)
    assert engine.cleanup_stale(now=1000.0, max_age=500.0) == 1
    assert [u for u, _ in engine.list_uploads("outputs")] == [fresh]
    with pytest.raises(StorageError):
        engine.upload_info("outputs", old)
    for bad in ("../../x", "0" * 32, "zz"):
        with pytest.raises(StorageError) as err:
            engine.upload_info("outputs", bad)
        assert err.value.code == "NoSuchUpload"


def test_clean_up_never_removes_a_temp_file_still_being_written(engine, tmp_path):
    pending = engine.begin_put("outputs", "job-1/slow.bin")
    pending.write(b"x" * 10)
    leftover = tmp_path / "outputs" / ".stdaemon" / "tmp" / "crash-leftover.tmp"
    leftover.write_bytes(b"old")
    assert engine.cleanup_stale(now=10 ** 12, max_age=1.0) == 0
    assert os.path.exists(pending.path) and not leftover.exists()
    assert engine.startup_cleanup() == 0
    assert os.path.exists(pending.path)
    engine.commit_put("outputs", "job-1/slow.bin", pending, 1.0)
    assert engine.live_temp_files == set()
    aborted = engine.begin_put("outputs", "job-1/gone.bin")
    aborted.abort()
    assert engine.live_temp_files == set()


def test_sidecars_of_keys_that_look_alike_do_not_collide(engine):
    _put(engine, "x", b"1", content_type="text/a")
    _put(engine, "x.json/y", b"22", content_type="text/b")
    assert engine.head("outputs", "x").content_type == "text/a"
    assert engine.head("outputs", "x.json/y").content_type == "text/b"
    assert engine.iter_keys("outputs") == ["x", "x.json/y"]


def test_files_placed_by_hand_are_listed_and_odd_names_skipped(engine, tmp_path):
    _put(engine, "job-1/a", b"1")
    (tmp_path / "outputs" / "job-1" / "by-hand.txt").write_bytes(b"hand")
    os.makedirs(os.path.join(str(tmp_path / "outputs" / "job-1").encode(), b"odd"), exist_ok=True)
    with open(os.path.join(str(tmp_path / "outputs" / "job-1").encode(), b"odd", b"\xff\xfe"), "wb") as fh:
        fh.write(b"x")
    assert engine.iter_keys("outputs") == ["job-1/a", "job-1/by-hand.txt"]
    info = engine.head("outputs", "job-1/by-hand.txt")
    assert info.size == 4 and info.etag.startswith('"')


def test_part_copy_falls_back_without_losing_the_parts_before(tmp_path, monkeypatch):
    """When the kernel copy fails for a later part, the plain copy appends that part after the
    ones already assembled instead of starting the object again."""
    from stdaemon.s3 import multipart

    calls = []

    def failing_copy(*args, **kwargs):
        calls.append(args)
        raise OSError(18, "Invalid cross-device link")

    assembled = tmp_path / "assembled"
    part = tmp_path / "part"
    part.write_bytes(b"B" * 5000)
    with open(assembled, "wb") as dst:
        dst.write(b"A" * 3000)
        monkeypatch.setattr(multipart.os, "copy_file_range", failing_copy, raising=False)
        with open(part, "rb") as src:
            multipart._copy_file(src, dst, 5000)
    assert calls, "the kernel copy was tried first"
    assert assembled.read_bytes() == b"A" * 3000 + b"B" * 5000


# -- parts written in place (the upload's assembly file) ------------------------------------------

def _part(engine, key, upload_id, number, data, expected=True):
    pending = engine.begin_part("outputs", key, upload_id, number,
                                expected_size=len(data) if expected else None)
    pending.write(data)
    return pending, engine.commit_part("outputs", key, upload_id, number, pending, 1.0).etag


def _upload_files(engine, upload_id):
    return sorted(os.listdir(os.path.join(engine.bucket("outputs").multipart, upload_id)))


def _read(engine, key):
    fh, _ = engine.open_read("outputs", key)
    with fh:
        return fh.read()


def test_uniform_parts_go_in_place_and_complete_copies_nothing(engine, monkeypatch):
    from stdaemon.s3 import multipart

    upload_id = engine.create_multipart("outputs", "job-1/ckpt.bin", 1.0)
    data = {1: os.urandom(MIN_PART_SIZE), 2: os.urandom(MIN_PART_SIZE), 3: os.urandom(1000)}
    etags = {}
    for number in (2, 3, 1):   # out of order, the short last part before the first
        pending, etags[number] = _part(engine, "job-1/ckpt.bin", upload_id, number, data[number])
        assert pending.in_place is not None
    files = [f for f in _upload_files(engine, upload_id) if f.endswith(".data")]
    assert files == [f"assembly.{MIN_PART_SIZE}.data"]      # no file per part
    assembly = os.path.join(engine.bucket("outputs").multipart, upload_id, files[0])
    inode = os.stat(assembly).st_ino

    def no_copy(*args, **kwargs):
        raise AssertionError("Complete copied a part")

    monkeypatch.setattr(multipart, "_copy_file", no_copy)
    info = engine.complete_multipart("outputs", "job-1/ckpt.bin", upload_id,
                                     [(n, etags[n]) for n in (1, 2, 3)], 2.0)
    body = data[1] + data[2] + data[3]
    assert _read(engine, "job-1/ckpt.bin") == body and info.size == len(body)
    assert os.stat(engine.bucket("outputs").object_path("job-1/ckpt.bin")).st_ino == inode
    digest = hashlib.md5(b"".join(hashlib.md5(data[n]).digest() for n in (1, 2, 3))).hexdigest()
    assert info.etag == f'"{digest}-3"'
    assert _upload_files(engine, upload_id) == [multipart.COMPLETED]
    # a repeated Complete answers the same object
    again = engine.complete_multipart("outputs", "job-1/ckpt.bin", upload_id,
                                      [(n, etags[n]) for n in (1, 2, 3)], 3.0)
    assert again.etag == info.etag


def test_parts_that_cannot_go_in_place_are_copied_and_the_object_is_the_same(engine):
    from stdaemon.s3 import multipart

    size = MIN_PART_SIZE
    # the short last part arrives first: it sets the part size, the full parts get files of their own
    upload_id = engine.create_multipart("outputs", "a", 1.0)
    data = {1: os.urandom(size), 2: os.urandom(size), 3: os.urandom(777)}
    etags = {3: _part(engine, "a", upload_id, 3, data[3])[1]}
    for number in (1, 2):
        pending, etags[number] = _part(engine, "a", upload_id, number, data[number])
        assert pending.in_place is None
    engine.complete_multipart("outputs", "a", upload_id, [(n, etags[n]) for n in (1, 2, 3)], 2.0)
    assert _read(engine, "a") == data[1] + data[2] + data[3]

    # a re-uploaded part replaces the one in place; an unknown size and a part uploaded twice at
    # once get files of their own; a part beyond those listed keeps Complete from using the file
    upload_id = engine.create_multipart("outputs", "b", 1.0)
    data = {1: os.urandom(size), 2: os.urandom(size), 3: os.urandom(size)}
    etags = {n: _part(engine, "b", upload_id, n, data[n])[1] for n in (1, 2, 3)}
    data[2] = os.urandom(size)
    pending, etags[2] = _part(engine, "b", upload_id, 2, data[2])
    assert pending.in_place is None
    first = engine.begin_part("outputs", "b", upload_id, 4, expected_size=size)
    second = engine.begin_part("outputs", "b", upload_id, 4, expected_size=size)
    assert first.in_place is not None and second.in_place is None
    first.abort()
    second.abort()
    unknown = engine.begin_part("outputs", "b", upload_id, 5)
    assert unknown.in_place is None
    unknown.abort()
    engine.complete_multipart("outputs", "b", upload_id, [(n, etags[n]) for n in (1, 2)], 2.0)
    assert _read(engine, "b") == data[1] + data[2]
    assert _upload_files(engine, upload_id) == [multipart.COMPLETED]


def test_an_aborted_part_in_place_leaves_nothing_and_is_uploaded_again(engine):
    size = MIN_PART_SIZE
    upload_id = engine.create_multipart("outputs", "c", 1.0)
    data = {1: os.urandom(size), 2: os.urandom(size)}
    broken = engine.begin_part("outputs", "c", upload_id, 2, expected_size=size)
    broken.write(os.urandom(size // 2))
    broken.abort()                       # the client went away half-way
    _, parts = engine.list_parts("outputs", "c", upload_id)
    assert parts == []
    etags = {n: _part(engine, "c", upload_id, n, data[n])[1] for n in (2, 1)}
    engine.complete_multipart("outputs", "c", upload_id, [(n, etags[n]) for n in (1, 2)], 2.0)
    assert _read(engine, "c") == data[1] + data[2]


def test_a_complete_refused_by_a_condition_leaves_the_upload_whole(engine):
    size = MIN_PART_SIZE
    _put(engine, "d", b"already here")
    upload_id = engine.create_multipart("outputs", "d", 1.0)
    data = {1: os.urandom(size), 2: os.urandom(10)}
    etags = {n: _part(engine, "d", upload_id, n, data[n])[1] for n in (1, 2)}
    listed = [(n, etags[n]) for n in (1, 2)]
    with pytest.raises(StorageError) as err:
        engine.complete_multipart("outputs", "d", upload_id, listed, 2.0, if_none_match=True)
    assert err.value.code == "PreconditionFailed"
    assert _read(engine, "d") == b"already here"
    engine.complete_multipart("outputs", "d", upload_id, listed, 3.0)
    assert _read(engine, "d") == data[1] + data[2]


def test_parts_in_place_survive_a_restart_and_a_late_writer_cannot_touch_the_object(tmp_path):
    size = MIN_PART_SIZE
    root = str(tmp_path / "outputs")
    engine = StorageEngine({"outputs": root})
    upload_id = engine.create_multipart("outputs", "e", 1.0)
    data = {1: os.urandom(size), 2: os.urandom(size), 3: os.urandom(5)}
    etags = {n: _part(engine, "e", upload_id, n, data[n])[1] for n in (1, 2)}
    restarted = StorageEngine({"outputs": root})   # what the process kept in memory is gone
    etags[3] = _part(restarted, "e", upload_id, 3, data[3])[1]
    late = restarted.begin_part("outputs", "e", upload_id, 4, expected_size=size)
    assert late.in_place is not None
    late.write(b"x" * 100)
    restarted.complete_multipart("outputs", "e", upload_id, [(n, etags[n]) for n in (1, 2, 3)], 2.0)
    body = data[1] + data[2] + data[3]
    assert _read(restarted, "e") == body
    late.write(b"y" * 100)
    with pytest.raises(StorageError) as err:
        restarted.commit_part("outputs", "e", upload_id, 4, late, 3.0)
    assert err.value.code == "NoSuchUpload"
    assert _read(restarted, "e") == body


def test_another_upload_of_a_part_being_recorded_never_goes_over_its_bytes(engine, monkeypatch):
    """An SDK retry of a part may arrive while the first upload of it is being recorded: until the
    record is written the number stays claimed, so the retry gets a file of its own and the bytes
    the record describes stay as they are."""
    from stdaemon.s3 import multipart

    size = MIN_PART_SIZE
    upload_id = engine.create_multipart("outputs", "f", 1.0)
    data = {1: os.urandom(size), 2: os.urandom(size)}
    retries = []
    original = multipart._write_json_atomic

    def record(path, value, tmp):
        if path.endswith("00002.part.json") and not retries:
            retry = engine.begin_part("outputs", "f", upload_id, 2, expected_size=size)
            retries.append(retry.in_place)
            retry.write(os.urandom(size // 2))   # ... and then its client gives up
            retry.abort()
        return original(path, value, tmp)

    monkeypatch.setattr(multipart, "_write_json_atomic", record)
    etags = {n: _part(engine, "f", upload_id, n, data[n])[1] for n in (1, 2)}
    assert retries == [None]
    late = engine.begin_part("outputs", "f", upload_id, 2, expected_size=size)
    assert late.in_place is None                  # recorded: a re-upload gets a file of its own
    late.abort()
    engine.complete_multipart("outputs", "f", upload_id, [(n, etags[n]) for n in (1, 2)], 2.0)
    assert _read(engine, "f") == data[1] + data[2]
