"""Shared GPU batches: work items of several jobs, joined by a compatibility key, run in one slot.

A job calls :meth:`Batcher.submit` with all its items (say, the audio chunks of one file) and
gets its results back in its own order. Items wait in a queue per key; a key's batch is ready
when it would be full or ``window_s`` has passed since its oldest item arrived. The dispatcher
then takes a slot through the gate, like any other GPU work, and only once it holds one does it
take the batch from the queue, so under load items gather while the GPU is busy (whoever holds
it: another batcher, another model, another task) instead of queueing at the gate in small batches.

A job may cap how many of its own items one batch holds (``limit``, say its ``batch_size``); a
batch holds at most the largest limit among the jobs waiting under its key (and ``max_batch``).
Jobs with different limits therefore share batches, and none gets more of its items decoded
together than it asked for.

Each job keeps its own outcome:

* a batch's error fails the jobs whose items were in that batch, and no other;
* a CUDA out-of-memory error (``GpuOutOfMemory`` from the gate) on a batch of several items is
  retried in halves, recursively; only an item that fails alone fails its job with ``GPU_OOM``;
* a job whose task is cancelled, or whose token is, leaves the queue: its items not yet running
  never reach ``run_batch``, and results of its items already running are dropped;
* an error no job is left to receive (all of the batch's jobs were cancelled while it ran) goes to
  ``on_late_error``, as the gate's late errors do: a sticky CUDA error still marks the worker.

A batcher outlives the jobs it serves (one per model, for the life of the worker), so it keeps
nothing of a job once the job's ``submit`` has returned.

The queues and the dispatcher task belong to one event loop (production has one, tests many),
and are touched only on that loop's thread.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
import weakref
from collections import Counter, deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from handler.cancel import CancelToken
from handler.errors import Cancelled, GenerationTimeout, GpuOutOfMemory, WorkerError
from handler.logs import get_logger
from handler.runtime.gate import Gate, Slot
from handler.runtime.threads import LateErrorHook

ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")
log = get_logger(__name__)

# The longest the dispatcher sleeps without a reason to wake: it also notices cancelled tokens.
_DISPATCH_POLL_S = 0.5


def _log_late_error(exc: BaseException) -> None:
    log.error("batch.late_error", error=repr(exc))


@dataclass(frozen=True)
class BatchStats:
    """What a batcher has run: batches (calls of ``run_batch``) and how many had each size."""

    batches: int
    items: int
    sizes: dict[int, int]


class _Request(Generic[ItemT, ResultT]):
    """One job's call of ``submit``: its items, their results so far, and its future."""

    def __init__(
        self, items: list[ItemT], cancel: CancelToken, loop: asyncio.AbstractEventLoop, *, limit: int
    ) -> None:
        self.items = items
        self.cancel = cancel
        # The most of its items one batch may hold.
        self.limit = limit
        self.future: asyncio.Future[list[ResultT]] = loop.create_future()
        self._results: dict[int, ResultT] = {}
        # Set (on the loop's thread) once the request needs nothing more; read from the GPU thread.
        self._finished = threading.Event()

    @property
    def active(self) -> bool:
        """Whether its items should still run; safe to ask from any thread."""
        return not self._finished.is_set() and not self.cancel.cancelled

    def finish(self) -> None:
        self._finished.set()

    def put(self, index: int, result: ResultT) -> None:
        if self.future.done():
            return  # cancelled or failed while its item ran: the result is dropped
        self._results[index] = result
        if len(self._results) == len(self.items):
            self.finish()
            self.future.set_result([self._results[i] for i in range(len(self.items))])

    def fail(self, error: BaseException) -> bool:
        """Answer the job with ``error``; False if it was already answered (or cancelled)."""
        self.finish()
        if self.future.done():
            return False
        self.future.set_exception(error)
        return True


@dataclass(eq=False)
class _Entry(Generic[ItemT, ResultT]):
    """One item of one request, waiting in its key's queue or running in a batch."""

    request: _Request[ItemT, ResultT]
    index: int
    queued_at: float = field(default_factory=time.monotonic)

    @property
    def item(self) -> ItemT:
        return self.request.items[self.index]


class Batcher(Generic[ItemT, ResultT]):
    """Run ``run_batch`` on batches of items joined across jobs by a compatibility key.

    ``run_batch`` is blocking and runs in one slot of ``gate``; it gets a list of items and
    returns one result per item, in the same order. A batch holds at most ``max_batch`` items
    (fewer when the limits of the jobs waiting are lower) and is started when it is full, or
    ``window_s`` after its oldest item arrived. What a batch raises that no job receives goes
    to ``on_late_error``. ``run_batch`` lives as long as the batcher: it must hold no job's state.
    """

    def __init__(
        self,
        run_batch: Callable[[list[ItemT]], list[ResultT]],
        *,
        gate: Gate,
        max_batch: int,
        window_s: float,
        on_late_error: LateErrorHook = _log_late_error,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if window_s < 0:
            raise ValueError(f"window_s must not be negative, got {window_s}")
        self._run_batch = run_batch
        self._on_late_error = on_late_error
        self.gate = gate
        self.max_batch = max_batch
        self.window_s = window_s
        # Queues live on one event loop; production has one, tests many.
        self._dispatchers_lock = threading.Lock()
        self._dispatchers: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, _Dispatcher[ItemT, ResultT]
        ] = weakref.WeakKeyDictionary()
        # Guards the counters below (batches start on the GPU threads).
        self._stats_lock = threading.Lock()
        self._batch_sizes: Counter[int] = Counter()

    async def submit(
        self, key: Hashable, items: list[ItemT], *, cancel: CancelToken, limit: int | None = None
    ) -> list[ResultT]:
        """Run ``items`` in batches shared with other jobs of the same ``key``; their results, in order.

        At most ``limit`` (default ``max_batch``) of them go into one batch. Raises what failed
        one of the job's batches (``GpuOutOfMemory`` only for an item that ran out of memory
        alone, ``GenerationTimeout`` when no slot came free in time), ``Cancelled`` when
        ``cancel`` is set before its items ran, and ``CancelledError`` when the calling task is
        cancelled.
        """
        cancel.check()
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        if not items:
            return []
        dispatcher = self._dispatcher()
        request: _Request[ItemT, ResultT] = _Request(
            items, cancel, asyncio.get_running_loop(), limit=min(limit or self.max_batch, self.max_batch)
        )
        dispatcher.enqueue(key, request)
        try:
            return await request.future
        finally:
            request.finish()
            dispatcher.withdraw(key, request)

    def stats(self) -> BatchStats:
        """Batches run so far (all loops), with how many had each size."""
        with self._stats_lock:
            sizes = dict(self._batch_sizes)
        return BatchStats(
            batches=sum(sizes.values()), items=sum(n * count for n, count in sizes.items()), sizes=sizes
        )

    def _dispatcher(self) -> _Dispatcher[ItemT, ResultT]:
        loop = asyncio.get_running_loop()
        with self._dispatchers_lock:
            dispatcher = self._dispatchers.get(loop)
            if dispatcher is None:
                dispatcher = self._dispatchers[loop] = _Dispatcher(self)
            return dispatcher

    async def _execute(self, entries: list[_Entry[ItemT, ResultT]], slot: Slot | None = None) -> None:
        """Run one batch in ``slot`` (else in one taken now) and hand each item's result or error
        to its request."""
        try:
            await self._run_in_slot([entry for entry in entries if entry.request.active], slot)
        finally:
            if slot is not None:
                slot.release_unused()
            # Items of a job whose token was cancelled were left out; the job is answered here.
            for entry in entries:
                if entry.request.cancel.cancelled:
                    entry.request.fail(Cancelled("the job was cancelled"))

    async def _run_in_slot(self, live: list[_Entry[ItemT, ResultT]], slot: Slot | None) -> None:
        if not live:
            return
        try:
            if slot is None:
                slot, _waited_ms = await self.gate.acquire()
            ran, results = await slot.run(self._work(live), on_late_error=self._on_late_error)
        except GpuOutOfMemory as exc:
            await self._split(live, exc)
        except asyncio.CancelledError:
            for entry in live:
                entry.request.future.cancel()
            raise
        except Exception as exc:
            self._fail(live, exc)
        else:
            self._deliver(ran, results)

    def _fail(self, entries: list[_Entry[ItemT, ResultT]], error: BaseException) -> None:
        """Fail the entries' jobs; an error none of them is left to receive is a late error."""
        delivered = [entry.request.fail(error) for entry in entries]
        if not any(delivered) and not isinstance(error, Cancelled):
            self._on_late_error(error)

    async def _split(self, entries: list[_Entry[ItemT, ResultT]], error: GpuOutOfMemory) -> None:
        """After an OOM, run the two halves one after the other; an item alone fails its job."""
        if len(entries) == 1:
            entries[0].request.fail(error)
            return
        half = len(entries) // 2
        log.info("batch.split", size=len(entries))
        await self._execute(entries[:half])
        await self._execute(entries[half:])

    def _work(
        self, entries: list[_Entry[ItemT, ResultT]]
    ) -> Callable[[], tuple[list[_Entry[ItemT, ResultT]], list[ResultT]]]:
        def work() -> tuple[list[_Entry[ItemT, ResultT]], list[ResultT]]:
            # Jobs cancelled while the batch waited for its slot are left out at the last moment.
            live = [entry for entry in entries if entry.request.active]
            if not live:
                return live, []
            with self._stats_lock:
                self._batch_sizes[len(live)] += 1
            return live, self._run_batch([entry.item for entry in live])

        return work

    def _deliver(self, entries: list[_Entry[ItemT, ResultT]], results: list[ResultT]) -> None:
        if len(results) != len(entries):
            self._fail(entries, WorkerError(f"a batch of {len(entries)} items returned {len(results)} results"))
            return
        for entry, result in zip(entries, results, strict=True):
            entry.request.put(entry.index, result)


class _Dispatcher(Generic[ItemT, ResultT]):
    """The queues of one event loop, and the task that turns them into batches."""

    def __init__(self, batcher: Batcher[ItemT, ResultT]) -> None:
        self._batcher = batcher
        self._queues: dict[Hashable, deque[_Entry[ItemT, ResultT]]] = {}
        self._in_flight: set[asyncio.Task[None]] = set()
        # Set when items arrive or a batch ends: the dispatcher looks again.
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def enqueue(self, key: Hashable, request: _Request[ItemT, ResultT]) -> None:
        queue = self._queues.setdefault(key, deque())
        queue.extend(_Entry(request, index) for index in range(len(request.items)))
        self._changed.set()
        if self._task is None or self._task.done():
            # A context of its own: batches serve many jobs, so none of their request ids belongs here.
            self._task = asyncio.get_running_loop().create_task(self._dispatch(), context=contextvars.Context())

    def withdraw(self, key: Hashable, request: _Request[ItemT, ResultT]) -> None:
        """Take a request's items that are still waiting out of the queue."""
        queue = self._queues.get(key)
        if queue is None:
            return
        kept = deque(entry for entry in queue if entry.request is not request)
        if kept:
            self._queues[key] = kept
        else:
            del self._queues[key]

    async def _dispatch(self) -> None:
        try:
            while True:
                self._changed.clear()
                self._sweep()
                if not self._queues:
                    return
                if self._ready_key() is not None:
                    await self._start_next()
                    continue
                try:
                    async with asyncio.timeout(self._next_look()):
                        await self._changed.wait()
                except TimeoutError:
                    pass
        except BaseException as exc:
            self._abandon(exc)
            raise

    def _abandon(self, error: BaseException) -> None:
        """The dispatcher is stopping early (its loop is closing): no waiting job is left hanging."""
        for queue in self._queues.values():
            for entry in queue:
                if isinstance(error, asyncio.CancelledError):
                    entry.request.future.cancel()
                else:
                    entry.request.fail(error)
        self._queues.clear()

    def _sweep(self) -> None:
        """Drop entries of requests that ended; answer those whose token was cancelled."""
        for key, queue in list(self._queues.items()):
            for entry in queue:
                if entry.request.cancel.cancelled and not entry.request.future.done():
                    entry.request.fail(Cancelled("the job was cancelled"))
            kept = deque(entry for entry in queue if entry.request.active)
            if kept:
                self._queues[key] = kept
            else:
                del self._queues[key]

    async def _start_next(self) -> None:
        """Take a slot through the gate, then start the batch that is ready by then (it may have
        grown while the slot was busy). Without a slot in time, that batch's jobs get TIMEOUT."""
        try:
            slot, _waited_ms = await self._batcher.gate.acquire()
        except GenerationTimeout as exc:
            key = self._ready_key()
            if key is not None:
                self._batcher._fail(self._take(key), exc)
            return
        self._sweep()
        key = self._ready_key()
        if key is None:  # its jobs left while the slot was busy
            slot.release_unused()
            return
        self._start(self._take(key), slot)

    def _ready_key(self) -> Hashable | None:
        """The key whose oldest item has waited longest, among those with a batch ready."""
        now = time.monotonic()
        ready = [
            (queue[0].queued_at, key)
            for key, queue in self._queues.items()
            if now - queue[0].queued_at >= self._batcher.window_s or self._is_full(queue)
        ]
        return min(ready, key=lambda pair: pair[0])[1] if ready else None

    def _capacity(self, queue: deque[_Entry[ItemT, ResultT]]) -> int:
        """A batch holds at most the largest limit among the jobs waiting in ``queue``."""
        return max(entry.request.limit for entry in queue)

    def _is_full(self, queue: deque[_Entry[ItemT, ResultT]]) -> bool:
        return len(self._batch_of(queue)) >= self._capacity(queue)

    def _batch_of(self, queue: deque[_Entry[ItemT, ResultT]]) -> list[_Entry[ItemT, ResultT]]:
        """The next batch of ``queue``: oldest first, at most each job's limit of its items."""
        capacity = self._capacity(queue)
        taken: Counter[_Request[ItemT, ResultT]] = Counter()
        batch = []
        for entry in queue:
            if taken[entry.request] < entry.request.limit:
                taken[entry.request] += 1
                batch.append(entry)
                if len(batch) == capacity:
                    break
        return batch

    def _take(self, key: Hashable) -> list[_Entry[ItemT, ResultT]]:
        queue = self._queues[key]
        batch = self._batch_of(queue)
        chosen = set(batch)
        kept = deque(entry for entry in queue if entry not in chosen)
        if kept:
            self._queues[key] = kept
        else:
            del self._queues[key]
        return batch

    def _start(self, batch: list[_Entry[ItemT, ResultT]], slot: Slot) -> None:
        task = asyncio.get_running_loop().create_task(self._batcher._execute(batch, slot))
        self._in_flight.add(task)
        task.add_done_callback(lambda _task: slot.release_unused())  # cancelled before it began
        task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        self._changed.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("batch.crashed", error=repr(task.exception()))

    def _next_look(self) -> float:
        """Seconds until a waiting batch's window closes, at most the poll."""
        if not self._queues:
            return _DISPATCH_POLL_S
        oldest = min(queue[0].queued_at for queue in self._queues.values())
        return max(0.0, min(_DISPATCH_POLL_S, oldest + self._batcher.window_s - time.monotonic()))


class Batchers:
    """One batcher per key (a model), made on first use and then shared for the worker's life."""

    def __init__(self) -> None:
        # Guards _made; a batcher is cheap to make, so it is made under the lock.
        self._made_lock = threading.Lock()
        self._made: dict[Hashable, Batcher[Any, Any]] = {}

    def get(self, key: Hashable, make: Callable[[], Batcher[ItemT, ResultT]]) -> Batcher[ItemT, ResultT]:
        with self._made_lock:
            found = self._made.get(key)
            if found is None:
                found = self._made[key] = make()
            return found

    def all(self) -> list[tuple[Hashable, Batcher[Any, Any]]]:
        """Every batcher made so far, with its key (for metrics)."""
        with self._made_lock:
            return list(self._made.items())
