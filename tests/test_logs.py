"""Logs: every line of a job carries its request id, and secrets never reach a line."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from handler.app import Worker
from handler.logs import configure_logging, get_logger, redact_sdk_logs, register_secret
from handler.runtime.registry import Registry
from testkit.fixture_tasks import TABLE
from tests.conftest import CAPTURED_LOGS, remember_secret

ROOT = Path(__file__).resolve().parents[1]
PRESIGNED = (
    "http://127.0.0.1:8333/b/outputs/x.srt?X-Amz-Algorithm=AWS4-HMAC-SHA256"
    "&X-Amz-Credential=AKIDLEAK123%2F20261122%2Fus-east-1%2Fs3%2Faws4_request"
    "&X-Amz-Signature=deadbeefcafe0123456789"
)


@pytest.fixture
def json_logs() -> Iterator[io.StringIO]:
    """Route logs as JSON into a buffer for one test, then back into the suite's capture."""
    buffer = io.StringIO()
    configure_logging(level="DEBUG", json=True, stream=buffer)
    try:
        yield buffer
    finally:
        CAPTURED_LOGS.write(buffer.getvalue())
        configure_logging(level="DEBUG", stream=CAPTURED_LOGS)


def lines(buffer: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in buffer.getvalue().splitlines() if line.strip()]


def test_every_line_of_a_job_has_its_request_id(make_settings, json_logs: io.StringIO) -> None:
    """Two concurrent jobs: each line carries the right request_id and job_id, none is mixed up."""
    worker = Worker(make_settings(), tasks=TABLE, registry=Registry())

    async def scenario() -> list[dict]:
        jobs = [worker.handle({"id": f"job-{i}", "input": {"task": "fixture", "action": "sleep", "seconds": 0.1}})
                for i in range(2)]
        return await asyncio.gather(*jobs)

    results = asyncio.run(scenario())
    events = [e for e in lines(json_logs) if e.get("logger", "").startswith("handler")]
    assert {e["event"] for e in events} >= {"job.start", "job.done", "pipeline.load.start"}
    by_job = {r["request_id"]: [e for e in events if e.get("request_id") == r["request_id"]] for r in results}
    assert all(len(found) >= 2 for found in by_job.values())
    assert all("request_id" in e and "job_id" in e for e in events)
    for request_id, found in by_job.items():
        assert len({e["job_id"] for e in found}) == 1, f"{request_id} logged under two job ids"


def test_secrets_are_redacted(json_logs: io.StringIO) -> None:
    """Secret-named fields, presigned query strings, auth headers and registered values are scrubbed."""
    register_secret("registered-secret-value")
    log = get_logger("handler.test")
    log.info("upload", url=PRESIGNED, aws_secret_access_key="plainsecret1",
             headers={"Authorization": "AWS4-HMAC-SHA256 Credential=AKIDLEAK123/x"})
    log.info("note", detail="the key is registered-secret-value, keep it")
    logging.getLogger("thirdparty").warning("fetching %s", PRESIGNED)
    try:
        raise RuntimeError("failed with registered-secret-value")
    except RuntimeError:
        log.exception("crash")
    text = json_logs.getvalue()
    for secret in ("deadbeefcafe0123456789", "AKIDLEAK123", "plainsecret1", "registered-secret-value"):
        assert secret not in text
    assert "[REDACTED]" in text
    assert "127.0.0.1:8333/b/outputs/x.srt" in text  # the useful part stays


def test_sdk_log_lines_are_redacted(capsys: pytest.CaptureFixture[str]) -> None:
    """The RunPod SDK's own logger (it prints whole results) goes through the same redaction."""
    from runpod.serverless.modules.rp_logger import RunPodLogger

    redact_sdk_logs()
    RunPodLogger().info(f"Job result: {{'url': '{PRESIGNED}'}}")
    printed = capsys.readouterr().out
    assert "Job result" in printed
    assert "deadbeefcafe0123456789" not in printed


def test_console_format_is_readable(json_logs: io.StringIO) -> None:
    """Locally the lines are console text with key=value fields, not JSON."""
    buffer = io.StringIO()
    configure_logging(level="INFO", json=False, stream=buffer)
    get_logger("handler.test").info("upload.done", key="outputs/a.srt", bytes=12)
    line = buffer.getvalue()
    assert "upload.done" in line and "key=outputs/a.srt" in line and "bytes=12" in line
    assert not line.lstrip().startswith("{")


def test_sdk_debug_output_in_local_mode_has_no_secret_and_no_forged_line(tmp_path: Path) -> None:
    """`python -m handler --test_input` with RUNPOD_LOG_LEVEL=DEBUG: the SDK prints the raw job before
    the worker has seen its s3Config, yet the secret never appears (secret-named keys are redacted in
    any printed dict); an unknown key carrying a newline and ANSI escapes is echoed escaped, so it
    cannot forge a log line."""
    secret = remember_secret("sdk-debug-" + uuid.uuid4().hex)
    payload = {
        "input": {"audio": "https://example.com/a.mp3", "x\nFORGED | ERROR | fake line\x1b[31m": 1},
        "s3Config": {"accessId": "AKDEBUG12345", "accessSecret": secret, "bucketName": "bucket",
                     "endpointUrl": "https://s3.example.com"},
    }
    env = {**os.environ, "RUNPOD_LOG_LEVEL": "DEBUG", "WORK_DIR": str(tmp_path), "DEVICE": "cpu",
           "ALLOW_MODEL_DOWNLOAD": "false"}
    done = subprocess.run([sys.executable, "-m", "handler", "--test_input", json.dumps(payload)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    output = done.stdout + done.stderr
    CAPTURED_LOGS.write(output)
    assert "Retrieved local job" in output  # the SDK did print the raw job
    assert "unknown field" in output
    assert secret not in output
    assert "\x1b" not in output
    assert not [line for line in output.splitlines() if line.startswith("FORGED")]


def test_a_job_of_the_queue_worker_logs_each_line_once(tmp_path: Path) -> None:
    """`python -m handler` (the SDK's local mode: the queue path) answering one job prints each of the
    worker's lines once. The SDK calls logging.basicConfig when imported, which used to leave a second
    handler on the root logger beside the worker's: every line came out twice."""
    env = {**os.environ, "WORK_DIR": str(tmp_path), "DEVICE": "cpu", "ALLOW_MODEL_DOWNLOAD": "false",
           "TASK_MODULES": "testkit.fixture_tasks", "LOG_FORMAT": "json"}
    done = subprocess.run([sys.executable, "-m", "handler", "--test_input", json.dumps({"input": {"task": "fixture"}})],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    output = done.stdout + done.stderr
    CAPTURED_LOGS.write(output)
    assert done.returncode == 0, output[-3000:]
    mentions = [line for line in output.splitlines() if "job.done" in line]
    assert len(mentions) == 1, mentions
    assert json.loads(mentions[0])["task"] == "fixture"
