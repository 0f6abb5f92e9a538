"""Which device and dtype to run on, CUDA cache hygiene around each job, and torch's CUDA errors
translated (the torch edge: :func:`cuda_errors`).

:func:`check_device` runs once at start-up: a worker that was given a GPU but cannot use it
(the driver is too old for torch's CUDA build, or no device reached the container) stops with
:class:`GpuUnusable` instead of serving every job at CPU speed on a paid GPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from handler.config import Settings
from handler.errors import CudaFatal, GpuOutOfMemory
from handler.logs import get_logger

log = get_logger(__name__)

# NVIDIA_VISIBLE_DEVICES values that give the container no GPU. `all` is no promise either: the
# nvidia/cuda base image sets it for every container, GPU or not (the device nodes tell then).
_NO_DEVICES = frozenset({"", "void", "none", "all"})
DRIVER_VERSION_FILE = Path("/proc/driver/nvidia/version")


class GpuUnusable(RuntimeError):
    """This worker was given a GPU (or DEVICE=cuda asked for one) that torch cannot use.

    Raised at start-up so the process exits and the platform sees an unhealthy worker, rather
    than a worker that silently runs every job on the CPU.
    """


def resolve_device(requested: str) -> str:
    """``auto`` becomes ``cuda`` when a GPU is visible, else ``cpu``."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def gpu_promises(settings: Settings, *, dev: Path = Path("/dev")) -> list[str]:
    """The signs that this container was given a GPU, each as the thing seen (empty: none)."""
    signs = []
    if settings.runpod_gpu_count > 0:
        signs.append(f"RUNPOD_GPU_COUNT={settings.runpod_gpu_count}")
    visible = settings.nvidia_visible_devices
    if visible is not None and visible.strip().lower() not in _NO_DEVICES:
        signs.append(f"NVIDIA_VISIBLE_DEVICES={visible}")
    signs += [str(node) for node in sorted(dev.glob("nvidia[0-9]*"))[:1]]
    return signs


def check_device(settings: Settings, *, dev: Path = Path("/dev")) -> str:
    """The device jobs will run on; :class:`GpuUnusable` when a GPU was given or asked for but
    CUDA is not available. DEVICE=cpu is always allowed: the CPU on purpose."""
    if settings.device == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    signs = (["DEVICE=cuda"] if settings.device == "cuda" else []) + gpu_promises(settings, dev=dev)
    if not signs:
        return "cpu"
    raise GpuUnusable(f"a GPU was given to this worker ({', '.join(signs)}) but torch cannot use it: "
                      f"{_cause()}; refusing to run on the CPU instead (set DEVICE=cpu to do that on purpose)")


def _cause() -> str:
    built = torch.version.cuda
    if built is None:
        return f"torch {torch.__version__} is a CPU-only build"
    driver, supports = driver_version(), driver_cuda()
    if driver is None and supports is None:
        return (f"torch {torch.__version__} is built for CUDA {built}, and no NVIDIA driver is visible in "
                f"the container ({DRIVER_VERSION_FILE} and libcuda.so.1 are missing)")
    driver_text = f"NVIDIA driver {driver or 'of unknown version'}"
    if supports is not None and _version(supports) < _version(built):
        return (f"torch {torch.__version__} is built for CUDA {built}, and the {driver_text} supports "
                f"CUDA up to {supports}: use a host whose driver supports CUDA {built} or newer")
    return (f"torch {torch.__version__} is built for CUDA {built}, the {driver_text} supports CUDA "
            f"{supports or 'unknown'}, and no CUDA device is usable")


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:2])


@functools.cache
def driver_version() -> str | None:
    """The NVIDIA kernel driver's version (e.g. 570.124.06), or None without one."""
    try:
        text = DRIVER_VERSION_FILE.read_text()
    except OSError:
        return None
    found = re.search(r"Kernel Module\b.*?\s(\d+\.\d+(?:\.\d+)?)\s", text)
    return found[1] if found else None


@functools.cache
def driver_cuda() -> str | None:
    """The newest CUDA version the user-space driver (libcuda) supports (e.g. 12.8), or None."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    number = ctypes.c_int()
    if libcuda.cuDriverGetVersion(ctypes.byref(number)) != 0:
        return None
    return f"{number.value // 1000}.{number.value % 1000 // 10}"


def describe(device: str) -> dict[str, Any]:
    """What runs the jobs: the device, torch and its CUDA build, the driver and the GPU's name."""
    return {"device": device, "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "driver": driver_version(), "driver_cuda": driver_cuda(),
            "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None}


def half_precision(device: str, precision: str) -> bool:
    """Whether models run in half precision: PRECISION=auto means on the GPU only (on the CPU
    half is slower, and some ops have no kernel), half means on every device."""
    return precision == "half" or (precision == "auto" and device == "cuda")


def default_dtype(device: str, precision: str = "auto") -> torch.dtype:
    """fp16 in half precision (Whisper's choice: it was trained for it), else fp32."""
    return torch.float16 if half_precision(device, precision) else torch.float32


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
