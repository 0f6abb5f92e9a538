"""Memory readings: admission control, automatic GPU-slot sizing, and what a model weighs."""

from __future__ import annotations

from dataclasses import dataclass

import psutil
import torch

MIB = 1024 * 1024


@dataclass(frozen=True)
class MemoryUse:
    """RAM and (when there is a GPU) VRAM, in bytes."""

    ram_total: int
    ram_available: int
    rss: int
    vram_total: int = 0
    vram_free: int = 0

    @property
    def ram_fraction(self) -> float:
        return 1 - self.ram_available / self.ram_total if self.ram_total else 0.0

    @property
    def vram_fraction(self) -> float:
        return 1 - self.vram_free / self.vram_total if self.vram_total else 0.0

    def as_dict(self) -> dict[str, float]:
        return {
            "ram_used_fraction": round(self.ram_fraction, 4),
            "ram_available_mb": round(self.ram_available / MIB, 1),
            "rss_mb": round(self.rss / MIB, 1),
            "vram_used_fraction": round(self.vram_fraction, 4),
            "vram_free_mb": round(self.vram_free / MIB, 1),
        }


def read_memory() -> MemoryUse:
    ram = psutil.virtual_memory()
    rss = psutil.Process().memory_info().rss
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        return MemoryUse(ram.total, ram.available, rss, total, free)
    return MemoryUse(ram.total, ram.available, rss)


def free_for_models(use: MemoryUse, device: str) -> int:
    """Bytes free where the models live: VRAM on the GPU, RAM on the CPU."""
    return use.vram_free if device == "cuda" else use.ram_available


def model_bytes(use_before: MemoryUse, use_after: MemoryUse, device: str) -> int:
    """What loading a model cost where it lives (VRAM, or the process's RSS on the CPU)."""
    if device == "cuda":
        return max(0, use_before.vram_free - use_after.vram_free)
    return max(0, use_after.rss - use_before.rss)


def auto_slots(*, free: int, reserve: int, footprint: int, cap: int) -> int:
    """``(free - reserve) / footprint`` slots, at least one and at most ``cap``."""
    if footprint <= 0:
        return 1
    return max(1, min(cap, (free - reserve) // footprint))


def host_room() -> int:
    """Bytes of host RAM available now (where parked pipelines go)."""
    return int(psutil.virtual_memory().available)


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers, each storage counted once (tied weights share one)."""
    seen: set[int] = set()
    total = 0
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.is_meta:  # no storage: what it would take once loaded (a model built to be measured)
            total += tensor.numel() * tensor.element_size()
            continue
        if tensor.layout != torch.strided:  # sparse (Whisper's alignment-head mask): a few bytes
            continue
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def memory_budget(*, device: str, budget_mb: int | None, reserve_mb: int, device_total: int) -> int | None:
    """Bytes the pipelines may take on the device: GPU_MEMORY_BUDGET_MB when set, else the GPU's
    memory less the reserve; on the CPU, unbounded unless set."""
    if budget_mb is not None:
        return budget_mb * MIB
    if device != "cuda":
        return None
    return max(0, device_total - reserve_mb * MIB)


def device_memory(device: str) -> int:
    """The GPU's total memory in bytes (0 on the CPU)."""
    if device != "cuda":
        return 0
    return int(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
