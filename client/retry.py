"""What a reply means (success, or an error code and whether to retry), and how long to wait.

Backoff is exponential with full jitter: before retry ``k`` (from 0) the client sleeps a
uniform random time in ``[0, min(cap, base * 2**k)]``, so clients that failed together do not
come back together, and the expected wait still doubles each time.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# Codes a client may retry (the worker's error table; tests/test_errors.py holds the two equal); used when
# only the error string arrives.
RETRYABLE = frozenset({"DOWNLOAD_FAILED", "TIMEOUT", "GPU_OOM", "UPLOAD_FAILED", "OVERLOADED", "CANCELLED",
                       "INTERNAL", "CUDA_FATAL"})
SUCCESS = "success"


def outcome_of(response: dict[str, Any]) -> tuple[str, bool]:
    """(code, retryable) of a /runsync or /status reply, or a job-done body.

    The structured output (``error_code``, ``retryable``) wins; else the code is the prefix of
    the ``error`` string; a status other than COMPLETED (TIMED_OUT, CANCELLED) is retryable.
    """
    output = response.get("output")
    if isinstance(output, dict) and "error_code" in output:
        return str(output["error_code"]), bool(output.get("retryable"))
    error = response.get("error")
    if error:
        code = str(error).split(":", 1)[0].strip()
        return code, code in RETRYABLE
    if response.get("status") not in (None, "COMPLETED"):
        return str(response["status"]), True
    return SUCCESS, False


def error_message(response: dict[str, Any]) -> str:
    """The human message of a failed reply ('' when there is none)."""
    output = response.get("output")
    if isinstance(output, dict) and output.get("error"):
        return str(output["error"])
    return str(response.get("error") or "")


@dataclass(frozen=True)
class Backoff:
    """How often and how long to retry."""

    # Ceiling of the first retry's delay; doubles with each retry.
    base_s: float = 1.0
    # Most any one delay can be.
    cap_s: float = 30.0
    # Tries in all, the first included.
    attempts: int = 5

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.base_s < 0 or self.cap_s < 0:
            raise ValueError(f"backoff needs attempts >= 1 and delays >= 0, not {self}")

    def ceiling(self, retry: int) -> float:
        """The longest delay before retry ``retry`` (0 for the first retry)."""
        return float(min(self.cap_s, self.base_s * 2**retry))

    def delay(self, retry: int, rng: random.Random) -> float:
        """Full jitter: uniform in [0, ceiling]."""
        return rng.uniform(0.0, self.ceiling(retry))


@dataclass(frozen=True)
class Outcome:
    """One attempt: its code, whether it may be retried, and what came back."""

    code: str
    retryable: bool
    message: str = ""
    reply: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return self.code == SUCCESS


@dataclass(frozen=True)
class Wait:
    """A retry's wait: the code that caused it, the delay slept, and its jitter ceiling."""

    code: str
    delay_s: float
    ceiling_s: float


@dataclass
class Retried:
    """The last outcome of a call retried, and the waits between its attempts."""

    outcome: Outcome
    attempts: int = 0
    waits: list[Wait] = field(default_factory=list)


OnRetry = Callable[[Wait], None]


def with_retries(call: Callable[[], Outcome], policy: Backoff, *, deadline: float, rng: random.Random,
                 on_retry: OnRetry | None = None, sleep: Callable[[float], None] = time.sleep) -> Retried:
    """Call until success, a final failure, ``policy.attempts`` tries, or ``deadline`` (monotonic).

    A retry whose wait would end past the deadline is not made: the last outcome stands.
    """
    retried = Retried(Outcome("NOT_TRIED", False))
    for retry in range(policy.attempts):
        retried.outcome = call()
        retried.attempts += 1
        if not retried.outcome.retryable or retry == policy.attempts - 1:
            break
        wait = Wait(retried.outcome.code, policy.delay(retry, rng), policy.ceiling(retry))
        if time.monotonic() + wait.delay_s >= deadline:
            break
        if on_retry is not None:
            on_retry(wait)
        retried.waits.append(wait)
        sleep(wait.delay_s)
    return retried
