"""A local stand-in for RunPod's job API, speaking the protocol the SDK's production loop uses.

The real worker process (``python -m handler`` with ``RUNPOD_WEBHOOK_*`` pointing here) takes
jobs by long-poll (single or batch), posts results and progress to job-done, pings, and
long-polls the stop channel; tests submit jobs, stop them, and read what came back. A test can
also hold job-take requests open until it says so (to hand a job out at a moment it picks), and
serve entries that are not well-formed jobs.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from testkit.servers import LOOPBACK, ThreadedServer, free_port_block

ROOT = Path(__file__).resolve().parents[1]
# How long a job-take or job-stop request is held open when there is nothing to give.
LONG_POLL_S = 0.5
# The longest a held job-take request stays open.
HOLD_LIMIT_S = 30.0


class JobServer(ThreadedServer):
    """Queue of jobs for workers, and a record of everything they posted back."""

    def __init__(self) -> None:
        # Guards every field below; `changed` is signalled on every change.
        self._lock = threading.Lock()
        self.changed = threading.Condition(self._lock)
        # Entries to hand out: jobs, or whatever a test wants a worker to receive as one.
        self._pending: deque[Any] = deque()
        # While set, a job-take request waits (however long) instead of answering.
        self._holding = False
        # Job-take requests now waiting because of the hold.
        self.held_takes = 0
        self._to_stop: list[str] = []
        self.results: dict[str, list[dict[str, Any]]] = {}
        # Which worker (its RUNPOD_POD_ID) posted each result.
        self.answered_by: dict[str, list[str]] = {}
        self.progress: dict[str, list[Any]] = {}
        self.taken: list[str] = []
        self.pings = 0
        self._ids = itertools.count()
        super().__init__(ThreadingHTTPServer((LOOPBACK, 0), self._handler_class()))

    # --- what tests use -------------------------------------------------------------

    def env(self) -> dict[str, str]:
        """Environment that points the SDK's production loop at this server."""
        base = f"http://{LOOPBACK}:{self.port}"
        return {
            "RUNPOD_WEBHOOK_GET_JOB": f"{base}/job-take/$ID?gpu=test",
            "RUNPOD_WEBHOOK_POST_OUTPUT": f"{base}/job-done/$RUNPOD_POD_ID/$ID?gpu=test",
            "RUNPOD_WEBHOOK_POST_STREAM": f"{base}/job-stream/$RUNPOD_POD_ID/$ID?gpu=test",
            "RUNPOD_WEBHOOK_PING": f"{base}/ping/$RUNPOD_POD_ID?gpu=test",
            "RUNPOD_POD_ID": "test-worker",
            # The heartbeat runs only with a key; once a second so a test sees it.
            "RUNPOD_AI_API_KEY": "rpa_test_key_not_secret",
            "RUNPOD_PING_INTERVAL": "1000",
            "RUNPOD_SKIP_GPU_CHECK": "true",
            "RUNPOD_SKIP_AUTO_SYSTEM_CHECKS": "true",
        }

    def submit(self, job_id: str, inputs: dict[str, Any], **extra: Any) -> None:
        with self.changed:
            self._pending.append({"id": job_id, "input": inputs, **extra})
            self.changed.notify_all()

    def submit_batch(self, entries: list[Any]) -> None:
        """Queue ``entries`` at once, so one batch job-take hands them all out together."""
        with self.changed:
            self._pending.extend(entries)
            self.changed.notify_all()

    def hold_takes(self) -> None:
        """From now on, job-take requests stay open until :meth:`release_takes`."""
        with self.changed:
            self._holding = True

    def release_takes(self) -> None:
        """Let held job-take requests answer (with a job, if one is waiting)."""
        with self.changed:
            self._holding = False
            self.changed.notify_all()

    def wait_held(self, timeout: float) -> bool:
        """Wait until a job-take request is being held open."""
        with self.changed:
            return self.changed.wait_for(lambda: self.held_takes > 0, timeout)

    def stop(self, job_id: str) -> None:
        with self.changed:
            self._to_stop.append(job_id)
            self.changed.notify_all()

    def run(self, inputs: dict[str, Any], timeout: float = 600) -> dict[str, Any]:
        """Submit one job and wait for its result (a load client's `send`)."""
        job_id = f"load-{next(self._ids)}"
        self.submit(job_id, inputs)
        with self.changed:
            if not self.changed.wait_for(lambda: job_id in self.results, timeout):
                raise TimeoutError(f"no result for {job_id}")
            return self.results[job_id][0]

    def wait_for(self, count: int, timeout: float) -> bool:
        """Wait until ``count`` jobs have a final result."""
        with self.changed:
            return self.changed.wait_for(lambda: len(self.results) >= count, timeout)

    def wait_taken(self, job_id: str, timeout: float) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: job_id in self.taken, timeout)

    def result(self, job_id: str) -> dict[str, Any]:
        with self._lock:
            return self.results[job_id][0]

    # --- the protocol -----------------------------------------------------------------

    def _take(self, batch: int) -> list[Any]:
        with self.changed:
            self._wait_while_held()
            deadline = time.monotonic() + LONG_POLL_S
            while not self._pending and time.monotonic() < deadline:
                self.changed.wait(deadline - time.monotonic())
            jobs = [self._pending.popleft() for _ in range(min(batch, len(self._pending)))]
            self.taken.extend(job["id"] for job in jobs if isinstance(job, dict) and isinstance(job.get("id"), str))
            self.changed.notify_all()
            return jobs

    def _wait_while_held(self) -> None:
        """Called holding the lock; bounded so a forgotten hold cannot hang a test's teardown."""
        if not self._holding:
            return
        self.held_takes += 1
        self.changed.notify_all()
        try:
            self.changed.wait_for(lambda: not self._holding, HOLD_LIMIT_S)
        finally:
            self.held_takes -= 1

    def _stops(self) -> list[str]:
        deadline = time.monotonic() + LONG_POLL_S
        with self.changed:
            while not self._to_stop and time.monotonic() < deadline:
                self.changed.wait(deadline - time.monotonic())
            stops, self._to_stop = self._to_stop, []
            return stops

    def _done(self, job_id: str, body: dict[str, Any], worker: str = "") -> None:
        with self.changed:
            if body.get("status") != "IN_PROGRESS":
                self.answered_by.setdefault(job_id, []).append(worker)
            if body.get("status") == "IN_PROGRESS":
                self.progress.setdefault(job_id, []).append(body.get("output"))
            else:
                self.results.setdefault(job_id, []).append(body)
            self.changed.notify_all()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body go out in two writes; with Nagle on, the body waits for the
            # client's delayed ACK (~40 ms a reply), a stall RunPod's own API does not add.
            disable_nagle_algorithm = True

            def _reply(self, status: int, payload: Any = None) -> None:
                body = b"" if payload is None else json.dumps(payload).encode()
                self.send_response(status)
                if payload is not None:
                    self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                query = parse_qs(parts.query)
                if parts.path.startswith("/job-take-batch/"):
                    jobs = server._take(int(query.get("batch_size", ["1"])[0]))
                    self._reply(200, jobs) if jobs else self._reply(204)
                elif parts.path.startswith("/job-take/"):
                    jobs = server._take(1)
                    self._reply(200, jobs[0]) if jobs else self._reply(204)
                elif parts.path.startswith("/job-stop/"):
                    stops = server._stops()
                    self._reply(200, {"jobsToStop": stops}) if stops else self._reply(204)
                elif parts.path.startswith("/ping/"):
                    with server._lock:
                        server.pings += 1
                    self._reply(200, {})
                else:
                    self._reply(404)

            def do_POST(self) -> None:
                parts = urlsplit(self.path)
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length) or b"{}")
                if parts.path.startswith(("/job-done/", "/job-stream/")):
                    *_, worker, job_id = parts.path.rstrip("/").split("/")
                    server._done(job_id, body, worker)
                    self._reply(200, {})
                else:
                    self._reply(404)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler


def stop_process(process: subprocess.Popen[bytes]) -> int:
    """SIGTERM, then the exit status within 30 s; a process still running then is killed."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


class WorkerProcess:
    """`python -m handler` pointed at a JobServer (run from ``cwd``: another checkout, for a baseline)."""

    def __init__(self, server: JobServer, work_dir: Path, model_dir: Path, *, cwd: Path = ROOT, **env: str) -> None:
        self.work_dir = work_dir
        self.log_path = work_dir.parent / f"worker-{time.monotonic_ns()}.log"
        full_env = {
            **os.environ, **server.env(), "TASK_MODULES": "testkit.fixture_tasks", "WORK_DIR": str(work_dir),
            "MODEL_DIR": str(model_dir), "WHISPER_MODEL": "tiny.en", "ALLOW_MODEL_DOWNLOAD": "false",
            "DEVICE": "cpu", "PYTHONUNBUFFERED": "1", **env,
        }
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "handler"], cwd=cwd, env=full_env,
                                            stdout=log, stderr=subprocess.STDOUT)

    def stop(self) -> int:
        return stop_process(self.process)

    def sigterm(self, *, within_s: float) -> None:
        """SIGTERM while jobs are held: the process must exit 0 within ``within_s`` seconds."""
        signalled = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        assert self.process.wait(within_s + 15) == 0
        elapsed = time.monotonic() - signalled
        assert elapsed < within_s, f"exited {elapsed:.1f} s after SIGTERM"

    def job_dirs(self) -> list[Path]:
        return list(self.work_dir.iterdir())


class LocalApi:
    """`python -m handler --rp_serve_api` (the SDK's local HTTP API) on a free loopback port."""

    def __init__(self, work_dir: Path, **env: str) -> None:
        self.port = free_port_block(1)
        self.url = f"http://{LOOPBACK}:{self.port}"
        self.log_path = work_dir / f"api-{time.monotonic_ns()}.log"
        full_env = {**os.environ, "WORK_DIR": str(work_dir), "DEVICE": "cpu", "ALLOW_MODEL_DOWNLOAD": "false", **env}
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "handler", "--rp_serve_api", "--rp_api_host", LOOPBACK,
                 "--rp_api_port", str(self.port)], cwd=ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT)

    def __enter__(self) -> LocalApi:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/docs", timeout=1).close()  # noqa: S310 (loopback)
                return self
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    self.__exit__()
                    raise RuntimeError(self.log_path.read_text(errors="replace")[-2000:]) from None
                time.sleep(0.3)

    def runsync(self, inputs: dict[str, Any], timeout: float = 300) -> dict[str, Any]:
        """POST /runsync {"input": inputs}; the SDK's reply."""
        request = urllib.request.Request(  # noqa: S310 (loopback)
            f"{self.url}/runsync", data=json.dumps({"input": inputs}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 (loopback)
            reply: dict[str, Any] = json.loads(response.read())
        return reply

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        finally:
            if self.process.poll() is None:
                self.process.kill()


class ServeProcess:
    """`python -m handler serve` on free loopback ports (PORT, and PORT_HEALTH beside it when asked)."""

    def __init__(self, work_dir: Path, *, separate_health: bool = False, **env: str) -> None:
        self.port = free_port_block(2)
        self.health_port = self.port + 1 if separate_health else self.port
        self.url = f"http://{LOOPBACK}:{self.port}"
        self.health_url = f"http://{LOOPBACK}:{self.health_port}"
        self.log_path = work_dir.parent / f"serve-{time.monotonic_ns()}.log"
        full_env = {**os.environ, "WORK_DIR": str(work_dir), "DEVICE": "cpu", "ALLOW_MODEL_DOWNLOAD": "false",
                    "HTTP_HOST": LOOPBACK, "PORT": str(self.port), "PYTHONUNBUFFERED": "1",
                    "TASK_MODULES": "testkit.fixture_tasks", **env}
        if separate_health:
            full_env["PORT_HEALTH"] = str(self.health_port)
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "handler", "serve"], cwd=ROOT, env=full_env,
                                            stdout=log, stderr=subprocess.STDOUT)

    def health(self) -> int | None:
        """The health route's status; None while nothing listens."""
        try:
            with urllib.request.urlopen(f"{self.health_url}/ping", timeout=2) as response:  # noqa: S310 (loopback)
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return None

    def wait_health(self, wanted: int, timeout: float = 120) -> list[int]:
        """Poll the health route until it answers ``wanted``; every status seen, in order."""
        seen: list[int] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(self.log_text()[-3000:])
            status = self.health()
            if status is not None and (not seen or seen[-1] != status):
                seen.append(status)
            if status == wanted:
                return seen
            time.sleep(0.1)
        raise TimeoutError(f"health never answered {wanted}: {seen}\n{self.log_text()[-3000:]}")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self) -> None:
        self.process.send_signal(signal.SIGTERM)

    def stop(self) -> int:
        return stop_process(self.process)


@contextlib.contextmanager
def serving(work_dir: Path, **env: str) -> Iterator[ServeProcess]:
    """A serve-mode worker, ready (health 200) until the block ends; then stopped, and it must have
    exited 0 and left no request directory behind."""
    server = ServeProcess(work_dir, **env)
    try:
        server.wait_health(200)
        yield server
    finally:
        code = server.stop()
    assert code == 0, server.log_text()[-3000:]
    assert list(work_dir.iterdir()) == [], "request directories left behind"
