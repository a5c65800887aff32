"""Structured logging API: JSON fields, LogContext isolation, levels, stdlib bridge."""

from __future__ import annotations

import io
import json
import logging

from twisted.internet import defer, task
from twisted.logger import globalLogPublisher

from stdaemon.logs import (
    LogContext,
    StructuredObserver,
    configure_structured_logging,
    correlation_id_var,
    get_logger,
    make_observer,
)


def capture(level="DEBUG", json_output=True):
    stream = io.StringIO()
    observer = make_observer(level, json_output, None, stream)
    globalLogPublisher.addObserver(observer)
    return stream, observer


def lines(stream):
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def test_json_line_has_exactly_the_spec_fields():
    stream, observer = capture()
    try:
        log = get_logger("stdaemon.jobs")
        token = correlation_id_var.set("cid-1")
        try:
            with LogContext(job_id="xyz789", provider="replicate"):
                log.info("Job {job_id} submitted", attempt=1)
        finally:
            correlation_id_var.reset(token)
    finally:
        globalLogPublisher.removeObserver(observer)
    [record] = [r for r in lines(stream) if r["logger"] == "stdaemon.jobs"]
    assert set(record) == {"timestamp", "level", "logger", "message", "correlation_id", "source", "extra"}
    assert record["message"] == "Job xyz789 submitted"
    assert record["level"] == "INFO" and record["correlation_id"] == "cid-1"
    assert record["source"]["file"] == "test_logs.py"
    assert record["source"]["function"] == "test_json_line_has_exactly_the_spec_fields"
    assert record["extra"] == {"job_id": "xyz789", "provider": "replicate", "attempt": 1}


def test_exception_field_and_level_filter():
    stream, observer = capture(level="WARNING")
    try:
        log = get_logger("stdaemon.test")
        log.info("hidden")
        try:
            raise ValueError("bad thing")
        except ValueError:
            log.failure("it failed")
    finally:
        globalLogPublisher.removeObserver(observer)
    records = [r for r in lines(stream) if r["logger"] == "stdaemon.test"]
    assert [r["message"] for r in records] == ["it failed"]
    assert "ValueError: bad thing" in records[0]["exception"]
    assert records[0]["level"] == "CRITICAL"


def test_log_context_is_isolated_between_concurrent_tasks():
    """Two interleaved coroutines (as two requests would be) each see only
    their own context fields."""
    stream, observer = capture()
    clock = task.Clock()
    log = get_logger("stdaemon.ctx")

    async def worker(name):
        with LogContext(request=name):
            await task.deferLater(clock, 1, lambda: None)
            log.info("step", worker=name)

    try:
        a = defer.ensureDeferred(worker("a"))
        b = defer.ensureDeferred(worker("b"))
        clock.advance(1)
        assert a.called and b.called
    finally:
        globalLogPublisher.removeObserver(observer)
    records = [r for r in lines(stream) if r["logger"] == "stdaemon.ctx"]
    assert sorted((r["extra"]["request"], r["extra"]["worker"]) for r in records) == [("a", "a"), ("b", "b")]


def test_text_format_and_stdlib_bridge(tmp_path):
    log_file = tmp_path / "out.log"
    stream = io.StringIO()
    observer = configure_structured_logging("INFO", json_output=False, log_file=str(log_file),
                                            stream=stream)
    try:
        logging.getLogger("botocore.test").warning("from the stdlib %s", "logger")
        get_logger("stdaemon.text").info("plain {what}", what="text")
    finally:
        globalLogPublisher.removeObserver(observer)
    text = stream.getvalue()
    assert "WARNING  botocore.test: from the stdlib logger" in text
    assert "INFO     stdaemon.text: plain text" in text
    assert log_file.read_text() == text
    assert not text.lstrip().startswith("{")


def test_observer_reopen_writes_to_the_new_file(tmp_path):
    from stdaemon.logs import ReopenableFile

    path = tmp_path / "a.log"
    output = ReopenableFile(str(path))
    observer = StructuredObserver(True, [output])
    observer({"log_format": "one", "log_namespace": "x", "log_level": None, "log_time": 0})
    path.rename(tmp_path / "a.log.1")
    observer.reopen()
    observer({"log_format": "two", "log_namespace": "x", "log_level": None, "log_time": 0})
    assert json.loads(path.read_text())["message"] == "two"
    assert json.loads((tmp_path / "a.log.1").read_text())["message"] == "one"
