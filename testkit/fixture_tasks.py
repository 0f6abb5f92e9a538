"""A tiny task for tests of the handler's plumbing: its pipeline sleeps, raises, runs out of memory.

It goes through the real registry, instance pool and gate like every production task, and
the worker process loads it through TASK_MODULES=testkit.fixture_tasks.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict

from handler.cancel import CancelToken
from handler.errors import GenerationTimeout
from handler.job import JobContext
from handler.runtime.instances import InstancePool, Placement, move_whole
from handler.runtime.registry import PipelineKey
from handler.task_interface import Task
from handler.tasks import TASKS

_ids = itertools.count()
# Attempts seen per key by the "flaky" action (a client's retries of one job share a key).
_flaky_attempts: dict[str, int] = {}
_flaky_lock = threading.Lock()


class FixtureInput(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    task: Literal["fixture"] = "fixture"
    action: Literal["ok", "sleep", "raise", "oom", "cuda_fatal", "allocate", "fatal_after_cancel", "flaky",
                    "device_assert"] = "ok"
    # How loading the model goes: fine, out of GPU memory, or a sticky CUDA error.
    load: Literal["ok", "oom", "cuda_fatal"] = "ok"
    seconds: float = 0.0
    # For "allocate": gibibytes to take on the GPU (a real CUDA out-of-memory when too many).
    gigabytes: float = 0.0
    model: str = "fixture-model"
    # Fetched through the real guarded downloader before the GPU slot, like a media input.
    url: str | None = None
    # For "flaky": the first `failures` jobs with this key answer TIMEOUT, later ones succeed.
    key: str = ""
    failures: int = 0
    # Run the action in a batch of the worker's shared batcher (as transcription chunks run), not alone.
    batched: bool = False
    # What the model weighs on the device (its pool's placement), and the working memory the job asks for.
    weights_mb: int = 0
    working_mb: int = 0


class FixturePipeline:
    """Counts calls and how many run at once on this instance, and records its moves between
    devices (``events``: ("run", start, end) and ("move", device, time))."""

    def __init__(self) -> None:
        self.id = next(_ids)
        self.calls = 0
        self.running = 0
        self.max_running = 0
        self.device = "cpu"
        self.events: list[tuple[str, Any, float]] = []
        self._lock = threading.Lock()

    def to(self, device: str) -> None:
        self.device = device
        self.events.append(("move", device, time.monotonic()))

    def __call__(self, action: str, seconds: float, cancel: CancelToken, gigabytes: float = 0.0) -> str:
        with self._lock:
            self.calls += 1
            self.running += 1
            self.max_running = max(self.max_running, self.running)
        try:
            if action == "sleep":
                deadline = time.monotonic() + seconds
                while time.monotonic() < deadline:  # steps, like a decoder or a sampler
                    cancel.check()
                    time.sleep(0.01)
            elif action == "raise":
                raise RuntimeError("fixture pipeline failed")
            elif action == "oom":
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
            elif action == "allocate":
                block = torch.empty(int(gigabytes * 2**30), dtype=torch.uint8, device="cuda")
                del block
            elif action == "device_assert":  # a real sticky CUDA error: an index out of bounds in a kernel
                values = torch.zeros(4, device="cuda")
                values[torch.tensor([1 << 20], device="cuda")] += 1
                torch.cuda.synchronize()
            elif action == "cuda_fatal":
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            elif action == "fatal_after_cancel":  # a kernel fault that surfaces after the job was stopped
                while not cancel.cancelled:
                    time.sleep(0.01)
                raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")
            return "done"
        finally:
            with self._lock:
                self.running -= 1


def _load(how: str) -> FixturePipeline:
    if how == "oom":
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 30.00 GiB")
    if how == "cuda_fatal":
        raise torch.AcceleratorError("CUDA error: device-side assert triggered")
    return FixturePipeline()


def pipelines_for(ctx: JobContext, model: str, load: str = "ok", weights_mb: int = 0) -> InstancePool[FixturePipeline]:
    key = PipelineKey("fixture", model, ctx.runtime.device, "float32")
    placement = Placement(weights=weights_mb * 2**20, move=move_whole) if weights_mb else None
    return ctx.runtime.registry.get(key, lambda: InstancePool.build(
        ctx.settings.model_instances, lambda: _load(load), lambda _: placement or Placement()))


@dataclass(frozen=True, eq=False)
class _BatchItem:
    """One job's call of the pipeline, in a batch shared with other jobs."""

    pipelines: InstancePool[FixturePipeline]
    action: str
    seconds: float
    cancel: CancelToken


def _run_batch(items: list[_BatchItem]) -> list[tuple[str, int]]:
    with items[0].pipelines.borrow(10.0) as pipeline:
        return [(pipeline(item.action, item.seconds, item.cancel), pipeline.id) for item in items]


async def _batched(ctx: JobContext, pipelines: InstancePool[FixturePipeline], params: FixtureInput) -> tuple[str, int]:
    batcher = ctx.runtime.batcher(("fixture", params.model), _run_batch, max_batch=8, window_s=0.0)
    item = _BatchItem(pipelines, params.action, params.seconds, ctx.cancel)
    return (await batcher.submit("fixture", [item], cancel=ctx.cancel))[0]


def _flaky(params: FixtureInput) -> int:
    """This attempt's number for the key; TIMEOUT (no slot) for the first ``failures``."""
    with _flaky_lock:
        attempt = _flaky_attempts[params.key] = _flaky_attempts.get(params.key, 0) + 1
    if attempt <= params.failures:
        raise GenerationTimeout(f"fixture: attempt {attempt} of {params.key!r} gets no slot")
    return attempt


async def run(ctx: JobContext, params: FixtureInput) -> dict[str, Any]:
    if params.action == "flaky":
        return {"output": "done", "attempt": _flaky(params), "model": params.model}
    pipelines = pipelines_for(ctx, params.model, params.load, params.weights_mb)
    (ctx.workdir / "scratch.bin").write_bytes(b"x" * 1024)
    if params.url is not None:
        with ctx.timings.measure("download"):
            await asyncio.to_thread(ctx.inputs.from_url, params.url, ctx.workdir / "input.bin", field="url")

    def work(pipeline: FixturePipeline) -> tuple[str, int]:
        started = time.monotonic()
        try:
            return pipeline(params.action, params.seconds, ctx.cancel, params.gigabytes), pipeline.id
        finally:
            pipeline.events.append(("run", started, time.monotonic()))

    if params.batched:
        output, instance = await _batched(ctx, pipelines, params)
    else:
        output, instance = await ctx.on_model(pipelines, work, working=params.working_mb * 2**20)
    return {"output": output, "instance": instance, "model": params.model}


# What preload keeps on the GPU, as a model's weights stay there (FIXTURE_PRELOAD_GIB).
PRELOADED: list[torch.Tensor] = []


def preload(runtime: Any) -> None:
    """A preload as slow as FIXTURE_PRELOAD_S says (what the health route shows while it runs),
    keeping FIXTURE_PRELOAD_GIB gibibytes on the GPU, a model's footprint for slot sizing."""
    time.sleep(float(os.environ.get("FIXTURE_PRELOAD_S", "0")))
    gigabytes = float(os.environ.get("FIXTURE_PRELOAD_GIB", "0"))
    if gigabytes:
        PRELOADED.append(torch.empty(int(gigabytes * 2**30), dtype=torch.uint8, device="cuda"))


TASK = Task(name="fixture", input_model=FixtureInput, run=run, preload=preload)
TABLE = {**TASKS, "fixture": TASK}
