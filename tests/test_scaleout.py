"""Scale-out as RunPod runs it: several real worker processes, one job server, one shared bucket."""

from __future__ import annotations

import base64
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from testkit import media
from testkit.jobserver import JobServer, WorkerProcess
from tests.conftest import remember_presigned, start_worker, stop_worker

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def start(server: JobServer, root: Path, model_dir: Path, name: str, env: dict[str, str]) -> WorkerProcess:
    """Worker ``name`` (its RUNPOD_POD_ID), its job directories its own."""
    return start_worker(server, root / name, model_dir, RUNPOD_POD_ID=name, **env)


def output(server: JobServer, job_id: str) -> dict[str, Any]:
    posts = server.results[job_id]
    assert len(posts) == 1, posts
    result: dict[str, Any] = posts[0].get("output", {})
    remember_presigned(result)
    return result


# The fewest workers that share a queue: one proves nothing two do not, and more prove nothing more.
WORKERS = 2


def test_workers_share_one_queue_and_one_cache(tmp_path: Path, model_dir: Path, speech_wav: Path,
                                              bucket_env: dict[str, str]) -> None:
    """WORKERS workers on one job server and one bucket: every job is answered exactly once across them; a
    transcription computed by one worker is a result-cache hit when a later worker (started after the
    first one stopped) gets the same job."""
    speech = base64.b64encode(speech_wav.read_bytes()).decode()
    job = {"audio_base64": speech, "beam_size": 1, "best_of": 1}
    with JobServer() as server:
        first = start(server, tmp_path, model_dir, "first", bucket_env)
        try:
            server.submit("computed", job)
            assert server.wait_for(1, 120)
        finally:
            stop_worker(first)
        assert output(server, "computed")["cached"] is False
        pool = [start(server, tmp_path, model_dir, f"w{i}", bucket_env) for i in range(WORKERS)]
        try:
            server.submit("again", job)
            for i in range(8 * WORKERS):
                server.submit(f"f{i}", {"task": "fixture", "action": "sleep", "seconds": 0.3})
            assert server.wait_for(2 + 8 * WORKERS, 180), f"only {len(server.results)} answered"
        finally:
            for worker in pool:
                stop_worker(worker)
        again = output(server, "again")
        assert again["cached"] is True and media.recognised(again["transcription"]) >= 0.7
        assert server.answered_by["again"][0] != "first"
        answered = Counter(by[0] for job_id, by in server.answered_by.items() if job_id.startswith("f"))
        assert sum(answered.values()) == 8 * WORKERS
        assert all(len(by) == 1 for by in server.answered_by.values())
        assert len(answered) > 1, answered  # the queue really was shared
        for worker in pool:
            assert worker.job_dirs() == []
