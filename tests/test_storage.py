"""Outputs in a real S3 server (SeaweedFS on loopback): presigned URLs, per-job buckets, failures."""

from __future__ import annotations

import json
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from handler.io.storage import InlineStorage, object_key
from tests import media
from tests.conftest import assert_no_job_dirs, b64, job, remember_secret, run_job
from tests.servers import SeaweedS3

pytestmark = pytest.mark.integration


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
    """A job's s3Config overrides the worker's bucket for that job only."""
    other = s3.create_bucket(f"own-{uuid.uuid4().hex[:10]}")
    worker = make_worker(**bucket_env)
    s3_config = {"accessId": s3.access_key, "accessSecret": s3.secret_key, "bucketName": other,
                 "endpointUrl": s3.endpoint}
    result = run_job(worker, {**job(audio_base64=b64(short_speech)), "s3Config": s3_config})
    assert "error" not in result, result
    assert len(keys_in(s3, other)) == 3
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
