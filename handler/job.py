"""What a task is handed: one job's context (its runtime, inputs, storage, cancel token, threads)
and its timings, with the one recipe for model work, file output and the result cache."""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import Executor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from handler.cancel import CancelToken
from handler.config import Settings
from handler.io.inputs import MediaInputs
from handler.io.outputs import OutputSink
from handler.io.result_cache import ResultCache, cache_key
from handler.io.storage import S3Storage
from handler.io.workspace import Workspace
from handler.runtime.container import Runtime
from handler.runtime.instances import InstancePool
from handler.runtime.threads import in_thread, job_threads
from handler.task_interface import CachePolicy, TaskInput

T = TypeVar("T")
P = TypeVar("P")
# An output file: where it is, the name the client sees, its content type.
OutputFile = tuple[Path, str, str]


@dataclass
class Timings:
    """Milliseconds spent per stage of one job."""

    stages: dict[str, float] = field(default_factory=dict)

    def add(self, stage: str, ms: float) -> None:
        self.stages[stage] = self.stages.get(stage, 0.0) + ms

    @contextmanager
    def measure(self, stage: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, (time.perf_counter() - started) * 1000)

    def as_dict(self) -> dict[str, float]:
        return {f"{stage}_ms": round(ms, 2) for stage, ms in self.stages.items()}


@dataclass
class JobContext:
    """One job: its id, directory, inputs, where its outputs go, its bucket and timings."""

    runtime: Runtime
    request_id: str
    job: dict[str, Any]
    workspace: Workspace
    inputs: MediaInputs
    storage: OutputSink
    # The job's bucket (its s3Config's, else the worker's), which also holds the result cache; None: none.
    bucket: S3Storage | None = None
    timings: Timings = field(default_factory=Timings)
    # Cancelled when RunPod cancels the job; model code checks it between steps.
    cancel: CancelToken = field(default_factory=CancelToken)
    # The job's own threads for blocking work: a job stuck on a slow endpoint holds only these.
    threads: Executor = field(default_factory=job_threads)
    # Who hears of partial results (see ``emit``); None for queued jobs.
    on_event: Callable[[str, dict[str, Any]], None] | None = None

    def emit(self, kind: str, data: dict[str, Any]) -> None:
        """Tell the job's listener of a partial result (safe from any thread; nothing without one)."""
        if self.on_event is not None:
            self.on_event(kind, data)

    @property
    def settings(self) -> Settings:
        return self.runtime.settings

    @property
    def workdir(self) -> Path:
        """The job's private directory (created on first use, removed after the job)."""
        return self.workspace.path

    async def in_thread(self, work: Callable[[], T]) -> T:
        """Blocking IO off the event loop, on the job's threads; a late failure after
        cancellation is still reported."""
        return await in_thread(work, on_late_error=self.runtime.lifecycle.late_error, executor=self.threads)

    async def load(self, get_pool: Callable[[], InstancePool[P]]) -> InstancePool[P]:
        """A model's instances, loaded on first use (timed as ``load``)."""
        with self.timings.measure("load"):
            return await self.in_thread(get_pool)

    async def on_model(
        self, pool: InstancePool[P], work: Callable[[P], T], *, stage: str = "run", working: int = 0
    ) -> T:
        """Run ``work`` with an instance of ``pool`` to itself, in a GPU slot.

        The one recipe for model work: the gate's slot and acquire timeout, the pool placed on the
        device with ``working`` bytes beside it (waiting for room, within the same timeout), an
        exclusive instance, CUDA errors translated, the job's cancel token, ``queued`` (slot and
        room) and ``stage`` timings.
        """
        timeout = self.settings.generation_acquire_timeout

        def borrowed() -> T:
            with contextlib.ExitStack() as held:
                with self.timings.measure("queued"):
                    held.enter_context(self.runtime.residency.hold(pool, working=working, timeout=timeout,
                                                                   cancel=self.cancel))
                    instance = held.enter_context(pool.borrow(timeout))
                with self.timings.measure(stage):
                    return work(instance)

        result, waited_ms = await self.runtime.gate.run(
            borrowed, token=self.cancel, on_late_error=self.runtime.lifecycle.late_error
        )
        self.timings.add("queued", waited_ms)
        return result

    async def fetch_media(
        self, target: Path, *, url: str | None, data: str | None, fields: tuple[str, str],
        delete_after_read: bool = False,
    ) -> str:
        """Bring the job's media (a URL or base64) to ``target``; returns the field it came from."""
        url_field, data_field = fields
        with self.timings.measure("download"):
            if url is not None:
                await self.in_thread(functools.partial(self.inputs.from_url, url, target, field=url_field,
                                                       delete_after_read=delete_after_read))
                return url_field
            assert data is not None
            await self.in_thread(functools.partial(self.inputs.from_base64, data, target, field=data_field))
            return data_field

    def caching(self, params: TaskInput) -> bool:
        """Whether this job uses the result cache (so whether its key is worth computing: hashing
        a large input costs seconds)."""
        return params.cache and self._result_cache() is not None

    async def cache_key(self, params: TaskInput, policy: CachePolicy[Any], *, media: str | None = None) -> str | None:
        """The result cache's key for this job: its task, device, the effective values of what
        shapes its result (models by their weights), the media hash. None when the job does not
        use the cache or a model's weights are unknown."""
        if not self.caching(params):
            return None
        fields = policy.shaping(self.settings, params)
        for name, identify in policy.models.items():
            model = fields.get(name)
            if model is not None:
                fields[name] = await self.in_thread(functools.partial(identify, model, self.settings))
                if fields[name] is None:
                    return None
        return cache_key(task=str(getattr(params, "task", "")), fields={**fields, "device": self.runtime.device},
                         media=media)

    async def generation_key(self, params: TaskInput, policy: CachePolicy[Any], *, deterministic: bool) -> str | None:
        """The cache key of a generation job; only a deterministic one (seeded) has one answer to remember."""
        return await self.cache_key(params, policy) if deterministic else None

    async def cached(
        self, key: str | None, policy: CachePolicy[Any], compute: Callable[[], Awaitable[dict[str, Any]]]
    ) -> dict[str, Any]:
        """The task's output for ``key``: from the bucket's result cache, from an identical job in
        flight on this worker, or computed (and then stored). ``key`` None: not cacheable."""
        cache = self._result_cache() if key is not None else None
        if cache is None or key is None:
            return {**await compute(), "cached": False}
        with self.timings.measure("cache"):
            hit = await self.in_thread(lambda: cache.lookup(key, fields=policy.outputs, cancel=self.cancel))
        if hit is not None:
            return {**hit, "cached": True}

        async def compute_and_store() -> dict[str, Any]:
            output = await compute()
            await self.in_thread(lambda: cache.store(key, output, fields=policy.outputs, cancel=self.cancel))
            return output

        output, shared = await self.runtime.single_flight.run((cache.scope, key), compute_and_store)
        return {**output, "cached": shared}

    def _result_cache(self) -> ResultCache | None:
        if not self.settings.result_cache or self.bucket is None:
            return None
        settings = self.settings
        return ResultCache(self.bucket, prefix=settings.result_cache_prefix, output_prefix=settings.bucket_prefix,
                           secret=self.runtime.cache_secret, timeout_s=settings.result_cache_timeout_s)

    async def save_files(self, files: Sequence[OutputFile]) -> list[dict[str, Any]]:
        """Store the job's output files, in order (timed as ``upload``)."""
        stored = []
        with self.timings.measure("upload"):
            for path, name, content_type in files:
                save = functools.partial(self.storage.save, path, name=name, content_type=content_type,
                                         request_id=self.request_id, cancel=self.cancel)
                stored.append((await self.in_thread(save)).as_dict())
        return stored

