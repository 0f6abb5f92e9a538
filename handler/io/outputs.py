"""Where a job's output files go: an output sink. The bucket (handler.io.storage.S3Storage) is one,
storing a file and answering its presigned URL; with no bucket, :class:`InlineStorage` puts small
files in the result itself as base64.
"""

from __future__ import annotations

import base64
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from handler.cancel import CancelToken
from handler.errors import InputTooLarge


@dataclass(frozen=True)
class StoredFile:
    """One output file as the client sees it."""

    name: str
    content_type: str
    size: int
    key: str | None = None
    url: str | None = None
    base64: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


class OutputSink(Protocol):
    """Saves a job's output files."""

    # Whether saved files outlive the result (a bucket), or travel inside it (inline).
    durable: bool

    def save(
        self, path: Path, *, name: str, content_type: str, request_id: str, cancel: CancelToken | None = None
    ) -> StoredFile: ...


class InlineStorage:
    """No bucket: small files come back base64 in the result, within a per-job budget. It only
    stores outputs: a job with no bucket has none to read its inputs from (see MediaInputs)."""

    durable = False

    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._used_lock = threading.Lock()
        self._used = 0

    def save(
        self, path: Path, *, name: str, content_type: str, request_id: str, cancel: CancelToken | None = None
    ) -> StoredFile:
        size = path.stat().st_size
        with self._used_lock:
            if self._used + size > self._max_bytes:
                raise InputTooLarge(
                    f"output {name!r} ({size} bytes) does not fit inline in the result "
                    f"(limit {self._max_bytes} bytes); configure a bucket or send s3Config"
                )
            self._used += size
        encoded = base64.b64encode(path.read_bytes()).decode("ascii")
        return StoredFile(name=name, content_type=content_type, size=size, base64=encoded)
