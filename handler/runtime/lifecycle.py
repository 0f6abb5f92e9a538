"""The worker's one lifecycle state, with checked transitions (as cog's worker keeps its own).

::

    SERVING ──SIGTERM──> DRAINING          refuse new jobs (CANCELLED), let running ones finish
       │                    ^
       └─sticky CUDA error─> FATAL ─SIGTERM─┘
                             refuse GPU jobs (CUDA_FATAL), ask RunPod for a new worker

A state is never left for an earlier one: only a new process serves again.
"""

from __future__ import annotations

import enum
import threading

from handler.errors import Cancelled, CudaFatal, WorkerError
from handler.logs import get_logger

log = get_logger(__name__)


class State(enum.Enum):
    SERVING = "serving"
    DRAINING = "draining"
    FATAL = "fatal"


_NEXT: dict[State, frozenset[State]] = {
    State.SERVING: frozenset({State.DRAINING, State.FATAL}),
    State.FATAL: frozenset({State.DRAINING}),
    State.DRAINING: frozenset(),
}


class Lifecycle:
    """Where the worker is in its life; safe to read and change from any thread."""

    def __init__(self) -> None:
        # Guards _state and _fatal_message.
        self._state_lock = threading.Lock()
        self._state = State.SERVING
        self._fatal_message = ""

    @property
    def state(self) -> State:
        return self._state

    def _move(self, to: State) -> bool:
        """Go to ``to`` if the table allows it from here; False if the worker is already past it."""
        with self._state_lock:
            if to is self._state or to not in _NEXT[self._state]:
                return False
            log.info("worker.state", previous=self._state.value, state=to.value)
            self._state = to
            return True

    def drain(self) -> bool:
        """SIGTERM: stop taking jobs."""
        return self._move(State.DRAINING)

    def fail(self, error: CudaFatal) -> None:
        """A sticky CUDA error: this process must never take GPU work again."""
        if self._move(State.FATAL):
            self._fatal_message = error.message

    def admit(self) -> None:
        """Raise the error a new job gets in this state (nothing while serving)."""
        state = self._state
        if state is State.DRAINING:
            raise Cancelled("the worker is shutting down; send the job again")
        if state is State.FATAL:
            raise CudaFatal(self._fatal_message)

    def late_error(self, exc: BaseException) -> None:
        """An error from work whose job was already answered (cancelled): log it, and let a
        sticky CUDA error still mark the worker."""
        if isinstance(exc, CudaFatal):
            self.fail(exc)
        if isinstance(exc, WorkerError):
            log.warning("job.late_error", code=exc.code, error=exc.message)
        else:
            log.error("job.late_error", error=repr(exc), exc_info=exc)
