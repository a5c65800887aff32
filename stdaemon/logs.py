"""Structured logging (S16): JSON lines or text, correlation ids, context fields.

Python API as in the operations guide::

    configure_structured_logging(level="INFO", json_output=True, log_file=None)
    logger = get_logger("stdaemon.jobs")
    with LogContext(job_id="abc123", provider="replicate"):
        logger.info("Processing job")

Every event goes through ``twisted.logger``; :func:`make_observer` builds the
observer that renders it.  A JSON line has exactly ``timestamp`` (ISO-8601 UTC
with milliseconds), ``level``, ``logger``, ``message``, ``correlation_id``,
``source {file, line, function}``, ``extra {...}`` and ``exception`` when
there is one.  Twisted's own ``jsonFileLogObserver`` writes ``\\x1e``-separated
records without a rendered message, so this module has its own observer.

Under twistd the observer is installed as the application's ``ILogObserver``
(``twistd --logger stdaemon.logs.observer`` works too); the log file is
reopened on SIGHUP for logrotate.
"""

from __future__ import annotations

import contextvars
import io
import json
import logging as stdlib_logging
import os
import sys
import threading
import traceback
from datetime import datetime, timezone
from typing import Any, Optional, TextIO

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    Logger,
    formatEvent,
    globalLogBeginner,
    globalLogPublisher,
)
from zope.interface import implementer

correlation_id_var: contextvars.ContextVar[str] = contextvars.ContextVar(
    "stdaemon_correlation_id", default="")
_context_var: contextvars.ContextVar[dict] = contextvars.ContextVar(
    "stdaemon_log_context", default={})

_LEVELS = {
    "DEBUG": LogLevel.debug,
    "INFO": LogLevel.info,
    "WARNING": LogLevel.warn,
    "WARN": LogLevel.warn,
    "ERROR": LogLevel.error,
    "CRITICAL": LogLevel.critical,
}
_LEVEL_NAMES = {
    LogLevel.debug: "DEBUG",
    LogLevel.info: "INFO",
    LogLevel.warn: "WARNING",
    LogLevel.error: "ERROR",
    LogLevel.critical: "CRITICAL",
}
# Keys twisted.logger and this module put in events; everything else a caller
# passes is "extra".
_RESERVED = {
    "log_logger", "log_level", "log_namespace", "log_source", "log_format", "log_time",
    "log_failure", "log_text", "log_io", "log_system", "log_trace", "log_flattened",
    "log_legacy", "message", "format", "isError", "system", "time", "failure", "why",
    "st_source", "st_correlation_id", "st_context", "log_observer_failure",
}


class LogContext:
    """Context-local fields added to every log line in the ``with`` block.

    Backed by ``contextvars``: concurrent requests (each handled in its own
    context) never see each other's fields."""

    def __init__(self, **fields: Any):
        self.fields = fields
        self._token: Optional[contextvars.Token] = None

    def __enter__(self) -> "LogContext":
        merged = dict(_context_var.get())
        merged.update(self.fields)
        self._token = _context_var.set(merged)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._token is not None:
            _context_var.reset(self._token)


def current_context() -> dict:
    return dict(_context_var.get())


class StructuredLogger:
    """A ``twisted.logger.Logger`` that records the caller's source location,
    the correlation id and :class:`LogContext` fields with each event.

    ``message`` may use ``{name}`` placeholders filled from keyword
    arguments (Twisted's format); keyword arguments are also the line's
    ``extra``."""

    def __init__(self, name: str):
        self.name = name
        self._logger = Logger(namespace=name)

    def _emit(self, level: LogLevel, message: str, depth: int = 2, **kwargs: Any) -> None:
        frame = sys._getframe(depth)
        kwargs["st_source"] = {
            "file": os.path.basename(frame.f_code.co_filename),
            "line": frame.f_lineno,
            "function": frame.f_code.co_name,
        }
        kwargs["st_correlation_id"] = correlation_id_var.get()
        kwargs["st_context"] = _context_var.get()
        self._logger.emit(level, message, **kwargs)

    def debug(self, message: str, **kwargs: Any) -> None:
        self._emit(LogLevel.debug, message, **kwargs)

    def info(self, message: str, **kwargs: Any) -> None:
        self._emit(LogLevel.info, message, **kwargs)

    def warning(self, message: str, **kwargs: Any) -> None:
        self._emit(LogLevel.warn, message, **kwargs)

    warn = warning

    def error(self, message: str, **kwargs: Any) -> None:
        self._emit(LogLevel.error, message, **kwargs)

    def critical(self, message: str, **kwargs: Any) -> None:
        self._emit(LogLevel.critical, message, **kwargs)

    def failure(self, message: str, failure: Any = None, level: LogLevel = LogLevel.critical,
                **kwargs: Any) -> None:
        """Log the current exception (or ``failure``) with its traceback."""
        from twisted.python.failure import Failure

        if failure is None:
            failure = Failure()
        self._emit(level, message, log_failure=failure, **kwargs)

    exception = failure


def get_logger(name: str) -> StructuredLogger:
    return StructuredLogger(name)


# -- rendering ---------------------------------------------------------------


def _timestamp(event: dict) -> str:
    when = event.get("log_time")
    moment = datetime.fromtimestamp(when, tz=timezone.utc) if when else datetime.now(timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return repr(value)


def event_to_record(event: dict) -> dict:
    """The S16 fields of one log event."""
    source = event.get("st_source") or {"file": None, "line": None, "function": None}
    extra = dict(event.get("st_context") or {})
    for key, value in event.items():
        if key not in _RESERVED and not key.startswith("log_"):
            extra[key] = value
    try:
        context = event.get("st_context") or {}
        message = formatEvent({**context, **event} if context else event)
    except Exception:  # a bad format string must not lose the line
        message = str(event.get("log_format"))
    failure = event.get("log_failure")
    if failure is not None and not message:
        message = str(getattr(failure, "value", failure))
    record = {
        "timestamp": _timestamp(event),
        "level": _LEVEL_NAMES.get(event.get("log_level"), "INFO"),
        "logger": event.get("log_namespace") or "twisted",
        "message": message,
        "correlation_id": event.get("st_correlation_id") or None,
        "source": source,
        "extra": _jsonable(extra),
    }
    if failure is not None:
        try:
            record["exception"] = failure.getTraceback()
        except Exception:
            record["exception"] = repr(failure)
    return record


class ReopenableFile:
    """An append-mode text file that can be reopened (SIGHUP, logrotate)."""

    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        self._file = open(path, "a", encoding="utf-8")

    def write(self, text: str) -> None:
        with self._lock:
            self._file.write(text)
            self._file.flush()

    def reopen(self) -> None:
        with self._lock:
            old, self._file = self._file, open(self.path, "a", encoding="utf-8")
            old.close()

    def flush(self) -> None:
        with self._lock:
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._file.close()


@implementer(ILogObserver)
class StructuredObserver:
    """Writes each event as a JSON line or a text line to one or more outputs."""

    def __init__(self, json_output: bool, outputs: list):
        self.json_output = json_output
        self.outputs = outputs

    def __call__(self, event: dict) -> None:
        record = event_to_record(event)
        if self.json_output:
            line = json.dumps(record, ensure_ascii=False, default=repr) + "\n"
        else:
            line = self._text(record, str(event.get("log_format") or ""))
        for output in self.outputs:
            try:
                output.write(line)
                if isinstance(output, io.TextIOBase):
                    output.flush()
            except Exception:
                pass

    @staticmethod
    def _text(record: dict, fmt: str = "") -> str:
        extras = " ".join(f"{k}={v}" for k, v in record["extra"].items()
                          if "{" + k + "}" not in fmt)
        cid = f" [{record['correlation_id']}]" if record["correlation_id"] else ""
        line = f"{record['timestamp']} {record['level']:<8} {record['logger']}{cid}: {record['message']}"
        if extras:
            line += f" {extras}"
        if "exception" in record:
            line += "\n" + record["exception"].rstrip()
        return line + "\n"

    def reopen(self) -> None:
        for output in self.outputs:
            if isinstance(output, ReopenableFile):
                output.reopen()


_debug_wanted = False


def debug_enabled() -> bool:
    """Does an observer built here keep debug lines?  Per-request debug lines (the request log
    line of every answered request) are skipped when none does, instead of being built and dropped
    by the filter."""
    return _debug_wanted


def make_observer(level: str = "INFO", json_output: bool = False, log_file: Optional[str] = None,
                  stream: Optional[TextIO] = None) -> FilteringLogObserver:
    """Build the filtering observer; ``.structured`` is the inner observer
    (for ``reopen()``)."""
    global _debug_wanted
    if _LEVELS.get(level.upper(), LogLevel.info) is LogLevel.debug:
        _debug_wanted = True
    outputs: list = [stream if stream is not None else sys.stdout]
    if log_file:
        outputs.append(ReopenableFile(log_file))
    inner = StructuredObserver(json_output, outputs)
    predicate = LogLevelFilterPredicate(defaultLogLevel=_LEVELS.get(level.upper(), LogLevel.info))
    filtering = FilteringLogObserver(inner, [predicate])
    filtering.structured = inner  # type: ignore[attr-defined]
    return filtering


def observer() -> FilteringLogObserver:
    """``twistd --logger stdaemon.logs.observer``: settings from the environment."""
    return make_observer(
        level=os.environ.get("SIMPLETUNER_LOG_LEVEL", "INFO"),
        json_output=os.environ.get("SIMPLETUNER_LOG_FORMAT", "text").lower() == "json",
        log_file=os.environ.get("SIMPLETUNER_LOG_FILE") or None,
    )


class _StdlibBridge(stdlib_logging.Handler):
    """Forward the standard library's log records (boto3, hvac, …) into
    twisted.logger so they get the same format."""

    def emit(self, record: stdlib_logging.LogRecord) -> None:
        level = {
            stdlib_logging.DEBUG: LogLevel.debug,
            stdlib_logging.INFO: LogLevel.info,
            stdlib_logging.WARNING: LogLevel.warn,
            stdlib_logging.ERROR: LogLevel.error,
        }.get(record.levelno, LogLevel.critical)
        Logger(namespace=record.name).emit(
            level, "{msg}", msg=record.getMessage(),
            st_source={"file": record.filename, "line": record.lineno, "function": record.funcName},
            st_correlation_id=correlation_id_var.get(), st_context=_context_var.get())


_bridge = _StdlibBridge()


def bridge_stdlib_logging(level: str = "WARNING") -> None:
    root = stdlib_logging.getLogger()
    if _bridge not in root.handlers:
        root.addHandler(_bridge)
    root.setLevel(getattr(stdlib_logging, level.upper(), stdlib_logging.WARNING))


_configured: list = []


def configure_structured_logging(level: str = "INFO", json_output: bool = False,
                                 log_file: Optional[str] = None,
                                 stream: Optional[TextIO] = None) -> FilteringLogObserver:
    """Send twisted.logger (and the stdlib ``logging`` module) to a structured
    observer.  Safe to call more than once: the previous observer is removed."""
    obs = make_observer(level, json_output, log_file, stream)
    for old in _configured:
        globalLogPublisher.removeObserver(old)
    _configured[:] = [obs]
    if globalLogBeginner._temporaryObserver is not None:  # nothing began logging yet
        globalLogBeginner.beginLoggingTo([obs], redirectStandardIO=False)
    else:
        globalLogPublisher.addObserver(obs)
    bridge_stdlib_logging("DEBUG" if level.upper() == "DEBUG" else "WARNING")
    return obs


def track_observer(obs: FilteringLogObserver) -> None:
    """Include an observer built elsewhere (twistd's) in SIGHUP reopening."""
    if obs not in _configured:
        _configured.append(obs)


def reopen_log_files() -> None:
    for obs in _configured:
        obs.structured.reopen()

