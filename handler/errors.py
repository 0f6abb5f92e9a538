"""The worker's errors: one tree, each class carrying its code and whether a retry may help.

::

    WorkerError                  INTERNAL           anything unexpected
    ├── InvalidInput             INVALID_INPUT      schema, impossible parameters, bad media
    ├── InputTooLarge            INPUT_TOO_LARGE    over a configured size/duration limit
    ├── DownloadFailed           DOWNLOAD_FAILED    unreachable, timed out
    │   └── DownloadRefused      DOWNLOAD_FAILED    refused by the address guard (no retry)
    ├── GenerationTimeout        TIMEOUT            no GPU slot (or model load) in time
    ├── GpuOutOfMemory           GPU_OOM            CUDA out of memory, cache cleared
    ├── ModelLoadFailed          MODEL_LOAD_FAILED  weights missing or broken
    ├── UploadFailed             UPLOAD_FAILED      storage refused or unreachable
    ├── Overloaded               OVERLOADED         memory pressure, refused up front
    ├── Cancelled                CANCELLED          cancelled or shutting down
    └── CudaFatal                CUDA_FATAL         sticky CUDA error, worker must restart

Errors of the libraries underneath (botocore, ffmpeg, torch, pydantic) are translated into
these at the module that calls the library, with ``raise ... from exc``.
"""

from __future__ import annotations

import reprlib
from typing import Any, ClassVar

_MAX_SHOWN = 80
# Client errors that heal on retry (request timeout, throttling); every other 4xx will not.
TRANSIENT_CLIENT_STATUSES = frozenset({408, 429})


def transient_status(status: int) -> bool:
    """Whether an HTTP error status (of a download server or a bucket) may heal on retry."""
    return status >= 500 or status in TRANSIENT_CLIENT_STATUSES


def printable(text: str, *, limit: int = _MAX_SHOWN) -> str:
    """``text`` safe to echo in a message or a log line: control and line-break characters (ANSI
    escapes, U+2028) escaped, and at most ``limit`` characters. Cut before it is escaped, so a
    client's megabytes cost no more than ``limit`` characters of work."""
    head = text[: limit + 1]
    escaped = head if head.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in head)
    return escaped if len(escaped) <= limit and len(text) <= limit else escaped[: limit - 3] + "..."


# The repr of a client's value, built only as far as it can be shown (a long string, a deep list).
_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxlevel = 2
_SHORT_REPR.maxdict = _SHORT_REPR.maxlist = _SHORT_REPR.maxtuple = _SHORT_REPR.maxset = 4
_SHORT_REPR.maxstring = _SHORT_REPR.maxother = _SHORT_REPR.maxlong = _MAX_SHOWN


def shown(value: object, *, limit: int = _MAX_SHOWN) -> str:
    """A client's value as a message may quote it: its repr, cut while it is built, then
    :func:`printable`."""
    return printable(_SHORT_REPR.repr(value), limit=limit)


class WorkerError(Exception):
    """Base of every error the handler reports; also the code for unexpected failures."""

    code: ClassVar[str] = "INTERNAL"
    retryable: bool = True
    # Whether RunPod should restart the worker process after this error.
    refresh_worker: ClassVar[bool] = False

    def __init_subclass__(
        cls, *, code: str | None = None, retryable: bool | None = None, refresh_worker: bool = False
    ) -> None:
        """A subclass states its code and retry policy in its header; what it leaves out it inherits."""
        super().__init_subclass__()
        cls.code = cls.code if code is None else code
        cls.retryable = cls.retryable if retryable is None else retryable
        cls.refresh_worker = cls.refresh_worker or refresh_worker

    def __init__(
        self, message: str, *, field: str | None = None, retryable: bool | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        # A specific failure may know better than its class (an HTTP 404 will not heal).
        self.retryable = type(self).retryable if retryable is None else retryable

    def payload(self, request_id: str) -> dict[str, Any]:
        """The handler's result for this error (RunPod needs ``error`` to be a string)."""
        result: dict[str, Any] = {
            "error": f"{self.code}: {self.message}",
            "error_code": self.code,
            "request_id": request_id,
            "retryable": self.retryable,
        }
        if self.field is not None:
            result["field"] = self.field
        if self.refresh_worker:
            result["refresh_worker"] = True
        return result


class InvalidInput(WorkerError, code="INVALID_INPUT", retryable=False):
    """The job asks for something the worker will never do: retrying cannot help."""


class InputTooLarge(WorkerError, code="INPUT_TOO_LARGE", retryable=False):
    """The job is over a configured limit; the same job will always be."""


class DownloadFailed(WorkerError, code="DOWNLOAD_FAILED", retryable=True):
    """An input URL could not be fetched; the remote side may recover."""


class DownloadRefused(DownloadFailed, retryable=False):
    """The URL points somewhere the worker must not go (private address, bad scheme)."""


class GenerationTimeout(WorkerError, code="TIMEOUT", retryable=True):
    """No GPU slot came free in time; another worker, or later, may have one."""


class GpuOutOfMemory(WorkerError, code="GPU_OOM", retryable=True):
    """CUDA ran out of memory; the cache was cleared and the worker is still healthy."""


class ModelLoadFailed(WorkerError, code="MODEL_LOAD_FAILED", retryable=False):
    """Weights are missing or broken; nothing was cached, and a retry gets the same files."""


class UploadFailed(WorkerError, code="UPLOAD_FAILED", retryable=True):
    """Storage refused or could not be reached after the bounded retries."""


class Overloaded(WorkerError, code="OVERLOADED", retryable=True):
    """Memory pressure is over the admission threshold; the job was refused up front."""


class Cancelled(WorkerError, code="CANCELLED", retryable=True):
    """RunPod cancelled the job or the worker is shutting down."""


class CudaFatal(WorkerError, code="CUDA_FATAL", retryable=True, refresh_worker=True):
    """A sticky CUDA error: this process cannot use the GPU again, so it asks to be replaced."""


ALL_ERRORS: tuple[type[WorkerError], ...] = (
    WorkerError,
    InvalidInput,
    InputTooLarge,
    DownloadFailed,
    DownloadRefused,
    GenerationTimeout,
    GpuOutOfMemory,
    ModelLoadFailed,
    UploadFailed,
    Overloaded,
    Cancelled,
    CudaFatal,
)
