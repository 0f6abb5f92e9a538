"""The GPU gate: bounded waits, slots always given back, CUDA OOM mapped and survived."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from handler.app import Worker
from handler.errors import GenerationTimeout
from handler.runtime.gate import Gate
from handler.runtime.registry import PipelineKey, Registry
from handler.runtime.threads import in_thread, job_threads
from testkit.fixture_tasks import TABLE, FixturePipeline
from tests.conftest import assert_no_job_dirs


def fixture_job(**inputs: object) -> dict[str, object]:
    return {"id": "gate", "input": {"task": "fixture", **inputs}}


@pytest.fixture
def worker(make_settings) -> Worker:
    settings = make_settings(GENERATION_ACQUIRE_TIMEOUT="1", MAX_CONCURRENT_GENERATIONS="1")
    return Worker(settings, tasks=TABLE, registry=Registry())


def pipeline_of(worker: Worker, model: str = "fixture-model") -> FixturePipeline:
    loaded = worker.runtime.registry.loaded()
    return loaded[PipelineKey("fixture", model, "cpu", "float32")].pipeline.first


def test_second_job_times_out_while_first_holds_the_slot(worker: Worker, work_dir: Path) -> None:
    """With one slot busy for 3 s, a second job gets TIMEOUT after the 1 s acquire timeout (±0.5 s)."""

    async def scenario() -> tuple[dict, dict, float]:
        first = asyncio.create_task(worker.handle(fixture_job(action="sleep", seconds=3.0)))
        await asyncio.sleep(0.2)
        started = time.monotonic()
        second = await worker.handle(fixture_job())
        waited = time.monotonic() - started
        return await first, second, waited

    first, second, waited = asyncio.run(scenario())
    assert first["output"] == "done"
    assert second["error_code"] == "TIMEOUT" and second["retryable"] is True
    assert second["error"].startswith("TIMEOUT: ")
    assert waited == pytest.approx(1.0, abs=0.5)
    assert_no_job_dirs(work_dir)


def test_slot_is_released_after_an_exception(worker: Worker) -> None:
    """A job whose pipeline raises gives INTERNAL, and the next job gets the slot at once."""

    async def scenario() -> tuple[dict, dict]:
        failed = await worker.handle(fixture_job(action="raise"))
        return failed, await worker.handle(fixture_job())

    failed, after = asyncio.run(scenario())
    assert failed["error_code"] == "INTERNAL"
    assert "fixture pipeline failed" not in failed["error"]  # the traceback stays in the log
    assert after["output"] == "done"
    assert after["timings"]["queued_ms"] < 100
    assert worker.runtime.gate.busy == 0


def test_cuda_oom_is_gpu_oom_and_the_next_job_succeeds(worker: Worker, work_dir: Path) -> None:
    """An injected torch.cuda.OutOfMemoryError comes back as retryable GPU_OOM; the worker carries on."""

    async def scenario() -> tuple[dict, dict]:
        oom = await worker.handle(fixture_job(action="oom"))
        return oom, await worker.handle(fixture_job())

    oom, after = asyncio.run(scenario())
    assert oom["error_code"] == "GPU_OOM" and oom["retryable"] is True
    assert len(oom["request_id"]) == 32
    assert after["output"] == "done"
    assert pipeline_of(worker).calls == 2  # the same cached pipeline served both
    assert_no_job_dirs(work_dir)


def test_one_slot_means_one_generation_at_a_time(worker: Worker) -> None:
    """Four concurrent jobs on one slot never overlap inside the pipeline."""

    async def scenario() -> list[dict]:
        jobs = [worker.handle(fixture_job(action="sleep", seconds=0.15)) for _ in range(4)]
        return await asyncio.gather(*jobs)

    worker_settings = worker.settings
    assert worker_settings.max_concurrent_generations == 1
    results = asyncio.run(scenario())
    assert [r.get("output") for r in results] == ["done"] * 4
    assert pipeline_of(worker).max_running == 1


def test_two_slots_run_two_generations_at_once(make_settings) -> None:
    """With two slots and two model instances, two jobs run together, one per instance."""
    worker = Worker(make_settings(MAX_CONCURRENT_GENERATIONS="2", MODEL_INSTANCES="2"), tasks=TABLE,
                    registry=Registry())

    async def scenario() -> list[dict]:
        return await asyncio.gather(*(worker.handle(fixture_job(action="sleep", seconds=0.5)) for _ in range(2)))

    started = time.monotonic()
    results = asyncio.run(scenario())
    assert time.monotonic() - started < 0.95
    assert len({r["instance"] for r in results}) == 2


def test_cancelling_a_running_job_frees_its_slot_promptly(worker: Worker, work_dir: Path) -> None:
    """A running job that is cancelled answers CANCELLED; its work stops at the next step, so the
    next job gets the slot within a second, and never overlaps it."""

    async def scenario() -> tuple[dict, dict]:
        running = asyncio.create_task(worker.handle(fixture_job(action="sleep", seconds=30)))
        await asyncio.sleep(0.3)
        running.cancel()
        cancelled = await running
        return cancelled, await worker.handle(fixture_job())

    cancelled, after = asyncio.run(scenario())
    assert cancelled["error_code"] == "CANCELLED" and cancelled["retryable"] is True
    assert after["output"] == "done"
    assert after["timings"]["queued_ms"] < 1000
    assert pipeline_of(worker).max_running == 1
    assert_no_job_dirs(work_dir)


def test_cancelling_a_waiting_job(worker: Worker, work_dir: Path) -> None:
    """A job cancelled while waiting for the slot answers CANCELLED and takes nothing."""

    async def scenario() -> tuple[dict, dict]:
        holder = asyncio.create_task(worker.handle(fixture_job(action="sleep", seconds=0.5)))
        await asyncio.sleep(0.1)
        waiting = asyncio.create_task(worker.handle(fixture_job()))
        await asyncio.sleep(0.1)
        assert worker.runtime.gate.waiting == 1
        waiting.cancel()
        return await waiting, await holder

    cancelled, held = asyncio.run(scenario())
    assert cancelled["error_code"] == "CANCELLED"
    assert held["output"] == "done"
    assert worker.runtime.gate.busy == 0 and worker.runtime.gate.waiting == 0
    assert pipeline_of(worker).calls == 1
    assert_no_job_dirs(work_dir)


def test_oom_while_loading_is_gpu_oom_and_not_cached(worker: Worker) -> None:
    """CUDA running out of memory while a model loads is GPU_OOM (retryable), not MODEL_LOAD_FAILED;
    nothing is cached and the worker keeps serving."""

    async def scenario() -> tuple[dict, dict]:
        failed = await worker.handle(fixture_job(model="big", load="oom"))
        return failed, await worker.handle(fixture_job(model="big"))

    failed, after = asyncio.run(scenario())
    assert failed["error_code"] == "GPU_OOM" and failed["retryable"] is True, failed
    assert after["output"] == "done"


def test_sticky_error_while_loading_marks_the_worker(worker: Worker) -> None:
    """A sticky CUDA error during a model load is CUDA_FATAL with refresh_worker, and every later GPU
    job is refused with CUDA_FATAL (the `system` snapshot still answers)."""

    async def scenario() -> list[dict]:
        return [await worker.handle(fixture_job(model="broken", load="cuda_fatal")),
                await worker.handle(fixture_job()),
                await worker.handle({"id": "s", "input": {"task": "system"}})]

    fatal, refused, system = asyncio.run(scenario())
    assert fatal["error_code"] == "CUDA_FATAL" and fatal["refresh_worker"] is True, fatal
    assert refused["error_code"] == "CUDA_FATAL"
    assert "error" not in system
    assert worker.lifecycle.state.value == "fatal"


def test_error_after_cancellation_is_logged_and_still_marks_the_worker(worker: Worker) -> None:
    """A sticky CUDA error raised by GPU work after its job was cancelled (and answered) is not lost:
    it is logged with the job's request id, and the worker stops taking GPU jobs."""
    from tests.conftest import CAPTURED_LOGS

    async def scenario() -> tuple[dict, dict]:
        running = asyncio.create_task(worker.handle(fixture_job(action="fatal_after_cancel")))
        await asyncio.sleep(0.3)
        running.cancel()
        cancelled = await running
        deadline = time.monotonic() + 5
        while worker.lifecycle.state.value != "fatal" and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return cancelled, await worker.handle(fixture_job())

    mark = len(CAPTURED_LOGS.getvalue())
    cancelled, after = asyncio.run(scenario())
    assert cancelled["error_code"] == "CANCELLED"
    assert after["error_code"] == "CUDA_FATAL"
    late = [line for line in CAPTURED_LOGS.getvalue()[mark:].splitlines() if "job.late_error" in line]
    assert late and cancelled["request_id"] in late[0]


def test_a_slot_taken_first_runs_one_work_or_goes_back_unused() -> None:
    """A slot taken with acquire holds the gate until it runs its one piece of work (a second is
    refused) or is given back unused; either way the next acquire gets it at once."""
    gate = Gate(slots=1, acquire_timeout=0.2)

    async def scenario() -> None:
        slot, _ = await gate.acquire()
        assert gate.busy == 1
        with pytest.raises(GenerationTimeout):
            await gate.acquire()
        assert await slot.run(lambda: "ran") == "ran"
        with pytest.raises(RuntimeError, match="one piece of work"):
            await slot.run(lambda: "again")
        unused, _ = await gate.acquire()
        unused.release_unused()
        unused.release_unused()  # once only
        await asyncio.sleep(0)  # the release is handed to the loop
        assert gate.busy == 0
        last, _ = await gate.acquire()
        last.release_unused()

    try:
        asyncio.run(scenario())
    finally:
        gate.shutdown()


def test_torch_computes_on_the_gates_threads_and_on_one_thread_elsewhere(
    worker: Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each of the gate's threads runs torch on its share of the cores; a job's own threads and a
    preload on one (handler.runtime.threads: past the cores, OpenMP's threads stop spinning).

    With every thread on torch's default, each job's thread that touched torch kept a team of its own.
    """
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1, 2, 3})
    seen: dict[str, int] = {}

    async def scenario() -> None:
        for slots in (8, 2, 1):  # the last leaves 4 where threads that never set theirs start
            gate = Gate(slots=slots, acquire_timeout=5)
            seen[f"gate {slots}"], _ = await gate.run(torch.get_num_threads)
            gate.shutdown()
        threads = job_threads()
        seen["job"] = await in_thread(torch.get_num_threads, on_late_error=print, executor=threads)
        threads.shutdown()

    def preload(_runtime: object) -> None:
        seen["preload"] = torch.get_num_threads()

    monkeypatch.setitem(TABLE, "fixture", dataclasses.replace(TABLE["fixture"], preload=preload))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        asyncio.run(scenario())
        worker.preload(("fixture",))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert seen == {"gate 1": 4, "gate 2": 2, "gate 8": 1, "job": 1, "preload": 1}


def test_the_worker_entry_starts_numba_on_one_thread() -> None:
    """``python -m handler`` keeps numba (whisper's DTW) from starting an OpenMP thread per core: the
    setting is read when numba is imported, which importing the entry does."""
    code = "import handler.__main__, numba\nprint(numba.config.NUMBA_NUM_THREADS)"
    env = {key: value for key, value in os.environ.items() if key != "NUMBA_NUM_THREADS"}
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "1"
