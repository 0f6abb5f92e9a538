"""Load client: N concurrent clients send a mix of jobs, retrying retryable failures with backoff.

  python -m bench.load --target api --url http://127.0.0.1:8000 --clients 8 --jobs 200
  python -m bench.load --target runpod --clients 16 --jobs 500 --mix mix.json
      (RUNPOD_ENDPOINT_ID and RUNPOD_API_KEY from the environment)

Targets: the SDK's local API (``python -m handler --rp_serve_api``), a real RunPod endpoint's
``/runsync``, or (from Python) a local job server driving the real worker loop. The summary
gives throughput, latency percentiles and outcomes by error code.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Codes a client may retry (the contract's table); used when only the error string arrives.
RETRYABLE = frozenset({"DOWNLOAD_FAILED", "TIMEOUT", "GPU_OOM", "UPLOAD_FAILED", "OVERLOADED", "CANCELLED",
                       "INTERNAL", "CUDA_FATAL"})
RUNPOD_API = "https://api.runpod.ai/v2"

Send = Callable[[dict[str, Any]], dict[str, Any]]


def outcome_of(response: dict[str, Any]) -> tuple[str, bool]:
    """(code, retryable) of a /runsync-style response or a job-done body."""
    output = response.get("output")
    if isinstance(output, dict) and "error_code" in output:
        return output["error_code"], bool(output.get("retryable"))
    error = response.get("error")
    if error:
        code = str(error).split(":", 1)[0].strip()
        return code, code in RETRYABLE
    if response.get("status") not in (None, "COMPLETED"):
        return str(response["status"]), True
    return "success", False


def http_sender(url: str, *, headers: dict[str, str] | None = None, timeout: float = 600) -> Send:
    """POST ``{"input": ...}`` to a /runsync URL."""

    def send(job_input: dict[str, Any]) -> dict[str, Any]:
        request = urllib.request.Request(  # noqa: S310 (the URL is the operator's target)
            url, data=json.dumps({"input": job_input}).encode(), method="POST",
            headers={"Content-Type": "application/json", **(headers or {})},
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            result: dict[str, Any] = json.loads(response.read())
            return result

    return send


@dataclass
class Summary:
    """What a load run measured."""

    wall_s: float = 0.0
    latencies_s: list[float] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)
    retries: int = 0

    def as_dict(self) -> dict[str, Any]:
        lat = sorted(self.latencies_s)

        def pct(p: float) -> float | None:
            return round(lat[min(len(lat) - 1, int(p * len(lat)))] * 1000, 1) if lat else None

        return {
            "jobs": len(lat), "wall_s": round(self.wall_s, 2),
            "throughput_jobs_s": round(len(lat) / self.wall_s, 2) if self.wall_s else None,
            "p50_ms": pct(0.50), "p95_ms": pct(0.95), "p99_ms": pct(0.99),
            "mean_ms": round(statistics.fmean(lat) * 1000, 1) if lat else None,
            "outcomes": dict(self.outcomes), "retries": self.retries,
        }


def run_load(send: Send, jobs: list[dict[str, Any]], *, clients: int, attempts: int = 4,
             backoff_s: float = 0.5) -> Summary:
    """Send every job once (plus retries for retryable failures), ``clients`` at a time."""
    summary = Summary()
    summary_lock = threading.Lock()

    def one(job_input: dict[str, Any]) -> None:
        started = time.perf_counter()
        code, retries = "NO_ANSWER", 0
        for attempt in range(attempts):
            try:
                code, retryable = outcome_of(send(job_input))
            except OSError as exc:
                code, retryable = f"CLIENT:{type(exc).__name__}", True
            if not retryable or attempt == attempts - 1:
                break
            retries += 1
            time.sleep(backoff_s * 2**attempt * random.uniform(0.5, 1.5))
        with summary_lock:
            summary.latencies_s.append(time.perf_counter() - started)
            summary.outcomes[code] += 1
            summary.retries += retries

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        list(pool.map(one, jobs))
    summary.wall_s = time.perf_counter() - started
    return summary


def _mix(path: str | None, count: int) -> list[dict[str, Any]]:
    """``count`` job inputs drawn round-robin from a JSON list (default: a `system` snapshot)."""
    inputs: list[dict[str, Any]] = json.loads(Path(path).read_text()) if path else [{"task": "system"}]
    return [inputs[i % len(inputs)] for i in range(count)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", choices=("api", "runpod"), default="api")
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="base URL of the local API")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--mix", help="JSON file: a list of job inputs, used round-robin")
    parser.add_argument("--attempts", type=int, default=4)
    args = parser.parse_args(argv)
    if args.target == "api":
        send = http_sender(args.url.rstrip("/") + "/runsync")
    else:
        endpoint, key = os.environ["RUNPOD_ENDPOINT_ID"], os.environ["RUNPOD_API_KEY"]
        send = http_sender(f"{RUNPOD_API}/{endpoint}/runsync", headers={"Authorization": f"Bearer {key}"})
    summary = run_load(send, _mix(args.mix, args.jobs), clients=args.clients, attempts=args.attempts)
    print(json.dumps(summary.as_dict(), indent=2))


if __name__ == "__main__":
    main()
