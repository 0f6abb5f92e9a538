"""Batched Whisper decoding: several 30 s windows of one recording through the model at once.

``whisper.transcribe`` walks a recording one 30 s window at a time, each window conditioned on
the text of the one before. Here the recording is first cut into chunks of at most 30 s
(:mod:`handler.pipelines.whisper.vad`), and up to ``batch_size`` of them share one encoder pass
and one decoder loop, greedy or beam search, each with a prompt of its own.

Public API::

    prepare_windows(model, audio, chunks) -> list[WindowInput]       # log-mel windows, on the CPU
    language_mel(model, audio) -> Tensor; detect_language(model, settings, mel) -> BatchSettings
    decode_windows(model, windows, settings) -> (settings, segments per window)  # one batch
    Sections(windows, width=batch_size, settings=settings)  # which windows go together, prompted how
    transcribe_chunks(model, audio, chunks, *, options=None, batch_size=DEFAULT_BATCH_SIZE,
                      cancel=None) -> dict                             # all of the above, in order
    decode_with_fallback(model, features, settings) -> list[DecodingResult]
    BatchDecodingTask   # openai-whisper's DecodingTask, fixed for batches of beams/samples

How the worker runs it (``handler/tasks/transcribe.py``; a
``batch_size`` of 1 without VAD keeps ``whisper.transcribe`` instead)::

    chunks = vad.speech_chunks(audio)                     # on the CPU, before any GPU slot
    windows = prepare_windows(model, audio, chunks)
    sections = Sections(windows, width=batch_size, settings=settings, initial=initial_prompt(model, settings))
    while batch := sections.next_round():       # each round's windows carry their prompts
        # go to the model's batcher with the windows of every job held; it calls, in a GPU slot,
        settings, found = decode_windows(model, batch_of_windows, settings)
        # and each window's segments come back: sections.done(index, segments)

``audio`` is 16 kHz mono float32 (``media.load_audio``). ``options`` is the dict that
``TranscribeInput.decode_options()`` builds, plus ``task`` ("transcribe" or "translate").
The result has the shape of ``whisper.transcribe``'s::

    {"text": str, "language": str | None,
     "segments": [{"id", "seek", "start", "end", "text", "tokens", "temperature", "avg_logprob",
                   "compression_ratio", "no_speech_prob", "words" (with word_timestamps)}]}

Times are seconds in the whole recording, clipped to the chunk they come from (so to the
audio), segments in time order, ``seek`` the first mel frame of the chunk. With VAD the
silence between chunks is never decoded and yields no segments.

Differences from ``whisper.transcribe``, by design:

- ``condition_on_previous_text`` conditions within sections: the chunks are cut into a few runs
  of consecutive chunks (:class:`Sections`), decoded side by side, each chunk prompted with the
  text before it in its run (and ``initial_prompt`` at the start of each run). A long recording
  keeps batches of ``batch_size``; a short one is decoded in fewer, longer runs. Without
  conditioning every chunk is independent, all of them batched at once, each prompted with
  ``initial_prompt``.
- Temperature fallback is per chunk: only the chunks whose result fails
  ``compression_ratio_threshold`` / ``logprob_threshold`` are decoded again at the next
  temperature, together in one batch, from the encoder output already computed.
- Where Whisper leaves the end of a chunk untranscribed (its output ends on a timestamp pair,
  or on an unfinished segment), ``whisper.transcribe`` decodes again from the last timestamp in
  its next window; here there is none, so that tail of the chunk is decoded again on its own
  (the tails of a batch together), up to three rounds, the last one keeping what it got. Without
  this, every chunk's transcript stopped seconds before its end (bench/RESULTS.md).
- An unset ``language`` on a multilingual model is detected once, on the recording's first 30 s
  (:func:`language_mel`), as ``whisper.transcribe`` detects it, whichever chunk comes first.

The caller must hold the model for itself for the whole call (``WhisperPipeline`` does):
decoding installs key/value-cache hooks and a cancellation hook on it. fp16 is used on CUDA
only, unless asked for.

Memory: the decoder's cross-attention keys and values are computed once per window and shared
by its beams or samples (see :class:`BatchDecodingTask`): large-v3 in fp16 takes ~250 MB per
window, so batch 8 is ~2 GB on top of the weights, whatever ``beam_size``.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor
from whisper.audio import HOP_LENGTH, N_FRAMES, N_SAMPLES, SAMPLE_RATE, log_mel_spectrogram, pad_or_trim
from whisper.decoding import DecodingOptions, DecodingResult, DecodingTask
from whisper.model import Whisper
from whisper.timing import add_word_timestamps
from whisper.tokenizer import Tokenizer, get_tokenizer

from handler.pipelines.whisper.search import vectorised
from handler.pipelines.whisper.vad import Chunk, fixed_chunks, speech_chunks
from handler.runtime.cancel import CancelToken

# Chunks decoded together; chosen from bench/batched.py (see bench/RESULTS.md).
DEFAULT_BATCH_SIZE = 8
# Rounds of decoding again the tails that windows leave untranscribed (see decode_windows).
_TAIL_ROUNDS = 3
# The most prompt tokens a window gets (DecodingTask keeps n_text_ctx // 2 - 1 = 223).
_PROMPT_TOKENS = 223
# Text decoded above this temperature is not a prompt for what follows (as whisper.transcribe).
_PROMPT_RESET_TEMPERATURE = 0.5
# The fewest windows a section of conditioned windows holds (see Sections).
SECTION_WINDOWS = 3
# A tail shorter than this (0.2 s) is not worth a window of its own.
_MIN_TAIL_FRAMES = 20
# Seconds per timestamp token: one encoder position is two mel frames.
_TIME_PRECISION = 2 * HOP_LENGTH / SAMPLE_RATE
_DEFAULT_TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
# DecodingOptions fields taken from ``options`` as they are (None: openai-whisper's default).
_PASSED_ON = ("beam_size", "best_of", "patience", "length_penalty", "suppress_tokens")
_OPTIONS = frozenset({
    *_PASSED_ON, "task", "language", "temperature", "compression_ratio_threshold", "logprob_threshold",
    "no_speech_threshold", "word_timestamps", "initial_prompt", "condition_on_previous_text",
})


class BatchDecodingTask(DecodingTask):  # type: ignore[misc]  # whisper ships no type hints
    """openai-whisper's ``DecodingTask``, able to run beam search or best-of on several windows.

    Upstream (20250625) repeats the prompt tokens ``n_group`` times per window (one row per beam
    or sample) but keeps the encoder output at one row per window. With one window, attention
    broadcasts the single row over all beams; with ``n`` windows, the decoder's cross-attention
    gets ``n * n_group`` query rows against ``n`` key/value rows and fails ("The size of tensor a
    (10) must match the size of tensor b (2) at non-singleton dimension 0"). ``run`` even slices
    ``audio_features[:: n_group]`` afterwards, which only makes sense for repeated features.
    Here the features are repeated per beam for ``run``'s bookkeeping only (language detection
    sees one row per window); the decoder loop gets one row per window, and each window's beams
    attend to it together (:meth:`_main_loop`). A single window keeps upstream's broadcast.
    """

    def __init__(self, model: Whisper, options: DecodingOptions, *, prompts: Tensor | None = None) -> None:
        """``prompts``: one row of prompt tokens per window (one length), written over the
        placeholder prompt that ``options`` carries (``BatchSettings.at``)."""
        super().__init__(model, options)
        self._prompts = prompts
        vectorised(self)  # upstream's beam search update and timestamp rules, on the whole batch at once

    def _get_audio_features(self, mel: Tensor) -> Tensor:
        features: Tensor = super()._get_audio_features(mel)
        if self.n_group == 1 or features.shape[0] == 1:
            return features
        return features.repeat_interleave(self.n_group, dim=0)

    def _detect_language(self, audio_features: Tensor, tokens: Tensor) -> Any:
        if self.n_group > 1 and audio_features.shape[0] == tokens.shape[0] * self.n_group:
            audio_features = audio_features[:: self.n_group]
        if self._prompts is not None:  # each window's own prompt, after sot_prev (upstream writes languages here too)
            tokens[:, 1 : 1 + self._prompts.shape[1]] = self._prompts
        return super()._detect_language(audio_features, tokens)

    def _main_loop(self, audio_features: Tensor, tokens: Tensor) -> Any:
        """The decoder loop on one row of encoder output per window, its beams sharing it.

        Cross-attention keys and values are then projected and read once per window instead of
        once per beam: 5x less of the decoder's heaviest reads at beam 5 (2 windows decoded 3.4x
        faster on the CPU, the same tokens; ``tests/test_decoding.py``). A single window's beams
        attend as one row too: upstream's broadcast of one key/value row over 5 beams took torch's
        CPU attention 3.1 ms per layer and step, against 0.17 ms for the 5 queries in one row.
        """
        sot_index: int = self.sot_index  # type: ignore[has-type]  # set by whisper's untyped __init__
        self.sot_index = 0  # the first step's logits begin at sot (_logits_from)
        if self.n_group > 1:
            self.inference.logits = _initial_pass_once_per_window(self.inference, self.n_group)
        try:
            with _logits_from(self.model, sot_index):
                if self.n_group == 1:
                    return super()._main_loop(audio_features, tokens)
                if audio_features.shape[0] == tokens.shape[0]:  # repeated per beam (_get_audio_features)
                    audio_features = audio_features[:: self.n_group]
                with _beams_share_cross_attention(self.model):
                    return super()._main_loop(audio_features, tokens)
        finally:
            self.sot_index = sot_index


def _initial_pass_once_per_window(inference: Any, n_group: int) -> Callable[[Tensor, Tensor], Tensor]:
    """``inference.logits`` with its first pass (the prompt and start tokens, the same for every
    beam of a window) run on one row per window, its self-attention cache then copied per beam.

    Upstream runs it on every beam: with a 223-token prompt at beam 5, 1,115 rows of prompt
    through the decoder per window instead of 223.
    """
    logits = inference.logits

    def first_pass_shared(tokens: Tensor, audio_features: Tensor) -> Tensor:
        if tokens.shape[-1] != inference.initial_token_length or inference.kv_cache:
            return cast(Tensor, logits(tokens, audio_features))
        found = cast(Tensor, logits(tokens[::n_group], audio_features))  # one window's beams start alike
        for module in inference.kv_modules:
            inference.kv_cache[module] = inference.kv_cache[module].repeat_interleave(n_group, dim=0)
        return found.repeat_interleave(n_group, dim=0)

    return first_pass_shared


@contextmanager
def _logits_from(model: Whisper, start: int) -> Iterator[None]:
    """While held, the decoder's first pass over the initial tokens yields logits from position
    ``start`` (sot) on: the decoding loop reads only those at sot (no-speech) and at the last token.

    Upstream projects every position onto the 51,864-token vocabulary, so a 200-token prompt
    cost as much as 200 decoding steps of its beams (the heaviest product of tiny.en's step).
    """
    def last_positions(_module: torch.nn.Module, _args: Any, output: Tensor) -> Tensor | None:
        return output[:, start:] if output.shape[1] > 1 else None

    hook = model.decoder.ln.register_forward_hook(last_positions)
    try:
        yield
    finally:
        hook.remove()


@contextmanager
def _beams_share_cross_attention(model: Whisper) -> Iterator[None]:
    """While held, a decoder query batch of ``g`` rows per encoder row attends as one row of ``g``
    times the queries: the same attention (cross-attention has no mask), on K/V read once."""
    modules = [block.cross_attn for block in model.decoder.blocks if block.cross_attn is not None]
    for module in modules:
        module.qkv_attention = functools.partial(_grouped_attention, type(module).qkv_attention.__get__(module))
    try:
        yield
    finally:
        for module in modules:
            del module.qkv_attention


Attend = Callable[..., tuple[Tensor, Tensor | None]]


def _grouped_attention(
    attend: Attend, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None
) -> tuple[Tensor, Tensor | None]:
    rows, groups = k.shape[0], q.shape[0] // k.shape[0]
    if groups == 1 or mask is not None:
        return attend(q, k, v, mask)
    n_ctx = q.shape[1]
    out, qk = attend(q.reshape(rows, groups * n_ctx, q.shape[2]), k, v)
    if qk is not None:  # (rows, heads, groups * n_ctx, keys) -> (rows * groups, heads, n_ctx, keys)
        qk = qk.reshape(rows, qk.shape[1], groups, n_ctx, qk.shape[3]).transpose(1, 2).flatten(0, 1)
    return out.reshape(rows * groups, n_ctx, out.shape[2]), qk


@dataclass(frozen=True)
class BatchSettings:
    """What ``options`` asks of the decoding, checked and with whisper.transcribe's defaults."""

    temperatures: tuple[float, ...]
    compression_ratio_threshold: float | None
    logprob_threshold: float | None
    no_speech_threshold: float | None
    word_timestamps: bool
    language: str | None
    task: str
    prompt: str | None
    fp16: bool
    decoding: tuple[tuple[str, Any], ...]  # the _PASSED_ON options that are set
    # Decoded without timestamps (False), a window is one segment, its edges the window's; the
    # benchmark measures that against decoding the tails again (bench/accuracy.py).
    timestamps: bool = True
    tail_rounds: int = _TAIL_ROUNDS  # times a window's untranscribed tail is decoded again
    condition: bool = True  # condition_on_previous_text: a window is prompted with the text before it

    @classmethod
    def from_options(cls, model: Whisper, options: Mapping[str, Any], *, fp16: bool | None = None) -> BatchSettings:
        unknown = sorted(set(options) - _OPTIONS)
        if unknown:
            raise ValueError(f"unknown decoding options: {', '.join(unknown)}")
        language = options.get("language") or (None if model.is_multilingual else "en")
        return cls(
            temperatures=_temperatures(options.get("temperature", _DEFAULT_TEMPERATURES)),
            compression_ratio_threshold=options.get("compression_ratio_threshold", 2.4),
            logprob_threshold=options.get("logprob_threshold", -1.0),
            no_speech_threshold=options.get("no_speech_threshold", 0.6),
            word_timestamps=bool(options.get("word_timestamps", False)),
            language=language,
            task=options.get("task", "transcribe"),
            prompt=options.get("initial_prompt"),
            fp16=model.device.type == "cuda" if fp16 is None else fp16,
            decoding=tuple((key, options[key]) for key in _PASSED_ON if options.get(key) is not None),
            condition=bool(options.get("condition_on_previous_text", True)),
        )

    def at(self, temperature: float, prompt_length: int = 0) -> DecodingOptions:
        """DecodingOptions for one temperature: beams when greedy, best-of when sampling; room
        for a prompt of ``prompt_length`` tokens (each window's own, see BatchDecodingTask)."""
        decoding = dict(self.decoding)
        if temperature > 0:
            decoding.pop("beam_size", None)
            decoding.pop("patience", None)
        else:
            decoding.pop("best_of", None)
        return DecodingOptions(
            task=self.task, language=self.language, temperature=temperature, prompt=[0] * prompt_length or None,
            fp16=self.fp16, without_timestamps=not self.timestamps, **decoding,
        )

    def needs_fallback(self, result: DecodingResult) -> bool:
        """As whisper.transcribe: too repetitive or too unlikely, unless it is silence."""
        failed = (
            self.compression_ratio_threshold is not None
            and result.compression_ratio > self.compression_ratio_threshold
        ) or (self.logprob_threshold is not None and result.avg_logprob < self.logprob_threshold)
        return failed and not (self._no_speech(result) and self.logprob_threshold is not None
                               and result.avg_logprob < self.logprob_threshold)

    def is_silent(self, result: DecodingResult) -> bool:
        """As whisper.transcribe: skip a window that is likely no speech, unless its text is likely."""
        if not self._no_speech(result):
            return False
        return self.logprob_threshold is None or result.avg_logprob <= self.logprob_threshold

    def _no_speech(self, result: DecodingResult) -> bool:
        return self.no_speech_threshold is not None and result.no_speech_prob > self.no_speech_threshold


def _temperatures(value: float | Sequence[float]) -> tuple[float, ...]:
    temperatures = (float(value),) if isinstance(value, int | float) else tuple(float(t) for t in value)
    if not temperatures:
        raise ValueError("temperature: give at least one temperature")
    return temperatures


@dataclass(frozen=True)
class _Window:
    """A chunk as the model sees it: mel frames ``[seek, seek + frames)``, padded to 30 s."""

    seek: int
    frames: int
    end_s: float  # where the chunk's audio ends; no timestamp goes past it

    @property
    def offset_s(self) -> float:
        return float(self.seek * HOP_LENGTH / SAMPLE_RATE)


def _window(chunk: Chunk, content_frames: int, audio_s: float) -> _Window:
    seek = min(chunk.start // HOP_LENGTH, content_frames)
    end = min(math.ceil(chunk.end / HOP_LENGTH), content_frames, seek + N_FRAMES)
    return _Window(seek, end - seek, min(chunk.end_s, audio_s))


def transcribe_batched(
    model: Whisper,
    audio: np.ndarray,
    *,
    options: Mapping[str, Any] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    enable_vad: bool = True,
    cancel: CancelToken | None = None,
) -> dict[str, Any]:
    """Transcribe ``audio`` in batches of chunks: speech chunks with VAD, else 30 s windows."""
    chunks = speech_chunks(audio) if enable_vad else fixed_chunks(audio)
    return transcribe_chunks(model, audio, chunks, options=options, batch_size=batch_size, cancel=cancel)


def transcribe_chunks(
    model: Whisper,
    audio: np.ndarray,
    chunks: Sequence[Chunk],
    *,
    options: Mapping[str, Any] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    cancel: CancelToken | None = None,
    fp16: bool | None = None,
) -> dict[str, Any]:
    """Transcribe the given ``chunks`` of ``audio`` (each at most 30 s), ``batch_size`` at a time;
    ``fp16`` None: on CUDA only.

    Raises ``Cancelled`` at the next decoder step (or between batches) once ``cancel`` is set.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size!r}")
    settings = BatchSettings.from_options(model, options or {}, fp16=fp16)
    inputs = prepare_windows(model, audio, chunks)
    if inputs:
        settings = detect_language(model, settings, language_mel(model, audio))
    sections = Sections(inputs, width=batch_size, settings=settings, initial=initial_prompt(model, settings))
    with cancellable(model, cancel):
        while round_ := sections.next_round():
            for start in range(0, len(round_), batch_size):
                if cancel is not None:
                    cancel.check()
                batch = round_[start : start + batch_size]
                settings, found = decode_windows(model, [window for _, window in batch], settings)
                for (index, _), segments in zip(batch, found, strict=True):
                    sections.done(index, segments)
    return result_of(sections.segments(), settings.language)


class Sections:
    """Which of a recording's windows are decoded together, and what each is prompted with.

    ``whisper.transcribe`` prompts each window with the text before it
    (``condition_on_previous_text``; on real speech tiny.en's chunks made WER 0.065 without it and
    0.058 with it here, bench/RESULTS.md), which makes its windows one sequence. Here the windows are cut into
    sections of at least ``SECTION_WINDOWS`` consecutive windows, at most ``width`` (the batch
    size) of them, decoded side by side one round at a time; each window is prompted with the
    text before it in its section, the first of a section with the initial prompt. A long
    recording keeps full batches; a short one trades width for context. Without conditioning
    every window is decoded in the first round, each prompted with the initial prompt only.
    """

    def __init__(self, windows: Sequence[WindowInput], *, width: int, settings: BatchSettings,
                 initial: tuple[int, ...] = ()) -> None:
        self._windows = list(windows)
        self._rounds, self._source = _plan(len(self._windows), width, condition=settings.condition)
        self._condition = settings.condition
        self._initial = initial[-_PROMPT_TOKENS:]
        self._after: dict[int, tuple[int, ...]] = {}  # the prompt of a window following window i
        self._found: dict[int, list[dict[str, Any]]] = {}
        self._round = 0

    def next_round(self) -> list[tuple[int, WindowInput]]:
        """The windows to decode now (their previous windows are done), with their prompts and indices."""
        if self._round == len(self._rounds):
            return []
        batch = self._rounds[self._round]
        self._round += 1
        return [(index, replace(self._windows[index], prompt=self._prompt(index))) for index in batch]

    def done(self, index: int, segments: list[dict[str, Any]]) -> None:
        """Window ``index`` decoded to ``segments``: the prompt of the windows that follow it."""
        self._found[index] = segments
        prompt = self._prompt(index)
        if segments:  # a silent window leaves the prompt as it was
            tokens = [token for segment in segments for token in segment["tokens"]]
            prompt = _next_prompt(prompt, tokens, segments[-1]["temperature"], condition=self._condition)
        self._after[index] = prompt

    def segments(self) -> list[dict[str, Any]]:
        """Every window's segments so far, in time order."""
        return [segment for index in sorted(self._found) for segment in self._found[index]]

    def _prompt(self, index: int) -> tuple[int, ...]:
        source = self._source[index]
        return self._initial if source is None else self._after[source]


def _plan(count: int, width: int, *, condition: bool) -> tuple[list[list[int]], list[int | None]]:
    """Rounds of window indices, and for each window the window whose text prompts it (or None)."""
    if not condition:
        return ([list(range(count))] if count else []), [None] * count
    sections = max(1, min(width, count // SECTION_WINDOWS))
    bounds = [round(i * count / sections) for i in range(sections + 1)]
    runs = [range(a, b) for a, b in itertools.pairwise(bounds) if b > a]
    rounds = [[run[step] for run in runs if step < len(run)] for step in range(max(map(len, runs), default=0))]
    source: list[int | None] = [None, *range(count - 1)]
    for run in runs:
        source[run[0]] = None
    return rounds, source


def initial_prompt(model: Whisper, settings: BatchSettings) -> tuple[int, ...]:
    """The tokens of ``settings.prompt`` (``initial_prompt``), as ``whisper.transcribe`` encodes it."""
    if not settings.prompt:
        return ()
    return tuple(_tokenizer(model, settings).encode(" " + settings.prompt.strip()))


@dataclass(frozen=True)
class WindowInput:
    """One chunk ready for the model: its log-mel, padded to 30 s, and its place in the recording."""

    mel: Tensor  # (n_mels, N_FRAMES), on the CPU
    window: _Window
    # The tokens it is prompted with (whisper.transcribe's prompt: the initial prompt and the text
    # before it, timestamps included), at most _PROMPT_TOKENS; see Sections.
    prompt: tuple[int, ...] = ()


def prepare_windows(model: Whisper, audio: np.ndarray, chunks: Sequence[Chunk]) -> list[WindowInput]:
    """The chunks' log-mel windows, computed on the CPU (before any GPU slot is taken)."""
    mel = log_mel_spectrogram(audio, model.dims.n_mels, padding=N_SAMPLES)
    content_frames = mel.shape[-1] - N_FRAMES
    windows = [_window(chunk, content_frames, len(audio) / SAMPLE_RATE) for chunk in chunks]
    return [WindowInput(pad_or_trim(mel[:, w.seek : w.seek + w.frames], N_FRAMES), w) for w in windows if w.frames > 0]


def decode_windows(
    model: Whisper, inputs: Sequence[WindowInput], settings: BatchSettings
) -> tuple[BatchSettings, list[list[dict[str, Any]]]]:
    """Each window's segments (windows of one or several recordings, decoded alike), and the
    settings with the language known.

    Whisper ends a window early when its last sentence runs on past the window (its training
    targets leave a cut-off sentence to the next window): ``whisper.transcribe`` decodes again
    from the last timestamp. Here each window's untranscribed tail is decoded again, the tails of
    all windows together, up to ``settings.tail_rounds`` times; the last round keeps what it got.
    """
    settings = detect_language(model, settings, inputs[0].mel)  # callers detect on language_mel first
    tokenizer = _tokenizer(model, settings)
    found: list[list[dict[str, Any]]] = [[] for _ in inputs]
    pending = list(enumerate(inputs))
    for round_ in range(settings.tail_rounds + 1):
        last = round_ == settings.tail_rounds or not settings.timestamps
        outcomes = _decode_round(model, [item for _, item in pending], settings, tokenizer, keep_tails=last)
        tails = []
        for (index, _), (segments, tail) in zip(pending, outcomes, strict=True):
            found[index].extend(segments)
            if tail is not None:
                tails.append((index, tail))
        if not tails:
            break
        pending = tails
    return settings, found


def _decode_round(
    model: Whisper, inputs: Sequence[WindowInput], settings: BatchSettings, tokenizer: Tokenizer, *,
    keep_tails: bool,
) -> list[tuple[list[dict[str, Any]], WindowInput | None]]:
    """One encoder pass and one decoder loop for all ``inputs``: each window's segments, and the
    window of its tail left untranscribed (None when there is none, or with ``keep_tails``)."""
    mels = torch.stack([item.mel for item in inputs]).to(model.device)
    mels = mels.half() if settings.fp16 else mels
    with torch.no_grad():
        features = model.encoder(mels)
    results = _decode_prompted(model, features, settings, [item.prompt for item in inputs])
    outcomes: list[tuple[list[dict[str, Any]], WindowInput | None]] = []
    for item, result, window_mel in zip(inputs, results, mels, strict=True):
        if settings.is_silent(result):
            outcomes.append(([], None))
            continue
        tokens, tail = list(result.tokens), None
        if not keep_tails:
            tokens, tail = _split_tail(tokens, item, tokenizer.timestamp_begin)
            if tail is not None:
                prompt = _next_prompt(item.prompt, tokens, result.temperature, condition=settings.condition)
                tail = replace(tail, prompt=prompt)
        segments = _segments(result, tokens, item.window, tokenizer)
        if settings.word_timestamps and segments:
            # Windows are independent: speech before this one is not known here.
            _add_words(model, tokenizer, segments, window_mel, item.window, item.window.offset_s)
        if tail is not None:  # word alignment may run past the timestamp where the tail begins
            _end_by(segments, tail.window.offset_s)
        outcomes.append((segments, tail))
    return outcomes


def _split_tail(tokens: list[int], item: WindowInput, timestamp_begin: int) -> tuple[list[int], WindowInput | None]:
    """The tokens of a window's finished segments, and the window of the rest when Whisper left
    some of it (as ``whisper.transcribe``: the output does not end on a single timestamp)."""
    is_time = [token >= timestamp_begin for token in tokens]
    if len(tokens) < 2 or is_time[-2:] == [False, True]:
        return tokens, None
    pairs = [i for i in range(1, len(tokens)) if is_time[i - 1] and is_time[i]]
    if not pairs:
        return tokens, None
    end = pairs[-1]  # tokens[end - 1] closes the last finished segment
    frames = 2 * (tokens[end - 1] - timestamp_begin)  # a timestamp step is two mel frames
    rest = item.window.frames - frames
    if frames <= 0 or rest < _MIN_TAIL_FRAMES:
        return tokens, None
    window = _Window(item.window.seek + frames, rest, item.window.end_s)
    return tokens[:end], WindowInput(pad_or_trim(item.mel[:, frames : item.window.frames], N_FRAMES), window)


def _next_prompt(prompt: tuple[int, ...], tokens: Sequence[int], temperature: float, *,
                 condition: bool) -> tuple[int, ...]:
    """The prompt of what follows text ``tokens`` decoded at ``temperature`` with ``prompt`` (the
    next window of a section, or a window's tail): as whisper.transcribe, the text appended and
    the last 223 tokens kept; nothing after text this uncertain; the same prompt without conditioning."""
    if not condition:
        return prompt
    if temperature > _PROMPT_RESET_TEMPERATURE:
        return ()
    return (*prompt, *tokens)[-_PROMPT_TOKENS:]


def _decode_prompted(
    model: Whisper, features: Tensor, settings: BatchSettings, prompts: Sequence[tuple[int, ...]]
) -> list[DecodingResult]:
    """:func:`decode_with_fallback` for windows with prompts of their own.

    The windows of one decoder loop share a prompt length (Whisper's decoder has no padding
    mask): those with a prompt are decoded together, each prompt cut to the shortest one's length
    (keeping its last tokens, as whisper.transcribe cuts a long prompt); those without, apart.
    """
    results: dict[int, DecodingResult] = {}
    for prompted in (False, True):
        rows = [index for index, prompt in enumerate(prompts) if bool(prompt) == prompted]
        if not rows:
            continue
        length = min(len(prompts[index]) for index in rows)
        tokens = torch.tensor([prompts[index][len(prompts[index]) - length :] for index in rows]) if length else None
        for index, result in zip(rows, decode_with_fallback(model, features[rows], settings, tokens), strict=True):
            results[index] = result
    return [results[index] for index in range(len(prompts))]


def decode_with_fallback(
    model: Whisper, features: Tensor, settings: BatchSettings, prompts: Tensor | None = None
) -> list[DecodingResult]:
    """One result per row of ``features`` (encoder output, one row per window); ``prompts``, one
    row of prompt tokens per window (of one length), or None.

    All rows are decoded at the first temperature; then only the rows that still need a
    fallback are decoded again, together, at the next one.
    """
    results: dict[int, DecodingResult] = {}
    pending = list(range(features.shape[0]))
    length = 0 if prompts is None else prompts.shape[1]
    for temperature in settings.temperatures:
        options = settings.at(temperature, length)
        task = BatchDecodingTask(model, options, prompts=None if prompts is None else prompts[pending])
        decoded = task.run(features[pending])
        for index, result in zip(pending, decoded, strict=True):
            results[index] = result
        pending = [index for index, result in zip(pending, decoded, strict=True) if settings.needs_fallback(result)]
        if not pending:
            break
    return [results[index] for index in range(features.shape[0])]


def language_mel(model: Whisper, audio: np.ndarray) -> Tensor:
    """The log-mel of the recording's first 30 s, padded as ``whisper.transcribe`` pads it: the
    window it detects the language on (the first chunk may start later, or end sooner)."""
    mel: Tensor = pad_or_trim(log_mel_spectrogram(audio, model.dims.n_mels, padding=N_SAMPLES), N_FRAMES)
    return mel


def detect_language(model: Whisper, settings: BatchSettings, mel: Tensor) -> BatchSettings:
    """``settings`` with the language set: as given, else detected on ``mel`` (one 30 s window,
    :func:`language_mel`) as ``whisper.transcribe`` detects it."""
    if settings.language is not None:
        return settings
    mel = mel.to(model.device)
    _, probabilities = model.detect_language(mel.half() if settings.fp16 else mel)
    return replace(settings, language=max(probabilities, key=probabilities.get))


def _tokenizer(model: Whisper, settings: BatchSettings) -> Tokenizer:
    return get_tokenizer(
        model.is_multilingual, num_languages=model.num_languages, language=settings.language, task=settings.task
    )


def _segments(
    result: DecodingResult, tokens: list[int], window: _Window, tokenizer: Tokenizer
) -> list[dict[str, Any]]:
    """Segments of one window's ``tokens`` (of ``result``), in recording time, clipped to the window's audio."""
    found = []
    for piece in _pieces(tokens, tokenizer.timestamp_begin):
        start, end = _piece_span(piece, window, tokenizer.timestamp_begin)
        found.append({
            "seek": window.seek,
            "start": start,
            "end": end,
            "text": tokenizer.decode([token for token in piece if token < tokenizer.eot]),
            "tokens": piece,
            "temperature": result.temperature,
            "avg_logprob": result.avg_logprob,
            "compression_ratio": result.compression_ratio,
            "no_speech_prob": result.no_speech_prob,
        })
    return found


def _pieces(tokens: list[int], timestamp_begin: int) -> list[list[int]]:
    """Tokens cut between each two consecutive timestamps (as whisper.transcribe), text-less pieces dropped."""
    cuts = [i for i in range(1, len(tokens)) if tokens[i - 1] >= timestamp_begin and tokens[i] >= timestamp_begin]
    bounds = [0, *cuts, len(tokens)]
    pieces = [tokens[a:b] for a, b in itertools.pairwise(bounds)]
    return [piece for piece in pieces if any(token < timestamp_begin for token in piece)]


def _piece_span(piece: list[int], window: _Window, timestamp_begin: int) -> tuple[float, float]:
    """Start and end of a piece: its timestamps, else the window's edges; clipped to the window."""
    start = window.offset_s + _TIME_PRECISION * (piece[0] - timestamp_begin if piece[0] >= timestamp_begin else 0)
    end = window.end_s
    if piece[-1] >= timestamp_begin and len(piece) > 1:
        end = window.offset_s + _TIME_PRECISION * (piece[-1] - timestamp_begin)
    start = min(max(start, window.offset_s), window.end_s)
    return start, min(max(end, start), window.end_s)


def _add_words(
    model: Whisper,
    tokenizer: Tokenizer,
    segments: list[dict[str, Any]],
    mel: Tensor,
    window: _Window,
    last_speech: float,
) -> None:
    """Word timings of one window's segments (openai-whisper's alignment), kept inside the window."""
    add_word_timestamps(
        segments=segments, model=model, tokenizer=tokenizer, mel=mel, num_frames=window.frames,
        last_speech_timestamp=last_speech,
    )
    for segment in segments:
        for word in segment["words"]:
            word["start"] = _clip(word["start"], window.offset_s, window.end_s)
            word["end"] = _clip(word["end"], word["start"], window.end_s)
        segment["start"] = _clip(segment["start"], window.offset_s, window.end_s)
        segment["end"] = _clip(segment["end"], segment["start"], window.end_s)


def _end_by(segments: list[dict[str, Any]], limit: float) -> None:
    """Segments and their words moved to end by ``limit`` (where the tail's window starts)."""
    for segment in segments:
        for word in segment.get("words", []):
            word["start"], word["end"] = min(word["start"], limit), min(word["end"], limit)
        segment["start"], segment["end"] = min(segment["start"], limit), min(segment["end"], limit)


def _clip(value: float, low: float, high: float) -> float:
    return float(min(max(value, low), high))


def result_of(segments: list[dict[str, Any]], language: str | None) -> dict[str, Any]:
    """Segments (in time order) as ``whisper.transcribe``'s result."""
    numbered = [{"id": index, **segment} for index, segment in enumerate(segments)]
    return {"text": "".join(segment["text"] for segment in segments), "segments": numbered, "language": language}


@contextmanager
def cancellable(model: Whisper, cancel: CancelToken | None) -> Iterator[None]:
    """Check ``cancel`` before every decoder step while inside the block."""
    if cancel is None:
        yield
        return
    hook = model.decoder.register_forward_pre_hook(lambda _module, _args: cancel.check())
    try:
        yield
    finally:
        hook.remove()
