"""``system``: a snapshot of the worker (pipelines, slots, memory, outcomes, timings)."""

from __future__ import annotations

import socket
import time
from typing import Any, Literal

from handler import __version__
from handler.job import JobContext
from handler.runtime.devices import describe
from handler.runtime.memory import read_memory
from handler.task_interface import Task, TaskInput


class SystemInput(TaskInput):
    """Input of the ``system`` task: nothing but the task name."""

    task: Literal["system"] = "system"


def _pipelines(ctx: JobContext) -> list[dict[str, Any]]:
    """Every pipeline this worker has loaded: where it is now (``device``, ``parked`` in host RAM,
    ``dropped``), the bytes of its weights, its last use, and its load."""
    loaded = ctx.runtime.registry.loaded()
    found = []
    for key, place in ctx.runtime.residency.snapshot():
        load = loaded.get(key)
        found.append({"task": key.task, "model": key.model, "device": key.device, "dtype": key.dtype,
                      "place": place["place"], "memory_mb": round(place["bytes"] / 2**20, 1),
                      "in_use": place["holders"], "last_use": place["last_use"],
                      "load_ms": round(load.load_ms, 1) if load else None,
                      "loaded_at": round(load.loaded_at, 3) if load else None})
    return found


async def run(ctx: JobContext, params: SystemInput) -> dict[str, Any]:
    runtime = ctx.runtime
    return {
        "worker_id": ctx.settings.worker_id or socket.gethostname(),
        "version": __version__,
        "time": round(time.time(), 3),
        **describe(runtime.device),  # device, torch and its CUDA build, driver, GPU name
        "pipelines": _pipelines(ctx),  # each loaded Whisper copy's format is its dtype (int8, float16, ...)
        "whisper_compute_type": ctx.settings.whisper_compute_type,
        "slots": {"total": runtime.gate.slots, "busy": runtime.gate.busy, "waiting": runtime.gate.waiting,
                  "sizing": runtime.sizing},
        "memory": {**read_memory().as_dict(), "gpu_budget": runtime.residency.summary()},
        **runtime.stats.snapshot(),
    }


TASK: Task[SystemInput] = Task(name="system", input_model=SystemInput, run=run)
