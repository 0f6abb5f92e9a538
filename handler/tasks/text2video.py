"""``text2video``: prompt in, an mp4 of the asked duration and aspect ratio out, with optional
narration (an audio input, or text spoken by the ``speech`` task) and captions.

Stages: check inputs -> narration -> captions -> generate segments -> encode -> mux -> upload.
Everything that can be refused is refused before the video model loads. Long videos are made
of several generated segments, crossfaded where they meet (never slowed down); the video is
as long as the narration when that is longer, so speech is never cut.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from handler.config import Settings
from handler.errors import InputTooLarge, InvalidInput, ModelLoadFailed
from handler.io import media_in, media_out
from handler.job import JobContext
from handler.limits import check_pixels, check_steps, served_model
from handler.logs import get_logger
from handler.pipelines.captions import cues_from_words, write_srt
from handler.pipelines.diffusion import loading
from handler.pipelines.diffusion.steps import step_callback
from handler.pipelines.diffusion.video_plan import (
    AspectRatio,
    Family,
    Joiner,
    Resolution,
    SegmentPlan,
    family_of,
    frame_size,
    plan_segments,
    to_uint8,
)
from handler.pipelines.speech.pipeline import get_pipelines as speech_pipelines
from handler.pipelines.speech.pipeline import pieces_to_say
from handler.pipelines.speech.pipeline import working_bytes as speech_working_bytes
from handler.pipelines.weights import model_identity, pretrained_source, whisper_identity
from handler.pipelines.whisper import compute_types
from handler.pipelines.whisper import pipeline as whisper_pipeline
from handler.pipelines.whisper.transcript import word_timings
from handler.runtime.container import Runtime
from handler.runtime.instances import InstancePool
from handler.runtime.progress import Progress
from handler.task_interface import CachePolicy, Task, TaskInput, input_fields, new_seed

Captions = Literal["none", "soft", "burned"]
log = get_logger(__name__)


class VideoInput(TaskInput):
    """Input of the ``text2video`` task."""

    task: Literal["text2video"] = "text2video"
    prompt: str = Field(min_length=1, max_length=4000)
    negative_prompt: str | None = Field(None, max_length=4000)
    model: str | None = Field(None, description="video model; default VIDEO_MODEL")
    duration_s: float = Field(5.0, gt=0, description="seconds; longer when the narration is")
    fps: int = Field(16, ge=4, le=60)
    aspect_ratio: AspectRatio = "16:9"
    resolution: Resolution = "480p"
    width: int | None = Field(None, ge=64, le=4096, description="explicit frame width, instead of aspect_ratio "
                              "and resolution (a multiple of the model's: 16 for Wan, 32 for LTX)")
    height: int | None = Field(None, ge=64, le=4096, description="explicit frame height, with width")
    num_inference_steps: int = Field(30, ge=1)
    guidance_scale: float | None = Field(None, ge=0.0, le=30.0)
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    audio: str | None = Field(None, description="narration track: https URL or s3://bucket/key")
    audio_base64: str | None = Field(None, description="narration track, base64")
    narration: str | None = Field(None, min_length=1, description="text to speak as narration")
    captions: Captions = "none"

    @model_validator(mode="after")
    def _check(self) -> VideoInput:
        given = [name for name in ("audio", "audio_base64", "narration") if getattr(self, name) is not None]
        if len(given) > 1:
            raise ValueError(f"give at most one of audio, audio_base64, narration (got {', '.join(given)})")
        if self.captions != "none" and not given:
            raise ValueError("captions: need narration (audio, audio_base64 or narration) to caption")
        if (self.width is None) != (self.height is None):
            raise ValueError("give both width and height, or neither (then aspect_ratio and resolution decide)")
        if self.width is not None and {"aspect_ratio", "resolution"} & self.model_fields_set:
            raise ValueError("give width and height, or aspect_ratio and resolution, not both")
        return self


def get_pipelines(runtime: Runtime, name: str) -> InstancePool[Any]:
    return loading.pipelines(runtime, "text2video", name, video=True)


def preload(runtime: Runtime) -> None:
    """Load the default model and place it on the device (a resident like any, parked when idle and
    needed elsewhere)."""
    pipelines = get_pipelines(runtime, runtime.settings.video_model)
    runtime.residency.place(pipelines, timeout=runtime.settings.generation_acquire_timeout)


def model_family(ctx: JobContext, name: str) -> Family:
    """The model's family from its model_index.json alone, so nothing heavy loads to learn it."""
    from diffusers import DiffusionPipeline

    source, options = pretrained_source(name, ctx.settings)
    try:
        config = DiffusionPipeline.load_config(source, **options)
    except (OSError, ValueError) as exc:
        log.warning("video.model_missing", model=name, error=repr(exc))
        raise ModelLoadFailed(
            f"no video model {name!r} ({type(exc).__name__}); the worker log has the details"
        ) from exc
    family = family_of(str(config.get("_class_name", "")))
    if family is None:
        raise InvalidInput(f"model: {config.get('_class_name')} is not a supported video pipeline", field="model")
    return family


def _check_limits(ctx: JobContext, params: VideoInput) -> None:
    """Everything that needs no model: checked before the model's files are even read."""
    settings = ctx.settings
    served_model(params.model, settings.video_model)
    check_steps(params.num_inference_steps, settings.max_steps)
    _check_duration(ctx, params.duration_s, params.fps, field="duration_s")
    if params.narration is not None:
        pieces_to_say(params.narration, limit=settings.max_speech_chars, field="narration")
    if params.width is not None and params.height is not None:
        check_pixels(params.width, params.height, settings.max_image_pixels, field="width", label="width",
                     unit="pixels per frame")


def _size_field(params: VideoInput) -> str:
    return "width" if params.width is not None else "resolution"


def _frame_size(ctx: JobContext, params: VideoInput, family: Family) -> tuple[int, int]:
    field = _size_field(params)
    if params.width is not None and params.height is not None:
        width, height = params.width, params.height
        for name, value in (("width", width), ("height", height)):
            if value % family.side_multiple:
                raise InvalidInput(f"{name}: {value} is not a multiple of {family.side_multiple}, as "
                                   f"{family.name} models need", field=name)
    else:
        width, height = frame_size(params.aspect_ratio, params.resolution, family)
    check_pixels(width, height, ctx.settings.max_image_pixels, field=field, label=field, unit="pixels per frame")
    return width, height


def _check_duration(ctx: JobContext, duration_s: float, fps: int, *, field: str) -> int:
    settings = ctx.settings
    if duration_s > settings.max_video_duration_s:
        raise InputTooLarge(f"{field}: {duration_s:.1f}s is over the limit of {settings.max_video_duration_s:g}s",
                            field=field)
    frames = math.ceil(duration_s * fps)
    if frames > settings.max_video_frames:
        raise InputTooLarge(f"{field}: {frames} frames is over the limit of {settings.max_video_frames}",
                            field=field)
    return frames


async def _narration(ctx: JobContext, params: VideoInput) -> tuple[Path | None, np.ndarray | None, str]:
    """The narration file, its samples at 16 kHz, and the input field it came from."""
    if params.narration is not None:
        field = "narration"
        pieces = pieces_to_say(params.narration, limit=ctx.settings.max_speech_chars, field=field)
        voices = await ctx.load(lambda: speech_pipelines(ctx.runtime, ctx.settings.tts_model))
        pieces = voices.first.speakable(pieces, field=field)
        samples = await ctx.on_model(voices, lambda voice: voice.synthesize(
            pieces, speaking_rate=1.0, seed=params.seed or 0, cancel=ctx.cancel, field=field), stage="speech",
            working=speech_working_bytes(pieces))
        rate = voices.first.sample_rate
        path = ctx.workdir / "narration.wav"
        media_out.write_wav(path, samples, rate)
    elif params.audio is not None or params.audio_base64 is not None:
        path = ctx.workdir / "narration.input"
        field = await ctx.fetch_media(path, url=params.audio, data=params.audio_base64,
                                      fields=("audio", "audio_base64"))
    else:
        return None, None, "duration_s"
    audio, _info = await ctx.in_thread(functools.partial(
        media_in.load_audio, path, max_duration_s=ctx.settings.max_video_duration_s,
        timeout_s=ctx.settings.media_timeout_s, field=field, cancel=ctx.cancel,
    ))
    return path, audio, field


async def _captions(ctx: JobContext, audio: np.ndarray) -> Path:
    with ctx.timings.measure("captions"):
        # With the default Whisper model, in a GPU slot like any transcription; timed by whisper.transcribe.
        compute_type = compute_types.chosen(ctx.settings, ctx.runtime.device, None, sequential=True)
        pipelines = await ctx.load(lambda: whisper_pipeline.get_pipelines(ctx.runtime, ctx.settings.whisper_model,
                                                                          compute_type))
        words = await ctx.on_model(pipelines, lambda pipeline: word_timings(pipeline, audio, ctx.cancel),
                                   stage="captions_run",
                                   working=whisper_pipeline.pipeline_working_bytes(pipelines.first, batch=1, beams=5))
        path = ctx.workdir / "captions.srt"
        write_srt(cues_from_words(words), path)
    return path


def _generate(ctx: JobContext, pipeline: Any, params: VideoInput, plan: SegmentPlan, writer: media_out.FrameWriter,
              size: tuple[int, int], seed: int) -> np.ndarray:
    width, height = size
    joiner = Joiner(writer, plan)
    progress = Progress(ctx.job, enabled=ctx.settings.post_progress)
    count = len(plan.segments)
    options: dict[str, Any] = {"prompt": params.prompt, "height": height, "width": width,
                               "num_inference_steps": params.num_inference_steps, "output_type": "np"}
    if params.negative_prompt is not None:
        options["negative_prompt"] = params.negative_prompt
    if params.guidance_scale is not None:
        options["guidance_scale"] = params.guidance_scale
    for index, frames in enumerate(plan.segments):
        ctx.cancel.check()
        callback = step_callback(ctx.cancel, progress, params.num_inference_steps,
                                 label=f"segment {index + 1}/{count}, ")
        generator = torch.Generator("cpu").manual_seed(seed + index)
        output = pipeline(**options, num_frames=frames, generator=generator, callback_on_step_end=callback)
        joiner.add(to_uint8(np.asarray(output.frames[0])), last=index == count - 1)
    assert joiner.poster is not None
    poster: np.ndarray = joiner.poster
    return poster


def _refuse_unfitting(ctx: JobContext, params: VideoInput, need: int, size: tuple[int, int], frames: int) -> None:
    """INPUT_TOO_LARGE for a video whose segments could never fit the GPU memory budget (``need``
    bytes with the model's weights)."""
    ctx.runtime.residency.check_fits(need, field=_size_field(params),
                                     what=f"a segment of {frames} frames of {size[0]}x{size[1]}")


async def _render(ctx: JobContext, params: VideoInput, plan: SegmentPlan, size: tuple[int, int], seed: int,
                  model: str) -> tuple[Path, np.ndarray]:
    frames = max(plan.segments)
    working = loading.video_working_bytes(*size, frames)
    _refuse_unfitting(ctx, params, loading.least_device_weights(ctx.runtime, model, video=True) + working, size,
                      frames)
    pipelines = await ctx.load(lambda: get_pipelines(ctx.runtime, model))
    _refuse_unfitting(ctx, params, pipelines.running_bytes + working, size, frames)
    path = ctx.workdir / "frames.mp4"
    writer = media_out.FrameWriter(path, width=size[0], height=size[1], fps=params.fps, hold=plan.hold,
                               timeout_s=ctx.settings.media_timeout_s, cancel=ctx.cancel)
    try:
        poster = await ctx.on_model(
            pipelines, lambda pipeline: _generate(ctx, pipeline, params, plan, writer, size, seed), stage="generate",
            working=working,
        )
    except BaseException:
        writer.abort()
        raise
    with ctx.timings.measure("mux"):
        await ctx.in_thread(writer.close)
    return path, poster


async def run(ctx: JobContext, params: VideoInput) -> dict[str, Any]:
    _check_limits(ctx, params)
    model = params.model or ctx.settings.video_model
    # A seeded request without a narration file has one answer to remember (a file would need hashing).
    cacheable = params.seed is not None and params.audio is None and params.audio_base64 is None
    key = await ctx.generation_key(params, CACHE, deterministic=cacheable)
    return await ctx.cached(key, CACHE, lambda: _make(ctx, params, model))


def _shaping(settings: Settings, params: VideoInput) -> dict[str, Any]:
    """What decides a video: every field, the video model, how long its clips are, its precision
    and the speed-ups that approximate (cache, attention backend), the voice of a spoken narration
    and the Whisper model (and its format) that times its captions."""
    narrated = params.narration is not None
    return {
        **input_fields(params), "model": params.model or settings.video_model,
        "clip_frames": settings.video_clip_frames, "precision": settings.precision,
        "cache": (settings.video_cache, settings.video_cache_threshold),
        "attention_backend": settings.video_attention_backend,
        "narration_model": settings.tts_model if narrated else None,
        "captions_model": (settings.whisper_model, settings.whisper_compute_type) if params.captions != "none"
        else None,
    }


CACHE: CachePolicy[VideoInput] = CachePolicy(
    outputs=frozenset({"model", "seed", "width", "height", "fps", "frames", "duration_s", "segments",
                       "segment_frames", "narrated", "captions", "files"}),
    shaping=_shaping,
    models={"model": model_identity, "narration_model": model_identity,
            "captions_model": whisper_identity},
)


async def _make(ctx: JobContext, params: VideoInput, model: str) -> dict[str, Any]:
    family = await ctx.in_thread(lambda: model_family(ctx, model))
    size = _frame_size(ctx, params, family)
    # Before anything loads: a narration can only add segments, never make them longer.
    least = plan_segments(math.ceil(params.duration_s * params.fps), family, fps=params.fps,
                          clip_frames=ctx.settings.video_clip_frames)
    need = (loading.least_device_weights(ctx.runtime, model, video=True)
            + loading.video_working_bytes(*size, max(least.segments)))
    _refuse_unfitting(ctx, params, need, size, max(least.segments))
    seed = params.seed if params.seed is not None else new_seed()
    narration, samples, narration_field = await _narration(ctx, params)
    duration = max(params.duration_s, samples.size / media_in.SAMPLE_RATE if samples is not None else 0.0)
    total = _check_duration(ctx, duration, params.fps, field=narration_field)
    plan = plan_segments(total, family, fps=params.fps, clip_frames=ctx.settings.video_clip_frames)
    subtitles = await _captions(ctx, samples) if params.captions != "none" and samples is not None else None
    frames_path, poster = await _render(ctx, params, plan, size, seed, model)
    video = ctx.workdir / "video.mp4"
    frames = plan.frames + plan.hold
    with ctx.timings.measure("mux"):
        await ctx.in_thread(functools.partial(
            media_out.finish_video, frames_path, video, audio=narration, subtitles=subtitles,
            burn=params.captions == "burned", font_size=14 if size[1] > size[0] else 18,
            duration_s=frames / params.fps, timeout_s=ctx.settings.media_timeout_s, cancel=ctx.cancel,
            audio_field=narration_field,
        ))
    poster_path = ctx.workdir / "poster.jpg"
    await ctx.in_thread(lambda: _save_poster(poster, poster_path))
    files = [(video, video.name, "video/mp4"), (poster_path, poster_path.name, "image/jpeg")]
    if subtitles is not None:
        files.append((subtitles, subtitles.name, "application/x-subrip"))
    return {
        "model": model, "seed": seed, "width": size[0], "height": size[1], "fps": params.fps,
        "frames": frames, "duration_s": round(frames / params.fps, 3), "segments": len(plan.segments),
        "segment_frames": list(plan.segments), "narrated": narration is not None, "captions": params.captions,
        "files": await ctx.save_files(files),
    }


def _save_poster(frame: np.ndarray, path: Path) -> None:
    from PIL import Image

    Image.fromarray(frame).save(path, format="JPEG", quality=90)


TASK: Task[VideoInput] = Task(name="text2video", input_model=VideoInput, run=run, preload=preload, cache=CACHE)
