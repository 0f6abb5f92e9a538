"""The real worker process (`python -m handler`, production mode) driven by a local RunPod job server."""

from __future__ import annotations

import base64
import time
from pathlib import Path

import pytest

from testkit import media
from testkit.jobserver import JobServer
from tests.conftest import output_of, start_worker, stop_worker

pytestmark = pytest.mark.integration


@pytest.mark.slow
def test_two_hundred_jobs_each_answered_once(server: JobServer, tmp_path: Path, model_dir: Path,
                                            speech_dir: Path) -> None:
    """200 jobs, 8 held, 1 slot: every job answered exactly once, with a request id; nothing left behind."""
    worker = start_worker(server, tmp_path, model_dir, MAX_CONCURRENT_JOBS="8", MAX_CONCURRENT_GENERATIONS="1",
                   GENERATION_ACQUIRE_TIMEOUT="60")
    try:
        clip = media.encode(media.speak(media.SENTENCES[0], speech_dir / "loop.wav"), speech_dir / "loop.ogg",
                            "-ac", "1", "-c:a", "libopus", "-b:a", "16k")
        speech = base64.b64encode(clip.read_bytes()).decode()
        for i in range(200):
            if i % 40 == 0:  # five transcriptions among the sleeps
                server.submit(f"job-{i}", {"audio_base64": speech, "beam_size": 1, "best_of": 1})
            else:
                server.submit(f"job-{i}", {"task": "fixture", "action": "sleep", "seconds": 0.01 + (i % 5) * 0.01})
        assert server.wait_for(200, timeout=240), f"only {len(server.results)} answered"
        assert all(len(posts) == 1 for posts in server.results.values())
        assert set(server.results) == {f"job-{i}" for i in range(200)}
        outcomes = {}
        for job_id, posts in server.results.items():
            output = output_of(posts[0])
            assert len(output["request_id"]) == 32
            code = output.get("error_code", "success")
            assert code == "success", (job_id, posts[0])
            outcomes[code] = outcomes.get(code, 0) + 1
        speech_results = [output_of(server.result(f"job-{i}")) for i in range(0, 200, 40)]
        assert len(speech_results) == 5
        assert all("please" in r["transcription"].lower() for r in speech_results)
        assert worker.job_dirs() == []
        server.submit("after", {"task": "system"})
        assert server.wait_for(201, timeout=30)
        snapshot = output_of(server.result("after"))
        assert snapshot["jobs"] == 200 and snapshot["slots"]["total"] == 1
        assert sum(snapshot["outcomes"].values()) == 200
        assert server.pings > 0  # the heartbeat reached the server too
    finally:
        assert stop_worker(worker) == 0


@pytest.mark.slow
def test_stop_channel_cancels_waiting_and_running_jobs(server: JobServer, tmp_path: Path, model_dir: Path) -> None:
    """A job stopped while running, and one stopped while waiting for the slot, answer CANCELLED;
    the slot is free for the next job within a second, and no job directory is left."""
    worker = start_worker(server, tmp_path, model_dir, MAX_CONCURRENT_JOBS="4", MAX_CONCURRENT_GENERATIONS="1")
    try:
        server.submit("running", {"task": "fixture", "action": "sleep", "seconds": 60})
        assert server.wait_taken("running", 60)
        server.submit("waiting", {"task": "fixture", "action": "sleep", "seconds": 60})
        assert server.wait_taken("waiting", 10)
        time.sleep(0.5)
        server.stop("waiting")
        assert server.wait_for(1, 10)
        server.stop("running")
        assert server.wait_for(2, 10)
        stopped_at = time.monotonic()
        server.submit("next", {"task": "fixture", "action": "ok"})
        assert server.wait_for(3, 10)
        for job_id in ("running", "waiting"):
            body = server.result(job_id)
            assert body["error"].startswith("CANCELLED"), body
            assert output_of(body)["error_code"] == "CANCELLED"
        after = output_of(server.result("next"))
        assert after["output"] == "done"
        assert after["timings"]["queued_ms"] < 1000
        assert time.monotonic() - stopped_at < 5
        assert worker.job_dirs() == []
    finally:
        assert stop_worker(worker) == 0


@pytest.mark.slow
def test_sigterm_answers_the_job_and_exits_cleanly(server: JobServer, tmp_path: Path, model_dir: Path) -> None:
    """SIGTERM during a long job: it is answered (CANCELLED after the grace period) and the process
    exits 0 within the grace period plus shutdown; a short job in flight finishes normally."""
    worker = start_worker(server, tmp_path, model_dir, MAX_CONCURRENT_JOBS="2", MAX_CONCURRENT_GENERATIONS="2",
                   MODEL_INSTANCES="2", SHUTDOWN_GRACE_S="2")
    server.submit("long", {"task": "fixture", "action": "sleep", "seconds": 60})
    server.submit("short", {"task": "fixture", "action": "sleep", "seconds": 1})
    assert server.wait_taken("long", 60) and server.wait_taken("short", 10)
    time.sleep(0.3)
    worker.sigterm(within_s=2 + 5)
    stop_worker(worker)
    assert output_of(server.result("short"))["output"] == "done"
    assert output_of(server.result("long"))["error_code"] == "CANCELLED"
    assert worker.job_dirs() == []


@pytest.mark.slow
def test_recycling_through_the_loop(server: JobServer, tmp_path: Path, model_dir: Path) -> None:
    """MAX_JOBS_PER_WORKER=3: RunPod is told to stop the pod on the third result (stopPod)."""
    worker = start_worker(server, tmp_path, model_dir, MAX_JOBS_PER_WORKER="3")
    try:
        for i in range(3):
            server.submit(f"r{i}", {"task": "fixture"})
            assert server.wait_for(i + 1, 60)
        assert [server.result(f"r{i}").get("stopPod", False) for i in range(3)] == [False, False, True]
    finally:
        stop_worker(worker)
