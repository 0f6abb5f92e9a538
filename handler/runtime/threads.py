"""Blocking work in a thread, awaited by a job that may be cancelled; which threads compute.

The job's context (its request id in every log line) goes with the work. If the job is
cancelled while the work runs, the work is left to stop at its next check of the job's
cancel token, and whatever it raises after that is still reported, never lost.

Torch's CPU threads: only the gate's threads (:func:`compute_threads` each) run torch on more
than one thread; the main thread, job threads and VAD run it on one. Torch's thread count is a
setting of the calling thread (OpenMP's ``nthreads``; ``torch.set_num_threads`` also sets where
threads that have not run torch yet start). Every thread that has run torch on ``n`` threads keeps
``n - 1`` OpenMP threads for its life, and libgomp lets its idle threads spin between parallel
regions only while the process holds no more of them than cores; past that, each of torch's small
operations wakes its team through the kernel. With the main thread's team beside the gate's,
tiny.en's decoder loop ran markedly slower on 2 cores, and ``whisper.transcribe`` beside it as
much (bench/RESULTS.md, fourth run).
"""

from __future__ import annotations

import asyncio
import contextvars
import os
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from contextlib import contextmanager
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
    return ThreadPoolExecutor(max_workers=_JOB_THREADS, thread_name_prefix="job", initializer=torch_threads,
                              initargs=(1,))


def cores() -> int:
    """The CPUs this process may use: what libgomp counts its threads against."""
    return len(os.sched_getaffinity(0))


def compute_threads(slots: int) -> int:
    """Torch threads of each of the gate's ``slots`` threads: the cores shared out, at least one."""
    return max(1, cores() // slots)


def torch_threads(count: int) -> None:
    """Run torch on ``count`` threads in the calling thread."""
    import torch  # here: the gate and job threads of workers that never compute need not load it

    torch.set_num_threads(count)


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """The calling thread runs torch on one thread inside the block, and as before after it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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
