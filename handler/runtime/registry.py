"""Lazily built pipelines, one per key, each loaded once however many jobs ask at once.

Lookups go lock-free first; on a miss the caller takes the lock of that key only (so two
different models load in parallel), looks again, loads, and publishes. A load that fails
is not cached: the next request tries again. A load that runs out of GPU memory is
``GPU_OOM`` and a sticky CUDA error during a load is ``CUDA_FATAL``, as in model code; any
other failure is ``MODEL_LOAD_FAILED``, its details in the log, not in the client's message.

Loaders build their pools in host RAM; the runtime's
:class:`~handler.runtime.residency.Residency` places a pool on the device when a job holds it,
and may later park or drop it (a dropped pool is forgotten here, so it loads again).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from handler.errors import GenerationTimeout, ModelLoadFailed, WorkerError
from handler.logs import get_logger
from handler.runtime.devices import cuda_errors
from handler.runtime.instances import InstancePool

T = TypeVar("T")
log = get_logger(__name__)


@dataclass(frozen=True)
class PipelineKey:
    """What makes two pipelines different."""

    task: str
    model: str
    device: str
    dtype: str


@dataclass(frozen=True)
class LoadedPipeline:
    """A published pipeline and what its load cost."""

    pipeline: Any
    load_ms: float
    loaded_at: float


class Registry:
    """Pipelines by key, loaded on first use under a per-key lock."""

    def __init__(self, *, load_wait_timeout: float = 1800.0) -> None:
        self._load_wait_timeout = load_wait_timeout
        self._pipelines: dict[PipelineKey, LoadedPipeline] = {}
        self._key_locks: dict[PipelineKey, threading.Lock] = {}
        # Guards creation of entries in _key_locks, never held during a load.
        self._key_locks_lock = threading.Lock()

    def _lock_for(self, key: PipelineKey) -> threading.Lock:
        with self._key_locks_lock:
            return self._key_locks.setdefault(key, threading.Lock())

    def get(self, key: PipelineKey, loader: Callable[[], T]) -> T:
        """The pipeline for ``key``, calling ``loader`` once if it is not loaded yet."""
        found = self._pipelines.get(key)
        if found is not None:
            return found.pipeline  # type: ignore[no-any-return]
        lock = self._lock_for(key)
        if not lock.acquire(timeout=self._load_wait_timeout):
            raise GenerationTimeout(
                f"model {key.model!r} is still loading after {self._load_wait_timeout:.0f}s"
            )
        try:
            found = self._pipelines.get(key)
            if found is not None:
                return found.pipeline  # type: ignore[no-any-return]
            return self._load(key, loader)
        finally:
            lock.release()

    def _load(self, key: PipelineKey, loader: Callable[[], T]) -> T:
        log.info("pipeline.load.start", task=key.task, model=key.model, device=key.device)
        started = time.perf_counter()
        try:
            with cuda_errors():
                pipeline = loader()
        except WorkerError:
            raise
        except Exception as exc:
            log.warning("pipeline.load.failed", task=key.task, model=key.model, error=repr(exc))
            raise ModelLoadFailed(
                f"could not load model {key.model!r} ({type(exc).__name__}); the worker log has the details"
            ) from exc
        load_ms = (time.perf_counter() - started) * 1000
        if isinstance(pipeline, InstancePool):
            pipeline.key = key
        self._pipelines[key] = LoadedPipeline(pipeline, load_ms, time.time())
        log.info("pipeline.load.done", task=key.task, model=key.model, ms=round(load_ms, 1))
        return pipeline

    def is_loaded(self, key: PipelineKey) -> bool:
        return key in self._pipelines

    def loaded(self) -> dict[PipelineKey, LoadedPipeline]:
        """A snapshot of what is loaded now."""
        return dict(self._pipelines)

    def forget(self, key: PipelineKey, pool: InstancePool[Any]) -> None:
        """Forget ``pool`` (the residency dropped it): the next job for ``key`` loads it again.
        Called with the residency's lock held, so it never takes a key's lock (a load may hold
        that one while it waits for the residency)."""
        found = self._pipelines.get(key)
        if found is not None and found.pipeline is pool:
            del self._pipelines[key]

    def adopt(self, key: PipelineKey, pool: InstancePool[Any]) -> None:
        """Publish again a pool the residency took back after dropping it, unless a new copy was loaded."""
        if key not in self._pipelines:
            self._pipelines[key] = LoadedPipeline(pool, 0.0, time.time())
