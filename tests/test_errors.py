"""The error tree: unique codes, the contract's retry flags, and outside errors mapped at the edges."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from botocore.exceptions import ClientError, EndpointConnectionError

from handler.errors import ALL_ERRORS, DownloadRefused, GpuOutOfMemory, InvalidInput, UploadFailed, WorkerError
from handler.io import media
from handler.io.storage import _upload_error
from handler.runtime.gate import Gate


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


def test_payload_shape() -> None:
    """The payload is what RunPod and clients need: a string error, code, request id, retry flag."""
    payload = InvalidInput("language: unknown", field="language").payload("rid")
    assert payload == {"error": "INVALID_INPUT: language: unknown", "error_code": "INVALID_INPUT",
                       "request_id": "rid", "retryable": False, "field": "language"}


def test_cuda_oom_maps_to_gpu_oom() -> None:
    """torch.cuda.OutOfMemoryError raised inside the gate becomes GpuOutOfMemory."""
    gate = Gate(slots=1, acquire_timeout=1)

    def boom() -> None:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(GpuOutOfMemory) as info:
        asyncio.run(gate.run(boom))
    assert isinstance(info.value.__cause__, torch.cuda.OutOfMemoryError)
    assert gate.busy == 0


@pytest.mark.parametrize(
    ("exc", "retryable"),
    [
        (s3_error("InvalidAccessKeyId", 403), False),
        (s3_error("SlowDown", 503), True),
        (s3_error("InternalError", 500), True),
        (EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), True),
    ],
)
def test_botocore_errors_map_to_upload_failed(exc: Exception, retryable: bool) -> None:
    """Storage errors become UPLOAD_FAILED; only those that can heal are retryable."""
    mapped = _upload_error(exc, "bucket")
    assert isinstance(mapped, UploadFailed)
    assert mapped.retryable is retryable


def test_ffmpeg_failures_map_to_invalid_input(tmp_path: Path) -> None:
    """A file ffprobe cannot read is INVALID_INPUT carrying ffprobe's message."""
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00\x01garbage" * 50)
    with pytest.raises(InvalidInput, match="not a readable media file"):
        media.probe(junk, timeout_s=30, field="audio")


def test_media_tool_timeout_maps_to_invalid_input(speech_wav: Path) -> None:
    """An ffprobe run past its deadline (here a deadline shorter than ffprobe's start) is INVALID_INPUT."""
    with pytest.raises(InvalidInput, match="longer than"):
        media.probe(speech_wav, timeout_s=0.001, field="audio")


def test_every_error_is_a_worker_error() -> None:
    """All codes descend from WorkerError, so the handler's one except clause catches them."""
    assert all(issubclass(cls, WorkerError) for cls in ALL_ERRORS)
