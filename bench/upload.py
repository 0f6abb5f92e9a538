"""256 MB upload through the storage module vs raw boto3 upload_file to the same server (goal >= 0.95)."""

from __future__ import annotations

import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import boto3
from botocore.config import Config

from bench.common import Comparison, bench_settings
from handler.io.storage import S3Storage
from testkit.servers import SeaweedS3

SIZE = 256 * 1024 * 1024


def measure(runs: int = 4) -> list[Comparison]:
    work = Path(tempfile.mkdtemp(prefix="bench-s3-"))
    server = SeaweedS3(work / "weed", access_key="AKBENCH" + uuid.uuid4().hex[:8].upper(),
                       secret_key="bench-" + uuid.uuid4().hex)
    server.start()
    try:
        bucket = server.create_bucket("bench")
        payload = work / "payload.bin"
        with payload.open("wb") as out:
            for _ in range(SIZE // (16 * 1024 * 1024)):
                out.write(os.urandom(16 * 1024 * 1024))
        env = {"BUCKET_ENDPOINT_URL": server.endpoint, "BUCKET_ACCESS_KEY_ID": server.access_key,
               "BUCKET_SECRET_ACCESS_KEY": server.secret_key, "BUCKET_NAME": bucket}
        storage = S3Storage(bench_settings(None, **env).bucket, bench_settings(None, **env))  # type: ignore[arg-type]
        raw = boto3.session.Session().client(
            "s3", endpoint_url=server.endpoint, aws_access_key_id=server.access_key,
            aws_secret_access_key=server.secret_key, region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}),
        )
        ours_times: list[float] = []
        raw_times: list[float] = []

        def upload_ours(i: int) -> None:
            started = time.perf_counter()
            storage.save(payload, name="payload.bin", content_type="application/octet-stream", request_id=f"r{i}")
            ours_times.append(time.perf_counter() - started)

        def upload_raw(i: int) -> None:
            started = time.perf_counter()
            raw.upload_file(str(payload), bucket, f"raw/{i}.bin")
            raw_times.append(time.perf_counter() - started)

        for i in range(runs):  # alternate which goes first
            for upload in (upload_ours, upload_raw) if i % 2 == 0 else (upload_raw, upload_ours):
                upload(i)
        ours, baseline = statistics.median(ours_times), statistics.median(raw_times)
        mb_s = SIZE / 1e6 / ours
        return [Comparison("256 MB upload vs raw boto3 upload_file (SeaweedFS, loopback)", ours, baseline,
                           "baseline/ours >= 0.95", f"{mb_s:.0f} MB/s ours; {runs} interleaved runs; "
                           "raw client uses botocore's default checksums")]
    finally:
        server.stop()
