"""What every task gets from the worker, and what the worker needs from every task."""

from __future__ import annotations

import functools
import secrets
import time
import types
from collections.abc import Awaitable, Callable, Hashable, Iterator, Mapping, Sequence
from concurrent.futures import Executor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, model_validator

from handler.config import Settings
from handler.errors import InvalidInput
from handler.io.inputs import MediaInputs
from handler.io.result_cache import ResultCache, cache_key
from handler.io.storage import S3Storage, Storage
from handler.io.workspace import Workspace
from handler.runtime.batcher import Batcher, Batchers
from handler.runtime.cancel import CancelToken
from handler.runtime.flights import SingleFlight
from handler.runtime.gate import Gate
from handler.runtime.instances import InstancePool
from handler.runtime.lifecycle import Lifecycle
from handler.runtime.registry import Registry
from handler.runtime.stats import WorkerStats
from handler.runtime.threads import in_thread, job_threads

InputT = TypeVar("InputT", bound=BaseModel)
T = TypeVar("T")
P = TypeVar("P")
ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")
# An output file: where it is, the name the client sees, its content type.
OutputFile = tuple[Path, str, str]


class TaskInput(BaseModel):
    """Base of every task's input: unknown fields are errors, types are strict, numbers finite,
    and ``null`` for a field that has no meaning for null is "not given" (its default applies),
    as clients of other workers send ``"seed": null`` or ``"image_url": null``."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    cache: bool = Field(True, description="answer from (and store into) the result cache, when the worker has one")

    # Fields other workers take that this one cannot honour, and why: refused by name, not as unknown.
    unsupported: ClassVar[dict[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _null_means_not_given(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        for name, reason in cls.unsupported.items():
            if data.get(name) is not None:
                raise InvalidInput(f"{name}: not supported by this worker ({reason})", field=name)
        return {key: value for key, value in data.items()
                if value is not None or (key not in cls.unsupported and _takes_null(cls, key))}


def _takes_null(model: type[BaseModel], name: str) -> bool:
    field = model.model_fields.get(name)
    if field is None:
        return True  # not a field (an alias, or unknown): leave it to validation
    annotation = field.annotation
    return get_origin(annotation) in (Union, types.UnionType) and type(None) in get_args(annotation)


def new_seed() -> int:
    """A random seed for a job that gave none (the result reports it, so it can be replayed)."""
    return secrets.randbelow(2**32 - 1)


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


@dataclass(frozen=True)
class Runtime:
    """The long-lived parts of the worker that tasks use."""

    settings: Settings
    registry: Registry
    gate: Gate
    device: str
    stats: WorkerStats = field(default_factory=WorkerStats)
    lifecycle: Lifecycle = field(default_factory=Lifecycle)
    # Identical cacheable jobs held at once compute once.
    flights: SingleFlight[dict[str, Any]] = field(default_factory=SingleFlight)
    # Batches shared by the jobs this worker holds (transcription chunks), per model.
    batchers: Batchers = field(default_factory=Batchers)
    # How the GPU slots were sized (fixed, or auto with its figures), for `system`.
    sizing: dict[str, Any] = field(default_factory=dict)
    # The key that authenticates result cache entries (see handler.io.result_cache).
    cache_secret: bytes = field(default_factory=lambda: secrets.token_bytes(32), repr=False)

    def batcher(
        self, key: Hashable, run_batch: Callable[[list[ItemT]], list[ResultT]], *, max_batch: int, window_s: float
    ) -> Batcher[ItemT, ResultT]:
        """The worker's batcher for ``key`` (a model), made on first use: its batches take slots
        of the gate like any model work (CUDA errors translated there), and what a batch raises
        after its jobs were cancelled reaches the lifecycle (a sticky CUDA error marks the worker).

        The first caller's ``run_batch`` serves every later job, for the worker's life: it must
        not hold any job's state (borrow the model through the items instead).
        """

        def make() -> Batcher[ItemT, ResultT]:
            return Batcher(run_batch, gate=self.gate, max_batch=max_batch, window_s=window_s,
                           on_late_error=self.lifecycle.late_error)

        return self.batchers.get(key, make)


@dataclass(frozen=True)
class CachePolicy(Generic[InputT]):
    """What shapes a task's result, so what its cache key is made of, and what an entry may give back."""

    # The output fields a cached answer is rebuilt from; nothing else is ever taken from an entry.
    outputs: frozenset[str]
    # The effective value of every input field and setting that shapes the result (defaults
    # resolved: `batch_size: null` is the worker's WHISPER_BATCH_SIZE), model names included.
    shaping: Callable[[Settings, Any], dict[str, Any]]
    # Which of those fields name a model, and how to know its weights: the key holds the
    # weights' identity, not the name. An unknown identity makes the job uncacheable.
    models: Mapping[str, Callable[[str, Settings], str | None]]
    # The settings that shape other tasks' results but not this one's: every setting is read
    # by `shaping`, listed here or in NOT_SHAPING_RESULTS, as tests/test_cache_keys.py checks.
    unaffected: frozenset[str]


# The video speed-ups that change a video (a little): in text2video's key, no other task's.
VIDEO_SHAPING = frozenset({"video_cache", "video_cache_threshold", "video_attention_backend"})

# Settings that shape no task's result, so are in no cache key.
NOT_SHAPING_RESULTS = frozenset({
    # Where the worker runs and what it logs.
    "on_runpod", "worker_id", "runpod_gpu_count", "nvidia_visible_devices", "post_progress", "log_level",
    "log_format", "use_ram_filesystem", "work_dir",
    # How requests reach the worker (queue or HTTP) and who may send them.
    "worker_mode", "http_host", "port", "port_health", "health_check_path", "max_concurrent_requests",
    "retry_after_s", "api_key",
    # Where weights come from (their identity is in the key) and which may be asked for; the
    # device it resolved to is in the key.
    "model_dir", "allow_model_download", "runpod_hf_cache", "whisper_models", "device", "preload", "bake_models",
    "task_modules",
    # How jobs share the worker: batches give each job the result it gets alone; offloading
    # moves the same weights between memories.
    "max_concurrent_jobs", "max_concurrent_generations", "generation_slots_cap", "memory_reserve_mb",
    "model_instances", "memory_pressure_threshold", "max_jobs_per_worker", "shutdown_grace_s",
    "generation_acquire_timeout", "model_load_wait_timeout", "whisper_batch_window_ms", "enable_cpu_offload",
    "video_group_offload",
    # Compiling runs the same operations as fused kernels: the same video to within rounding.
    "video_compile",
    # Where results go and how they travel (the cache is per bucket).
    "bucket", "bucket_prefix", "presign_expiry_s", "result_cache", "result_cache_prefix", "result_cache_secret",
    "result_cache_timeout_s", "upload_prefix", "upload_expiry_s", "upload_timeout_s", "upload_max_attempts",
    "s3_connect_timeout_s", "s3_read_timeout_s", "inline_output_max_bytes",
    # Limits and deadlines: they refuse a job, never change the result of one they accept.
    "download_max_bytes", "download_timeout_s", "download_max_redirects", "download_allow_http",
    "download_allowed_networks", "base64_max_bytes", "max_speech_chars", "max_image_pixels",
    "max_video_duration_s", "max_video_frames", "max_images", "max_steps", "max_audio_duration_s",
    "media_timeout_s",
})


def input_fields(params: BaseModel, *, exclude: Sequence[str] = ()) -> dict[str, Any]:
    """A job's validated input fields (defaults filled in), but those of ``exclude`` and the
    ones that never shape a result (`task`, `cache`)."""
    return params.model_dump(mode="json", exclude={"task", "cache", *exclude})


@dataclass
class JobContext:
    """One job: its id, directory, inputs, storage and timings."""

    runtime: Runtime
    request_id: str
    job: dict[str, Any]
    workspace: Workspace
    inputs: MediaInputs
    storage: Storage
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

    async def on_model(self, pool: InstancePool[P], work: Callable[[P], T], *, stage: str = "run") -> T:
        """Run ``work`` with an instance of ``pool`` to itself, in a GPU slot.

        The one recipe for model work: the gate's slot and acquire timeout, an exclusive
        instance, CUDA errors translated, the job's cancel token, ``queued`` and ``stage`` timings.
        """

        def borrowed() -> T:
            with pool.borrow(self.settings.generation_acquire_timeout) as instance, self.timings.measure(stage):
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

        output, shared = await self.runtime.flights.run((cache.scope, key), compute_and_store)
        return {**output, "cached": shared}

    def _result_cache(self) -> ResultCache | None:
        if not self.settings.result_cache or not isinstance(self.storage, S3Storage):
            return None
        settings = self.settings
        return ResultCache(self.storage, prefix=settings.result_cache_prefix, output_prefix=settings.bucket_prefix,
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


@dataclass(frozen=True)
class Task(Generic[InputT]):
    """A row of the task table: a name, its input model, and how to run and preload it."""

    name: str
    input_model: type[InputT]
    run: Callable[[JobContext, InputT], Awaitable[dict[str, Any]]]
    preload: Callable[[Runtime], None] | None = None
    # Input fields whose presence, without `task`, selects this task.
    implied_by: tuple[str, ...] = ()
    # How its results are cached; None: never.
    cache: CachePolicy[InputT] | None = None
