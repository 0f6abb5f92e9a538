"""The error tree, and every outside library's exceptions mapped at its one edge.

Each edge test enumerates the library's exception classes (not a hand-picked few), so a new
exception class in a library upgrade shows up here, and no failure of a job that can never
succeed comes back ``INTERNAL`` or retryable.
"""

from __future__ import annotations

import asyncio
import inspect
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import boto3.exceptions
import botocore.exceptions
import httpcore
import pytest
import s3transfer.exceptions
import torch
from botocore.exceptions import ClientError

from handler.errors import (
    ALL_ERRORS,
    CudaFatal,
    DownloadRefused,
    GpuOutOfMemory,
    InvalidInput,
    WorkerError,
    printable,
)
from handler.io import media_in, media_tools
from handler.io.download import httpcore_errors
from handler.io.storage import s3_errors
from handler.runtime.devices import cuda_errors
from handler.runtime.gate import Gate
from handler.runtime.registry import PipelineKey, Registry


def s3_error(code: str, status: int) -> ClientError:
    return ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")


CONTRACT = {
    "INVALID_INPUT": False, "INPUT_TOO_LARGE": False, "DOWNLOAD_FAILED": True, "TIMEOUT": True,
    "GPU_OOM": True, "MODEL_LOAD_FAILED": False, "UPLOAD_FAILED": True, "OVERLOADED": True,
    "CANCELLED": True, "INTERNAL": True, "CUDA_FATAL": True,
}


def test_codes_match_the_contract() -> None:
    """Every code of the design exists once (DownloadRefused shares DOWNLOAD_FAILED) with its retry flag."""
    codes = [cls.code for cls in ALL_ERRORS if cls is not DownloadRefused]
    assert len(codes) == len(set(codes))
    assert {cls.code: cls.retryable for cls in ALL_ERRORS if cls is not DownloadRefused} == CONTRACT
    assert DownloadRefused.retryable is False


def test_the_client_retries_what_the_worker_calls_retryable() -> None:
    """client/retry.py keeps its own copy of the retry table (the client imports nothing of the
    worker): it names exactly the codes whose error class is retryable."""
    from client.retry import RETRYABLE

    assert {cls.code for cls in ALL_ERRORS if cls is not DownloadRefused and cls.retryable} == RETRYABLE


def test_the_client_retries_every_status_the_worker_calls_transient() -> None:
    """What heals on retry for the worker's downloads and bucket calls, the client retries too
    (it adds 425, RunPod's own "too early")."""
    from client.api import _RETRYABLE_HTTP
    from handler.errors import TRANSIENT_CLIENT_STATUSES

    assert _RETRYABLE_HTTP >= TRANSIENT_CLIENT_STATUSES


def test_payload_shape() -> None:
    """The payload is what RunPod and clients need: a string error, code, request id, retry flag."""
    payload = InvalidInput("language: unknown", field="language").payload("rid")
    assert payload == {"error": "INVALID_INPUT: language: unknown", "error_code": "INVALID_INPUT",
                       "request_id": "rid", "retryable": False, "field": "language"}


def test_only_a_sticky_cuda_error_asks_for_a_new_worker() -> None:
    """CUDA_FATAL's payload carries ``refresh_worker``; no other code's does."""
    asking = {cls.code for cls in ALL_ERRORS if "refresh_worker" in cls("x").payload("rid")}
    assert asking == {"CUDA_FATAL"}
    assert CudaFatal("x").payload("rid")["refresh_worker"] is True


def test_every_error_is_a_worker_error() -> None:
    """All codes descend from WorkerError, so the handler's one except clause catches them."""
    assert all(issubclass(cls, WorkerError) for cls in ALL_ERRORS)


def test_printable_escapes_and_shortens() -> None:
    """Echoed client text cannot carry a newline or an ANSI escape, and is cut to its limit."""
    shown = printable("a\nb\x1b[31mc" + "x" * 200)
    assert "\n" not in shown and "\x1b" not in shown and "\\n" in shown and "\\x1b" in shown
    assert len(shown) == 80 and shown.endswith("...")


def exception_classes(*modules: ModuleType) -> list[type[BaseException]]:
    """Every exception class a module defines (warnings excluded)."""
    found: dict[str, type[BaseException]] = {}
    for module in modules:
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, Exception) and not issubclass(cls, Warning) and cls.__module__ == module.__name__:
                found[f"{cls.__module__}.{name}"] = cls
    return [found[key] for key in sorted(found)]


def instance(cls: type[BaseException]) -> BaseException:
    """An instance of ``cls`` without knowing its constructor's arguments."""
    if issubclass(cls, ClientError):
        return cls({"Error": {"Code": "X"}, "ResponseMetadata": {"HTTPStatusCode": 500}}, "GetObject")
    exc = cls.__new__(cls)
    Exception.__init__(exc, "injected")
    exc.kwargs = {}  # type: ignore[attr-defined]  # botocore's errors keep their format arguments here
    return exc


def translated(edge: Any, exc: BaseException) -> WorkerError:
    with pytest.raises(WorkerError) as info, edge:
        raise exc
    return info.value


BOTO_CLASSES = exception_classes(botocore.exceptions, boto3.exceptions, s3transfer.exceptions)
TRANSIENT_BOTO = {"ConnectionError", "EndpointConnectionError", "ConnectTimeoutError", "ProxyConnectionError",
                  "SSLError", "HTTPClientError", "ConnectionClosedError", "ReadTimeoutError",
                  "ResponseStreamingError", "IncompleteReadError", "ChecksumError", "FlexibleChecksumError",
                  "CapacityNotAvailableError", "CredentialRetrievalError", "MetadataRetrievalError",
                  "TokenRetrievalError", "ClientError", "EventStreamError", "CancelledError",
                  "RetriesExceededError", "FatalError"}


@pytest.mark.parametrize("cls", BOTO_CLASSES, ids=lambda c: c.__name__)
def test_every_storage_error_is_mapped(cls: type[BaseException]) -> None:
    """Each boto3/botocore/s3transfer exception becomes UPLOAD_FAILED on a write and DOWNLOAD_FAILED on a
    read (CANCELLED for a cancelled transfer), retryable only for network and store hiccups."""
    write = translated(s3_errors(bucket="b"), instance(cls))
    read = translated(s3_errors(bucket="b", field="audio"), instance(cls))
    if cls is s3transfer.exceptions.CancelledError:  # s3transfer's FatalError is a failure, not a cancel
        assert write.code == read.code == "CANCELLED"
        return
    assert (write.code, read.code) == ("UPLOAD_FAILED", "DOWNLOAD_FAILED")
    assert read.field == "audio"
    transient = cls.__name__ in TRANSIENT_BOTO
    assert write.retryable is transient and read.retryable is transient, cls.__name__


@pytest.mark.parametrize(
    ("code", "status", "retryable"),
    [("InvalidAccessKeyId", 403, False), ("AccessDenied", 403, False), ("InvalidRequest", 400, False),
     ("SlowDown", 503, True), ("InternalError", 500, True), ("RequestTimeout", 400, True), ("X", 429, True)],
)
def test_store_answers_decide_retry(code: str, status: int, retryable: bool) -> None:
    """A 4xx from the store will not heal (writes and reads alike) unless it is throttling or a timeout."""
    for field in (None, "audio"):
        mapped = translated(s3_errors(bucket="b", field=field), s3_error(code, status))
        assert mapped.retryable is retryable
    missing = translated(s3_errors(bucket="b", field="audio"), s3_error("NoSuchKey", 404))
    assert missing.code == "DOWNLOAD_FAILED" and missing.retryable is False


def test_wrapped_upload_failure_is_unwrapped() -> None:
    """boto3's S3UploadFailedError carries the store's answer as its context; that answer decides."""
    try:
        try:
            raise s3_error("AccessDenied", 403)
        except ClientError as inner:
            raise boto3.exceptions.S3UploadFailedError("failed") from inner
    except boto3.exceptions.S3UploadFailedError as outer:
        mapped = translated(s3_errors(bucket="b"), outer)
    assert mapped.code == "UPLOAD_FAILED" and mapped.retryable is False


HTTPCORE_CLASSES = exception_classes(httpcore)


@pytest.mark.parametrize("cls", HTTPCORE_CLASSES, ids=lambda c: c.__name__)
def test_every_httpcore_error_is_mapped(cls: type[BaseException]) -> None:
    """Each httpcore exception is DOWNLOAD_FAILED naming the field; an unsupported URL is refused for good."""
    mapped = translated(httpcore_errors("audio"), cls("injected"))
    assert mapped.code == "DOWNLOAD_FAILED" and mapped.field == "audio"
    assert mapped.retryable is (cls is not httpcore.UnsupportedProtocol)


@pytest.mark.parametrize("exc", [UnicodeEncodeError("ascii", "①", 0, 1, "x"), TypeError("host")])
def test_urls_httpcore_cannot_encode_are_refused(exc: BaseException) -> None:
    """A host or header httpcore cannot encode is refused (not INTERNAL, not retryable)."""
    mapped = translated(httpcore_errors("audio"), exc)
    assert isinstance(mapped, DownloadRefused) and mapped.retryable is False


def test_subprocess_errors_are_mapped(tmp_path: Path) -> None:
    """subprocess's failures: a missing or unrunnable tool is the worker's fault (INTERNAL, never the
    input's); a run past its deadline is the caller's timeout error; CalledProcessError is never
    raised (tools run with check=False and their exit code is read)."""
    with pytest.raises(WorkerError, match="not installed") as missing:
        media_tools.start(["/nonexistent/ffmpeg"])
    assert missing.value.code == "INTERNAL"
    script = tmp_path / "tool"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o644)
    with pytest.raises(WorkerError, match="could not start") as unrunnable:
        media_tools.start([str(script)])
    assert unrunnable.value.code == "INTERNAL"
    late = InvalidInput("audio: too slow", field="audio")
    with pytest.raises(InvalidInput) as slow:
        media_tools.run(["sleep", "5"], timeout_s=0.2, timeout_error=late)
    assert slow.value is late and isinstance(slow.value.__cause__, subprocess.TimeoutExpired)


def test_ffmpeg_failures_map_to_invalid_input(tmp_path: Path) -> None:
    """A file ffprobe cannot read is INVALID_INPUT carrying ffprobe's message, without the worker's path."""
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00\x01garbage" * 50)
    with pytest.raises(InvalidInput, match="not a readable media file") as info:
        media_in.probe(junk, timeout_s=30, field="audio")
    assert str(tmp_path) not in info.value.message and "junk.bin" not in info.value.message


def test_media_tool_timeout_maps_to_invalid_input(speech_wav: Path) -> None:
    """An ffprobe run past its deadline (here a deadline shorter than ffprobe's start) is INVALID_INPUT."""
    with pytest.raises(InvalidInput, match="longer than"):
        media_in.probe(speech_wav, timeout_s=0.001, field="audio")


STICKY = "CUDA error: an illegal memory access was encountered"
TORCH_CASES: list[tuple[BaseException, str | None]] = [
    (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"), "GPU_OOM"),
    (torch.OutOfMemoryError("CUDA out of memory"), "GPU_OOM"),
    (torch.AcceleratorError(STICKY), "CUDA_FATAL"),
    (torch.AcceleratorError("CUDA error: device-side assert triggered"), "CUDA_FATAL"),
    (torch.cuda.DeferredCudaCallError("CUDA call failed lazily at initialization"), "CUDA_FATAL"),
    (RuntimeError("CUDA error: unspecified launch failure"), "CUDA_FATAL"),
    (torch.AcceleratorError("CUDA error: invalid argument"), None),  # the context survives this one
    (RuntimeError("shape mismatch"), None),
    (torch.FatalError("internal assert"), None),
]


def test_every_torch_error_class_is_covered() -> None:
    """The cases below cover every exception class torch and torch.cuda define."""
    classes = {type(exc) for exc, _ in TORCH_CASES}
    defined = {cls for module in (torch, torch.cuda) for _, cls in inspect.getmembers(module, inspect.isclass)
               if issubclass(cls, Exception) and cls.__module__.startswith("torch")
               and cls not in (torch.JITException, torch.cuda.CudaError)}  # TorchScript's; CUDA's base
    assert defined <= classes, defined - classes


@pytest.mark.parametrize(("exc", "code"), TORCH_CASES, ids=[type(exc).__name__ for exc, _ in TORCH_CASES])
def test_torch_errors_in_model_code_and_loads(exc: BaseException, code: str | None) -> None:
    """The one CUDA translation holds in the gate (model code) and in the registry (model loads):
    OOM is GPU_OOM, a sticky error CUDA_FATAL, anything else passes unchanged (INTERNAL at the
    handler; MODEL_LOAD_FAILED for a load)."""
    def fail() -> None:
        raise exc

    gate = Gate(slots=1, acquire_timeout=1)
    registry = Registry(load_wait_timeout=5)
    key = PipelineKey("fixture", "m", "cpu", "float32")
    if code is None:
        with pytest.raises(type(exc)):
            asyncio.run(gate.run(fail))
        with pytest.raises(WorkerError) as load:
            registry.get(key, fail)
        assert load.value.code == "MODEL_LOAD_FAILED"
    else:
        for attempt in (lambda: asyncio.run(gate.run(fail)), lambda: registry.get(key, fail)):
            with pytest.raises(WorkerError) as info:
                attempt()
            assert info.value.code == code and info.value.__cause__ is exc
    assert gate.busy == 0 and not registry.is_loaded(key)


def test_cuda_oom_maps_to_gpu_oom() -> None:
    """torch.cuda.OutOfMemoryError raised inside the edge becomes GpuOutOfMemory, cause kept."""
    with pytest.raises(GpuOutOfMemory) as info, cuda_errors():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")
    assert isinstance(info.value.__cause__, torch.cuda.OutOfMemoryError)
