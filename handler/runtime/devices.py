"""Which device and dtype to run on, CUDA cache hygiene around each job, and torch's CUDA errors
translated (the torch edge: :func:`cuda_errors`)."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

import torch

from handler.errors import CudaFatal, GpuOutOfMemory
from handler.logs import get_logger

log = get_logger(__name__)


def resolve_device(requested: str) -> str:
    """``auto`` becomes ``cuda`` when a GPU is visible, else ``cpu``."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def default_dtype(device: str) -> torch.dtype:
    """Half precision on the GPU, full precision on the CPU (where fp16 is slow or missing)."""
    return torch.float16 if device == "cuda" else torch.float32


def clear_cuda_cache(*, collect: bool = False) -> None:
    """Give cached CUDA blocks back to the driver; a no-op without CUDA.

    ``collect`` runs the garbage collector first, which is worth its cost only after an
    out-of-memory error, when dead tensors may still hold memory through reference cycles.
    """
    if not torch.cuda.is_available():
        return
    if collect:
        gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.ipc_collect()  # type: ignore[no-untyped-call]


# CUDA errors after which the context is unusable: only a new process recovers.
_STICKY_CUDA_ERRORS = (
    "illegal memory access",
    "unspecified launch failure",
    "device-side assert triggered",
    "misaligned address",
    "illegal instruction",
    "uncorrectable ecc error",
    "cuda error: unknown error",
)


def is_sticky_cuda_error(exc: BaseException) -> bool:
    """A CUDA error that leaves the process's GPU context broken for good."""
    if isinstance(exc, torch.cuda.DeferredCudaCallError):  # CUDA could not even initialise
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in _STICKY_CUDA_ERRORS)


@contextlib.contextmanager
def cuda_errors() -> Iterator[None]:
    """torch's CUDA failures as the worker's: GPU_OOM (cache cleared first) or CUDA_FATAL.

    The one translation for model code and model loads alike; other errors pass unchanged.
    """
    try:
        yield
    except torch.cuda.OutOfMemoryError as exc:
        with contextlib.suppress(RuntimeError):
            clear_cuda_cache(collect=True)
        log.warning("gpu.oom", error=_first_line(exc))
        raise GpuOutOfMemory("CUDA ran out of memory for this request; try a smaller one") from exc
    except (RuntimeError, torch.cuda.DeferredCudaCallError) as exc:
        if not is_sticky_cuda_error(exc):
            raise
        log.error("gpu.fatal", error=_first_line(exc))
        raise CudaFatal("the GPU is in an unrecoverable state; the worker will restart") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__
