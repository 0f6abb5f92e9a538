"""The load client against the SDK's local HTTP API (`python -m handler --rp_serve_api`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.load import http_sender, outcome_of, run_load
from testkit.jobserver import LocalApi
from tests.conftest import CAPTURED_LOGS

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]


def test_outcomes_are_read_from_either_shape() -> None:
    """Codes come from the structured output when present, else from the error string's prefix."""
    assert outcome_of({"status": "COMPLETED", "output": {"text": "hi"}}) == ("success", False)
    assert outcome_of({"output": {"error_code": "GPU_OOM", "retryable": True}, "error": "GPU_OOM: x"}) == (
        "GPU_OOM", True)
    assert outcome_of({"status": "FAILED", "error": "INVALID_INPUT: audio: bad"}) == ("INVALID_INPUT", False)
    assert outcome_of({"status": "FAILED", "error": "TIMEOUT: no slot"}) == ("TIMEOUT", True)


def test_load_client_against_the_local_api(tmp_path: Path, model_dir: Path) -> None:
    """8 clients, 40 jobs on the local API: successes, final failures and retried OOMs are counted."""
    env = {"TASK_MODULES": "testkit.fixture_tasks", "MODEL_DIR": str(model_dir), "WHISPER_MODEL": "tiny.en"}
    api = LocalApi(tmp_path, **env)
    try:
        with api:
            jobs = [{"task": "fixture", "action": "sleep", "seconds": 0.02}] * 30
            jobs += [{"task": "fixture", "colour": 1}] * 5 + [{"task": "fixture", "action": "oom"}] * 5
            summary = run_load(http_sender(f"{api.url}/runsync"), jobs, clients=8, attempts=2, backoff_s=0.01)
    finally:
        CAPTURED_LOGS.write(api.log_path.read_text(errors="replace"))
    result = summary.as_dict()
    assert result["jobs"] == 40
    assert result["outcomes"] == {"success": 30, "INVALID_INPUT": 5, "GPU_OOM": 5}
    assert result["retries"] == 5  # each OOM retried once, INVALID_INPUT never
    assert result["p50_ms"] <= result["p95_ms"] <= result["p99_ms"]
    assert result["throughput_jobs_s"] > 0
    json.dumps(result)
