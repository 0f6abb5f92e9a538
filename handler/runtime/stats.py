"""What the worker has done since it started: outcomes and time percentiles, for `system`."""

from __future__ import annotations

import statistics
import threading
import time
from collections import Counter, deque
from typing import Any

# Percentiles cover the most recent jobs; older ones fall off so memory stays flat.
_WINDOW = 10_000


def _percentiles(values: deque[float]) -> dict[str, float | None]:
    if len(values) < 2:
        only = values[0] if values else None
        return {"p50": only, "p95": only}
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50": round(cuts[49], 2), "p95": round(cuts[94], 2)}


class WorkerStats:
    """Counters and recent timings, safe to update from any thread."""

    def __init__(self) -> None:
        self.started_at = time.time()
        self._started = time.monotonic()
        # Guards every field below.
        self._lock = threading.Lock()
        self._outcomes: Counter[str] = Counter()
        self._queue_ms: deque[float] = deque(maxlen=_WINDOW)
        self._run_ms: deque[float] = deque(maxlen=_WINDOW)
        self.jobs = 0

    def record(self, result: dict[str, Any]) -> int:
        """Count one finished job; returns how many jobs the worker has finished."""
        timings = result.get("timings", {})
        with self._lock:
            self.jobs += 1
            self._outcomes[result.get("error_code", "success")] += 1
            if "queued_ms" in timings:
                self._queue_ms.append(timings["queued_ms"])
            if "run_ms" in timings:
                self._run_ms.append(timings["run_ms"])
            return self.jobs

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "uptime_s": round(time.monotonic() - self._started, 1),
                "jobs": self.jobs,
                "outcomes": dict(self._outcomes),
                "queue_ms": _percentiles(self._queue_ms),
                "run_ms": _percentiles(self._run_ms),
            }
