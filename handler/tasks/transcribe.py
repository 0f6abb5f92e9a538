"""``transcribe``: audio or video in, text, segments, word timings and SRT/VTT out.

Field names follow runpod-workers/worker-faster_whisper where the meaning is the same, so
its clients can switch endpoints without changes.

The batched path (the default) transcribes in chunks, in batches shared by every job the worker
holds. A recording is cut into chunks of at most 30 s (speech found by Silero VAD, or fixed windows
cut at quiet points), their log-mel windows are computed on the CPU, and the windows go to the
model's batcher a round at a time by the engine's driver (``decoding.transcribe_windows``: each
window is prompted with the text of the window before it in its section, so a section's next
window waits for its last): windows of every job held by this worker with the same decode options
join the same batches
(one encoder pass, one decoder loop), each job getting back its own segments. The batcher keeps each job's
cancellation and error its own, and retries a batch that ran out of GPU memory in halves
(:mod:`handler.runtime.batcher`).

With ``diarize``, speaker diarization (:mod:`handler.pipelines.diarize`) starts as soon as the audio
is decoded and runs beside the decoding: one Silero pass gives both the decoding's chunks and the
speaker regions, the voice encoder takes a slot between Whisper's batches, and the speakers are put
on the words (always timed, then) and segments once both are done.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import io
import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from torch import Tensor
from whisper.tokenizer import LANGUAGES, TO_LANGUAGE_CODE
from whisper.utils import WriteSRT, WriteVTT

from handler.cancel import CancelToken
from handler.config import WHISPER_COMPUTE_TYPES, Settings
from handler.errors import InputTooLarge, InvalidInput, shown
from handler.io import media_in
from handler.job import JobContext
from handler.limits import served_model
from handler.pipelines.diarize import labels
from handler.pipelines.diarize import pipeline as diarization
from handler.pipelines.weights import file_identity, whisper_identity
from handler.pipelines.whisper import compute_types, decoding, vad
from handler.pipelines.whisper.options import DecodeOptions
from handler.pipelines.whisper.pipeline import WhisperPipeline, get_pipelines, pipeline_working_bytes
from handler.pipelines.whisper.transcript import is_silent, plain, temperatures, words
from handler.pipelines.whisper.windows import WindowInput, language_mel, prepare_windows
from handler.runtime.batcher import Batcher
from handler.runtime.container import Runtime
from handler.runtime.instances import InstancePool
from handler.runtime.progress import Progress
from handler.task_interface import CachePolicy, Task, TaskInput, input_fields

TextFormat = Literal["plain_text", "formatted_text", "srt", "vtt"]


def _format_name(value: Any) -> Any:
    """``"plain text"``, ``"Plain-Text"``: the spellings other workers' clients send, as ``plain_text``."""
    if isinstance(value, str):
        return value.strip().lower().replace(" ", "_").replace("-", "_")
    return value


Format = Annotated[TextFormat, BeforeValidator(_format_name)]
# Token ids as worker-faster_whisper's clients send them: "-1", "-1,50362", "1, 2, 3".
_SUPPRESS_TOKENS = re.compile(r"\s*-?\d{1,6}\s*(,\s*-?\d{1,6}\s*)*")
_INPUT_NAME = "input.media"
# Reference voices of known speakers: how many a job may name, and how long each clip may be.
MAX_KNOWN_SPEAKERS = 4
MAX_REFERENCE_S = 30.0
_MIN_REFERENCE_SPEECH_S = 1.0
# A speaker's name is a VTT voice tag and an SRT prefix: no markup or line breaks in it.
_SPEAKER_NAME = r"^[^<>\[\]&\r\n\t]{1,64}$"


class KnownSpeaker(BaseModel):
    """A voice to name: a short clip of that speaker alone (5-10 s of speech is plenty)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(..., pattern=_SPEAKER_NAME, description="the label this voice gets")
    audio: str | None = Field(None, description="https URL or s3://bucket/key of the reference clip")
    audio_base64: str | None = Field(None, description="the reference clip, base64")

    @model_validator(mode="after")
    def _one_source(self) -> KnownSpeaker:
        if (self.audio is None) == (self.audio_base64 is None):
            raise ValueError("give exactly one of audio or audio_base64")
        self.name = self.name.strip()
        if not self.name:
            raise ValueError("name: empty")
        return self


class TranscribeInput(TaskInput):
    """Input of the ``transcribe`` task."""

    task: Literal["transcribe"] = "transcribe"
    audio: str | None = Field(None, description="https URL or s3://bucket/key of the media")
    audio_base64: str | None = Field(None, description="the media file, base64")
    delete_after_read: bool = Field(False, description="delete the uploaded s3:// object once it has been read")
    model: str | None = Field(None, description="Whisper model; default WHISPER_MODEL")
    transcription: Format = "plain_text"
    translate: bool = False
    translation: Format = "plain_text"
    language: str | None = Field(None, description="spoken language; detected when omitted")
    temperature: float = Field(0.0, ge=0.0, le=1.0)
    # At least 0.1: at most 11 temperatures, so fallback can decode a window at most 11 times.
    temperature_increment_on_fallback: float | None = Field(0.2, ge=0.1, le=1.0)
    best_of: int = Field(5, ge=1, le=10)
    beam_size: int = Field(5, ge=1, le=10)
    # Beam search keeps beam_size * patience candidates: bounded like the beam.
    patience: float | None = Field(None, gt=0.0, le=2.0)
    length_penalty: float | None = Field(None, ge=0.0, le=1.0)
    suppress_tokens: str = Field("-1", max_length=2000, description='"-1" or comma-separated token ids')
    initial_prompt: str | None = Field(None, max_length=4000)
    condition_on_previous_text: bool = True
    compression_ratio_threshold: float | None = Field(2.4, ge=1.0, le=10.0)
    logprob_threshold: float | None = Field(-1.0, ge=-20.0, le=0.0)
    no_speech_threshold: float | None = Field(0.6, ge=0.0, le=1.0)
    # Unset: speech chunks on the batched path (the accurate cut, bench/RESULTS.md); false: the
    # whole recording in 30 s windows, as worker-faster_whisper decodes everything without VAD.
    enable_vad: bool | None = Field(None, description="decode only speech, found by Silero VAD (unset: "
                                    "yes on the batched path); false: the whole recording")
    word_timestamps: bool = False
    batch_size: int | None = Field(None, ge=1, le=64, description="chunks decoded together (default "
                                   "WHISPER_BATCH_SIZE); 1 without VAD is openai-whisper's sequential transcribe")
    compute_type: Literal[WHISPER_COMPUTE_TYPES] | None = Field(  # type: ignore[valid-type]
        None, description="number format Whisper runs in: auto, float32, int8 (CPU), float16, bfloat16 "
        "(default WHISPER_COMPUTE_TYPE)")
    diarize: bool = Field(False, description="label who speaks: a speaker on each segment and word, "
                          "segments split where the speaker changes")
    num_speakers: int | None = Field(None, ge=1, le=diarization.MAX_SPEAKERS,
                                     description="with diarize: exactly this many speakers")
    min_speakers: int | None = Field(None, ge=1, le=diarization.MAX_SPEAKERS,
                                     description="with diarize: at least this many speakers")
    max_speakers: int | None = Field(None, ge=1, le=diarization.MAX_SPEAKERS,
                                     description="with diarize: at most this many speakers")
    known_speakers: list[KnownSpeaker] | None = Field(
        None, max_length=MAX_KNOWN_SPEAKERS, description="with diarize: up to 4 {name, audio | audio_base64} "
        f"clips of speakers to name (at most {MAX_REFERENCE_S:g} s each)")

    @model_validator(mode="after")
    def _check(self) -> TranscribeInput:
        if (self.audio is None) == (self.audio_base64 is None):
            raise ValueError("give exactly one of audio or audio_base64")
        if not _SUPPRESS_TOKENS.fullmatch(self.suppress_tokens):
            raise ValueError("suppress_tokens must be -1 or comma-separated token ids")
        self.suppress_tokens = ",".join(str(int(t)) for t in self.suppress_tokens.split(","))
        if self.language is not None:
            self.language = _language_code(self.language)
        self._check_speakers()
        return self

    def _check_speakers(self) -> None:
        speaker_fields = ("num_speakers", "min_speakers", "max_speakers", "known_speakers")
        if not self.diarize:
            for name in speaker_fields:
                if getattr(self, name) is not None:
                    raise InvalidInput(f"{name}: needs diarize", field=name)
            return
        if self.translate:
            raise InvalidInput("diarize: not with translate (speakers are labelled on the transcription)",
                               field="diarize")
        if self.num_speakers is not None and (self.min_speakers is not None or self.max_speakers is not None):
            raise InvalidInput("num_speakers: give either num_speakers or min_speakers/max_speakers",
                               field="num_speakers")
        if self.min_speakers is not None and self.max_speakers is not None and self.min_speakers > self.max_speakers:
            raise InvalidInput(f"min_speakers: {self.min_speakers} is more than max_speakers {self.max_speakers}",
                               field="min_speakers")
        known = self.known_speakers or []
        names = [speaker.name for speaker in known]
        if len(set(names)) != len(names):
            raise InvalidInput("known_speakers: two speakers have the same name", field="known_speakers")
        most = self.num_speakers or self.max_speakers
        if most is not None and len(known) > most:
            raise InvalidInput(f"known_speakers: {len(known)} known speakers but at most {most} speakers",
                               field="known_speakers")

    def speaker_bounds(self) -> diarization.SpeakerBounds:
        return diarization.SpeakerBounds(num=self.num_speakers, low=self.min_speakers or 1,
                                         high=self.max_speakers or diarization.MAX_SPEAKERS)

    def decode_options(self) -> dict[str, Any]:
        """Keyword arguments for ``whisper.transcribe``."""
        options: dict[str, Any] = {
            "temperature": temperatures(self.temperature, self.temperature_increment_on_fallback),
            "compression_ratio_threshold": self.compression_ratio_threshold,
            "logprob_threshold": self.logprob_threshold,
            "no_speech_threshold": self.no_speech_threshold,
            "condition_on_previous_text": self.condition_on_previous_text,
            "initial_prompt": self.initial_prompt,
            # Diarization gives each word its speaker, and cuts segments between words.
            "word_timestamps": self.word_timestamps or self.diarize,
            "language": self.language,
            "beam_size": self.beam_size,
            "best_of": self.best_of,
            "patience": self.patience,
            "length_penalty": self.length_penalty,
            "suppress_tokens": self.suppress_tokens,
        }
        return options


def _language_code(value: str) -> str:
    code = value[:40].strip().lower()  # no language name is longer; a client's megabytes are not read
    if code in LANGUAGES:
        return code
    if code in TO_LANGUAGE_CODE:
        return str(TO_LANGUAGE_CODE[code])
    raise ValueError(f"language: unknown language {shown(value)}")


# The job: its media fetched and decoded, its model loaded, transcribed (from the result cache when it
# can be), its output written.

async def run(ctx: JobContext, params: TranscribeInput) -> dict[str, Any]:
    model = _model_name(ctx.settings, params)
    target, field = await _fetch(ctx, params)
    references = await _fetch_references(ctx, params)
    key = None
    if ctx.caching(params):
        files = [target, *(reference.path for reference in references)]
        media = ":".join([await ctx.in_thread(functools.partial(file_identity, path, remember=False))
                          for path in files])
        key = await ctx.cache_key(params, CACHE, media=media)
    return await ctx.cached(key, CACHE, lambda: _transcribe(ctx, params, model, target, field, references))


async def _transcribe(
    ctx: JobContext, params: TranscribeInput, model: str, target: Path, field: str, references: list[_Reference]
) -> dict[str, Any]:
    audio, duration_s = await _decode(ctx, target, field)
    compute_type = _compute_type(ctx, params)
    pipelines = await ctx.load(lambda: get_pipelines(ctx.runtime, model, compute_type))
    _check_language_support(pipelines.first, params)
    _check_suppress_tokens(pipelines.first, params)
    # Started first, so that its work runs while Whisper decodes; one Silero pass serves both.
    diarizing = vad_pass = None
    if params.diarize:
        vad_pass = asyncio.ensure_future(ctx.in_thread(lambda: vad.speech_probabilities(audio, cancel=ctx.cancel)))
        diarizing = asyncio.ensure_future(_diarize(ctx, params, audio, references, vad_pass))
    try:
        result, translation = await _transcript_and_translation(ctx, pipelines, audio, params, vad_pass)
        turns = await diarizing if diarizing is not None else None
    finally:
        for pending in (diarizing, vad_pass):
            if pending is not None and not pending.done():
                pending.cancel()
            elif pending is not None and not pending.cancelled():
                pending.exception()  # seen, so a failure behind the decoding's own is not logged as lost
    if turns is not None:
        result = {**result, "segments": labels.label_segments(result["segments"], turns)}
    output: dict[str, Any] = {
        "transcription": format_text(result, params.transcription),
        "translation": format_text(translation, params.translation) if translation else None,
        "detected_language": result.get("language"),
        "segments": _segments(result),
        "translation_segments": _segments(translation) if translation else None,
        "device": ctx.runtime.device,
        "model": model,
        "compute_type": compute_type,
        "duration_s": round(duration_s, 3),
    }
    if params.word_timestamps:
        output["word_timestamps"] = words(result)
    if turns is not None:
        output["speakers"] = labels.speaker_summary(turns)
    output["files"] = await _store(ctx, result, output)
    return output


def _model_name(settings: Settings, params: TranscribeInput) -> str:
    """The served model a job gets: its own choice, or the one WHISPER_MODEL_MAP maps it to."""
    return served_model(params.model or None, settings.whisper_model, others=settings.whisper_models,
                        aliases=settings.whisper_model_map)


def _batch_size(settings: Settings, params: TranscribeInput) -> int:
    return params.batch_size or settings.whisper_batch_size


def _sequential(settings: Settings, params: TranscribeInput) -> bool:
    """Whether the job runs openai-whisper's own ``transcribe`` (one window after another, no VAD)."""
    return _batch_size(settings, params) == 1 and not params.enable_vad


def _compute_type(ctx: JobContext, params: TranscribeInput) -> str:
    return compute_types.chosen(ctx.settings, ctx.runtime.device, params.compute_type,
                                sequential=_sequential(ctx.settings, params))


def _check_language_support(pipeline: WhisperPipeline, params: TranscribeInput) -> None:
    """An English-only model hears English alone; its translation into English is its transcript."""
    if pipeline.is_multilingual:
        return
    if params.language not in (None, "en"):
        raise InvalidInput(
            f"language: model {pipeline.name!r} is English-only, not {params.language!r}",
            field="language",
        )


def _check_suppress_tokens(pipeline: WhisperPipeline, params: TranscribeInput) -> None:
    """Token ids must exist in the served model's vocabulary (on CUDA, one that does not is a
    device-side assert that kills the worker)."""
    vocabulary = int(pipeline.model.dims.n_vocab)
    for token in (int(t) for t in params.suppress_tokens.split(",")):
        if token != -1 and not 0 <= token < vocabulary:
            raise InvalidInput(f"suppress_tokens: {token} is not a token of model {pipeline.name!r} "
                               f"(ids 0-{vocabulary - 1}, or -1)", field="suppress_tokens")


async def _fetch(ctx: JobContext, params: TranscribeInput) -> tuple[Path, str]:
    """The job's media file in its directory, and the field it came from."""
    target = ctx.workdir / _INPUT_NAME
    field = await ctx.fetch_media(target, url=params.audio, data=params.audio_base64,
                                  fields=("audio", "audio_base64"), delete_after_read=params.delete_after_read)
    return target, field


async def _decode(ctx: JobContext, target: Path, field: str) -> tuple[np.ndarray, float]:
    with ctx.timings.measure("decode"):
        audio, info = await ctx.in_thread(functools.partial(
            media_in.load_audio, target, max_duration_s=ctx.settings.max_audio_duration_s,
            timeout_s=ctx.settings.media_timeout_s, field=field, cancel=ctx.cancel,
        ))
    return audio, info.audio_duration_s


def preload(runtime: Runtime) -> None:
    """Load the default model and pay its first-call costs, so a cold worker's first job is not slower."""
    settings = runtime.settings
    pipelines = get_pipelines(runtime, settings.whisper_model)  # in the format of a job that names none
    timeout = runtime.settings.generation_acquire_timeout
    # Placed on the device (one more resident, parked when idle and needed elsewhere), and borrowed:
    # on CUDA the warm-up decodes, and a job taken meanwhile may be using the first copy.
    working = pipeline_working_bytes(pipelines.first, batch=1, beams=1)
    with runtime.residency.hold(pipelines, working=working, timeout=timeout), pipelines.borrow(timeout) as pipeline:
        pipeline.warm_up()
    if runtime.settings.result_cache and runtime.settings.bucket is not None:  # hash the weights now, not in a job
        whisper_identity(runtime.settings.whisper_model, runtime.settings)


# The transcript: openai-whisper's own sequential path, or the job's chunks in batches shared with
# the worker's other jobs, their rounds driven by decoding.transcribe_windows.

async def _transcript_and_translation(
    ctx: JobContext, pipelines: InstancePool[WhisperPipeline], audio: np.ndarray, params: TranscribeInput,
    vad_pass: asyncio.Future[list[float]] | None = None,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Transcription (and translation): nothing to decode in silence; openai-whisper's own sequential
    path for ``batch_size`` 1 without VAD, else chunks in batches shared with the worker's other jobs."""
    if is_silent(audio):
        empty: dict[str, Any] = {"text": "", "segments": [], "language": params.language}
        return empty, (empty if params.translate else None)
    if _sequential(ctx.settings, params):
        working = pipeline_working_bytes(pipelines.first, batch=1, beams=params.beam_size)
        return await ctx.on_model(
            pipelines, lambda pipeline: _transcribe_sequentially(pipeline, audio, params, ctx.cancel), working=working)
    model = pipelines.first.model
    with ctx.timings.measure("chunk"):
        speech_only = params.enable_vad is not False
        probabilities = await vad_pass if vad_pass is not None and speech_only else None
        find = functools.partial(find_chunks, audio, enable_vad=speech_only, cancel=ctx.cancel,
                                 probabilities=probabilities)
        chunks = await ctx.in_thread(find)
        windows = await ctx.in_thread(lambda: prepare_windows(model, audio, chunks))
        detect = params.language is None and pipelines.first.is_multilingual
        first = await ctx.in_thread(lambda: language_mel(model, audio)) if detect else None
    options = params.decode_options()
    result = await _transcribe_batched(ctx, pipelines, windows, options={**options, "task": "transcribe"},
                                       batch_size=_batch_size(ctx.settings, params), first_30_s=first,
                                       on_segments=lambda found: ctx.emit("segments", {"segments": found}))
    translation = None
    if params.translate and not pipelines.first.is_multilingual:
        translation = result
    elif params.translate:
        translation = await _transcribe_batched(ctx, pipelines, windows, options={**options, "task": "translate"},
                                                batch_size=_batch_size(ctx.settings, params), first_30_s=first,
                                                label="translation ")
    return result, translation


def _transcribe_sequentially(
    pipeline: WhisperPipeline, audio: np.ndarray, params: TranscribeInput, cancel: CancelToken
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Transcription, and translation when asked, by ``whisper.transcribe``; runs inside a GPU slot."""
    options = params.decode_options()
    result = pipeline.transcribe(audio, task="transcribe", cancel=cancel, **options)
    translation = None
    if params.translate:
        translation = (pipeline.transcribe(audio, task="translate", cancel=cancel, **options)
                       if pipeline.is_multilingual else result)
    return result, translation


def find_chunks(audio: np.ndarray, *, enable_vad: bool, cancel: CancelToken,
                probabilities: list[float] | None = None) -> list[vad.Chunk]:
    """Speech chunks (VAD, stopping when the job is cancelled; from its pass ``probabilities`` when
    made already) or windows covering everything, each at most 30 s; on the CPU."""
    if not enable_vad:
        return vad.fixed_chunks(audio)
    return vad.speech_chunks(audio, cancel=cancel, probabilities=probabilities)


Segments = list[dict[str, Any]]
# The most chunks of all jobs in one batch (batch_size's own bound, or WHISPER_BATCH_SIZE if larger): a
# batch holds at most the largest batch_size of the jobs waiting, and at most batch_size chunks of each job.
_MAX_BATCH = 64


async def _transcribe_batched(
    ctx: JobContext, pipelines: InstancePool[WhisperPipeline], windows: list[WindowInput], *,
    options: dict[str, Any], batch_size: int, first_30_s: Tensor | None, label: str = "",
    on_segments: Callable[[Segments], None] | None = None,
) -> dict[str, Any]:
    """The transcript of a job's ``windows`` (``whisper.transcribe``'s result shape), their rounds
    decoded in the model's batches, which the windows of the worker's other jobs share.

    ``first_30_s`` (``windows.language_mel``) is where an unset language is detected;
    ``on_segments`` hears the segments in order as they are decoded (on a GPU thread).
    """
    model = pipelines.first.model
    decode_options = DecodeOptions.from_options(model, options, dtype=pipelines.first.dtype)
    if decode_options.language is None and windows:  # detected once, so the job's windows decode alike
        if first_30_s is None:
            raise ValueError("first_30_s: needed to detect the language")
        mel, unknown = first_30_s, decode_options
        decode_options = await ctx.on_model(pipelines, lambda p: p.with_language(unknown, mel), stage="language",
                                            working=pipeline_working_bytes(pipelines.first, batch=1, beams=1))
    progress = ChunkProgress(Progress(ctx.job, enabled=ctx.settings.post_progress), len(windows), label,
                             on_segments)
    batcher = _batcher(ctx.runtime, pipelines.first)

    async def decode(batch: list[tuple[int, WindowInput]]) -> list[Segments]:
        items = [_Item(window, decode_options, progress, pipelines, index) for index, window in batch]
        return await batcher.submit(decode_options, items, cancel=ctx.cancel, limit=batch_size)

    submitted = time.perf_counter()
    result = await decoding.transcribe_windows(model, windows, decode_options, width=batch_size, decode=decode)
    started = progress.first_started or submitted
    ctx.timings.add("queued", (started - submitted) * 1000)
    ctx.timings.add("run", (time.perf_counter() - started) * 1000)
    return result


def _batcher(runtime: Runtime, model: WhisperPipeline) -> Batcher[_Item, Segments]:
    """The model's batcher; it outlives every job, so it knows them only through their items."""
    timeout = runtime.settings.generation_acquire_timeout

    def run_batch(items: list[_Item]) -> list[Segments]:
        for item in items:
            item.progress.started()
        pool, options = items[0].pipelines, items[0].options
        beams = int(dict(options.passed_on).get("beam_size", 1))
        working = pipeline_working_bytes(pool.first, batch=len(items), beams=beams)
        with runtime.residency.hold(pool, working=working, timeout=timeout), pool.borrow(timeout) as pipeline:
            found = decoding.decode_windows(pipeline.model, [item.window for item in items], options)
        for item, segments in zip(items, found, strict=True):
            item.progress.advance()
            item.progress.decoded(item.index, segments)
        return found

    most = max(_MAX_BATCH, runtime.settings.whisper_batch_size)
    return runtime.batcher(("whisper", model.name, model.device, model.compute_type), run_batch, max_batch=most,
                           window_s=runtime.settings.whisper_batch_window_ms / 1000)


@dataclass(frozen=True, eq=False)
class _Item:
    """One window of one job, with the options its batch is decoded with."""

    window: WindowInput
    options: DecodeOptions
    progress: ChunkProgress
    pipelines: InstancePool[WhisperPipeline]
    # Its place among the job's windows.
    index: int = 0


class ChunkProgress:
    """One job's chunks in the batches: when the first began (its queued time ends there),
    ``chunk i/n`` reported (throttled) as they come back, and the job's segments handed to
    ``on_segments`` in time order as soon as every window before them is decoded."""

    def __init__(self, progress: Progress, total: int, label: str,
                 on_segments: Callable[[Segments], None] | None = None) -> None:
        self._progress = progress
        # The job's context: its lines carry its request id, whichever job's batch reports them.
        self._context = contextvars.copy_context()
        self._total = total
        self._label = label
        # Guards _done and first_started: batches of one job may run on different GPU threads.
        self._done_lock = threading.Lock()
        self._done = 0
        self.first_started: float | None = None
        self._on_segments = on_segments
        # Windows decoded but not yet handed on (an earlier one is still in a later batch); guarded too.
        self._decoded: dict[int, Segments] = {}
        self._next_window = 0

    def started(self) -> None:
        with self._done_lock:
            if self.first_started is None:
                self.first_started = time.perf_counter()

    def advance(self) -> None:
        with self._done_lock:  # also keeps the context entered by one thread at a time
            self._done += 1
            message = f"{self._label}chunk {self._done}/{self._total}"
            self._context.run(self._progress.report, message, force=self._done == self._total)

    def decoded(self, window: int, segments: Segments) -> None:
        """Window ``window``'s segments are known: hand on those now in order."""
        if self._on_segments is None:
            return
        with self._done_lock:  # one thread at a time, so segments go out in order
            self._decoded[window] = segments
            ready: Segments = []
            while self._next_window in self._decoded:
                ready.extend(self._decoded.pop(self._next_window))
                self._next_window += 1
            if ready:
                self._on_segments(ready)


# The output formats of worker-faster_whisper.

def format_text(result: dict[str, Any], fmt: TextFormat) -> str:
    """The transcript in one of the output formats of worker-faster_whisper; with speakers, SRT
    cues start ``[A] `` and VTT cues are voice spans ``<v A>``."""
    segments = result["segments"]
    if fmt == "plain_text":
        return " ".join(s["text"].strip() for s in segments)
    if fmt == "formatted_text":
        return "\n".join(s["text"].strip() for s in segments)
    if segments and "speaker" in segments[0]:  # one cue per segment, so one speaker per cue
        tag = "<v {}>" if fmt == "vtt" else "[{}] "
        segments = [{key: value for key, value in s.items() if key != "words"}
                    | {"text": tag.format(s["speaker"]) + s["text"].strip()} for s in segments]
        result = {**result, "segments": segments}
    writer = WriteSRT(".") if fmt == "srt" else WriteVTT(".")
    buffer = io.StringIO()
    writer.write_result(result, file=buffer)
    return buffer.getvalue()


def _segments(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Segments as worker-faster_whisper returns them (ids counted from 1, as faster-whisper does)."""
    keys = ("seek", "start", "end", "text", "tokens", "temperature", "avg_logprob",
            "compression_ratio", "no_speech_prob")
    return [{"id": number, **{key: plain(segment.get(key)) for key in keys},
             **({"speaker": segment["speaker"]} if "speaker" in segment else {})}
            for number, segment in enumerate(result["segments"], 1)]


def _write_files(ctx: JobContext, result: dict[str, Any]) -> list[tuple[Path, str, str]]:
    files = []
    subtitles: tuple[tuple[TextFormat, str], ...] = (("srt", "application/x-subrip"), ("vtt", "text/vtt"))
    for fmt, content_type in subtitles:
        path = ctx.workdir / f"transcript.{fmt}"
        path.write_text(format_text(result, fmt), encoding="utf-8")
        files.append((path, f"transcript.{fmt}", content_type))
    return files


async def _store(ctx: JobContext, result: dict[str, Any], output: dict[str, Any]) -> list[dict[str, Any]]:
    files = _write_files(ctx, result)
    if ctx.storage.durable:  # inline, the JSON would only repeat the result it travels in
        path = ctx.workdir / "transcript.json"
        path.write_text(json.dumps(output, ensure_ascii=False), encoding="utf-8")
        files.append((path, "transcript.json", "application/json"))
    return await ctx.save_files(files)


# Diarization: beside the decoding, on the same decoded audio.

@dataclass(frozen=True)
class _Reference:
    """A known speaker's clip, fetched into the job's directory."""

    name: str
    path: Path
    field: str


async def _fetch_references(ctx: JobContext, params: TranscribeInput) -> list[_Reference]:
    """The known speakers' clips, through the same guarded path as the job's media."""
    references = []
    for index, speaker in enumerate(params.known_speakers or []):
        prefix = f"known_speakers.{index}"
        target = ctx.workdir / f"speaker-{index}.media"
        field = await ctx.fetch_media(target, url=speaker.audio, data=speaker.audio_base64,
                                      fields=(f"{prefix}.audio", f"{prefix}.audio_base64"))
        references.append(_Reference(speaker.name, target, field))
    return references


async def _diarize(ctx: JobContext, params: TranscribeInput, audio: np.ndarray, references: list[_Reference],
                   vad_pass: asyncio.Future[list[float]]) -> list[diarization.Turn]:
    """Who speaks when in ``audio`` (reference voices named)."""
    pool = await ctx.load(lambda: diarization.get_pipelines(ctx.runtime, ctx.settings.diarization_model))
    known = {reference.name: await _reference_voice(ctx, pool, reference) for reference in references}
    if is_silent(audio):
        return []
    probabilities = await vad_pass
    regions = await ctx.in_thread(lambda: _diarization_regions(audio, ctx.cancel, probabilities))
    bounds = params.speaker_bounds()
    return await ctx.on_model(pool, lambda pipeline: pipeline.diarize(audio, regions, bounds=bounds, known=known,
                                                                       cancel=ctx.cancel), stage="diarize")


async def _reference_voice(ctx: JobContext, pool: InstancePool[diarization.DiarizationPipeline],
                           reference: _Reference) -> np.ndarray:
    try:
        audio, _ = await ctx.in_thread(functools.partial(
            media_in.load_audio, reference.path, max_duration_s=MAX_REFERENCE_S, timeout_s=ctx.settings.media_timeout_s,
            field=reference.field, cancel=ctx.cancel))
    except InputTooLarge as exc:
        raise InvalidInput(f"{reference.field}: a reference clip is at most {MAX_REFERENCE_S:g} s of one speaker",
                           field=reference.field) from exc
    regions = await ctx.in_thread(lambda: _diarization_regions(audio, ctx.cancel))
    if sum(region.end - region.start for region in regions) < _MIN_REFERENCE_SPEECH_S * vad.SAMPLE_RATE:
        raise InvalidInput(f"{reference.field}: no speech in the reference clip of {reference.name!r}",
                           field=reference.field)
    return await ctx.on_model(pool, lambda pipeline: pipeline.voice(audio, regions), stage="diarize")


def _diarization_regions(audio: np.ndarray, cancel: CancelToken,
                         probabilities: list[float] | None = None) -> list[diarization.Span]:
    """Speech for diarization: Silero (its pass ``probabilities`` when made already), more sensitive
    than for decoding (a missed stretch has no speaker) and cut at shorter pauses (turns change in them)."""
    regions = vad.speech_regions(audio, threshold=0.2, min_silence_ms=100, speech_pad_ms=30, cancel=cancel,
                                 probabilities=probabilities)
    return [diarization.Span(region.start, region.end) for region in regions]


# What shapes a result (its cache key), and the task's row of the table.

def _shaping(settings: Settings, params: TranscribeInput) -> dict[str, Any]:
    """What decides a transcription: the served model, the effective batch size, every decoding
    field; not where the media came from or what happens to it after."""
    fields = input_fields(params, exclude=("audio", "audio_base64", "delete_after_read", "known_speakers"))
    # The format asked for: with the device (in every key), PRECISION and the path, it decides the one run.
    shaping = {**fields, "model": _model_name(settings, params), "batch_size": _batch_size(settings, params),
               "precision": settings.precision, "compute_type": params.compute_type or settings.whisper_compute_type}
    if params.diarize:
        # The reference clips count by their content, hashed with the media (see ``run``).
        shaping["diarization_model"] = settings.diarization_model
        shaping["known_speakers"] = [speaker.name for speaker in params.known_speakers or []]
    return shaping


CACHE: CachePolicy[TranscribeInput] = CachePolicy(
    outputs=frozenset({"transcription", "translation", "detected_language", "segments", "translation_segments",
                       "device", "model", "compute_type",
                       "duration_s", "word_timestamps", "speakers", "files"}),
    shaping=_shaping,
    models={"model": whisper_identity, "diarization_model": diarization.diarization_identity},
)
TASK: Task[TranscribeInput] = Task(
    name="transcribe",
    input_model=TranscribeInput,
    run=run,
    preload=preload,
    implied_by=("audio", "audio_base64"),
    cache=CACHE,
)
