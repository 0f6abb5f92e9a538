"""Progress reports to RunPod (`progress_update`), at most about once a second."""

from __future__ import annotations

import threading
import time
from typing import Any

from handler.logs import get_logger

log = get_logger(__name__)


class Progress:
    """Throttled progress messages for one job; silent outside the production job loop."""

    def __init__(self, job: dict[str, Any], *, enabled: bool, min_interval_s: float = 1.0) -> None:
        self._job = job
        self._min_interval_s = min_interval_s
        self._last = -float("inf")
        # Guards _last: model callbacks may come from any thread.
        self._last_lock = threading.Lock()
        # Local test mode has no job-done URL to post to (Settings.post_progress is off).
        self._enabled = enabled and "id" in job

    def report(self, message: str, *, force: bool = False) -> bool:
        """Send ``message`` unless one went out less than the interval ago; True if sent."""
        now = time.monotonic()
        with self._last_lock:
            if not force and now - self._last < self._min_interval_s:
                return False
            self._last = now
        log.debug("job.progress", message=message)
        if self._enabled:
            from runpod.serverless import progress_update

            progress_update(self._job, message)
        return True
