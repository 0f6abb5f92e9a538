"""A job run to its end through ``/run`` and ``/status``, and retried while it fails retryably."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from client.api import ApiError, Endpoint, OnStatus, Polling, run_job
from client.retry import Backoff, OnRetry, Outcome, Retried, error_message, outcome_of, with_retries


def outcome(reply: dict[str, Any]) -> Outcome:
    """The outcome of a final /status reply; a completed job must carry an output dict."""
    code, retryable = outcome_of(reply)
    if code == "success" and not isinstance(reply.get("output"), dict):
        return Outcome("NO_OUTPUT", False, "the job completed without an output (RunPod drops results over ~20 MB)")
    return Outcome(code, retryable, error_message(reply), reply)


def attempt(endpoint: Endpoint, job_input: dict[str, Any], *, deadline: float, polling: Polling | None = None,
            on_status: OnStatus | None = None) -> Outcome:
    """One try of a job: its outcome, an HTTP failure included."""
    try:
        reply = run_job(endpoint, job_input, deadline=deadline, polling=polling or Polling(), on_status=on_status)
    except ApiError as exc:
        return Outcome(exc.code, exc.retryable, str(exc))
    return outcome(reply)


def run_with_retries(endpoint: Endpoint, make_input: Callable[[], dict[str, Any]], policy: Backoff, *,
                     deadline: float, rng: random.Random, on_retry: OnRetry | None = None) -> Retried:
    """Run the job ``make_input`` builds (anew for each try) until it succeeds or fails for good."""
    return with_retries(lambda: attempt(endpoint, make_input(), deadline=deadline), policy, deadline=deadline,
                        rng=rng, on_retry=on_retry)
