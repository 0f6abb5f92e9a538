"""A tiny task for tests of the handler's plumbing: its pipeline sleeps, raises or runs out of memory.

It goes through the real registry and the real gate, like every production task.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict

from handler.runtime.registry import PipelineKey
from handler.tasks import TASKS
from handler.tasks.base import JobContext, Task


class FixtureInput(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    task: Literal["fixture"] = "fixture"
    action: Literal["ok", "sleep", "raise", "oom"] = "ok"
    seconds: float = 0.0
    model: str = "fixture-model"


class FixturePipeline:
    """Counts calls and how many run at once."""

    def __init__(self) -> None:
        self.calls = 0
        self.running = 0
        self.max_running = 0
        self._lock = threading.Lock()

    def __call__(self, action: str, seconds: float) -> str:
        with self._lock:
            self.calls += 1
            self.running += 1
            self.max_running = max(self.max_running, self.running)
        try:
            if action == "sleep":
                time.sleep(seconds)
            elif action == "raise":
                raise RuntimeError("fixture pipeline failed")
            elif action == "oom":
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
            return "done"
        finally:
            with self._lock:
                self.running -= 1


def pipeline_for(ctx: JobContext, model: str) -> FixturePipeline:
    key = PipelineKey("fixture", model, ctx.runtime.device, "float32")
    return ctx.runtime.registry.get(key, FixturePipeline)


async def run(ctx: JobContext, params: FixtureInput) -> dict[str, Any]:
    pipeline = pipeline_for(ctx, params.model)
    (ctx.workdir / "scratch.bin").write_bytes(b"x" * 1024)
    output, waited_ms = await ctx.runtime.gate.run(lambda: pipeline(params.action, params.seconds))
    ctx.timings.add("queued", waited_ms)
    return {"output": output, "model": params.model}


FIXTURE = Task(name="fixture", input_model=FixtureInput, run=run)
TABLE = {**TASKS, "fixture": FIXTURE}
