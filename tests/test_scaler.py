"""The prompt job loop: the real worker process (`python -m handler`) against the local job server,
holding one job at a time (the default), with no idle second between jobs."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from testkit.jobserver import JobServer, WorkerProcess
from tests.conftest import output_of, start_worker, stop_worker

pytestmark = pytest.mark.integration


def start(server: JobServer, tmp_path: Path, model_dir: Path, **env: str) -> WorkerProcess:
    worker = start_worker(server, tmp_path, model_dir, **env)
    server.run({"task": "fixture"}, timeout=120)  # ready: imports done, loop polling
    return worker


def test_one_held_jobs_follow_each_other_without_an_idle_second(
    server: JobServer, tmp_path: Path, model_dir: Path
) -> None:
    """30 trivial jobs through the loop holding 1 job: each is answered exactly once, and the mean
    time per job is well under the SDK's old ~1 s (loose bound; bench/RESULTS.md has the figure)."""
    worker = start(server, tmp_path, model_dir)
    try:
        jobs = 30
        started = time.monotonic()
        for i in range(jobs):
            server.submit(f"quick-{i}", {"task": "fixture"})
        assert server.wait_for(jobs + 1, timeout=60), f"only {len(server.results)} answered"
        per_job = (time.monotonic() - started) / jobs
        assert all(len(posts) == 1 for posts in server.results.values())
        assert all(output_of(server.result(f"quick-{i}"))["output"] == "done" for i in range(jobs))
        assert server.taken.count("quick-0") == 1 and len(server.taken) == jobs + 1
        assert per_job < 0.3, f"{per_job * 1000:.0f} ms per job"
    finally:
        assert stop_worker(worker) == 0


def test_sigterm_drains_the_held_job_and_exits_cleanly(server: JobServer, tmp_path: Path, model_dir: Path) -> None:
    """SIGTERM while the one held job runs: it is answered (CANCELLED after the 1 s grace), no job
    waiting at the server is taken afterwards, and the process exits 0 within a few seconds."""
    worker = start(server, tmp_path, model_dir, SHUTDOWN_GRACE_S="1")
    server.submit("long", {"task": "fixture", "action": "sleep", "seconds": 60})
    assert server.wait_taken("long", 30)
    server.submit("never", {"task": "fixture"})
    time.sleep(0.3)
    worker.sigterm(within_s=1 + 4)
    stop_worker(worker)
    assert output_of(server.result("long"))["error_code"] == "CANCELLED"
    assert "never" not in server.taken
    assert worker.job_dirs() == []


def wait_logged(worker: WorkerProcess, event: str, timeout: float) -> bool:
    """Wait until the worker's log has a line naming ``event``."""
    deadline = time.monotonic() + timeout
    while event not in worker.log_path.read_text(errors="replace"):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_a_job_handed_out_on_a_take_open_at_sigterm_is_answered(
    server: JobServer, tmp_path: Path, model_dir: Path
) -> None:
    """An idle worker with default settings: its job-take request is open when SIGTERM arrives,
    and the server hands a job out on it half a second after the worker has logged the shutdown
    (by then the SDK's run loop had ended). That job is answered CANCELLED (retryable, with the
    worker's request id), every job taken has an answer, and the process exits 0 well within
    the 10 s grace period."""
    worker = start(server, tmp_path, model_dir)
    server.hold_takes()
    assert server.wait_held(10)
    server.submit("late", {"task": "fixture"})
    signalled = time.monotonic()
    worker.process.send_signal(signal.SIGTERM)
    try:
        assert wait_logged(worker, "worker.shutdown", 5)
        time.sleep(0.5)
    finally:
        server.release_takes()
    assert worker.process.wait(8) == 0
    assert time.monotonic() - signalled < 5
    stop_worker(worker)
    assert server.wait_taken("late", 0)
    body = server.result("late")
    assert body["error"].startswith("CANCELLED")
    assert output_of(body)["error_code"] == "CANCELLED" and output_of(body)["retryable"] is True
    assert len(output_of(body)["request_id"]) == 32
    assert set(server.taken) <= set(server.results)


def test_a_garbled_batch_is_answered_where_it_can_be_and_the_worker_keeps_serving(
    server: JobServer, tmp_path: Path, model_dir: Path
) -> None:
    """One batch job-take hands out well-formed jobs mixed with entries that are not jobs (a
    number, a string, no id, an id that is not a string) and a job whose input is garbage: the
    good jobs are done, the garbage-input job answers INVALID_INPUT, the rest are skipped, and
    the worker goes on to answer the next job and exits 0."""
    worker = start(server, tmp_path, model_dir, MAX_CONCURRENT_JOBS="8")
    try:
        server.submit_batch([
            {"id": "good-1", "input": {"task": "fixture"}},
            42,
            "not-a-job",
            {"input": {"task": "fixture"}},
            {"id": ["not", "a", "string"], "input": {"task": "fixture"}},
            {"id": "garbage-input", "input": "\x00garbage"},
            {"id": "good-2", "input": {"task": "fixture"}},
        ])
        assert server.wait_for(4, 10), f"answered: {sorted(server.results)}"  # the warm-up job too
        assert output_of(server.result("good-1"))["output"] == "done"
        assert output_of(server.result("good-2"))["output"] == "done"
        garbage = output_of(server.result("garbage-input"))
        assert garbage["error_code"] == "INVALID_INPUT" and garbage["retryable"] is False
        server.submit("after", {"task": "fixture"})
        assert server.wait_for(5, 10)
        assert output_of(server.result("after"))["output"] == "done"
        assert "scaler.job_unusable" in worker.log_path.read_text(errors="replace")
    finally:
        assert stop_worker(worker) == 0


def test_a_garbled_single_take_is_answered_where_it_can_be_and_the_worker_keeps_serving(
    server: JobServer, tmp_path: Path, model_dir: Path
) -> None:
    """One job held (the default), so each entry comes back alone on the single job-take: a job
    with no input and one whose input is a string answer INVALID_INPUT (the SDK dropped the first
    unanswered), bodies that are a list, a number, or a job with no id are logged and skipped,
    and the job after them is done by the same, still running, worker."""
    worker = start(server, tmp_path, model_dir)
    try:
        server.submit_batch([
            {"id": "x1"},
            {"id": "x2", "input": "garbage"},
            ["not", "a", "job"],
            42,
            {"input": {"task": "fixture"}},
            {"id": "good", "input": {"task": "fixture"}},
        ])
        assert server.wait_for(4, 10), f"answered: {sorted(server.results)}"  # the warm-up job too
        for job_id in ("x1", "x2"):
            body = output_of(server.result(job_id))
            assert body["error_code"] == "INVALID_INPUT" and body["field"] == "input", job_id
        assert output_of(server.result("good"))["output"] == "done"
        assert worker.process.poll() is None
        assert worker.log_path.read_text(errors="replace").count("scaler.job_unusable") >= 5
    finally:
        assert stop_worker(worker) == 0


def test_stop_channel_cancels_the_held_job_and_the_next_runs_at_once(
    server: JobServer, tmp_path: Path, model_dir: Path
) -> None:
    """A held job stopped through the stop channel answers CANCELLED, and a job submitted after it
    is taken and answered within half a second (the loop wakes when the stopped job ends)."""
    worker = start(server, tmp_path, model_dir)
    try:
        server.submit("running", {"task": "fixture", "action": "sleep", "seconds": 60})
        assert server.wait_taken("running", 30)
        server.submit("next", {"task": "fixture"})
        time.sleep(0.3)
        assert "next" not in server.taken  # one held: it waits at the server
        server.stop("running")
        assert server.wait_for(2, 10)  # the warm-up job, then "running"
        answered_at = time.monotonic()
        assert output_of(server.result("running"))["error_code"] == "CANCELLED"
        assert server.wait_for(3, 10)
        assert time.monotonic() - answered_at < 0.5
        assert output_of(server.result("next"))["output"] == "done"
    finally:
        assert stop_worker(worker) == 0


def test_a_queued_job_starts_at_once_in_process() -> None:
    """In process, through the SDK's own local-test hooks (jobs_fetcher, jobs_handler): 20 jobs in a
    row at 1 held each start within milliseconds of being fetched (the SDK's run loop looked at its
    queue every 0.1 s), and the next is fetched as soon as one ends."""
    from handler.runtime.scaler import PromptJobScaler

    fetched: dict[str, float] = {}
    started: dict[str, float] = {}
    pending = [{"id": f"local-{i}", "input": {}} for i in range(20)]

    async def fetch(_session: object, _wanted: int) -> list[dict[str, Any]] | None:
        if not pending:
            await asyncio.sleep(0.01)  # an empty long-poll
            return None
        job = pending.pop(0)
        fetched[job["id"]] = time.perf_counter()
        return [job]

    async def handle(_session: object, _config: object, job: dict[str, Any]) -> None:
        started[job["id"]] = time.perf_counter()
        await asyncio.sleep(0.005)
        if len(started) == 20:
            scaler.kill_worker()

    scaler = PromptJobScaler({"handler": handle, "jobs_fetcher": fetch, "jobs_handler": handle})
    assert scaler.jobs_handler is handle  # the hooks apply only without RUNPOD_WEBHOOK_GET_JOB

    async def scenario() -> None:
        async with asyncio.timeout(20):
            await asyncio.gather(scaler.get_jobs(None), scaler.run_jobs(None))

    began = time.perf_counter()
    asyncio.run(scenario())
    assert sorted(started) == sorted(fetched) and len(started) == 20
    delays = sorted(started[job] - fetched[job] for job in started)
    assert delays[10] < 0.02, f"median {delays[10] * 1000:.1f} ms from fetch to start"
    assert time.perf_counter() - began < 2  # the SDK's loop slept up to 1 s after each job


def test_a_take_still_open_when_the_grace_runs_out_is_abandoned() -> None:
    """In process: a job-take that never answers, open when the worker is stopped, is given the
    grace period (here 0.3 s) and then abandoned, so both loops end in time; no take starts
    after the stop."""
    from handler.runtime.scaler import PromptJobScaler

    takes: list[float] = []

    async def fetch(_session: object, _wanted: int) -> list[dict[str, Any]] | None:
        takes.append(time.monotonic())
        await asyncio.sleep(60)  # a long-poll that outlives the grace
        return None

    async def handle(_session: object, _config: object, _job: dict[str, Any]) -> None:
        raise AssertionError("no job was handed out")

    scaler = PromptJobScaler({"handler": handle, "jobs_fetcher": fetch, "jobs_handler": handle,
                              "shutdown_grace_s": 0.3})

    async def scenario() -> float:
        loops = asyncio.gather(scaler.get_jobs(None), scaler.run_jobs(None))
        await asyncio.sleep(0.2)
        stopped = time.monotonic()
        scaler.kill_worker()
        async with asyncio.timeout(5):
            await loops
        return time.monotonic() - stopped

    took = asyncio.run(scenario())
    assert 0.3 <= took < 1.0, f"the loops ended {took:.2f} s after the stop"
    assert len(takes) == 1
