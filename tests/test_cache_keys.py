"""Cache keys hold the effective value of everything that shapes a result, and nothing else.

Every setting and every input field of every cached task is enumerated: a setting changes the key
(for some input of that task) exactly when its declaration in handler/config.py names the task in
``shapes``, and an input field changes it unless it is listed as not shaping the result, so a new
setting or field cannot be forgotten.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from handler.config import BucketSettings, Settings, shaping
from handler.errors import InvalidInput
from handler.io.result_cache import cache_key
from handler.task_interface import CachePolicy
from handler.tasks import TASKS

CACHED = {name: task for name, task in TASKS.items() if task.cache is not None}
# Inputs that exercise each setting a task reads (narration and captions for text2video).
SAMPLES: dict[str, list[dict[str, Any]]] = {
    "transcribe": [{"audio": "https://example.com/a.wav"}, {"audio": "https://example.com/a.wav", "model": "base"},
                   {"audio": "https://example.com/a.wav", "diarize": True}],
    "text2image": [{"task": "text2image", "prompt": "a cube", "seed": 1}],
    "speech": [{"task": "speech", "text": "hello", "seed": 1}],
    "text2video": [{"task": "text2video", "prompt": "a cube", "seed": 1},
                   {"task": "text2video", "prompt": "a cube", "seed": 1, "narration": "hi", "captions": "soft"}],
}
# Another valid value of each input field, to show it changes the key.
OTHER_INPUT: dict[str, Any] = {
    "model": "de-model", "transcription": "srt", "translate": True, "translation": "vtt", "language": "de",
    "temperature": 0.5, "temperature_increment_on_fallback": 0.3, "best_of": 2, "beam_size": 2, "patience": 1.5,
    "length_penalty": 0.5, "suppress_tokens": "1,2", "initial_prompt": "hi", "condition_on_previous_text": False,
    "compression_ratio_threshold": 2.0, "logprob_threshold": -2.0, "no_speech_threshold": 0.5, "enable_vad": True,
    "word_timestamps": True, "batch_size": 3, "compute_type": "float32", "diarize": True, "num_speakers": 2,
    "min_speakers": 2, "max_speakers": 3, "known_speakers": [{"name": "Ann", "audio": "https://example.com/ann.wav"}],
    "prompt": "a sphere", "negative_prompt": "blur", "width": 128,
    "height": 128, "num_inference_steps": 7, "guidance_scale": 2.0, "seed": 2, "num_images": 2,
    "format": "jpeg", "text": "bye", "speaking_rate": 1.5, "duration_s": 3.0, "fps": 8, "aspect_ratio": "9:16",
    "resolution": "720p", "narration": "bye", "captions": "burned",
}
# Input fields that never shape a result: where media comes from, what happens to it after.
NOT_SHAPING_INPUT = {"task", "cache", "audio", "audio_base64", "delete_after_read"}


def other_value(name: str, value: Any) -> Any:
    """A different value of the setting ``name`` of the same type."""
    specials: dict[str, Any] = {
        "whisper_model_map": (("base", "de-model"),), "whisper_models": ("other", "de-model", "more"),
        "preload": ("speech",),
        "bucket": BucketSettings(endpoint_url=None, access_key_id="a", secret_access_key="b", name="n"),
        "video_clip_frames": 33, "max_concurrent_generations": None, "max_jobs_per_worker": 5,
        "result_cache_secret": "s", "worker_id": "w1", "nvidia_visible_devices": "0",
        "download_allowed_networks": (), "device": "cuda", "video_attention_backend": "_native_math",
        "log_format": "json", "port_health": 8081, "api_key": "k", "worker_mode": "http",
        "gpu_memory_budget_mb": 20000,
    }
    if name in specials:
        return specials[name]
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value + 1
    if isinstance(value, str):
        return value + "-other"
    if isinstance(value, Path):
        return value / "other"
    if isinstance(value, tuple):
        return (*value, "other")
    raise AssertionError(f"no other value for setting {name}={value!r}")


def key_of(policy: CachePolicy[Any], settings: Settings, params: BaseModel) -> str:
    """The key as JobContext.cache_key makes it, with each model's name standing for its weights."""
    return cache_key(task=str(getattr(params, "task", "")), fields=policy.shaping(settings, params), media=None)


def base_settings() -> Settings:
    """A worker serving two more Whisper models, one of them under an alias."""
    return Settings(whisper_model="tiny.en", whisper_models=("other", "de-model"),
                    whisper_model_map=(("base", "other"),))


@pytest.mark.parametrize("name", sorted(CACHED))
def test_a_setting_shapes_the_key_exactly_when_its_declaration_says_so(name: str) -> None:
    """For each cached task, changing any one setting changes the key for some input of the task
    when its declaration names the task in ``shapes``, and leaves the key alone otherwise."""
    task = CACHED[name]
    policy = task.cache
    assert policy is not None
    base = base_settings()
    samples = [task.input_model.model_validate(sample) for sample in SAMPLES[name]]
    shapes = set(shaping(name))
    for setting in dataclasses.fields(Settings):
        value = getattr(base, setting.name)
        changed = dataclasses.replace(base, **{setting.name: other_value(setting.name, value)})
        differs = [key_of(policy, base, p) != key_of(policy, changed, p) for p in samples]
        if setting.name in shapes:
            assert any(differs), f"{name}: {setting.name} is declared to shape its results, yet leaves the key alone"
        else:
            assert not any(differs), f"{name}: {setting.name} changes the key, but its declaration's shapes omit {name}"


def test_the_declarations_name_cached_tasks() -> None:
    """Every task a setting's ``shapes`` names is a task with a cache (a renamed task cannot hide there)."""
    named = {task for setting in dataclasses.fields(Settings) for task in setting.metadata["shapes"]}
    assert named <= set(CACHED)


@pytest.mark.parametrize("name", sorted(CACHED))
def test_every_input_field_shapes_the_key_or_is_listed(name: str) -> None:
    """For each cached task, changing any one input field changes the key, unless it is where the
    media comes from (or the task and cache switches)."""
    task = CACHED[name]
    policy = task.cache
    assert policy is not None
    settings = base_settings()
    for sample in SAMPLES[name]:
        params = task.input_model.model_validate(sample)
        for field in task.input_model.model_fields:
            if field in NOT_SHAPING_INPUT:
                continue
            assert field in OTHER_INPUT, f"{name}.{field}: give it another value in OTHER_INPUT"
            changed = _with(task.input_model, sample, field, OTHER_INPUT[field])
            if changed is None:
                continue  # not valid with this sample (width without height): another sample covers it
            assert key_of(policy, settings, params) != key_of(policy, settings, changed), f"{name}.{field}"


def _with(model: type[BaseModel], sample: dict[str, Any], field: str, value: Any) -> BaseModel | None:
    if sample.get(field) == value:
        return None  # no change: a sample without the field covers it
    data = {**sample, field: value}
    if field in ("width", "height"):
        data.update(width=128, height=128)
    if field in ("narration", "captions") and "narration" not in sample:
        data.update(narration="bye")
    try:
        return model.model_validate(data)
    except (ValueError, InvalidInput):
        return None


def test_a_null_batch_size_is_keyed_as_the_workers_own() -> None:
    """`batch_size: null` on a worker with WHISPER_BATCH_SIZE=8 has the key of `batch_size: 8`, not
    the key a worker with 1 gives the same null (whose result differs)."""
    policy = CACHED["transcribe"].cache
    assert policy is not None
    model = CACHED["transcribe"].input_model
    eight, one = Settings(whisper_model="tiny.en"), Settings(whisper_model="tiny.en", whisper_batch_size=1)
    null = model.model_validate({"audio": "https://example.com/a.wav", "batch_size": None})
    explicit = model.model_validate({"audio": "https://example.com/a.wav", "batch_size": 8})
    assert key_of(policy, eight, null) == key_of(policy, eight, explicit)
    assert key_of(policy, eight, null) != key_of(policy, one, null)
