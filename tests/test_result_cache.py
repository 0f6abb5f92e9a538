"""The result cache in the real SeaweedFS bucket: hits skip the GPU and the model, misses on any change."""

from __future__ import annotations

import asyncio
import shutil
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch

from handler.app import Worker
from handler.runtime.gate import Gate, Slot
from handler.runtime.registry import Registry
from testkit import media
from testkit.servers import SeaweedS3
from tests.conftest import b64, job, remember_presigned, run_job

pytestmark = pytest.mark.integration
T = TypeVar("T")
FAST = {"beam_size": 1, "best_of": 1}


class CountingGate(Gate):
    """The real gate, counting the slots it hands out (a hit must take none): every model call
    takes one, whole jobs through ``run`` and shared batches through ``acquire``."""

    runs = 0

    async def acquire(self) -> tuple[Slot, float]:
        type(self).runs += 1
        return await super().acquire()


@pytest.fixture
def counting_worker(make_settings, bucket_env) -> Callable[..., Worker]:
    def make(**env: str) -> Worker:
        CountingGate.runs = 0
        return Worker(make_settings(**bucket_env, **env), registry=Registry(),
                      gate=CountingGate(slots=1, acquire_timeout=60))

    return make


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 (loopback test store)
        return bytes(response.read())


def cache_entries(s3: SeaweedS3, bucket: str) -> list[str]:
    listing = s3.client().list_objects_v2(Bucket=bucket, Prefix="cache/")
    return [item["Key"] for item in listing.get("Contents", [])]


def test_a_second_worker_answers_from_the_bucket(counting_worker, speech_wav: Path) -> None:
    """A result one worker computed is a hit on another worker sharing the bucket: same transcript,
    "cached": true, fresh URLs that work, and no GPU slot taken, no model loaded."""
    first = run_job(counting_worker(), job(audio_base64=b64(speech_wav), **FAST))
    assert first["cached"] is False and media.recognised(first["transcription"]) >= 0.7
    other = counting_worker()
    hit = run_job(other, job(audio_base64=b64(speech_wav), **FAST))
    assert hit["cached"] is True, hit
    assert hit["transcription"] == first["transcription"] and hit["segments"] == first["segments"]
    assert hit["request_id"] != first["request_id"]
    assert CountingGate.runs == 0 and other.runtime.registry.loaded() == {}
    assert [f["key"] for f in hit["files"]] == [f["key"] for f in first["files"]]
    for stored in hit["files"]:  # presigned now, by this worker (the same second signs the same)
        assert len(fetch(stored["url"])) == stored["size"]
    remember_presigned(hit)


def test_any_change_that_matters_misses(counting_worker, speech_wav: Path, model_dir: Path, tmp_path: Path) -> None:
    """An output-affecting field, other weights under the same model name, or one byte more of audio
    miss; where the audio came from does not matter; a job can opt out."""
    worker = counting_worker()
    base = run_job(worker, job(audio_base64=b64(speech_wav), **FAST))
    assert base["cached"] is False
    assert run_job(worker, job(audio_base64=b64(speech_wav), **FAST))["cached"] is True
    assert run_job(worker, job(audio_base64=b64(speech_wav), word_timestamps=True, **FAST))["cached"] is False
    assert run_job(worker, job(audio_base64=b64(speech_wav), **FAST, cache=False))["cached"] is False
    changed = tmp_path / "changed.wav"
    changed.write_bytes(speech_wav.read_bytes() + b"\0")
    assert run_job(worker, job(audio_base64=b64(changed), **FAST))["cached"] is False
    resaved = tmp_path / "models"
    shutil.copytree(model_dir, resaved)
    checkpoint = torch.load(resaved / "whisper" / "tiny.en.pt", weights_only=True)
    checkpoint["note"] = "same model, other bytes"
    torch.save(checkpoint, resaved / "whisper" / "tiny.en.pt")
    other_weights = counting_worker(MODEL_DIR=str(resaved))
    assert run_job(other_weights, job(audio_base64=b64(speech_wav), **FAST))["cached"] is False


def test_corrupt_or_stale_entries_are_ignored_and_replaced(counting_worker, s3: SeaweedS3, bucket: str,
                                                           speech_wav: Path) -> None:
    """A corrupted entry, or one whose output file is gone, is never returned: the job computes and
    writes a sound entry that the next job hits."""
    worker = counting_worker()
    first = run_job(worker, job(audio_base64=b64(speech_wav), **FAST))
    [entry] = cache_entries(s3, bucket)
    s3.client().put_object(Bucket=bucket, Key=entry, Body=b'{"key": "x", "output": {"transcription": "forged"}}')
    recomputed = run_job(worker, job(audio_base64=b64(speech_wav), **FAST))
    assert recomputed["cached"] is False and recomputed["transcription"] == first["transcription"]
    assert run_job(worker, job(audio_base64=b64(speech_wav), **FAST))["cached"] is True
    s3.client().delete_object(Bucket=bucket, Key=recomputed["files"][0]["key"])
    stale = run_job(worker, job(audio_base64=b64(speech_wav), **FAST))
    assert stale["cached"] is False


def test_identical_concurrent_jobs_compute_once(counting_worker, speech_wav: Path) -> None:
    """Two identical jobs held at once on one worker: one computes, the other gets its result (marked
    cached), each with its own request id; the GPU ran once."""
    worker = counting_worker()

    async def both() -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(worker.handle(job(audio_base64=b64(speech_wav), **FAST))
                                           for _ in range(2))))

    results = asyncio.run(both())
    assert sorted(r["cached"] for r in results) == [False, True]
    assert results[0]["transcription"] == results[1]["transcription"]
    assert results[0]["request_id"] != results[1]["request_id"]
    assert CountingGate.runs == 1


def test_the_setting_turns_it_off(counting_worker, s3: SeaweedS3, bucket: str, speech_wav: Path) -> None:
    """RESULT_CACHE=false: every job computes and nothing is written under cache/."""
    worker = counting_worker(RESULT_CACHE="false")
    for _ in range(2):
        assert run_job(worker, job(audio_base64=b64(speech_wav), **FAST))["cached"] is False
    assert cache_entries(s3, bucket) == []


def test_generation_is_cached_only_with_a_seed(counting_worker, tiny_sd: Path) -> None:
    """A seeded image request is answered from the cache the second time (same pixels: same files);
    without a seed every request computes (a new random seed each time)."""
    worker = counting_worker(IMAGE_MODEL=str(tiny_sd))
    seeded = {"task": "text2image", "prompt": "a red cube", "width": 64, "height": 64, "num_inference_steps": 2,
              "seed": 7}
    first = run_job(worker, job(**seeded))
    again = run_job(worker, job(**seeded))
    assert (first["cached"], again["cached"]) == (False, True), again
    assert again["files"][0]["key"] == first["files"][0]["key"]
    unseeded = {k: v for k, v in seeded.items() if k != "seed"}
    assert [run_job(worker, job(**unseeded))["cached"] for _ in range(2)] == [False, False]
