"""One worker, many jobs: instances, admission, recycling, sticky CUDA errors, the system snapshot."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from handler.app import Worker
from handler.runtime.memory import MemoryUse, auto_slots
from handler.runtime.registry import PipelineKey, Registry
from testkit.fixture_tasks import TABLE
from tests.conftest import assert_no_job_dirs


def fixture_job(**inputs: object) -> dict[str, object]:
    return {"id": "c", "input": {"task": "fixture", **inputs}}


def make(make_settings, **env: str) -> Worker:
    return Worker(make_settings(**env), tasks=TABLE, registry=Registry())


def test_one_instance_never_serves_two_jobs(make_settings) -> None:
    """4 slots, 2 instances, 12 jobs: both instances work, and no instance ever runs two jobs at once.

    The fixture pipeline itself counts how many calls are inside it; the gate is not asked.
    """
    worker = make(make_settings, MAX_CONCURRENT_GENERATIONS="4", MODEL_INSTANCES="2")

    async def scenario() -> list[dict]:
        return await asyncio.gather(*(worker.handle(fixture_job(action="sleep", seconds=0.1)) for _ in range(12)))

    results = asyncio.run(scenario())
    assert all(r["output"] == "done" for r in results)
    pool = worker.runtime.registry.loaded()[PipelineKey("fixture", "fixture-model", "cpu", "float32")].pipeline
    instances = []
    while True:  # drain the pool to inspect every instance
        try:
            instances.append(pool._free.get_nowait())
        except Exception:
            break
    assert len(instances) == 2
    assert all(i.max_running == 1 for i in instances)
    assert sum(i.calls for i in instances) == 12
    assert {r["instance"] for r in results} == {i.id for i in instances}


def test_admission_refuses_under_memory_pressure(make_settings, work_dir: Path) -> None:
    """With the threshold below current use, jobs get OVERLOADED up front; `system` still answers."""
    worker = make(make_settings, MEMORY_PRESSURE_THRESHOLD="0.001")
    refused = asyncio.run(worker.handle(fixture_job()))
    assert refused["error_code"] == "OVERLOADED" and refused["retryable"] is True
    assert "admission threshold" in refused["error"]
    snapshot = asyncio.run(worker.handle({"id": "s", "input": {"task": "system"}}))
    assert snapshot["outcomes"] == {"OVERLOADED": 1}
    assert_no_job_dirs(work_dir)


def test_max_jobs_per_worker_asks_for_a_fresh_worker(make_settings) -> None:
    """MAX_JOBS_PER_WORKER=3: the third result carries refresh_worker, the first two do not."""
    worker = make(make_settings, MAX_JOBS_PER_WORKER="3")
    results = [asyncio.run(worker.handle(fixture_job())) for _ in range(3)]
    assert [r.get("refresh_worker", False) for r in results] == [False, False, True]


def test_sticky_cuda_error_recycles_the_worker(make_settings) -> None:
    """A sticky CUDA error gives CUDA_FATAL with refresh_worker; later jobs are refused the same way."""
    worker = make(make_settings)
    fatal = asyncio.run(worker.handle(fixture_job(action="cuda_fatal")))
    assert fatal["error_code"] == "CUDA_FATAL" and fatal["refresh_worker"] is True
    after = asyncio.run(worker.handle(fixture_job()))
    assert after["error_code"] == "CUDA_FATAL" and after["refresh_worker"] is True
    assert worker.runtime.gate.busy == 0


def test_system_snapshot(make_settings) -> None:
    """`system` reports pipelines, slots, memory, outcomes by code and time percentiles."""
    worker = make(make_settings, MAX_CONCURRENT_GENERATIONS="2")
    asyncio.run(worker.handle(fixture_job(action="sleep", seconds=0.05)))
    asyncio.run(worker.handle(fixture_job(action="oom")))
    asyncio.run(worker.handle({"id": "bad", "input": {"task": "fixture", "colour": "red"}}))
    snapshot = asyncio.run(worker.handle({"id": "s", "input": {"task": "system"}}))
    assert snapshot["slots"]["total"] == 2 and snapshot["slots"]["busy"] == 0
    assert snapshot["slots"]["sizing"]["mode"] == "fixed"
    assert snapshot["outcomes"] == {"success": 1, "GPU_OOM": 1, "INVALID_INPUT": 1}
    assert snapshot["jobs"] == 3
    assert snapshot["run_ms"]["p50"] is not None and snapshot["queue_ms"]["p95"] is not None
    assert [p["model"] for p in snapshot["pipelines"]] == ["fixture-model"]
    assert 0 < snapshot["memory"]["ram_used_fraction"] < 1
    assert snapshot["version"] and snapshot["worker_id"] and snapshot["uptime_s"] >= 0


def test_auto_slots_from_free_memory(make_settings) -> None:
    """MAX_CONCURRENT_GENERATIONS=auto divides free memory (minus the reserve) by the footprint, capped."""
    gib = 2**30
    assert auto_slots(free=20 * gib, reserve=2 * gib, footprint=4 * gib, cap=8) == 4
    assert auto_slots(free=20 * gib, reserve=2 * gib, footprint=1 * gib, cap=8) == 8
    assert auto_slots(free=3 * gib, reserve=2 * gib, footprint=4 * gib, cap=8) == 1
    worker = make(make_settings, MAX_CONCURRENT_GENERATIONS="auto", GENERATION_SLOTS_CAP="3")
    sizing = worker.size_gate()
    assert sizing["mode"] == "auto" and 1 <= sizing["slots"] <= 3
    assert worker.runtime.gate.slots == sizing["slots"]
    assert sizing["footprint_mb"] > 20  # tiny.en's weights, measured


def test_memory_fractions() -> None:
    """RAM and VRAM use are read as fractions of the total."""
    use = MemoryUse(ram_total=100, ram_available=25, rss=10, vram_total=80, vram_free=20)
    assert use.ram_fraction == pytest.approx(0.75)
    assert use.vram_fraction == pytest.approx(0.75)
