"""The GPU gate: at most N jobs run model code at once, each waiting a bounded time.

A job acquires a slot on the event loop (with ``GENERATION_ACQUIRE_TIMEOUT``), then its
blocking model code runs on one of the gate's own N threads, so GPU work never queues behind
downloads in the default thread pool. Around the work the CUDA cache is cleared, and a CUDA
out-of-memory error comes back as ``GPU_OOM`` after clearing.

The slot is given back when the work has really finished: if the waiting task is cancelled
while its thread still runs, the slot stays taken until the thread returns, so a cancelled
job can never overlap the next one on the GPU.

``run`` is ``acquire`` then ``Slot.run``; the batcher takes the two steps apart, holding a slot
before it decides what its batch holds, so it shares the slots with all other GPU work.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from handler.cancel import CancelToken
from handler.errors import GenerationTimeout
from handler.logs import get_logger
from handler.runtime.devices import clear_cuda_cache, cuda_errors
from handler.runtime.threads import LateErrorHook, compute_threads, in_thread, torch_threads

T = TypeVar("T")
log = get_logger(__name__)


def _log_late_error(exc: BaseException) -> None:
    log.error("gpu.late_error", error=repr(exc))


def _slot_threads(slots: int) -> ThreadPoolExecutor:
    """One thread per slot, each running torch on its share of the cores (handler.runtime.threads)."""
    return ThreadPoolExecutor(max_workers=slots, thread_name_prefix="gpu", initializer=torch_threads,
                              initargs=(compute_threads(slots),))


class Gate:
    """``slots`` concurrent generations, each admitted within ``acquire_timeout`` seconds."""

    def __init__(self, *, slots: int, acquire_timeout: float) -> None:
        if slots < 1:
            raise ValueError("a gate needs at least one slot")
        self.slots = slots
        self.acquire_timeout = acquire_timeout
        self._executor = _slot_threads(slots)
        # asyncio semaphores belong to one event loop; production has one, tests many.
        self._semaphores_lock = threading.Lock()
        self._semaphores: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, asyncio.Semaphore
        ] = weakref.WeakKeyDictionary()
        # Guards the two counters below.
        self._counts_lock = threading.Lock()
        self._busy = 0
        self._waiting = 0

    @property
    def busy(self) -> int:
        """Slots taken right now."""
        return self._busy

    @property
    def waiting(self) -> int:
        """Jobs waiting for a slot right now."""
        return self._waiting

    def resize(self, slots: int) -> None:
        """Change the slot count; only before the gate has been used."""
        with self._semaphores_lock:
            if self._semaphores or self._busy:
                raise RuntimeError("a gate in use cannot be resized")
            self._executor.shutdown(wait=False)
            self.slots = slots
            self._executor = _slot_threads(slots)

    def _semaphore(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        with self._semaphores_lock:
            semaphore = self._semaphores.get(loop)
            if semaphore is None:
                semaphore = self._semaphores[loop] = asyncio.Semaphore(self.slots)
            return semaphore

    async def acquire(self) -> tuple[Slot, float]:
        """Take a slot (waiting at most ``acquire_timeout``); returns it and the ms spent waiting.

        The slot is the caller's until it has run one piece of work, or until it is given
        back unused; the batcher takes one this way before it decides what its batch holds.
        """
        semaphore = self._semaphore()
        started = time.perf_counter()
        self._count(waiting=+1)
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
            # arrives as the acquire completes, and the job would run after RunPod stopped it.
            async with asyncio.timeout(self.acquire_timeout):
                await semaphore.acquire()
        except TimeoutError:
            raise GenerationTimeout(
                f"no GPU slot free within {self.acquire_timeout:g}s ({self.slots} slot(s) busy)"
            ) from None
        finally:
            self._count(waiting=-1)
        waited_ms = (time.perf_counter() - started) * 1000
        self._count(busy=+1)
        loop = asyncio.get_running_loop()
        return Slot(self, _ReleaseOnce(lambda: self._release(semaphore, loop))), waited_ms

    async def run(
        self, work: Callable[[], T], *, token: CancelToken | None = None, on_late_error: LateErrorHook = _log_late_error
    ) -> tuple[T, float]:
        """Run ``work`` in a slot; returns its result and the ms spent waiting for the slot.

        If the calling task is cancelled while ``work`` runs, ``token`` is cancelled so the
        work can stop at its next step; the slot is freed when it has, and what the work
        raises after that goes to ``on_late_error``.
        """
        slot, waited_ms = await self.acquire()
        return await slot.run(work, token=token, on_late_error=on_late_error), waited_ms

    def _release(self, semaphore: asyncio.Semaphore, loop: asyncio.AbstractEventLoop) -> None:
        self._count(busy=-1)
        if loop.is_closed():
            return
        # The loop may close between the check and the call.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(semaphore.release)

    def _count(self, *, busy: int = 0, waiting: int = 0) -> None:
        with self._counts_lock:
            self._busy += busy
            self._waiting += waiting

    @staticmethod
    def _guarded(work: Callable[[], T]) -> T:
        clear_cuda_cache()
        try:
            with cuda_errors():
                return work()
        finally:
            # After a sticky error every CUDA call fails; that must not hide the error.
            with contextlib.suppress(RuntimeError):
                clear_cuda_cache()

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class _ReleaseOnce:
    """Call a release function exactly once, whichever path gets there first."""

    def __init__(self, release: Callable[[], None]) -> None:
        self._lock = threading.Lock()
        self._release: Callable[[], None] | None = release

    def __call__(self) -> None:
        with self._lock:
            release, self._release = self._release, None
        if release is not None:
            release()


class Slot:
    """One slot taken from a gate: it runs one piece of work, or is given back unused."""

    def __init__(self, gate: Gate, release: _ReleaseOnce) -> None:
        self._gate = gate
        self._release = release
        self._used = False

    async def run(
        self, work: Callable[[], T], *, token: CancelToken | None = None, on_late_error: LateErrorHook = _log_late_error
    ) -> T:
        """Run ``work`` on the gate's threads (as :meth:`Gate.run` does); the slot is freed when
        the work has really finished."""
        if self._used:
            raise RuntimeError("a gate slot runs one piece of work")
        self._used = True
        release = self._release

        def guarded() -> T:
            try:
                return self._gate._guarded(work)
            finally:
                release()

        try:
            return await in_thread(guarded, on_late_error=on_late_error, executor=self._gate._executor)
        except asyncio.CancelledError:
            if token is not None:
                token.cancel()
            raise
        except RuntimeError:  # the executor refused the work (shut down): nothing will release the slot
            release()
            raise

    def release_unused(self) -> None:
        """Give the slot back if it never ran work (once it has, the work's end frees it)."""
        if not self._used:
            self._used = True
            self._release()
