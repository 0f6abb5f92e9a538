"""``speech``: text in, a 16-bit WAV narration out (transformers VITS / MMS-TTS class models).

The synthesis itself (sentences spoken one by one, joined with a short pause) is
handler.pipelines.speech.pipeline, which ``text2video``'s narration uses too.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import Field

from handler.io import media_out
from handler.job import JobContext
from handler.limits import served_model
from handler.pipelines.speech.pipeline import get_pipelines, pieces_to_say, working_bytes
from handler.pipelines.weights import model_identity
from handler.runtime.container import Runtime
from handler.task_interface import CachePolicy, Task, TaskInput, input_fields, new_seed


class SpeechInput(TaskInput):
    """Input of the ``speech`` task."""

    task: Literal["speech"] = "speech"
    text: str = Field(min_length=1, description="what to say")
    model: str | None = Field(None, description="speech model; default TTS_MODEL")
    speaking_rate: float = Field(1.0, ge=0.5, le=2.0, description="1.0 is the model's own pace")
    seed: int | None = Field(None, ge=0, le=2**32 - 1, description="fixes the voice's random variation")


def preload(runtime: Runtime) -> None:
    """Load the default model and place it on the device (a resident like any, parked when idle and
    needed elsewhere)."""
    pipelines = get_pipelines(runtime, runtime.settings.tts_model)
    runtime.residency.place(pipelines, timeout=runtime.settings.generation_acquire_timeout)


async def synthesize(
    ctx: JobContext, pieces: list[str], *, model: str, speaking_rate: float, seed: int, field: str = "text"
) -> tuple[np.ndarray, int]:
    """Narration samples (float32, mono) and their rate; loads the model and takes a GPU slot.

    Text with nothing the model can say is refused before the GPU slot.
    """
    pipelines = await ctx.load(lambda: get_pipelines(ctx.runtime, model))
    pieces = pipelines.first.speakable(pieces, field=field)
    samples = await ctx.on_model(pipelines, lambda pipeline: pipeline.synthesize(
        pieces, speaking_rate=speaking_rate, seed=seed, cancel=ctx.cancel, field=field), stage="speech",
        working=working_bytes(pieces))
    return samples, pipelines.first.sample_rate


async def run(ctx: JobContext, params: SpeechInput) -> dict[str, Any]:
    pieces = pieces_to_say(params.text, limit=ctx.settings.max_speech_chars)
    model = served_model(params.model or None, ctx.settings.tts_model)  # "" asks for the default here
    # Only a seeded request has one answer to remember.
    key = await ctx.generation_key(params, CACHE, deterministic=params.seed is not None)
    return await ctx.cached(key, CACHE, lambda: _speak(ctx, params, model, pieces))


CACHE: CachePolicy[SpeechInput] = CachePolicy(
    outputs=frozenset({"model", "seed", "sample_rate", "duration_s", "sentences", "files"}),
    shaping=lambda settings, params: {**input_fields(params), "model": params.model or settings.tts_model},
    models={"model": model_identity},
)


async def _speak(ctx: JobContext, params: SpeechInput, model: str, pieces: list[str]) -> dict[str, Any]:
    seed = params.seed if params.seed is not None else new_seed()
    samples, rate = await synthesize(ctx, pieces, model=model, speaking_rate=params.speaking_rate, seed=seed)
    path = ctx.workdir / "speech.wav"
    media_out.write_wav(path, samples, rate)
    files = await ctx.save_files([(path, "speech.wav", "audio/wav")])
    return {
        "model": model,
        "seed": seed,
        "sample_rate": rate,
        "duration_s": round(samples.size / rate, 3),
        "sentences": len(pieces),
        "files": files,
    }


TASK: Task[SpeechInput] = Task(name="speech", input_model=SpeechInput, run=run, preload=preload, cache=CACHE)
