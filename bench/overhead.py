"""Handler overhead per job against calling the same tiny pipeline directly (goal: <= 1 ms median)."""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from bench.common import Comparison, bench_settings
from handler.app import Worker
from handler.job import JobContext
from handler.runtime.registry import PipelineKey, Registry
from handler.task_interface import Task


class EchoInput(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    task: Literal["echo"] = "echo"
    text: str = "hi"


def tiny_pipeline(text: str) -> str:
    return text.upper()


async def run_echo(ctx: JobContext, params: EchoInput) -> dict[str, Any]:
    key = PipelineKey("echo", "tiny", ctx.runtime.device, "float32")
    pipeline = ctx.runtime.registry.get(key, lambda: tiny_pipeline)
    output, waited_ms = await ctx.runtime.gate.run(lambda: pipeline(params.text))
    ctx.timings.add("queued", waited_ms)
    return {"output": output}


ECHO = Task(name="echo", input_model=EchoInput, run=run_echo)


def measure(jobs: int = 3000) -> Comparison:
    worker = Worker(bench_settings(), tasks={"echo": ECHO}, registry=Registry())

    async def handler_times() -> list[float]:
        times = []
        for i in range(jobs):
            started = time.perf_counter()
            result = await worker.handle({"id": f"b{i}", "input": {"task": "echo", "text": "hi"}})
            times.append(time.perf_counter() - started)
            assert result["output"] == "HI", result
        return times

    through_handler = statistics.median(asyncio.run(handler_times())[100:])
    direct = []
    for _ in range(jobs):
        started = time.perf_counter()
        tiny_pipeline("hi")
        direct.append(time.perf_counter() - started)
    direct_median = statistics.median(direct)
    overhead_ms = (through_handler - direct_median) * 1000
    return Comparison("handler overhead per job (tiny pipeline)", through_handler, direct_median,
                      "overhead <= 1 ms", f"overhead {overhead_ms:.3f} ms over {jobs} jobs")
