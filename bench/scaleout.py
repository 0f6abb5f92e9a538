"""Scale-out as RunPod does it: 1, 2 and 4 real worker processes taking jobs from one job server.

  PYTHONPATH=. .venv/bin/python -m bench scaleout

Fixture jobs that sleep 1 s (sleep-bound, so two cores suffice), one held per worker; throughput
of 2 and 4 workers against 1 (goals: >= 1.9x and >= 3.6x).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from bench.common import Comparison
from testkit.jobserver import JobServer, WorkerProcess

JOBS = 24


def _throughput(workers: int, work: Path) -> float:
    with JobServer() as server:
        processes = [WorkerProcess(server, _dir(work, f"w{workers}-{i}"), work, RUNPOD_POD_ID=f"worker-{i}")
                     for i in range(workers)]
        try:
            server.submit("warm", {"task": "fixture"})  # every process is up once one job is answered
            assert server.wait_for(1, 120)
            time.sleep(3)
            started = time.monotonic()
            for i in range(JOBS):
                server.submit(f"job-{i}", {"task": "fixture", "action": "sleep", "seconds": 1.0})
            assert server.wait_for(JOBS + 1, 300), f"only {len(server.results)} answered"
            elapsed = time.monotonic() - started
            assert all(len(posts) == 1 for posts in server.results.values())
            return elapsed
        finally:
            for process in processes:
                process.stop()


def _dir(root: Path, name: str) -> Path:
    path = root / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def measure() -> list[Comparison]:
    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    one = _throughput(1, work)
    rows = []
    for workers, goal in ((2, 1.9), (4, 3.6)):
        elapsed = _throughput(workers, work)
        rows.append(Comparison(f"scale-out: {JOBS} jobs of 1 s on {workers} workers vs 1", elapsed, one,
                               f"baseline/ours >= {goal}", f"1 worker {JOBS / one:.2f} jobs/s, {workers} workers "
                               f"{JOBS / elapsed:.2f} jobs/s; one job server, one held job per worker"))
    return rows
