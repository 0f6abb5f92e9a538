"""Which device and dtype to run on, and the CUDA cache hygiene around each job."""

from __future__ import annotations

import gc

import torch


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
