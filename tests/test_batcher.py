"""The batcher: items of several jobs share batches, yet each job gets its own results or error.

Every test runs the real Gate (threads, slots, CUDA error mapping); the batches are counted by
the fixture ``run_batch`` functions, which record what they received.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import pytest
import torch

from handler.app import Worker
from handler.cancel import CancelToken
from handler.errors import Cancelled, GenerationTimeout, GpuOutOfMemory
from handler.runtime.batcher import Batcher
from handler.runtime.gate import Gate
from handler.runtime.registry import PipelineKey, Registry
from testkit.fixture_tasks import TABLE

Item = tuple[str, int]  # (job, index)
T = TypeVar("T")


class Recorder:
    """A ``run_batch`` that records each batch it gets and answers ``job/index`` per item."""

    def __init__(self, *, seconds: float = 0.0, fails: Callable[[list[Item]], BaseException | None] = lambda _b: None):
        self.seconds = seconds
        self.fails = fails
        self.batches: list[list[Item]] = []
        self.started: list[float] = []
        self._batches_lock = threading.Lock()

    def __call__(self, items: list[Item]) -> list[str]:
        with self._batches_lock:
            self.batches.append(list(items))
            self.started.append(time.monotonic())
        time.sleep(self.seconds)
        error = self.fails(items)
        if error is not None:
            raise error
        return [f"{job}/{index}" for job, index in items]

    def items_of(self, job: str) -> list[Item]:
        return [item for batch in self.batches for item in batch if item[0] == job]


class Held:
    """A ``run_batch`` that holds the batches ``holds`` picks until :meth:`release`, then answers
    through ``answer``; ``running`` is set once a held batch has started."""

    def __init__(self, answer: Callable[[list[Item]], list[str]],
                 holds: Callable[[list[Item]], bool] = lambda _batch: True) -> None:
        self.answer = answer
        self.holds = holds
        self.running = threading.Event()
        self._released = threading.Event()

    def __call__(self, batch: list[Item]) -> list[str]:
        if self.holds(batch):
            self.running.set()
            assert self._released.wait(10)
        return self.answer(batch)

    def release(self) -> None:
        self._released.set()


@pytest.fixture
def gate() -> Iterator[Gate]:
    gate = Gate(slots=1, acquire_timeout=10)
    yield gate
    gate.shutdown()


def within(seconds: float, coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on a new event loop, failing the test if it takes longer than ``seconds``."""

    async def bounded() -> T:
        async with asyncio.timeout(seconds):
            return await coro

    return asyncio.run(bounded())


def items(job: str, count: int) -> list[Item]:
    return [(job, i) for i in range(count)]


def expected(job: str, count: int) -> list[str]:
    return [f"{job}/{i}" for i in range(count)]


def oom() -> torch.cuda.OutOfMemoryError:
    return torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_concurrent_jobs_get_their_own_results_in_order(gate: Gate) -> None:
    """8 concurrent jobs with distinct items each get exactly their own results, in order, with no
    item lost or run twice, while the batches the fixture saw mixed items of several jobs."""
    run = Recorder(seconds=0.01)
    batcher: Batcher[Item, str] = Batcher(run, gate=gate, max_batch=8, window_s=0.05)
    counts = {f"job{j}": 3 + j for j in range(8)}

    async def scenario() -> list[list[str]]:
        return await asyncio.gather(
            *(batcher.submit("k", items(job, n), cancel=CancelToken()) for job, n in counts.items())
        )

    results = within(10, scenario())
    assert results == [expected(job, n) for job, n in counts.items()]
    seen = sorted(item for batch in run.batches for item in batch)
    assert seen == sorted(item for job, n in counts.items() for item in items(job, n))
    assert any(len({job for job, _ in batch}) > 1 for batch in run.batches)
    assert batcher.stats().batches == len(run.batches)


def test_different_keys_never_share_a_batch(gate: Gate) -> None:
    """Jobs under two keys, submitted together: every batch holds items of one key only."""
    run = Recorder()
    batcher: Batcher[Item, str] = Batcher(run, gate=gate, max_batch=16, window_s=0.05)
    key_of = {f"job{j}": "en" if j % 2 else "fr" for j in range(6)}

    async def scenario() -> list[list[str]]:
        return await asyncio.gather(
            *(batcher.submit(key, items(job, 3), cancel=CancelToken()) for job, key in key_of.items())
        )

    assert within(10, scenario()) == [expected(job, 3) for job in key_of]
    assert all(len({key_of[job] for job, _ in batch}) == 1 for batch in run.batches)
    assert any(len({job for job, _ in batch}) > 1 for batch in run.batches)  # keys did batch


def test_max_batch_is_respected(gate: Gate) -> None:
    """30 items from 5 jobs with max_batch 4: no batch is larger than 4, and full batches happen."""
    run = Recorder(seconds=0.01)
    batcher: Batcher[Item, str] = Batcher(run, gate=gate, max_batch=4, window_s=0.05)

    async def scenario() -> list[list[str]]:
        return await asyncio.gather(*(batcher.submit("k", items(f"j{j}", 6), cancel=CancelToken()) for j in range(5)))

    assert within(10, scenario()) == [expected(f"j{j}", 6) for j in range(5)]
    assert max(len(batch) for batch in run.batches) == 4


def test_a_lone_job_runs_when_the_window_closes(gate: Gate) -> None:
    """A lone job of 3 items (max_batch 8, window 0.3 s) runs as one batch about 0.3 s after it was
    submitted: not before the window closes, and not much later."""
    run = Recorder()
    batcher: Batcher[Item, str] = Batcher(run, gate=gate, max_batch=8, window_s=0.3)

    async def scenario() -> float:
        submitted = time.monotonic()
        assert await batcher.submit("k", items("solo", 3), cancel=CancelToken()) == expected("solo", 3)
        return submitted

    submitted = within(10, scenario())
    assert run.batches == [items("solo", 3)]
    assert 0.29 <= run.started[0] - submitted < 0.45


def test_a_full_batch_does_not_wait_for_the_window(gate: Gate) -> None:
    """max_batch items waiting start at once, even with a long window."""
    run = Recorder()
    batcher: Batcher[Item, str] = Batcher(run, gate=gate, max_batch=4, window_s=5.0)

    async def scenario() -> float:
        started = time.monotonic()
        assert await batcher.submit("k", items("full", 4), cancel=CancelToken()) == expected("full", 4)
        return time.monotonic() - started

    assert within(10, scenario()) < 0.5


def test_cancelled_job_leaves_the_queue(gate: Gate) -> None:
    """While a batch runs, a job still queued is cancelled: it gets CancelledError, none of its items
    reach run_batch, and the jobs before and after it complete with their own results."""
    run = Recorder()
    held = Held(run, holds=lambda batch: batch[0][0] == "first")
    batcher: Batcher[Item, str] = Batcher(held, gate=gate, max_batch=2, window_s=0.0)

    async def scenario() -> tuple[list[str], BaseException | list[str], list[str]]:
        first = asyncio.create_task(batcher.submit("k", items("first", 2), cancel=CancelToken()))
        assert await asyncio.to_thread(held.running.wait, 10)
        doomed = asyncio.create_task(batcher.submit("k", items("doomed", 4), cancel=CancelToken()))
        after = asyncio.create_task(batcher.submit("k", items("after", 3), cancel=CancelToken()))
        await asyncio.sleep(0.05)
        doomed.cancel()
        await asyncio.sleep(0.05)
        held.release()
        outcome = (await asyncio.gather(doomed, return_exceptions=True))[0]
        return await first, outcome, await after

    first, doomed, after = within(10, scenario())
    assert isinstance(doomed, asyncio.CancelledError)
    assert first == expected("first", 2) and after == expected("after", 3)
    assert run.items_of("doomed") == []


def test_cancelled_job_in_a_running_batch_drops_its_results(gate: Gate) -> None:
    """A job cancelled while its items run in a batch shared with another job: the batch finishes,
    the other job gets its results, the cancelled one gets CancelledError, and nothing runs twice."""
    run = Recorder()
    held = Held(run)
    batcher: Batcher[Item, str] = Batcher(held, gate=gate, max_batch=8, window_s=0.1)

    async def scenario() -> tuple[list[str], BaseException | list[str]]:
        kept = asyncio.create_task(batcher.submit("k", items("kept", 2), cancel=CancelToken()))
        dropped = asyncio.create_task(batcher.submit("k", items("dropped", 2), cancel=CancelToken()))
        assert await asyncio.to_thread(held.running.wait, 10)
        dropped.cancel()
        await asyncio.sleep(0.05)
        held.release()
        outcome = (await asyncio.gather(dropped, return_exceptions=True))[0]
        return await kept, outcome

    kept, dropped = within(10, scenario())
    assert kept == expected("kept", 2)
    assert isinstance(dropped, asyncio.CancelledError)
    assert run.batches == [items("kept", 2) + items("dropped", 2)]


def test_cancelled_token_answers_cancelled(gate: Gate) -> None:
    """A job whose token is cancelled while its items wait gets Cancelled (CANCELLED), its items
    never run, and the job running at the time completes."""
    run = Recorder()
    held = Held(run)
    batcher: Batcher[Item, str] = Batcher(held, gate=gate, max_batch=2, window_s=0.0)
    token = CancelToken()

    async def scenario() -> tuple[list[str], BaseException | list[str]]:
        first = asyncio.create_task(batcher.submit("k", items("first", 2), cancel=CancelToken()))
        assert await asyncio.to_thread(held.running.wait, 10)
        waiting = asyncio.create_task(batcher.submit("k", items("waiting", 2), cancel=token))
        await asyncio.sleep(0.05)
        token.cancel()
        held.release()
        outcome = (await asyncio.gather(waiting, return_exceptions=True))[0]
        return await first, outcome

    first, waiting = within(10, scenario())
    assert first == expected("first", 2)
    assert isinstance(waiting, Cancelled) and waiting.code == "CANCELLED"
    assert run.items_of("waiting") == []


def test_job_cancelled_while_its_batch_waits_for_a_slot_never_runs(gate: Gate) -> None:
    """A batch is formed while the only slot is held by other work; one of its two jobs has its
    token cancelled before the slot frees: that job gets Cancelled and its items never reach
    run_batch, and the other job's items run and are answered."""
    run = Recorder()
    batcher: Batcher[Item, str] = Batcher(run, gate=gate, max_batch=8, window_s=0.0)
    token = CancelToken()

    async def scenario() -> tuple[BaseException | list[str], list[str]]:
        holder = asyncio.create_task(gate.run(lambda: time.sleep(0.5)))
        await asyncio.sleep(0.05)
        both = asyncio.gather(
            batcher.submit("k", items("cancelled", 2), cancel=token),
            batcher.submit("k", items("kept", 2), cancel=CancelToken()),
            return_exceptions=True,
        )
        await asyncio.sleep(0.1)
        assert gate.waiting == 1  # one batch, both jobs in it, waiting for the slot
        token.cancel()
        cancelled, kept = await both
        await holder
        assert not isinstance(kept, BaseException)
        return cancelled, kept

    cancelled, kept = within(10, scenario())
    assert isinstance(cancelled, Cancelled)
    assert kept == expected("kept", 2)
    assert run.batches == [items("kept", 2)]


def test_oom_batches_are_retried_in_halves(gate: Gate) -> None:
    """The fixture raises torch's CUDA OOM for any batch over 1 item (the real gate maps it to
    GpuOutOfMemory): the batch of 8 is retried as 4, 2, then 1, and every job still succeeds."""
    run = Recorder(fails=lambda batch: oom() if len(batch) > 1 else None)
    batcher: Batcher[Item, str] = Batcher(run, gate=gate, max_batch=8, window_s=0.1)

    async def scenario() -> list[list[str]]:
        return await asyncio.gather(*(batcher.submit("k", items(f"j{j}", 2), cancel=CancelToken()) for j in range(4)))

    assert within(10, scenario()) == [expected(f"j{j}", 2) for j in range(4)]
    assert [len(batch) for batch in run.batches][:4] == [8, 4, 2, 1]
    assert sorted(len(batch) for batch in run.batches) == [1] * 8 + [2] * 4 + [4] * 2 + [8]


def test_oom_of_one_item_fails_only_its_job(gate: Gate) -> None:
    """The fixture runs out of memory on one item (whatever its batch): only that item's job gets
    GpuOutOfMemory, the three others succeed, and a next submit on the same batcher works."""
    poison = ("bad", 1)
    run = Recorder(fails=lambda batch: oom() if poison in batch else None)
    batcher: Batcher[Item, str] = Batcher(run, gate=gate, max_batch=8, window_s=0.1)
    jobs = ["good0", "bad", "good1", "good2"]

    async def scenario() -> tuple[list[BaseException | list[str]], list[str]]:
        outcomes = await asyncio.gather(
            *(batcher.submit("k", items(job, 2), cancel=CancelToken()) for job in jobs), return_exceptions=True
        )
        return outcomes, await batcher.submit("k", items("next", 3), cancel=CancelToken())

    outcomes, following = within(10, scenario())
    assert isinstance(outcomes[1], GpuOutOfMemory) and outcomes[1].code == "GPU_OOM"
    assert [outcomes[i] for i in (0, 2, 3)] == [expected(jobs[i], 2) for i in (0, 2, 3)]
    assert following == expected("next", 3)
    assert [poison] in run.batches  # it was tried alone before its job failed
    assert gate.busy == 0


def test_other_errors_fail_only_the_jobs_in_that_batch(gate: Gate) -> None:
    """A batch whose run raises fails the jobs in it with that error, without a retry; a job in
    another batch succeeds."""
    run = Recorder(fails=lambda batch: ValueError("broken input") if ("broken", 0) in batch else None)
    batcher: Batcher[Item, str] = Batcher(run, gate=gate, max_batch=2, window_s=0.05)

    async def scenario() -> list[BaseException | list[str]]:
        return await asyncio.gather(
            batcher.submit("k", items("broken", 2), cancel=CancelToken()),
            batcher.submit("k", items("fine", 2), cancel=CancelToken()),
            return_exceptions=True,
        )

    broken, fine = within(10, scenario())
    assert isinstance(broken, ValueError)
    assert fine == expected("fine", 2)
    assert run.items_of("broken") == items("broken", 2)  # one batch, not retried item by item


def test_no_slot_in_time_is_a_timeout(gate: Gate) -> None:
    """With the gate's only slot held past its acquire timeout, the batch's job gets TIMEOUT from
    the gate and its items never run."""
    gate.acquire_timeout = 0.3
    run = Recorder()
    batcher: Batcher[Item, str] = Batcher(run, gate=gate, max_batch=4, window_s=0.0)

    async def scenario() -> BaseException | list[str]:
        holder = asyncio.create_task(gate.run(lambda: time.sleep(1.0)))
        await asyncio.sleep(0.05)
        outcome = (await asyncio.gather(batcher.submit("k", items("late", 2), cancel=CancelToken()),
                                        return_exceptions=True))[0]
        await holder
        return outcome

    outcome = within(10, scenario())
    assert isinstance(outcome, GenerationTimeout) and outcome.code == "TIMEOUT"
    assert run.batches == []


def test_one_batcher_serves_several_event_loops(gate: Gate) -> None:
    """The same batcher used from two asyncio.run calls in turn works in both (queues per loop)."""
    run = Recorder()
    batcher: Batcher[Item, str] = Batcher(run, gate=gate, max_batch=4, window_s=0.01)
    for loop_no in range(2):
        job = f"loop{loop_no}"
        assert within(10, batcher.submit("k", items(job, 3), cancel=CancelToken())) == expected(job, 3)


def test_bad_settings_are_refused(gate: Gate) -> None:
    """A batch size under 1 or a negative window is refused at construction, a limit under 1 at
    submit, each naming the value."""
    with pytest.raises(ValueError, match="max_batch must be at least 1, got 0"):
        Batcher(Recorder(), gate=gate, max_batch=0, window_s=0.1)
    with pytest.raises(ValueError, match="window_s must not be negative"):
        Batcher(Recorder(), gate=gate, max_batch=1, window_s=-1)
    batcher: Batcher[Item, str] = Batcher(Recorder(), gate=gate, max_batch=4, window_s=0.0)
    with pytest.raises(ValueError, match="limit must be at least 1, got 0"):
        within(10, batcher.submit("k", items("j", 1), cancel=CancelToken(), limit=0))


def test_jobs_with_different_limits_share_batches(gate: Gate) -> None:
    """Three jobs with limits 2, 4 and 8 share batches: the first holds the largest limit (8) of
    items, oldest first, with no job over its own limit; no later batch breaks either bound."""
    run = Recorder()
    batcher: Batcher[Item, str] = Batcher(run, gate=gate, max_batch=64, window_s=0.05)
    limits = {"a": 2, "b": 4, "c": 8}

    async def scenario() -> list[list[str]]:
        return await asyncio.gather(
            *(batcher.submit("k", items(job, 6), cancel=CancelToken(), limit=n) for job, n in limits.items())
        )

    assert within(10, scenario()) == [expected(job, 6) for job in limits]
    assert run.batches[0] == items("a", 2) + items("b", 4) + items("c", 2)
    for batch in run.batches:
        per_job = Counter(job for job, _ in batch)
        assert all(count <= limits[job] for job, count in per_job.items()), batch
        assert len(batch) <= max(limits[job] for job in per_job), batch


def test_a_batch_gathers_while_another_batcher_holds_the_slot(gate: Gate) -> None:
    """Dispatchers take slots through the gate: while a batch of another batcher (another model)
    holds the only slot, two jobs that arrive one after the other wait in the queue, and run
    together once the slot is free, instead of one small batch each queueing at the gate."""
    held = Held(lambda batch: [f"{job}/{index}" for job, index in batch])
    other: Batcher[Item, str] = Batcher(held, gate=gate, max_batch=8, window_s=0.0)
    run = Recorder()
    batcher: Batcher[Item, str] = Batcher(run, gate=gate, max_batch=8, window_s=0.0)

    async def scenario() -> tuple[list[str], list[str], list[str]]:
        holder = asyncio.create_task(other.submit("k", items("other", 1), cancel=CancelToken()))
        assert await asyncio.to_thread(held.running.wait, 10)
        first = asyncio.create_task(batcher.submit("k", items("first", 2), cancel=CancelToken()))
        await asyncio.sleep(0.05)
        second = asyncio.create_task(batcher.submit("k", items("second", 2), cancel=CancelToken()))
        await asyncio.sleep(0.05)
        assert gate.waiting == 1  # the dispatcher waits for the slot; no batch has been formed
        held.release()
        return await holder, await first, await second

    assert within(10, scenario()) == (expected("other", 1), expected("first", 2), expected("second", 2))
    assert run.batches == [items("first", 2) + items("second", 2)]
    assert gate.busy == 0


def test_sticky_error_of_a_batch_whose_jobs_were_cancelled_marks_the_worker(make_settings) -> None:
    """A shared batch raises a sticky CUDA error (torch.AcceleratorError, in the fixture pipeline,
    through the real gate) after its only job was cancelled and answered: nobody is left to receive
    it, yet it is logged and the worker is marked fatal, so the next job gets CUDA_FATAL."""
    from tests.conftest import CAPTURED_LOGS

    settings = make_settings(GENERATION_ACQUIRE_TIMEOUT="5", MAX_CONCURRENT_GENERATIONS="1")
    worker = Worker(settings, tasks=TABLE, registry=Registry())
    fatal_job = {"id": "batch", "input": {"task": "fixture", "action": "fatal_after_cancel", "batched": True}}

    def running() -> bool:
        loaded = worker.runtime.registry.loaded().get(PipelineKey("fixture", "fixture-model", "cpu", "float32"))
        return loaded is not None and loaded.pipeline.first.running == 1

    async def wait_for(condition: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 5
        while not condition() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    async def scenario() -> tuple[dict[str, Any], dict[str, Any]]:
        task = asyncio.create_task(worker.handle(fatal_job))
        await wait_for(running)
        assert running()
        task.cancel()
        cancelled = await task
        await wait_for(lambda: worker.lifecycle.state.value == "fatal")
        return cancelled, await worker.handle({"id": "next", "input": {"task": "fixture"}})

    mark = len(CAPTURED_LOGS.getvalue())
    cancelled, after = within(20, scenario())
    assert cancelled["error_code"] == "CANCELLED"
    assert worker.lifecycle.state.value == "fatal"
    assert after["error_code"] == "CUDA_FATAL", after
    assert any("job.late_error" in line for line in CAPTURED_LOGS.getvalue()[mark:].splitlines())
