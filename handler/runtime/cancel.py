"""Cooperative cancellation of work running in a thread."""

from __future__ import annotations

import threading

from handler.errors import Cancelled


class CancelToken:
    """Set by the job's task when it is cancelled; checked by the pipeline between steps.

    A thread cannot be interrupted from outside, so long-running model code calls
    :meth:`check` at step boundaries (a decoder step, a diffusion step) and stops there.
    """

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self._event.is_set():
            raise Cancelled("the job was cancelled")
