"""The registry loads each pipeline once, in parallel across keys, and never caches a failure."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from handler.errors import GenerationTimeout, ModelLoadFailed
from handler.runtime.instances import InstancePool
from handler.runtime.registry import PipelineKey, Registry

KEY = PipelineKey("t", "m", "cpu", "float32")


def test_sixteen_threads_load_one_key_once() -> None:
    """16 threads asking at once for one key: one load, everyone gets the same object."""
    registry = Registry()
    calls = 0
    calls_lock = threading.Lock()
    start = threading.Barrier(16)

    def loader() -> object:
        nonlocal calls
        with calls_lock:
            calls += 1
        time.sleep(0.2)
        return object()

    def ask() -> object:
        start.wait()
        return registry.get(KEY, loader)

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda _: ask(), range(16)))
    assert calls == 1
    assert all(r is results[0] for r in results)


def test_failed_load_is_not_cached() -> None:
    """A load that raises gives MODEL_LOAD_FAILED (the exception's kind for the client, its text only in
    the log, where file paths belong); the next request loads again and succeeds."""
    registry = Registry()
    attempts = []

    def flaky() -> str:
        attempts.append(1)
        if len(attempts) == 1:
            raise OSError("weights truncated at /models/secret/path.bin")
        return "pipeline"

    with pytest.raises(ModelLoadFailed, match=r"\(OSError\)") as info:
        registry.get(KEY, flaky)
    assert "/models" not in info.value.message
    assert not registry.is_loaded(KEY)
    assert registry.get(KEY, flaky) == "pipeline"
    assert len(attempts) == 2


def test_two_keys_load_in_parallel() -> None:
    """Different models do not wait on each other: both loads are inside the loader at once."""
    registry = Registry()
    both_inside = threading.Barrier(2, timeout=5)

    def loader() -> str:
        both_inside.wait()  # raises BrokenBarrierError if the loads were serialised
        return "ok"

    other = PipelineKey("t", "other", "cpu", "float32")
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(registry.get, k, loader) for k in (KEY, other)]
        assert [f.result(timeout=10) for f in futures] == ["ok", "ok"]


def test_waiting_for_a_slow_load_is_bounded() -> None:
    """A job waiting on another job's load gives up with TIMEOUT after the configured wait."""
    registry = Registry(load_wait_timeout=0.3)
    release = threading.Event()
    loading = threading.Event()

    def slow() -> str:
        loading.set()
        release.wait(5)
        return "slow"

    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(registry.get, KEY, slow)
        loading.wait(5)
        started = time.monotonic()
        with pytest.raises(GenerationTimeout):
            registry.get(KEY, slow)
        assert time.monotonic() - started == pytest.approx(0.3, abs=0.25)
        release.set()
        assert first.result(5) == "slow"


def test_a_forgotten_pool_loads_again_and_is_adopted_back_only_if_none_was() -> None:
    """A pool the residency dropped is forgotten (the next request loads a fresh one, and the key is
    on the new pool); forgetting a stale pool leaves the new one; adopting puts a pool back only
    where the key has none."""
    registry = Registry()
    first = registry.get(KEY, lambda: InstancePool([object()]))
    assert first.key == KEY
    registry.forget(KEY, first)
    second = registry.get(KEY, lambda: InstancePool([object()]))
    assert second is not first
    registry.forget(KEY, first)  # stale: the registry holds another pool for the key
    registry.adopt(KEY, first)
    assert registry.get(KEY, lambda: InstancePool([object()])) is second
    registry.forget(KEY, second)
    registry.adopt(KEY, first)
    assert registry.get(KEY, lambda: InstancePool([object()])) is first
