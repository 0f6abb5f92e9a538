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
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from client.api import RUNPOD_API, ApiError, Endpoint, request_json
from client.retry import RETRYABLE, Backoff, Outcome, outcome_of, with_retries

__all__ = ["RETRYABLE", "Summary", "http_sender", "outcome_of", "run_load"]

Send = Callable[[dict[str, Any]], dict[str, Any]]


def http_sender(url: str, *, headers: dict[str, str] | None = None, timeout: float = 600) -> Send:
    """POST ``{"input": ...}`` to a /runsync URL (the client's HTTP edge; its errors are ``ApiError``)."""

    def send(job_input: dict[str, Any]) -> dict[str, Any]:
        return request_json(url, body={"input": job_input}, headers=headers, timeout=timeout, what="runsync")

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


def _attempt(send: Send, job_input: dict[str, Any]) -> Outcome:
    try:
        return Outcome(*outcome_of(send(job_input)))
    except ApiError as exc:
        return Outcome(f"CLIENT:{exc.code}", exc.retryable)
    except OSError as exc:  # a sender other than http_sender (a JobServer's) may raise these
        return Outcome(f"CLIENT:{type(exc).__name__}", True)


def run_load(send: Send, jobs: list[dict[str, Any]], *, clients: int, attempts: int = 4,
             backoff_s: float = 0.5, deadline_s: float = 3600.0) -> Summary:
    """Send every job once (plus retries for retryable failures), ``clients`` at a time.

    Retries follow the client's policy: exponential backoff with full jitter, at most
    ``attempts`` tries and ``deadline_s`` seconds per job.
    """
    summary = Summary()
    summary_lock = threading.Lock()
    policy = Backoff(base_s=backoff_s, attempts=attempts)
    rng = random.Random()

    def one(job_input: dict[str, Any]) -> None:
        started = time.perf_counter()
        retried = with_retries(lambda: _attempt(send, job_input), policy,
                               deadline=time.monotonic() + deadline_s, rng=rng)
        with summary_lock:
            summary.latencies_s.append(time.perf_counter() - started)
            summary.outcomes[retried.outcome.code] += 1
            summary.retries += len(retried.waits)

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
        endpoint = Endpoint.local(args.url)
    else:
        endpoint = Endpoint.runpod(os.environ["RUNPOD_ENDPOINT_ID"], os.environ["RUNPOD_API_KEY"], api_base=RUNPOD_API)
    send = http_sender(endpoint.url("runsync"), headers=dict(endpoint.headers))
    summary = run_load(send, _mix(args.mix, args.jobs), clients=args.clients, attempts=args.attempts)
    print(json.dumps(summary.as_dict(), indent=2))


if __name__ == "__main__":
    main()
