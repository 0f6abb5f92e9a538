"""The Runtime: the long-lived parts of the worker (settings, registry, GPU memory, gate, batchers,
lifecycle) that every job is handed, built once at start-up."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from handler.config import Settings
from handler.runtime.batcher import Batcher, Batchers
from handler.runtime.gate import Gate
from handler.runtime.lifecycle import Lifecycle
from handler.runtime.registry import Registry
from handler.runtime.residency import Residency
from handler.runtime.single_flight import SingleFlight
from handler.runtime.stats import WorkerStats

ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")


@dataclass(frozen=True)
class Runtime:
    """The long-lived parts of the worker that tasks use."""

    settings: Settings
    registry: Registry
    gate: Gate
    device: str
    # Which pipelines are on the device, under the GPU memory budget (see memory_budget).
    residency: Residency = field(default_factory=lambda: Residency(device="cpu", budget=None))
    stats: WorkerStats = field(default_factory=WorkerStats)
    lifecycle: Lifecycle = field(default_factory=Lifecycle)
    # Identical cacheable jobs held at once compute once.
    single_flight: SingleFlight[dict[str, Any]] = field(default_factory=SingleFlight)
    # Batches shared by the jobs this worker holds (transcription chunks), per model.
    batchers: Batchers = field(default_factory=Batchers)
    # How the GPU slots were sized (fixed, or auto with its figures), for `system`.
    sizing: dict[str, Any] = field(default_factory=dict)
    # The key that authenticates result cache entries (see handler.io.result_cache).
    cache_secret: bytes = field(default_factory=lambda: secrets.token_bytes(32), repr=False)

    def batcher(
        self, key: Hashable, run_batch: Callable[[list[ItemT]], list[ResultT]], *, max_batch: int, window_s: float
    ) -> Batcher[ItemT, ResultT]:
        """The worker's batcher for ``key`` (a model), made on first use: its batches take slots
        of the gate like any model work (CUDA errors translated there), and what a batch raises
        after its jobs were cancelled reaches the lifecycle (a sticky CUDA error marks the worker).

        The first caller's ``run_batch`` serves every later job, for the worker's life: it must
        not hold any job's state (borrow the model through the items instead).
        """

        def make() -> Batcher[ItemT, ResultT]:
            return Batcher(run_batch, gate=self.gate, max_batch=max_batch, window_s=window_s,
                           on_late_error=self.lifecycle.late_error)

        return self.batchers.get(key, make)

