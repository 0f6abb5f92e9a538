"""Outputs in a real S3 server (SeaweedFS on loopback): presigned URLs, per-job buckets, failures."""

from __future__ import annotations

import ipaddress
import json
import threading
import time
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from handler.io.outputs import InlineStorage
from handler.io.storage import object_key
from testkit import media
from testkit.servers import HttpServer, SeaweedS3
from tests.conftest import assert_no_job_dirs, b64, job, remember_secret, run_job

pytestmark = pytest.mark.integration
# Per-job endpoints pass the download policy: the test's store on loopback must be allowed.
LOOPBACK_ALLOWED = {"DOWNLOAD_ALLOW_HTTP": "true", "DOWNLOAD_ALLOWED_NETWORKS": "127.0.0.1/32"}


@pytest.fixture(scope="module")
def short_speech(speech_dir: Path) -> Path:
    return media.speak(media.SENTENCES[0], speech_dir / "short.wav")


def fetch(url: str) -> tuple[bytes, str]:
    assert url.startswith("http://127.0.0.1:")
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 (loopback test server)
        return response.read(), response.headers.get("Content-Type", "")


def keys_in(s3: SeaweedS3, bucket: str) -> list[str]:
    listing = s3.client().list_objects_v2(Bucket=bucket)
    return [item["Key"] for item in listing.get("Contents", [])]


def test_outputs_download_byte_identical(make_worker, bucket_env, s3, bucket, short_speech, work_dir) -> None:
    """SRT, VTT and the JSON result land in the bucket and come back identical via their presigned URLs."""
    worker = make_worker(**bucket_env)
    result = run_job(worker, job(audio_base64=b64(short_speech), transcription="srt", word_timestamps=True))
    assert "error" not in result, result
    files = {f["name"]: f for f in result["files"]}
    assert set(files) == {"transcript.srt", "transcript.vtt", "transcript.json"}
    for stored in files.values():
        body, content_type = fetch(stored["url"])
        assert len(body) == stored["size"]
        assert content_type == stored["content_type"]
        direct = s3.client().get_object(Bucket=bucket, Key=stored["key"])["Body"].read()
        assert body == direct
        assert stored["key"].startswith("outputs/") and result["request_id"] in stored["key"]
        assert "base64" not in stored
    srt, _ = fetch(files["transcript.srt"]["url"])
    assert srt.decode() == result["transcription"]
    vtt, _ = fetch(files["transcript.vtt"]["url"])
    assert vtt.decode().startswith("WEBVTT")
    saved = json.loads(fetch(files["transcript.json"]["url"])[0])
    assert saved == {k: result[k] for k in saved}
    assert saved["word_timestamps"] == result["word_timestamps"]
    assert_no_job_dirs(work_dir)


def test_per_job_s3config_uses_its_own_bucket(make_worker, bucket_env, s3, bucket, short_speech) -> None:
    """A job's s3Config overrides the worker's bucket for that job only (the test's loopback store is
    allowed explicitly, as an operator would allow a private one)."""
    other = s3.create_bucket(f"own-{uuid.uuid4().hex[:10]}")
    worker = make_worker(**bucket_env, **LOOPBACK_ALLOWED)
    s3_config = {"accessId": s3.access_key, "accessSecret": s3.secret_key, "bucketName": other,
                 "endpointUrl": s3.endpoint}
    result = run_job(worker, {**job(audio_base64=b64(short_speech)), "s3Config": s3_config})
    assert "error" not in result, result
    assert len([key for key in keys_in(s3, other) if key.startswith("outputs/")]) == 3
    assert keys_in(s3, bucket) == []
    for stored in result["files"]:
        assert fetch(stored["url"])[0]


def test_wrong_credentials_give_upload_failed(make_worker, bucket_env, short_speech, work_dir) -> None:
    """A secret the server rejects is UPLOAD_FAILED; no URL is reported."""
    env = {**bucket_env, "BUCKET_SECRET_ACCESS_KEY": remember_secret("wrong-" + uuid.uuid4().hex)}
    result = run_job(make_worker(**env), job(audio_base64=b64(short_speech)))
    assert result["error_code"] == "UPLOAD_FAILED"
    assert "files" not in result
    assert_no_job_dirs(work_dir)


def test_bucket_object_as_input(make_worker, bucket_env, s3, bucket, short_speech) -> None:
    """audio=s3://bucket/key reads the object from the job's bucket."""
    s3.client().put_object(Bucket=bucket, Key="in/speech.wav", Body=short_speech.read_bytes())
    worker = make_worker(**bucket_env)
    result = run_job(worker, job(audio=f"s3://{bucket}/in/speech.wav"))
    assert {"please", "send", "report"} <= media.words_of(result["transcription"])
    missing = run_job(worker, job(audio=f"s3://{bucket}/in/missing.wav"))
    assert missing["error_code"] == "DOWNLOAD_FAILED" and missing["retryable"] is False
    other = run_job(worker, job(audio="s3://someone-elses/speech.wav"))
    assert other["error_code"] == "INVALID_INPUT"


@pytest.mark.slow
def test_storage_outage_then_recovery(make_worker, tmp_path_factory, short_speech) -> None:
    """Server down: UPLOAD_FAILED within the retry bound; once it is back, the next job succeeds."""
    server = SeaweedS3(
        tmp_path_factory.mktemp("outage"),
        access_key=remember_secret("AKOUT" + uuid.uuid4().hex[:12].upper()),
        secret_key=remember_secret("outage-" + uuid.uuid4().hex),
    )
    server.start()
    try:
        name = server.create_bucket("outage")
        env = {"BUCKET_ENDPOINT_URL": server.endpoint, "BUCKET_ACCESS_KEY_ID": server.access_key,
               "BUCKET_SECRET_ACCESS_KEY": server.secret_key, "BUCKET_NAME": name,
               "UPLOAD_MAX_ATTEMPTS": "3", "S3_CONNECT_TIMEOUT_S": "1"}
        worker = make_worker(**env)
        server.stop()
        started = time.monotonic()
        failed = run_job(worker, job(audio_base64=b64(short_speech)))
        elapsed = time.monotonic() - started
        assert failed["error_code"] == "UPLOAD_FAILED" and failed["retryable"] is True
        assert elapsed < 15, f"took {elapsed:.1f}s, over the retry bound"
        server.start()
        recovered = run_job(worker, job(audio_base64=b64(short_speech)))
        assert "error" not in recovered, recovered
        assert len(recovered["files"]) == 3
    finally:
        server.stop()


def test_inline_outputs_are_capped(tmp_path: Path) -> None:
    """Without a bucket, files past the inline budget are refused with a clear error, never dropped."""
    storage = InlineStorage(max_bytes=100)
    small = tmp_path / "a.txt"
    small.write_bytes(b"x" * 60)
    assert storage.save(small, name="a.txt", content_type="text/plain", request_id="r").base64
    with pytest.raises(Exception, match="does not fit inline") as info:
        storage.save(small, name="b.txt", content_type="text/plain", request_id="r")
    assert getattr(info.value, "code", None) == "INPUT_TOO_LARGE"


@pytest.mark.parametrize("name", ["../../etc/passwd", "a b?.srt", "..hidden", "ok.srt"])
def test_object_keys_are_built_by_the_worker(name: str) -> None:
    """Keys are prefix/date/request/name with the name reduced to safe characters."""
    key = object_key("outputs", "req123", name)
    parts = key.split("/")
    assert parts[0] == "outputs" and parts[4] == "req123" and len(parts) == 6
    assert ".." not in key and " " not in key and "?" not in key


def s3config(endpoint: str, bucket: str = "jobbucket") -> dict[str, str]:
    return {"accessId": "AKJOB1234567", "accessSecret": remember_secret("job-secret-" + uuid.uuid4().hex),
            "bucketName": bucket, "endpointUrl": endpoint}


def recorder() -> HttpServer:
    """A loopback server that answers anything 200 and counts the connections it gets."""

    def ok(request: BaseHTTPRequestHandler) -> None:
        request.send_response(200)
        request.send_header("Content-Length", "0")
        request.end_headers()

    return HttpServer({"/": ok, "/jobbucket/in.wav": ok})


def test_per_job_endpoint_on_internal_addresses_is_refused(make_worker, short_speech, work_dir) -> None:
    """A job's s3Config endpoint at loopback, link-local or private addresses is refused before any
    work (the loopback server records no connection, the media is never decoded), not retryable,
    field s3Config.endpointUrl; http needs the same setting as downloads."""
    with recorder() as server:
        worker = make_worker(DOWNLOAD_ALLOW_HTTP="true")
        for endpoint in (server.url(""), "http://169.254.169.254", "https://10.0.0.1", "http://[::1]:9",
                         f"http://[::ffff:127.0.0.1]:{server.port}", f"http://[64:ff9b::7f00:1]:{server.port}"):
            result = run_job(worker, {**job(audio_base64=b64(short_speech)), "s3Config": s3config(endpoint)})
            assert result["error_code"] == "DOWNLOAD_FAILED", (endpoint, result)
            assert result["retryable"] is False and result["field"] == "s3Config.endpointUrl"
            assert "timings" not in result
        https_only = run_job(make_worker(), {**job(audio_base64=b64(short_speech)),
                                             "s3Config": s3config("http://s3.example.com")})
        assert "scheme" in https_only["error"] and https_only["retryable"] is False
        assert server.connections == 0
    assert_no_job_dirs(work_dir)


@pytest.mark.parametrize(
    ("overrides", "field", "code"),
    [({"endpointUrl": "notaurl"}, "s3Config.endpointUrl", "INVALID_INPUT"),
     ({"endpointUrl": "http://[::1"}, "s3Config.endpointUrl", "INVALID_INPUT"),
     ({"endpointUrl": "https://①②⑦.0.0.1/"}, "s3Config.endpointUrl", "DOWNLOAD_FAILED"),
     ({"bucketName": "a/../b"}, "s3Config.bucketName", "INVALID_INPUT"),
     ({"bucketName": "x"}, "s3Config.bucketName", "INVALID_INPUT"),
     ({"accessSecret": 7}, "s3Config.accessSecret", "INVALID_INPUT"),
     ({"region": "eu"}, "s3Config.region", "INVALID_INPUT")],
)
def test_s3config_is_checked_completely_at_the_door(make_worker, overrides, field, code) -> None:
    """Malformed endpoints, bad bucket names and wrong types are refused before the job's download
    starts (its URL's server sees no connection), with the field named and no retry."""
    with recorder() as server:
        worker = make_worker(DOWNLOAD_ALLOW_HTTP="true", DOWNLOAD_ALLOWED_NETWORKS="127.0.0.1/32")
        config = {**s3config("https://s3.example.com"), **overrides}
        result = run_job(worker, {**job(audio=server.url("/in.wav")), "s3Config": config})
        assert (result["error_code"], result["field"], result["retryable"]) == (code, field, False), result
        assert server.connections == 0


def test_endpoint_rebinding_to_loopback_is_refused_at_connect(make_worker) -> None:
    """A host that resolves to a public address at the door and to loopback at connect time gets no
    connection: the guard checks again where botocore opens its socket."""
    answers = iter([ipaddress.ip_address("93.184.216.34")])

    def rebinding(_host: str, _port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        return [next(answers, ipaddress.ip_address("127.0.0.1"))]

    with recorder() as server:
        worker = make_worker(DOWNLOAD_ALLOW_HTTP="true", UPLOAD_MAX_ATTEMPTS="1")
        worker.downloader.policy.resolver = rebinding
        config = s3config(f"http://s3.rebind.example:{server.port}")
        result = run_job(worker, {**job(audio="s3://jobbucket/in.wav"), "s3Config": config})
        assert result["error_code"] == "DOWNLOAD_FAILED" and result["retryable"] is False, result
        # Refused by the connect-time check, which names the host, never the address it resolved to.
        assert "not a public address" in result["error"] and "127.0.0.1" not in result["error"], result
        assert server.connections == 0


class LyingStore:
    """An S3-speaking loopback server: HEAD says 10 bytes, GET streams far more (no length), or 403s."""

    def __init__(self, body_bytes: int) -> None:
        self.sent = 0
        self._lock = threading.Lock()
        self.server = HttpServer({"/bkt/big.wav": self._big, "/bkt/denied.wav": self._denied})
        self._body_bytes = body_bytes

    def _big(self, request: BaseHTTPRequestHandler) -> None:
        request.send_response(200)
        if request.command == "HEAD":
            request.send_header("Content-Length", "10")
            request.end_headers()
            return
        request.send_header("Connection", "close")
        request.end_headers()
        chunk = b"\0" * 65536
        try:
            for _ in range(self._body_bytes // len(chunk)):
                request.wfile.write(chunk)
                with self._lock:
                    self.sent += len(chunk)
        except OSError:
            return  # the worker hung up: what this test wants

    def _denied(self, request: BaseHTTPRequestHandler) -> None:
        body = b"<Error><Code>AccessDenied</Code><Message>no</Message></Error>"
        request.send_response(403)
        request.send_header("Content-Type", "application/xml")
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        request.wfile.write(body)


def test_bucket_reads_enforce_the_cap_on_bytes_received(make_worker, work_dir) -> None:
    """A store that answers HEAD small and GET large (no length) is cut off at DOWNLOAD_MAX_BYTES: the
    job is INPUT_TOO_LARGE and the worker stops reading long before the store's 64 MiB; a 403 on a
    read is not retryable."""
    store = LyingStore(body_bytes=64 * 2**20)
    with store.server as server:
        env = {"BUCKET_ENDPOINT_URL": server.url(""), "BUCKET_ACCESS_KEY_ID": "AKLIAR123456",
               "BUCKET_SECRET_ACCESS_KEY": remember_secret("liar-" + uuid.uuid4().hex), "BUCKET_NAME": "bkt",
               "DOWNLOAD_MAX_BYTES": str(2**20), "UPLOAD_MAX_ATTEMPTS": "1"}
        worker = make_worker(**env)
        result = run_job(worker, job(audio="s3://bkt/big.wav"))
        assert result["error_code"] == "INPUT_TOO_LARGE" and result["field"] == "audio", result
        assert store.sent < 32 * 2**20
        denied = run_job(worker, job(audio="s3://bkt/denied.wav"))
        assert denied["error_code"] == "DOWNLOAD_FAILED" and denied["retryable"] is False, denied
    assert_no_job_dirs(work_dir)
