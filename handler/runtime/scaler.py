"""The SDK's job loop, waking when a job ends or arrives instead of on its timers, and losing no job.

runpod-python's ``JobScaler`` polls: its fetch loop sleeps a second whenever the worker holds
as many jobs as it may, and its run loop looks at the queue every 0.1 s. With one job held
(the default) every job therefore paid up to a second of idle time before the next was even
asked for. :class:`PromptJobScaler` keeps the SDK's loops, protocol and shutdown, and only
replaces those two waits with events, each still bounded by the SDK's own interval:

* ``set_scale`` (called by the SDK's ``get_jobs`` before each fetch) returns once there is
  room for a job, woken by the end of a job, so ``get_jobs`` fetches at once instead of sleeping;
* ``run_jobs`` starts a fetched job as soon as it is queued.

It also closes two holes in the SDK's loop, both around what a job-take hands out:

* A job-take still open when the worker is told to stop may yet hand out a job. The SDK's run
  loop has ended by then, so that job was taken and never answered. Here ``run_jobs`` runs
  until ``get_jobs`` has returned, so such a job is handled (the worker, draining, answers it
  ``CANCELLED``); the open take is given the shutdown grace period, then abandoned, so the
  process still exits in time. No take starts once stopping.
* An entry of a batch that is not a job with a string ``id`` crashed the run loop, and with
  it the process; on the single job-take, the SDK's ``get_job`` raised on a job without an
  ``input`` after reading it, so that job was taken and never answered. Here the job-take
  (:func:`take_jobs`, the SDK's protocol but handing back the body as parsed) and
  :func:`usable_jobs` serve both: an entry that is not a job with a string ``id`` is logged
  and skipped; a job with an id but a missing or garbled ``input`` goes to the handler, which
  answers it ``INVALID_INPUT``.

SDK internals relied on (check them on an SDK upgrade): ``JobScaler.get_jobs`` calls
``set_scale`` first, sleeps only when ``current_concurrency - current_occupancy() <= 0``,
calls ``jobs_fetcher(session, jobs_needed)``, queues every job that call returns even when
the worker was stopped meanwhile, and returns once ``is_alive()`` is false; ``handle_job``,
``kill_worker``, ``is_alive``, ``jobs_queue``, ``jobs_tasks``, ``jobs_fetcher`` (set in
``__init__``, to ``rp_job.get_job`` unless a local test names its own) and
``current_concurrency``; ``rp_job.get_job``'s protocol, which :func:`take_jobs` repeats:
``session.get(rp_job._job_get_url(wanted))`` on the SDK's session (it carries the headers),
204 and 400 meaning no job, 429 raised as ``runpod.http_client.TooManyRequests`` (``get_jobs``
backs off on it), any other error status raised, and a body read only when it is JSON and not
empty; and ``runpod.serverless.worker.run_worker`` building its scaler as
``rp_scale.JobScaler(config)`` at call time (see :func:`prompt_job_loop`), with the ``config``
given to ``runpod.serverless.start``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import aiohttp
from runpod.http_client import TooManyRequests
from runpod.serverless.modules import rp_job, rp_scale

from handler.errors import printable
from handler.logs import get_logger

log = get_logger(__name__)

# The SDK's own intervals: how long the fetch loop slept when full, and the run loop's poll.
# They remain as the bounds of each wait, so liveness and concurrency are re-read as often.
_ROOM_WAIT_S = 1.0
_RUN_POLL_S = 0.1
# How long a job-take open at shutdown may still hand out a job, unless the config names the
# worker's grace period (``shutdown_grace_s``); the worker's own default.
_LATE_TAKE_S = 10.0


class PromptJobScaler(rp_scale.JobScaler):  # type: ignore[misc]  # the SDK has no type hints
    """``JobScaler`` whose fetch and run loops wake on job ends and arrivals, losing no job."""

    # The SDK's: how get_jobs takes jobs, ``(session, wanted) -> jobs or None``.
    jobs_fetcher: Callable[[Any, int], Awaitable[Any]]

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        # Set when a job ends or the worker is told to stop: the fetch loop looks for room.
        self._job_ended = asyncio.Event()
        # Set once the worker is told to stop: an open job-take's time starts running out.
        self._stopping = asyncio.Event()
        # True while get_jobs runs: it may still queue a job, so run_jobs must not end yet.
        self._taking = False
        self._late_take_s = float(config.get("shutdown_grace_s", _LATE_TAKE_S))
        # The job-take (or a local test's); get_jobs calls it through _take_jobs.
        self._fetch_jobs = take_jobs if self.jobs_fetcher is rp_job.get_job else self.jobs_fetcher
        self.jobs_fetcher = self._take_jobs

    async def get_jobs(self, session: Any) -> None:
        """The SDK's fetch loop, marked as running so run_jobs handles all it queues."""
        self._taking = True
        try:
            await super().get_jobs(session)
        finally:
            self._taking = False

    async def _take_jobs(self, session: Any, wanted: int) -> list[dict[str, Any]] | None:
        """One job-take: none once stopping, an open one bounded by the grace, garbage dropped."""
        if not self.is_alive():
            return None
        fetch = asyncio.ensure_future(self._fetch_jobs(session, wanted))
        try:
            return usable_jobs(await self._until_taken_or_late(fetch))
        finally:
            fetch.cancel()

    async def _until_taken_or_late(self, fetch: asyncio.Future[Any]) -> Any:
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({fetch, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
        if not fetch.done():
            # Told to stop while the take is open: it may still hand out a job, which is answered.
            done, _pending = await asyncio.wait({fetch}, timeout=self._late_take_s)
            if not done:
                log.warning("scaler.take_abandoned", waited_s=self._late_take_s)
                return None
        return fetch.result()

    async def set_scale(self) -> None:
        """The SDK's scaling step, then wait until a job may be fetched or the worker stops."""
        while True:
            self._job_ended.clear()
            await super().set_scale()
            if not self.is_alive() or self.current_occupancy() < self.current_concurrency:
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_ROOM_WAIT_S):
                    await self._job_ended.wait()

    async def handle_job(self, session: Any, job: dict[str, Any]) -> None:
        try:
            await super().handle_job(session, job)
        finally:
            self._job_ended.set()

    def kill_worker(self) -> None:
        super().kill_worker()
        self._stopping.set()
        self._job_ended.set()

    async def run_jobs(self, session: Any) -> None:
        """Start each queued job at once; when stopping, start what the last take brings, then drain."""
        tasks: set[asyncio.Task[None]] = set()
        while self.is_alive() or self._taking or not self.jobs_queue.empty():
            while len(tasks) < self.current_concurrency and not self.jobs_queue.empty():
                self._start(session, tasks, self.jobs_queue.get_nowait())
            await self._until_job_ends_or_arrives(session, tasks)
        await self._drain(tasks)

    def _start(self, session: Any, tasks: set[asyncio.Task[None]], job: dict[str, Any]) -> None:
        task = asyncio.create_task(self.handle_job(session, job))
        tasks.add(task)
        self.jobs_tasks[job["id"]] = task

    async def _until_job_ends_or_arrives(self, session: Any, tasks: set[asyncio.Task[None]]) -> None:
        waits: set[asyncio.Future[Any]] = set(tasks)
        arrival: asyncio.Task[dict[str, Any]] | None = None
        if len(tasks) < self.current_concurrency:
            arrival = asyncio.create_task(self.jobs_queue.get())
            waits.add(arrival)
        try:
            done, _pending = await asyncio.wait(waits, timeout=_RUN_POLL_S, return_when=asyncio.FIRST_COMPLETED)
            for ended in tasks & done:
                tasks.discard(ended)
                if not ended.cancelled() and ended.exception() is not None:
                    log.error("scaler.job_failed", error=repr(ended.exception()))
        finally:
            # A job taken off the queue is always started; a get still waiting leaves it there.
            if arrival is not None and not arrival.done():
                arrival.cancel()
            elif arrival is not None and not arrival.cancelled():
                self._start(session, tasks, arrival.result())

    @staticmethod
    async def _drain(tasks: set[asyncio.Task[None]]) -> None:
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for result in results:
            if isinstance(result, Exception):
                log.error("scaler.drain_failed", error=repr(result))


async def take_jobs(session: Any, wanted: int) -> Any:
    """One job-take by the SDK's protocol: the body as parsed (a job, a list of them, or
    whatever came), or None when there is none.

    The SDK's ``get_job`` raises on a job without an ``input`` after reading it, losing the id
    that the answer needs; this hands every body on to :func:`usable_jobs` instead.
    """
    async with session.get(rp_job._job_get_url(wanted)) as response:
        if response.status in (204, 400):  # 400: expected when FlashBoot is enabled
            return None
        if response.status == 429:
            raise TooManyRequests(response.request_info, response.history, status=response.status,
                                  message=response.reason)
        response.raise_for_status()
        if response.content_type != "application/json" or response.content_length == 0:
            return None
        try:
            return await response.json()
        except (aiohttp.ContentTypeError, ValueError) as exc:
            log.error("scaler.take_unreadable", error=type(exc).__name__)
            return None


def usable_jobs(taken: Any) -> list[dict[str, Any]] | None:
    """The entries of a job-take that can be answered: dicts with a non-empty string ``id``.

    ``taken`` is one job (the single take), a list of them (the batch take), or None. The
    others are logged (by kind and field names only: their values may hold secrets) and
    skipped; with no id there is nowhere to send an answer.
    """
    if taken is None:
        return None
    entries = taken if isinstance(taken, list) else [taken]
    usable = []
    for entry in entries:
        if isinstance(entry, dict) and isinstance(entry.get("id"), str) and entry["id"]:
            usable.append(entry)
        else:
            fields = sorted(printable(str(key)) for key in entry) if isinstance(entry, dict) else None
            log.error("scaler.job_unusable", kind=type(entry).__name__, fields=fields)
    return usable


@contextlib.contextmanager
def prompt_job_loop() -> Iterator[None]:
    """Make ``runpod.serverless.start`` run :class:`PromptJobScaler` for the duration.

    ``run_worker`` looks ``rp_scale.JobScaler`` up when it starts, so swapping the name keeps
    everything else ``start`` does (arguments, local test and API modes, fitness checks,
    heartbeat) exactly the SDK's.
    """
    original = rp_scale.JobScaler
    rp_scale.JobScaler = PromptJobScaler
    try:
        yield
    finally:
        rp_scale.JobScaler = original
