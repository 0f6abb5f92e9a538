"""GPU memory as a managed resource: pipelines placed under a budget, idle ones parked or dropped least
recently used first, held ones never moved, jobs waiting for room with the gate's timeout and
cancellation, requests that could never fit refused before any work."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from handler.app import Worker
from handler.errors import Cancelled, GenerationTimeout, InputTooLarge
from handler.runtime.cancel import CancelToken
from handler.runtime.instances import InstancePool, Placement, move_whole
from handler.runtime.registry import PipelineKey, Registry
from handler.runtime.residency import Residency
from tests.conftest import assert_no_job_dirs
from tests.fixture_tasks import TABLE, FixturePipeline

MB = 2**20


class Weights:
    """A pipeline instance that only knows where it is."""

    def __init__(self) -> None:
        self.device = "cpu"
        self.moves: list[str] = []

    def to(self, device: str) -> None:
        self.device = device
        self.moves.append(device)


def pool(name: str, megabytes: int) -> InstancePool[Weights]:
    made = InstancePool([Weights()], Placement(weights=megabytes * MB, move=move_whole))
    made.key = PipelineKey(name, name, "cuda", "float16")
    return made


def residency(budget_mb: int, *, host_mb: int = 10**6, **hooks: Any) -> Residency:
    return Residency(device="cuda", budget=budget_mb * MB, host_reserve=0, host_room=lambda: host_mb * MB, **hooks)


def use(memory: Residency, *pools: InstancePool[Any], working_mb: int = 0) -> None:
    for each in pools:
        with memory.hold(each, working=working_mb * MB, timeout=1):
            assert each.first.device == "cuda"


def test_idle_pipelines_leave_least_recently_used_first() -> None:
    """On a budget of two: the third pipeline parks the least recently used, and a parked one comes
    back (a move, not a load) parking the next least recently used."""
    memory = residency(100)
    a, b, c = pool("a", 40), pool("b", 40), pool("c", 40)
    use(memory, a, b, c)
    assert memory.places() == {("a", "a"): "parked", ("b", "b"): "device", ("c", "c"): "device"}
    assert a.first.device == "cpu"
    use(memory, b, a)  # b is now the most recent of the two on the device, so c leaves
    assert memory.places() == {("a", "a"): "device", ("b", "b"): "device", ("c", "c"): "parked"}
    assert a.first.moves == ["cuda", "cpu", "cuda"]
    assert memory.moves.counts == {("a", "to_device"): 2, ("b", "to_device"): 1, ("c", "to_device"): 1,
                                   ("a", "park"): 1, ("c", "park"): 1}


def test_working_memory_counts_while_held() -> None:
    """A job's working memory is counted beside the weights while it runs, and makes room like
    weights do; once it ends, nothing more has to leave."""
    memory = residency(100)
    a, b = pool("a", 30), pool("b", 30)
    use(memory, a)
    use(memory, b, working_mb=50)  # 30 + 30 + 50 > 100: a leaves
    assert memory.places()[("a", "a")] == "parked"
    assert memory.used() == 30 * MB
    use(memory, a, working_mb=10)  # 30 + 30 + 10 fits: b stays
    assert set(memory.places().values()) == {"device"}


def test_a_dropped_pipeline_is_forgotten_and_taken_back_if_still_in_hand() -> None:
    """With no host RAM to spare, an idle pipeline leaving the device is dropped: moved off the
    device, forgotten by the registry; a job that still had it comes back with it, and it is adopted."""
    forgotten: list[Any] = []
    adopted: list[Any] = []
    memory = residency(50, host_mb=0, forget=lambda key, p: forgotten.append(p),
                       adopt=lambda key, p: adopted.append(p))
    a, b = pool("a", 40), pool("b", 40)
    use(memory, a, b)
    assert forgotten == [a] and a.first.device == "cpu"
    assert memory.places() == {("a", "a"): "dropped", ("b", "b"): "device"}
    assert memory.moves.counts[("a", "drop")] == 1
    use(memory, a)
    assert adopted == [a] and forgotten == [a, b]
    assert memory.places() == {("a", "a"): "device", ("b", "b"): "dropped"}


def test_a_held_pipeline_is_never_moved_and_the_other_job_waits() -> None:
    """While one job holds a pipeline, another that needs its room waits (it is not moved under the
    first job), and gets the room as soon as the first ends."""
    memory = residency(100)
    a, b = pool("a", 60), pool("b", 60)
    released = threading.Event()
    got_room_at: list[float] = []

    def second() -> None:
        with memory.hold(b, timeout=5):
            got_room_at.append(time.monotonic())

    with memory.hold(a, timeout=1):
        waiter = threading.Thread(target=second)
        waiter.start()
        time.sleep(0.3)
        assert got_room_at == [] and a.first.moves == ["cuda"]
        ended = time.monotonic()
        released.set()
    waiter.join(5)
    assert got_room_at and got_room_at[0] >= ended
    assert a.first.moves == ["cuda", "cpu"]


def test_no_room_within_the_timeout_is_timeout_and_a_cancelled_wait_is_cancelled() -> None:
    """Waiting for room is bounded by the acquire timeout (TIMEOUT) and left at once when the job is
    cancelled (CANCELLED); neither leaves anything counted."""
    memory = residency(100)
    a, b = pool("a", 60), pool("b", 60)
    with memory.hold(a, timeout=1):
        started = time.monotonic()
        with pytest.raises(GenerationTimeout, match="no room on the GPU"), memory.hold(b, timeout=0.3):
            pass
        assert time.monotonic() - started == pytest.approx(0.3, abs=0.2)
        token = CancelToken()
        threading.Timer(0.2, token.cancel).start()
        started = time.monotonic()
        with pytest.raises(Cancelled), memory.hold(b, timeout=30, cancel=token):
            pass
        assert time.monotonic() - started < 1.0
    assert memory.used() == 60 * MB
    assert memory.places() == {("a", "a"): "device", ("b", "b"): "parked"}
    use(memory, b)


def test_a_request_that_could_never_fit_is_input_too_large() -> None:
    """Weights and working memory over the whole budget: INPUT_TOO_LARGE naming the field, without
    waiting and without moving anything."""
    memory = residency(100)
    a = pool("a", 60)
    with pytest.raises(InputTooLarge, match="budget") as info:
        memory.check_fits(120 * MB, field="resolution", what="a segment of 81 frames of 832x480")
    assert info.value.field == "resolution"
    with pytest.raises(InputTooLarge), memory.hold(a, working=50 * MB, timeout=5):
        pass
    assert a.first.moves == []


def test_without_a_budget_nothing_leaves() -> None:
    """No budget (the CPU, GPU_MEMORY_BUDGET_MB unset): places are tracked, nothing is parked."""
    memory = Residency(device="cpu", budget=None)
    pools = [pool(name, 10**6) for name in "abc"]
    use_cpu = [memory.hold(each, timeout=1) for each in pools]
    for held in use_cpu:
        with held:
            pass
    assert set(memory.places().values()) == {"device"}


# The same policy through the worker: jobs of the fixture task whose model declares its weights.


def fixture_job(**inputs: object) -> dict[str, object]:
    return {"id": "residency", "input": {"task": "fixture", **inputs}}


@pytest.fixture
def make_budget_worker(make_settings):
    def make(**env: str) -> Worker:
        settings = make_settings(GPU_MEMORY_BUDGET_MB="100", MAX_CONCURRENT_GENERATIONS="2", **env)
        return Worker(settings, tasks=TABLE, registry=Registry())

    return make


def fixture_pipeline(worker: Worker, model: str) -> FixturePipeline:
    loaded = worker.runtime.registry.loaded()
    pipeline: FixturePipeline = loaded[PipelineKey("fixture", model, "cpu", "float32")].pipeline.first
    return pipeline


def test_two_jobs_that_do_not_fit_together_run_one_after_the_other(make_budget_worker, work_dir: Path) -> None:
    """A slow job holds its 60 MB model; a second job for another 60 MB model (a free slot, no room)
    waits, then parks the first model and succeeds; the first was never moved while it ran."""
    worker = make_budget_worker(GENERATION_ACQUIRE_TIMEOUT="10")

    async def scenario() -> tuple[dict, dict]:
        slow = asyncio.create_task(worker.handle(fixture_job(model="a", weights_mb=60, action="sleep", seconds=1.0)))
        await asyncio.sleep(0.3)
        second = await worker.handle(fixture_job(model="b", weights_mb=60))
        return await slow, second

    slow, second = asyncio.run(scenario())
    assert slow["output"] == "done" and second["output"] == "done"
    assert second["timings"]["queued_ms"] > 400  # it waited for room, not for a slot
    a = fixture_pipeline(worker, "a")
    (_, started, ended), = [event for event in a.events if event[0] == "run"]
    moves = [at for kind, _, at in a.events if kind == "move"]
    assert len(moves) == 2  # placed, then parked for b
    assert moves[0] <= started and moves[1] >= ended
    assert worker.runtime.residency.places() == {("fixture", "a"): "parked", ("fixture", "b"): "device"}
    assert_no_job_dirs(work_dir)


def test_no_room_in_time_is_timeout_and_cancelled_while_waiting_is_cancelled(make_budget_worker) -> None:
    """The second job gets TIMEOUT within a short acquire timeout, or CANCELLED when cancelled while
    it waits; the worker counts nothing for either afterwards and serves the next job."""
    worker = make_budget_worker(GENERATION_ACQUIRE_TIMEOUT="0.5")

    async def scenario() -> tuple[dict, dict, dict]:
        slow = asyncio.create_task(worker.handle(fixture_job(model="a", weights_mb=60, action="sleep", seconds=2.5)))
        await asyncio.sleep(0.3)
        timed_out = await worker.handle(fixture_job(model="b", weights_mb=60))
        waiting = asyncio.create_task(worker.handle({"id": "cancel-me", "input": {
            "task": "fixture", "model": "b", "weights_mb": 60, "working_mb": 1}}))
        await asyncio.sleep(0.2)
        waiting.cancel()
        cancelled = await waiting
        await slow
        return timed_out, cancelled, await worker.handle(fixture_job(model="b", weights_mb=60))

    timed_out, cancelled, after = asyncio.run(scenario())
    assert timed_out["error_code"] == "TIMEOUT" and "room" in timed_out["error"]
    assert cancelled["error_code"] == "CANCELLED"
    assert after["output"] == "done"
    memory = worker.runtime.residency
    assert memory.used() == 60 * MB  # b's weights alone: no working memory left counted
    assert worker.runtime.gate.busy == 0
