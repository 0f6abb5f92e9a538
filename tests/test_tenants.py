"""One tenant cannot stall, steer or read another: slow per-job buckets, forged cache entries, shared work.

Everything a job names is untrusted: its ``s3Config`` endpoint (here a loopback server that
trickles a byte every half second, and the real SeaweedFS with the tenant's own bucket) and
every byte in that bucket, cache entries included.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from handler.app import Worker
from handler.cancel import CancelToken
from handler.io.result_cache import ResultCache
from handler.io.storage import S3Storage
from handler.tasks.transcribe import CACHE
from testkit import media
from testkit.servers import SeaweedS3, TrickleServer
from tests.conftest import b64, job, remember_secret, run_job

pytestmark = pytest.mark.integration
FAST = {"beam_size": 1, "best_of": 1}
# Per-job endpoints pass the download policy: the test's servers on loopback must be allowed.
LOOPBACK_ALLOWED = {"DOWNLOAD_ALLOW_HTTP": "true", "DOWNLOAD_ALLOWED_NETWORKS": "127.0.0.1/32"}


@pytest.fixture(scope="module")
def short_speech(speech_dir: Path) -> Path:
    return media.speak(media.SENTENCES[0], speech_dir / "short.wav")


def tenant(endpoint: str, bucket: str = "tenantbucket", *, access: str = "AKTENANT1234",
           secret: str | None = None) -> dict[str, str]:
    """An s3Config as a job sends it."""
    return {"accessId": access, "accessSecret": remember_secret(secret or "tenant-" + uuid.uuid4().hex),
            "bucketName": bucket, "endpointUrl": endpoint}


async def wait_for(condition: Any, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        await asyncio.sleep(0.05)
    return bool(condition())


def test_64_jobs_on_a_trickling_bucket_do_not_stall_anyone_else(make_worker, short_speech: Path) -> None:
    """64 jobs whose s3Config endpoint trickles (half stuck reading their s3:// input, half in the
    cache lookup) hold only their own threads: an ordinary job is answered within 5 s. Cancelled,
    the 64 are answered CANCELLED at once and every one of their connections is closed."""
    worker = make_worker(**LOOPBACK_ALLOWED, DOWNLOAD_TIMEOUT_S="120", RESULT_CACHE_TIMEOUT_S="120")
    ordinary = job(audio_base64=b64(short_speech), **FAST)
    assert "error" not in run_job(worker, ordinary)  # the model is loaded before the clock starts

    async def scenario(trickle: TrickleServer) -> tuple[float, list[dict[str, Any]], float, bool]:
        hostile = []
        for number in range(64):
            media_field = ({"audio": "s3://tenantbucket/in.wav"} if number % 2
                           else {"audio_base64": b64(short_speech)})
            hostile.append(asyncio.create_task(
                worker.handle({**job(**media_field, **FAST), "s3Config": tenant(trickle.url)})))
        await wait_for(lambda: trickle.open >= 64, 10)
        started = time.monotonic()
        answer = await asyncio.wait_for(worker.handle(job(audio_base64=b64(short_speech), **FAST)), 15)
        ordinary_s = time.monotonic() - started
        assert "error" not in answer, answer
        for task in hostile:
            task.cancel()
        cancelled_at = time.monotonic()
        results = list(await asyncio.gather(*hostile))
        answered_s = time.monotonic() - cancelled_at
        closed = await wait_for(lambda: trickle.open == 0, 5)
        return ordinary_s, results, answered_s, closed

    with TrickleServer() as trickle:
        ordinary_s, results, answered_s, closed = asyncio.run(scenario(trickle))
        assert trickle.seen >= 64
    assert ordinary_s < 5, f"an ordinary job waited {ordinary_s:.1f} s behind a trickling tenant"
    assert {r["error_code"] for r in results} == {"CANCELLED"} and answered_s < 2
    assert closed, "a cancelled job's connection to its endpoint stayed open"


def test_a_slow_cache_lookup_is_a_miss_and_every_call_has_a_deadline(make_worker, short_speech: Path) -> None:
    """On a trickling bucket the cache lookup gives up after RESULT_CACHE_TIMEOUT_S (a miss: the job
    computes), and the upload after UPLOAD_TIMEOUT_S: UPLOAD_FAILED, retryable, with the deadline
    named; nothing waits on botocore's per-byte read timeout."""
    worker = make_worker(**LOOPBACK_ALLOWED, RESULT_CACHE_TIMEOUT_S="1", UPLOAD_TIMEOUT_S="2")
    with TrickleServer() as trickle:
        started = time.monotonic()
        result = run_job(worker, {**job(audio_base64=b64(short_speech), **FAST), "s3Config": tenant(trickle.url)})
        took_s = time.monotonic() - started
    assert (result["error_code"], result["retryable"]) == ("UPLOAD_FAILED", True), result
    assert "within 2 s" in result["error"]
    assert took_s < 12, took_s


def test_a_trickling_s3_input_stops_at_the_download_deadline(make_worker) -> None:
    """An s3:// input on a trickling bucket fails at DOWNLOAD_TIMEOUT_S as DOWNLOAD_FAILED (retryable,
    field audio), where botocore alone would wait as long as a byte keeps coming."""
    worker = make_worker(**LOOPBACK_ALLOWED, DOWNLOAD_TIMEOUT_S="1.5")
    with TrickleServer() as trickle:
        started = time.monotonic()
        result = run_job(worker, {**job(audio="s3://tenantbucket/in.wav"), "s3Config": tenant(trickle.url)})
        took_s = time.monotonic() - started
    assert (result["error_code"], result["field"], result["retryable"]) == ("DOWNLOAD_FAILED", "audio", True)
    assert took_s < 6, took_s


def test_a_slow_lookup_stops_when_its_job_is_cancelled(make_settings) -> None:
    """A cache lookup blocked on a trickling endpoint returns as soon as the job's token is cancelled,
    long before its deadline, and its connection is closed."""
    settings = make_settings(**LOOPBACK_ALLOWED)
    worker = Worker(settings)
    with TrickleServer() as trickle:
        storage = worker.storage_for({"s3Config": tenant(trickle.url)})
        assert isinstance(storage, S3Storage)
        cache = ResultCache(storage, prefix="cache", output_prefix="outputs", secret=b"k", timeout_s=60)
        token = CancelToken()

        async def lookup() -> float:
            pending = asyncio.create_task(asyncio.to_thread(cache.lookup, "ab" * 32, fields=CACHE.outputs,
                                                            cancel=token))
            assert await wait_for(lambda: trickle.open == 1, 5)
            cancelled_at = time.monotonic()
            token.cancel()
            with pytest.raises(Exception, match="cancelled"):
                await pending
            return time.monotonic() - cancelled_at

        assert asyncio.run(lookup()) < 2
        assert asyncio.run(wait_for(lambda: trickle.open == 0, 3))


def entry_keys(s3: SeaweedS3, bucket: str) -> list[str]:
    listing = s3.client().list_objects_v2(Bucket=bucket, Prefix="cache/")
    return [item["Key"] for item in listing.get("Contents", [])]


@pytest.fixture
def tenant_bucket(s3: SeaweedS3) -> tuple[str, dict[str, str]]:
    """A bucket of the tenant's own in the real store, and the s3Config that names it."""
    name = s3.create_bucket(f"t-{uuid.uuid4().hex[:12]}")
    return name, tenant(s3.endpoint, name, access=s3.access_key, secret=s3.secret_key)


def test_a_forged_entry_is_a_miss_and_is_replaced(make_worker, s3: SeaweedS3, tenant_bucket,
                                                  short_speech: Path) -> None:
    """A tenant rewrites the entry in its own bucket: another transcript, ``stopPod`` and
    ``refresh_worker``, a plain sha256 for a checksum. The worker's HMAC
    fails, so the next job computes its own result (no stopPod, no refresh) and the sound entry it
    writes is a hit again."""
    bucket, config = tenant_bucket
    worker = make_worker(**LOOPBACK_ALLOWED)
    request = {**job(audio_base64=b64(short_speech), **FAST), "s3Config": config}
    first = run_job(worker, request)
    assert first["cached"] is False, first
    [entry_key] = entry_keys(s3, bucket)
    entry = json.loads(s3.client().get_object(Bucket=bucket, Key=entry_key)["Body"].read())
    forged = {**entry["output"], "transcription": "forged", "stopPod": True, "refresh_worker": True}
    entry.update(output=forged, mac=hashlib.sha256(json.dumps(forged).encode()).hexdigest())
    s3.client().put_object(Bucket=bucket, Key=entry_key, Body=json.dumps(entry).encode())
    again = run_job(worker, request)
    assert again["cached"] is False and again["transcription"] == first["transcription"]
    assert not {"stopPod", "refresh_worker"} & set(again)
    assert all(f["key"].startswith("outputs/") for f in again["files"])
    assert run_job(worker, request)["cached"] is True


def write_entry(worker: Worker, s3: SeaweedS3, bucket: str, entry_key: str, output: Any) -> None:
    """An entry with the worker's own HMAC (as if the worker had written it) around ``output``."""
    storage = worker.storage_for({"s3Config": tenant(s3.endpoint, bucket, access=s3.access_key,
                                                     secret=s3.secret_key)})
    assert isinstance(storage, S3Storage)
    cache = ResultCache(storage, prefix="cache", output_prefix="outputs", secret=worker.runtime.cache_secret,
                        timeout_s=5)
    key = entry_key.rsplit("/", 1)[1].removesuffix(".json")
    body = {"key": key, "mac": cache._mac(key, output), "output": output}
    s3.client().put_object(Bucket=bucket, Key=entry_key, Body=json.dumps(body).encode())


def test_only_the_tasks_fields_and_its_own_outputs_come_from_an_entry(make_worker, s3: SeaweedS3, tenant_bucket,
                                                                      short_speech: Path) -> None:
    """Even an authentic entry is rebuilt from the task's allow-list: fields the handler adds
    (stopPod, refresh_worker, error_code) never come back; a file outside the worker's outputs, or
    files of two jobs, make it a miss."""
    bucket, config = tenant_bucket
    worker = make_worker(**LOOPBACK_ALLOWED)
    request = {**job(audio_base64=b64(short_speech), **FAST), "s3Config": config}
    first = run_job(worker, request)
    [entry_key] = entry_keys(s3, bucket)
    sound = json.loads(s3.client().get_object(Bucket=bucket, Key=entry_key)["Body"].read())["output"]
    write_entry(worker, s3, bucket, entry_key, {**sound, "stopPod": True, "refresh_worker": True,
                                                "error_code": ["unhashable"], "error": "x"})
    hit = run_job(worker, request)
    assert hit["cached"] is True and hit["transcription"] == first["transcription"]
    assert not {"stopPod", "refresh_worker", "error", "error_code"} & set(hit), hit
    s3.client().put_object(Bucket=bucket, Key="private/notes.txt", Body=b"12345")
    outside = {"name": "notes.txt", "content_type": "text/plain", "size": 5, "key": "private/notes.txt"}
    other_job = {**sound["files"][0], "key": sound["files"][0]["key"].replace(first["request_id"], "f" * 32)}
    for files in ([outside], [sound["files"][0], other_job]):
        write_entry(worker, s3, bucket, entry_key, {**sound, "files": files})
        assert run_job(worker, request)["cached"] is False


@pytest.mark.parametrize("output", [
    ["not", "a", "dict"], {"transcription": "x", "files": {"a": 1}}, {"transcription": "x", "files": [7]},
    {"transcription": "x", "files": [{"name": "a", "key": 3}]},
])
def test_an_authentic_entry_of_the_wrong_shape_is_a_miss(make_worker, s3: SeaweedS3, tenant_bucket,
                                                         short_speech: Path, output: Any) -> None:
    """An entry that verifies but is not a result (a list, files not a list, a file not an object or
    with a number for a key) is a miss: the job computes, never INTERNAL."""
    bucket, config = tenant_bucket
    worker = make_worker(**LOOPBACK_ALLOWED)
    request = {**job(audio_base64=b64(short_speech), **FAST), "s3Config": config}
    run_job(worker, request)
    [entry_key] = entry_keys(s3, bucket)
    write_entry(worker, s3, bucket, entry_key, output)
    result = run_job(worker, request)
    assert result["cached"] is False and "error" not in result, result


def test_deeply_nested_json_in_an_entry_is_a_miss(make_worker, s3: SeaweedS3, tenant_bucket,
                                                  short_speech: Path) -> None:
    """An entry of 200,000 nested lists (the parser's recursion limit) is a miss, not INTERNAL."""
    bucket, config = tenant_bucket
    worker = make_worker(**LOOPBACK_ALLOWED)
    request = {**job(audio_base64=b64(short_speech), **FAST), "s3Config": config}
    run_job(worker, request)
    [entry_key] = entry_keys(s3, bucket)
    s3.client().put_object(Bucket=bucket, Key=entry_key, Body=b"[" * 200_000 + b"]" * 200_000)
    result = run_job(worker, request)
    assert result["cached"] is False and "error" not in result, result


def test_wrong_credentials_never_join_another_tenants_computation(make_worker, s3: SeaweedS3, tenant_bucket,
                                                                  short_speech: Path) -> None:
    """Two identical jobs at once on one bucket, one with its owner's credentials and one with a wrong
    secret: the second does not share the first's result (no presigned URLs, no access key id of
    the owner); it computes alone and its own upload is refused."""
    _, config = tenant_bucket
    worker = make_worker(**LOOPBACK_ALLOWED)
    body = {"audio_base64": b64(short_speech), **FAST}
    intruder = {**config, "accessSecret": remember_secret("wrong-" + uuid.uuid4().hex)}

    async def both() -> list[dict[str, Any]]:
        return list(await asyncio.gather(worker.handle({**job(**body), "s3Config": config}),
                                          worker.handle({**job(**body), "s3Config": intruder})))

    owner, other = asyncio.run(both())
    assert owner["cached"] is False and "files" in owner, owner
    assert other["error_code"] == "UPLOAD_FAILED", other
    assert s3.access_key not in json.dumps(other) and "files" not in other
