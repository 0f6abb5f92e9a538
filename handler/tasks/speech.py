"""``speech``: text in, a 16-bit WAV narration out (transformers VITS / MMS-TTS class models).

Long text is split at sentence boundaries, each sentence synthesised on its own, and the
pieces joined with a short pause; ``text2video`` uses the same code for its narration.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from handler.errors import InputTooLarge, InvalidInput
from handler.io import media
from handler.job import JobContext
from handler.runtime.cancel import CancelToken
from handler.runtime.container import Runtime
from handler.runtime.hub import model_identity, pretrained_source
from handler.runtime.instances import InstancePool
from handler.runtime.registry import PipelineKey
from handler.task import VIDEO_SHAPING, CachePolicy, Task, TaskInput, input_fields, new_seed

_SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+")
_SOFT_BREAK = re.compile(r"(?<=[,])\s+|\s+")
# VITS attends over the whole input at once; longer pieces cost quadratic memory.
_MAX_PIECE_CHARS = 400
_PAUSE_S = 0.2


class SpeechInput(TaskInput):
    """Input of the ``speech`` task."""

    task: Literal["speech"] = "speech"
    text: str = Field(min_length=1, description="what to say")
    model: str | None = Field(None, description="speech model; default TTS_MODEL")
    speaking_rate: float = Field(1.0, ge=0.5, le=2.0, description="1.0 is the model's own pace")
    seed: int | None = Field(None, ge=0, le=2**32 - 1, description="fixes the voice's random variation")


def split_sentences(text: str, *, max_chars: int = _MAX_PIECE_CHARS) -> list[str]:
    """Sentences of ``text``; a sentence over ``max_chars`` is cut at commas, then spaces."""
    pieces: list[str] = []
    for sentence in _SENTENCE_END.split(text.strip()):
        sentence = sentence.strip()
        while len(sentence) > max_chars:
            cut = max((m.start() for m in _SOFT_BREAK.finditer(sentence, 0, max_chars)), default=max_chars)
            pieces.append(sentence[:cut].strip())
            sentence = sentence[cut:].strip()
        if sentence:
            pieces.append(sentence)
    return pieces


@dataclass
class SpeechPipeline:
    """A VITS model and its tokenizer; one job at a time (the pace is set on the model)."""

    model: Any  # transformers.VitsModel
    tokenizer: Any
    name: str
    device: str

    def __post_init__(self) -> None:
        self._in_use = threading.Lock()

    @property
    def sample_rate(self) -> int:
        return int(self.model.config.sampling_rate)

    def speakable(self, pieces: list[str]) -> list[str]:
        """The pieces the tokenizer makes any input of (emoji alone make none)."""
        return [piece for piece in pieces if len(self.tokenizer(piece)["input_ids"]) > 0]

    def synthesize(self, pieces: list[str], *, speaking_rate: float, seed: int, cancel: CancelToken) -> np.ndarray:
        pause = np.zeros(int(_PAUSE_S * self.sample_rate), dtype=np.float32)
        parts: list[np.ndarray] = []
        with self._in_use, torch.random.fork_rng(devices=[]), torch.inference_mode():
            self.model.speaking_rate = speaking_rate
            for index, piece in enumerate(pieces):
                cancel.check()
                torch.manual_seed(seed + index)
                inputs = self.tokenizer(piece, return_tensors="pt").to(self.device)
                if inputs["input_ids"].shape[-1] == 0:
                    continue
                waveform = self.model(**inputs).waveform[0].float().cpu().numpy()
                if parts:
                    parts.append(pause)
                parts.append(waveform)
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)


def _load(name: str, runtime: Runtime) -> SpeechPipeline:
    # Imported here: transformers costs seconds at start-up, and most jobs never speak.
    from transformers import AutoTokenizer, VitsModel

    source, options = pretrained_source(name, runtime.settings)
    model: Any = VitsModel.from_pretrained(source, **options)
    model = model.to(runtime.device).eval()
    tokenizer = AutoTokenizer.from_pretrained(source, **options)
    return SpeechPipeline(model, tokenizer, name, runtime.device)


def get_pipelines(runtime: Runtime, name: str) -> InstancePool[SpeechPipeline]:
    key = PipelineKey("speech", name, runtime.device, "float32")
    count = runtime.settings.model_instances
    return runtime.registry.get(key, lambda: InstancePool.build(count, lambda: _load(name, runtime)))


def preload(runtime: Runtime) -> None:
    get_pipelines(runtime, runtime.settings.tts_model)


def check_text(ctx: JobContext, text: str, *, field: str = "text") -> list[str]:
    """The pieces to synthesise, after the length limit; refused before any model work."""
    limit = ctx.settings.max_speech_chars
    if len(text) > limit:
        raise InputTooLarge(f"{field}: {len(text)} characters, the limit is {limit}", field=field)
    pieces = split_sentences(text)
    if not pieces:
        raise InvalidInput(f"{field}: nothing to say", field=field)
    return pieces


def model_name(ctx: JobContext, requested: str | None) -> str:
    name = requested or ctx.settings.tts_model
    if name != ctx.settings.tts_model:
        raise InvalidInput(f"model: {name!r} is not served here; use {ctx.settings.tts_model!r}", field="model")
    return name


async def synthesize(
    ctx: JobContext, pieces: list[str], *, model: str, speaking_rate: float, seed: int, field: str = "text"
) -> tuple[np.ndarray, int]:
    """Narration samples (float32, mono) and their rate; loads the model and takes a GPU slot.

    Text with nothing the model can say is refused before the GPU slot.
    """
    pipelines = await ctx.load(lambda: get_pipelines(ctx.runtime, model))
    pieces = pipelines.first.speakable(pieces)
    if not pieces:
        raise InvalidInput(f"{field}: nothing speakable (no letters the voice knows)", field=field)
    samples = await ctx.on_model(
        pipelines,
        lambda pipeline: pipeline.synthesize(pieces, speaking_rate=speaking_rate, seed=seed, cancel=ctx.cancel),
        stage="speech",
    )
    if samples.size == 0:
        raise InvalidInput(f"{field}: nothing speakable", field=field)
    return samples, pipelines.first.sample_rate


async def run(ctx: JobContext, params: SpeechInput) -> dict[str, Any]:
    pieces = check_text(ctx, params.text)
    model = model_name(ctx, params.model)
    # Only a seeded request has one answer to remember.
    key = await ctx.generation_key(params, CACHE, deterministic=params.seed is not None)
    return await ctx.cached(key, CACHE, lambda: _speak(ctx, params, model, pieces))


CACHE: CachePolicy[SpeechInput] = CachePolicy(
    outputs=frozenset({"model", "seed", "sample_rate", "duration_s", "sentences", "files"}),
    shaping=lambda settings, params: {**input_fields(params), "model": params.model or settings.tts_model},
    models={"model": model_identity},
    unaffected=frozenset({"whisper_model", "whisper_model_map", "whisper_batch_size", "image_model", "video_model",
                          "video_clip_frames", *VIDEO_SHAPING,
                          # VITS runs in fp32 on every device (see _load).
                          "precision"}),
)


async def _speak(ctx: JobContext, params: SpeechInput, model: str, pieces: list[str]) -> dict[str, Any]:
    seed = params.seed if params.seed is not None else new_seed()
    samples, rate = await synthesize(ctx, pieces, model=model, speaking_rate=params.speaking_rate, seed=seed)
    path = ctx.workdir / "speech.wav"
    media.write_wav(path, samples, rate)
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
