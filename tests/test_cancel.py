"""Cancellation stops IO: downloads, bucket reads, ffmpeg children and uploads end within about a
second of their job's cancellation, and the real worker exits within its grace period after SIGTERM."""

from __future__ import annotations

import ipaddress
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from handler.cancel import CancelToken
from handler.config import load_settings
from handler.errors import Cancelled, WorkerError
from handler.io import media_out, media_tools
from handler.io.download import Downloader
from handler.io.storage import S3Storage
from testkit.jobserver import JobServer
from testkit.servers import HttpServer, SeaweedS3
from tests.conftest import start_worker, stop_worker

LOOPBACK = (ipaddress.ip_network("127.0.0.1/32"),)


def stalling(release: threading.Event) -> Callable[[BaseHTTPRequestHandler], None]:
    """A route that promises a large body, sends a few bytes, then stalls until ``release``."""

    def route(request: BaseHTTPRequestHandler) -> None:
        request.send_response(200)
        request.send_header("Content-Length", str(100 * 2**20))
        request.end_headers()
        request.wfile.write(b"\0" * 1024)
        request.wfile.flush()
        release.wait(30)

    return route


def cancel_after(token: CancelToken, seconds: float) -> None:
    threading.Timer(seconds, token.cancel).start()


def timed(work: Callable[[], Any]) -> tuple[BaseException | None, float]:
    started = time.monotonic()
    try:
        work()
    except BaseException as exc:
        return exc, time.monotonic() - started
    return None, time.monotonic() - started


@pytest.fixture
def release() -> Iterator[threading.Event]:
    event = threading.Event()
    yield event
    event.set()


def test_download_blocked_in_a_read_stops_on_cancel(tmp_path: Path, release: threading.Event) -> None:
    """A download waiting on a server that stopped sending ends at once when its job is cancelled
    (its deadline is 60 s away): the cancel shuts the socket the read waits on."""
    with HttpServer({"/slow": stalling(release)}) as server:
        guard = Downloader(max_bytes=2**30, timeout_s=60, allow_http=True, allowed_networks=LOOPBACK)
        token = CancelToken()
        cancel_after(token, 0.5)
        error, elapsed = timed(lambda: guard.fetch(server.url("/slow"), tmp_path / "o", field="audio", cancel=token))
    assert isinstance(error, Cancelled) and elapsed < 1.5, (error, elapsed)


def test_bucket_read_blocked_in_a_read_stops_on_cancel(tmp_path: Path, release: threading.Event) -> None:
    """An s3:// read stalled by the store ends at once on cancel (the S3 read timeout is 60 s)."""
    with HttpServer({"/bkt/slow.wav": stalling(release)}) as server:
        settings = load_settings({"BUCKET_ENDPOINT_URL": server.url(""), "BUCKET_ACCESS_KEY_ID": "AKSLOW123",
                                  "BUCKET_SECRET_ACCESS_KEY": "slow-secret-1234", "BUCKET_NAME": "bkt"})
        assert settings.bucket is not None
        storage = S3Storage(settings.bucket, settings)
        token = CancelToken()
        cancel_after(token, 0.5)
        error, elapsed = timed(lambda: storage.fetch_object("bkt", "slow.wav", tmp_path / "o", max_bytes=2**30,
                                                            field="audio", cancel=token))
    assert isinstance(error, Cancelled) and elapsed < 1.5, (error, elapsed)


def test_media_tool_is_killed_on_cancel() -> None:
    """An ffmpeg-class child still running when its job is cancelled is killed; the caller gets CANCELLED."""
    token = CancelToken()
    cancel_after(token, 0.3)
    error, elapsed = timed(lambda: media_tools.run(["sleep", "30"], timeout_s=60, timeout_error=WorkerError("late"),
                                              cancel=token))
    assert isinstance(error, Cancelled) and elapsed < 1.5


def test_stalled_encoder_is_stopped_at_the_write_deadline(tmp_path: Path) -> None:
    """An encoder that stops reading (stopped with SIGSTOP) cannot hold the GPU slot: the frame write
    gives up at its deadline with an error, and the encoder is gone."""
    writer = media_out.FrameWriter(tmp_path / "v.mp4", width=320, height=240, fps=8, timeout_s=1.0)
    os.kill(writer._process.pid, signal.SIGSTOP)
    frames = np.zeros((40, 240, 320, 3), dtype=np.uint8)  # 9 MB: far more than a pipe holds
    error, elapsed = timed(lambda: writer.write(frames))
    writer.abort()
    assert isinstance(error, WorkerError) and "stalled" in error.message, error
    assert 0.8 < elapsed < 3
    assert writer._process.poll() is not None


def test_a_stalled_encoder_not_yet_reaped_is_still_reported_stalled(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The deadline's kill and the encoder's exit are not one moment: asked before the killed
    process is reaped, its state says it runs, yet the error names the stall (the deadline fired)."""
    writer = media_out.FrameWriter(tmp_path / "v.mp4", width=320, height=240, fps=8, timeout_s=0.5)
    os.kill(writer._process.pid, signal.SIGSTOP)
    monkeypatch.setattr(writer._process, "poll", lambda: None)  # as under load, before the reaping
    error, _ = timed(lambda: writer.write(np.zeros((40, 240, 320, 3), dtype=np.uint8)))
    monkeypatch.undo()
    writer.abort()
    assert isinstance(error, WorkerError) and "stalled" in error.message, error


def test_encoder_write_stops_on_cancel(tmp_path: Path) -> None:
    """A frame write blocked on a busy encoder ends with CANCELLED when the job is cancelled."""
    token = CancelToken()
    writer = media_out.FrameWriter(tmp_path / "v.mp4", width=320, height=240, fps=8, timeout_s=60, cancel=token)
    os.kill(writer._process.pid, signal.SIGSTOP)
    cancel_after(token, 0.3)
    error, elapsed = timed(lambda: writer.write(np.zeros((40, 240, 320, 3), dtype=np.uint8)))
    writer.abort()
    assert isinstance(error, Cancelled) and elapsed < 1.5, (error, elapsed)


@pytest.mark.integration
def test_upload_stops_on_cancel(s3: SeaweedS3, bucket: str, tmp_path: Path) -> None:
    """A multipart upload cancelled mid-way stops sending parts and leaves no object behind."""
    big = tmp_path / "big.bin"
    with big.open("wb") as out:
        out.truncate(400 * 2**20)
    settings = load_settings({"BUCKET_ENDPOINT_URL": s3.endpoint, "BUCKET_ACCESS_KEY_ID": s3.access_key,
                              "BUCKET_SECRET_ACCESS_KEY": s3.secret_key, "BUCKET_NAME": bucket})
    assert settings.bucket is not None
    storage = S3Storage(settings.bucket, settings)
    token = CancelToken()
    cancel_after(token, 0.3)
    error, elapsed = timed(lambda: storage.save(big, name="big.bin", content_type="application/octet-stream",
                                                request_id=uuid.uuid4().hex, cancel=token))
    assert isinstance(error, Cancelled), error
    assert elapsed < 1.8, elapsed
    assert s3.client().list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0


@pytest.mark.integration
@pytest.mark.slow
def test_sigterm_during_a_stalled_download_exits_in_grace(tmp_path: Path, model_dir: Path,
                                                          release: threading.Event) -> None:
    """SIGTERM while a job's download is stalled: the job is answered CANCELLED once, no job directory
    is left, and the process exits within SHUTDOWN_GRACE_S plus a few seconds (not after the
    download's 300 s deadline)."""
    with HttpServer({"/slow": stalling(release)}) as media_server, JobServer() as server:
        worker = start_worker(server, tmp_path, model_dir, SHUTDOWN_GRACE_S="2", DOWNLOAD_ALLOW_HTTP="true",
                              DOWNLOAD_ALLOWED_NETWORKS="127.0.0.1/32")
        try:
            server.submit("stalled", {"task": "fixture", "url": media_server.url("/slow")})
            assert server.wait_taken("stalled", 60)
            deadline = time.monotonic() + 30
            while media_server.connections == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            worker.sigterm(within_s=2 + 5)
        finally:
            stop_worker(worker)
        results = server.results["stalled"]
        assert len(results) == 1 and results[0]["output"]["error_code"] == "CANCELLED", results
        assert worker.job_dirs() == []
