"""``system``: a snapshot of the worker (pipelines, slots, memory, outcomes, timings)."""

from __future__ import annotations

import socket
import time
from typing import Any, Literal

from handler import __version__
from handler.job import JobContext
from handler.runtime.devices import describe
from handler.runtime.memory import read_memory
from handler.task import Task, TaskInput


class SystemInput(TaskInput):
    """Input of the ``system`` task: nothing but the task name."""

    task: Literal["system"] = "system"


def _pipelines(ctx: JobContext) -> list[dict[str, Any]]:
    return [
        {"task": key.task, "model": key.model, "device": key.device, "dtype": key.dtype,
         "load_ms": round(loaded.load_ms, 1), "loaded_at": round(loaded.loaded_at, 3),
         "memory_mb": round(loaded.memory_bytes / 2**20, 1)}
        for key, loaded in ctx.runtime.registry.loaded().items()
    ]


async def run(ctx: JobContext, params: SystemInput) -> dict[str, Any]:
    runtime = ctx.runtime
    return {
        "worker_id": ctx.settings.worker_id or socket.gethostname(),
        "version": __version__,
        "time": round(time.time(), 3),
        **describe(runtime.device),  # device, torch and its CUDA build, driver, GPU name
        "pipelines": _pipelines(ctx),
        "slots": {"total": runtime.gate.slots, "busy": runtime.gate.busy, "waiting": runtime.gate.waiting,
                  "sizing": runtime.sizing},
        "memory": read_memory().as_dict(),
        **runtime.stats.snapshot(),
    }


TASK: Task[SystemInput] = Task(name="system", input_model=SystemInput, run=run)
