"""What the worker needs from every task: its row of the task table, its input model's base,
and what shapes its result (so what its result cache key is made of)."""

from __future__ import annotations

import secrets
import types
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, model_validator

from handler.config import Settings
from handler.errors import InvalidInput

if TYPE_CHECKING:
    from handler.job import JobContext
    from handler.runtime.container import Runtime

InputT = TypeVar("InputT", bound=BaseModel)


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
    "retry_after_s", "api_key", "http_allowed_hosts", "http_max_connections", "http_max_head_bytes",
    "http_max_headers", "http_head_timeout_s", "http_keep_alive_s",
    # Where weights come from (their identity is in the key) and which may be asked for; the
    # device it resolved to is in the key.
    "model_dir", "allow_model_download", "runpod_hf_cache", "whisper_models", "device", "preload", "bake_models",
    "task_modules",
    # How jobs share the worker: batches give each job the result it gets alone; offloading and
    # the GPU memory budget move the same weights between memories.
    "max_concurrent_jobs", "max_concurrent_generations", "generation_slots_cap", "memory_reserve_mb",
    "model_instances", "memory_pressure_threshold", "max_jobs_per_worker", "shutdown_grace_s",
    "generation_acquire_timeout", "model_load_wait_timeout", "whisper_batch_window_ms", "enable_cpu_offload",
    "video_group_offload", "video_text_encoder_offload", "gpu_memory_budget_mb",
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
