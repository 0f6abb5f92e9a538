"""Cooperative cancellation of work running in a thread, and of the IO it waits on."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from handler.errors import Cancelled
from handler.logs import get_logger

log = get_logger(__name__)


class CancelToken:
    """Set when a job is cancelled; checked by its work between steps.

    A thread cannot be interrupted from outside, so model code calls :meth:`check` at step
    boundaries (a decoder step, a diffusion step) and stops there. Work that blocks on
    something else (a socket read, an ffmpeg child) registers a callback with
    :meth:`on_cancel` that unblocks it: close the socket, kill the child.
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        # Guards _callbacks; never held while a callback runs.
        self._callbacks_lock = threading.Lock()
        self._callbacks: list[Callable[[], None]] = []

    def cancel(self) -> None:
        with self._callbacks_lock:
            self._event.set()
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            _call_quietly(callback)

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self._event.is_set():
            raise Cancelled("the job was cancelled")

    @contextmanager
    def on_cancel(self, callback: Callable[[], None]) -> Iterator[None]:
        """Call ``callback`` if the job is cancelled while the block runs (at once if it already is)."""
        with self._callbacks_lock:
            registered = not self._event.is_set()
            if registered:
                self._callbacks.append(callback)
        if not registered:
            _call_quietly(callback)
        try:
            yield
        finally:
            with self._callbacks_lock:
                if callback in self._callbacks:
                    self._callbacks.remove(callback)


def _call_quietly(callback: Callable[[], None]) -> None:
    # An abort that fails (the socket already closed, the child already gone) changes nothing.
    try:
        callback()
    except Exception as exc:
        log.debug("cancel.callback_failed", error=repr(exc))
