"""The `upload` task against the real SeaweedFS: presigned POSTs the store itself limits, then s3:// jobs."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import requests

from testkit import media
from testkit.servers import SeaweedS3
from tests.conftest import b64, job, run_job

pytestmark = pytest.mark.integration


def post_file(upload: dict[str, Any], body: bytes) -> requests.Response:
    """What a client does with the task's answer: a form POST, the file last."""
    return requests.post(upload["url"], data=upload["fields"], files={"file": ("clip.wav", body)}, timeout=30)


def object_exists(s3: SeaweedS3, reference: str) -> bool:
    bucket, key = reference.removeprefix("s3://").split("/", 1)
    return bool(s3.client().list_objects_v2(Bucket=bucket, Prefix=key).get("KeyCount", 0))


def test_upload_then_transcribe_then_delete(make_worker, bucket_env, s3: SeaweedS3, speech_wav: Path) -> None:
    """The presigned POST takes a file under the limit into the worker's upload prefix; the next job
    transcribes the s3:// reference; with delete_after_read the object is gone afterwards."""
    worker = make_worker(**bucket_env)
    body = speech_wav.read_bytes()
    granted = run_job(worker, job(task="upload", file_name="../meeting 1.wav", size=len(body)))
    assert "error" not in granted, granted
    assert granted["audio"].startswith(f"s3://{bucket_env['BUCKET_NAME']}/uploads/")
    assert granted["audio"].endswith("/meeting_1.wav")
    posted = post_file(granted["upload"], body)
    assert posted.status_code in (200, 201, 204), posted.text
    result = run_job(worker, job(audio=granted["audio"], delete_after_read=True, beam_size=1, best_of=1))
    assert media.recognised(result["transcription"]) >= 0.7, result
    assert not object_exists(s3, granted["audio"])


def test_the_store_refuses_files_over_the_limit(make_worker, bucket_env, speech_wav: Path) -> None:
    """The size condition is in the signed policy: a body larger than the declared size is refused by
    the store itself; a declared size over DOWNLOAD_MAX_BYTES is refused by the task."""
    worker = make_worker(**bucket_env, DOWNLOAD_MAX_BYTES="50000")
    granted = run_job(worker, job(task="upload", file_name="a.wav", size=1000))
    refused = post_file(granted["upload"], speech_wav.read_bytes()[:200_000])
    assert refused.status_code == 400 and "EntityTooLarge" in refused.text, refused.text
    too_big = run_job(worker, job(task="upload", file_name="a.wav", size=50_001))
    assert (too_big["error_code"], too_big["field"]) == ("INPUT_TOO_LARGE", "size")


def test_the_grant_holds_only_the_declared_size(make_worker, bucket_env, s3: SeaweedS3) -> None:
    """A grant for 1000 bytes takes exactly 1000: one byte more or one less is refused by the store
    (still under DOWNLOAD_MAX_BYTES), so a client cannot put more than it declared."""
    worker = make_worker(**bucket_env)
    granted = run_job(worker, job(task="upload", file_name="a.wav", size=1000))
    assert granted["max_bytes"] == 1000
    for wrong in (1001, 999, 40_000):
        refused = post_file(granted["upload"], b"x" * wrong)
        assert refused.status_code == 400, (wrong, refused.status_code, refused.text)
        assert not object_exists(s3, granted["audio"])
    assert post_file(granted["upload"], b"x" * 1000).status_code in (200, 201, 204)
    assert object_exists(s3, granted["audio"])


@pytest.mark.slow
def test_an_expired_upload_url_is_refused(make_worker, bucket_env) -> None:
    """After UPLOAD_EXPIRY_S the store refuses the POST."""
    worker = make_worker(**bucket_env, UPLOAD_EXPIRY_S="1")
    granted = run_job(worker, job(task="upload", file_name="late.wav", size=10))
    time.sleep(2.5)
    late = post_file(granted["upload"], b"0123456789")
    assert late.status_code == 403, late.text


def test_uploads_need_a_bucket_and_only_uploads_are_deleted(make_worker, bucket_env, s3: SeaweedS3,
                                                            speech_wav: Path) -> None:
    """Without a bucket the task is INVALID_INPUT; delete_after_read applies only to objects under the
    upload prefix (never to the worker's outputs) and only to s3:// inputs."""
    assert run_job(make_worker(), job(task="upload", file_name="a.wav", size=10))["error_code"] == "INVALID_INPUT"
    worker = make_worker(**bucket_env)
    s3.client().put_object(Bucket=bucket_env["BUCKET_NAME"], Key="outputs/x.wav", Body=speech_wav.read_bytes())
    kept = run_job(worker, job(audio=f"s3://{bucket_env['BUCKET_NAME']}/outputs/x.wav", delete_after_read=True))
    assert (kept["error_code"], kept["field"]) == ("INVALID_INPUT", "delete_after_read")
    assert object_exists(s3, f"s3://{bucket_env['BUCKET_NAME']}/outputs/x.wav")
    inline = run_job(worker, job(audio_base64=b64(speech_wav), delete_after_read=True, beam_size=1, best_of=1))
    assert "error" not in inline, inline  # nothing to delete: the field does nothing for base64
