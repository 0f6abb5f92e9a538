"""Blocking work in a thread, awaited by a job that may be cancelled.

The job's context (its request id in every log line) goes with the work. If the job is
cancelled while the work runs, the work is left to stop at its next check of the job's
cancel token, and whatever it raises after that is still reported, never lost.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import TypeVar

from handler.errors import Cancelled

T = TypeVar("T")
LateErrorHook = Callable[[BaseException], None]

# Blocking calls one job may have running at once: a job overlaps at most a few (a download
# beside a decode, an upload's own transfer threads aside).
_JOB_THREADS = 4


def job_threads() -> ThreadPoolExecutor:
    """Threads for one job's downloads, decoding and uploads, never GPU work (the gate has its
    own). A pool per job, so that no job, however slow what it waits on, can hold threads
    another job needs; shut down when the job ends (a thread still blocked then ends with its
    call, which has a deadline)."""
    return ThreadPoolExecutor(max_workers=_JOB_THREADS, thread_name_prefix="job")


async def in_thread(
    work: Callable[[], T], *, on_late_error: LateErrorHook, executor: Executor
) -> T:
    """Run ``work`` on ``executor`` (a job's threads, or the gate's) and return its result."""
    context = contextvars.copy_context()
    future = executor.submit(context.run, work)
    try:
        return await asyncio.wrap_future(future)
    except asyncio.CancelledError:
        # Reported in the job's context, so the log line still carries its request id.
        future.add_done_callback(lambda done: _report_late(done, lambda exc: context.run(on_late_error, exc)))
        raise


def _report_late(future: Future[T], on_late_error: LateErrorHook) -> None:
    if future.cancelled():
        return
    exc = future.exception()
    if exc is not None and not isinstance(exc, Cancelled):
        on_late_error(exc)
