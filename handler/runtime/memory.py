"""Memory readings: admission control and automatic GPU-slot sizing."""

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
