"""Structured logging: structlog over the standard library, with secrets redacted.

Every record, the worker's own and those of libraries (botocore, urllib3) routed through the
standard library, passes one redaction step before it is rendered:

* values under secret-looking keys (``secret``, ``token``, ``password``, ``authorization``...)
  are replaced;
* query strings of URLs that carry signatures or credentials (presigned URLs) are cut;
* any value registered with :func:`register_secret` (bucket keys, per-job credentials) is
  replaced wherever it appears in a string.

Output is JSON on RunPod and readable console text locally; each job binds ``request_id``
and ``job_id`` once with structlog's contextvars so every line of the job carries them.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import threading
from collections.abc import Iterator, MutableMapping
from typing import Any, TextIO

import structlog

REDACTED = "[REDACTED]"

_SENSITIVE_WORDS = (
    r"(secret|password|passwd|token|authorization|api[_-]?key|access[_-]?key|credential|"
    r"signature|accessid|session[_-]?id)"
)
_SECRET_KEY = re.compile(_SENSITIVE_WORDS, re.IGNORECASE)
# A secret-named key and its string value inside a printed dict or JSON text:
# {'accessSecret': '...'} or {"accessSecret": "..."}, as libraries print whole jobs.
_SECRET_PAIR = re.compile(
    r"""(?P<key>(?P<q>['"])[\w.-]*""" + _SENSITIVE_WORDS + r"""[\w.-]*(?P=q)\s*:\s*)"""
    r"""(?P<vq>['"])(?:\\.|(?!(?P=vq)).)*(?P=vq)""",
    re.IGNORECASE,
)
_SIGNED_QUERY = re.compile(
    r"\?[^\s\"'<>]*(?:X-Amz-|AWSAccessKeyId|Signature=|sig=|token=|key=)[^\s\"'<>]*",
    re.IGNORECASE,
)
_AUTH_HEADER = re.compile(r"(AWS4-HMAC-SHA256\s+Credential=|Bearer\s+|Basic\s+)[^\s\"',]+")
# Libraries whose DEBUG output includes request headers and signatures.
_NOISY_LOGGERS = ("botocore", "boto3", "s3transfer", "urllib3", "httpcore", "httpx", "numba")
_MIN_SECRET_LENGTH = 6


class _SecretRegistry:
    """Literal secret values to scrub from every log string: the process's own for its life, a
    job's for the job's (counted, as two jobs may bring the same one)."""

    def __init__(self) -> None:
        self._values_lock = threading.Lock()
        self._permanent: frozenset[str] = frozenset()
        self._held: dict[str, int] = {}
        # What scrub reads without the lock: the two above, together.
        self._values: frozenset[str] = frozenset()

    def add(self, value: str | None) -> None:
        if not value or len(value) < _MIN_SECRET_LENGTH:
            return
        with self._values_lock:
            self._permanent = self._permanent | {value}
            self._values = self._permanent | set(self._held)

    def hold(self, value: str) -> None:
        if len(value) < _MIN_SECRET_LENGTH:
            return
        with self._values_lock:
            self._held[value] = self._held.get(value, 0) + 1
            self._values = self._permanent | set(self._held)

    def release(self, value: str) -> None:
        if len(value) < _MIN_SECRET_LENGTH:
            return
        with self._values_lock:
            left = self._held.pop(value, 1) - 1
            if left:
                self._held[value] = left
            self._values = self._permanent | set(self._held)

    def scrub(self, text: str) -> str:
        for value in self._values:
            if value in text:
                text = text.replace(value, REDACTED)
        return text


_secrets = _SecretRegistry()


def register_secret(value: str | None) -> None:
    """Never let ``value`` appear in a log line from now on."""
    _secrets.add(value)


@contextlib.contextmanager
def secret_held(value: str) -> Iterator[None]:
    """Never let ``value`` (a job's own credential, once it validated) appear in a log line while
    the block runs; afterwards it is forgotten, so what clients send cannot grow the list."""
    _secrets.hold(value)
    try:
        yield
    finally:
        _secrets.release(value)


def redact_text(text: str) -> str:
    """``text`` with signed query strings, auth headers, values of secret-named keys in printed
    dicts, and registered secrets removed."""
    text = _SECRET_PAIR.sub(lambda m: f"{m['key']}{m['vq']}{REDACTED}{m['vq']}", text)
    text = _SIGNED_QUERY.sub("?" + REDACTED, text)
    text = _AUTH_HEADER.sub(lambda m: m.group(1) + REDACTED, text)
    return _secrets.scrub(text)


def _redact_value(key: str, value: Any) -> Any:
    if _SECRET_KEY.search(key) and value not in (None, "", False):
        return REDACTED
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {k: _redact_value(str(k), v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_redact_value(key, v) for v in value]
    if isinstance(value, BaseException):
        return redact_text(repr(value))
    return value


def redact(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: scrub every field of the event."""
    for key in list(event_dict):
        event_dict[key] = _redact_value(key, event_dict[key])
    return event_dict


def _redact_rendered(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    # Tracebacks are rendered into text late; scrub them after rendering.
    for key in ("exception", "stack"):
        if isinstance(event_dict.get(key), str):
            event_dict[key] = redact_text(event_dict[key])
    return event_dict


def _escape(text: str) -> str:
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def escape_controls(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor of console lines: control and line-break characters (ESC, U+2028) of
    every string value escaped, so a value a client chose (a job id) cannot erase, forge or split
    a line, or talk to the terminal; a traceback keeps its own line breaks. (JSON lines need
    none: the JSON renderer escapes them.)"""
    for key, value in event_dict.items():
        if isinstance(value, str) and not value.isprintable():
            keep_lines = key in ("exception", "stack")
            event_dict[key] = "\n".join(map(_escape, value.split("\n"))) if keep_lines else _escape(value)
    return event_dict


def _renderer(*, json: bool) -> list[Any]:
    if json:
        return [structlog.processors.JSONRenderer()]
    return [escape_controls, structlog.dev.ConsoleRenderer(colors=False)]


def configure_logging(*, level: str = "INFO", json: bool = False, stream: TextIO | None = None) -> None:
    """Set up structlog and the standard library so every line is structured and redacted."""
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact,
    ]
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            _redact_rendered,
            *_renderer(json=json),
        ],
    )
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    # The worker owns the root logger's output: every handler already there goes, not only an
    # earlier one of ours. The RunPod SDK calls ``logging.basicConfig`` when it is imported
    # (runpod/serverless/utils/rp_upload.py), which put a second stderr handler on the root
    # logger, and every line, the worker's and the libraries', was printed twice (both modes).
    for existing in list(root.handlers):
        root.removeHandler(existing)
    handler._media_worker = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLevelName(level)))


def get_logger(name: str) -> Any:
    return structlog.stdlib.get_logger(name)


def redact_sdk_logs() -> None:
    """Pass the RunPod SDK's own log lines through the same redaction.

    The SDK prints whole job results (presigned URLs included) in local mode and at DEBUG;
    its logger is a plain print-based singleton, so its one output method is wrapped.
    """
    from runpod.serverless.modules.rp_logger import RunPodLogger

    original = RunPodLogger.log
    if getattr(original, "_redacting", False):
        return

    def log(self: Any, message: Any, message_level: str = "INFO", job_id: str | None = None) -> None:
        original(self, redact_text(str(message)), message_level, job_id)

    log._redacting = True  # type: ignore[attr-defined]
    RunPodLogger.log = log
