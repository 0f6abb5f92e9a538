"""Batched Whisper transcription: the driver. Several 30 s windows of one recording (and of every
job the worker holds) through the model at once.

``whisper.transcribe`` walks a recording one 30 s window at a time, each window conditioned on
the text of the one before. Here the recording is first cut into chunks of at most 30 s
(:mod:`~handler.pipelines.whisper.vad`), and up to ``batch_size`` of them share one encoder pass
and one decoder loop, greedy or beam search, each with a prompt of its own. A transcription reads
top to bottom in three files: the task (``handler/tasks/transcribe.py``: input, output, the
batches shared by jobs), this driver, and the decoder (:mod:`~handler.pipelines.whisper.batch_task`:
upstream's ``DecodingTask``, batched). Beside them, one trade each:

    windows.py   prepare_windows(model, audio, chunks) -> list[WindowInput]; language_mel(model, audio)
    options.py   DecodeOptions.from_options(model, options): what the job asks of the decoding
    sections.py  Sections: which windows go together, prompted how
    segments.py  a window's tokens as segments, word timings, the result

The driver, :func:`transcribe_windows`, is the one loop over a recording's sections; the worker
gives it a ``decode`` that goes through the model's batcher (so windows of several jobs share
batches), :func:`transcribe_chunks` one that calls :func:`decode_windows` here (the warm-up, the
tests and the benchmarks)::

    windows = prepare_windows(model, audio, vad.speech_chunks(audio))   # on the CPU, before any GPU slot
    options = detect_language(model, DecodeOptions.from_options(model, options), language_mel(model, audio))
    result = await transcribe_windows(model, windows, options, width=batch_size, decode=decode)
    # decode(batch) -> each window's segments: decode_windows(model, windows, options), in a GPU slot

``audio`` is 16 kHz mono float32 (``media_in.load_audio``). ``options`` is the dict that
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
  of consecutive chunks (``sections.Sections``), decoded side by side, each chunk prompted with the
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
  (``windows.language_mel``), as ``whisper.transcribe`` detects it, whichever chunk comes first.

The caller must hold the model for itself for the whole call (``WhisperPipeline`` does):
decoding installs key/value-cache hooks and a cancellation hook on it. The activations are float16
on CUDA and float32 on the CPU, unless asked otherwise (``dtype``, the model's compute type).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor
from whisper.audio import N_FRAMES, pad_or_trim
from whisper.model import Whisper
from whisper.tokenizer import Tokenizer

from handler.cancel import CancelToken
from handler.pipelines.whisper.batch_task import decode_prompted
from handler.pipelines.whisper.options import DecodeOptions
from handler.pipelines.whisper.sections import Sections, initial_prompt, next_prompt
from handler.pipelines.whisper.segments import add_words, end_by, result_of, segments_of
from handler.pipelines.whisper.vad import Chunk
from handler.pipelines.whisper.windows import Window, WindowInput, language_mel, prepare_windows

T = TypeVar("T")
Segments = list[dict[str, Any]]
# Windows of one round, each with its index among the recording's windows -> each window's segments.
Decode = Callable[[list[tuple[int, WindowInput]]], Awaitable[list[Segments]]]

# Chunks decoded together; chosen from bench/batched.py (see bench/RESULTS.md).
DEFAULT_BATCH_SIZE = 8
# A tail shorter than this (0.2 s) is not worth a window of its own.
_MIN_TAIL_FRAMES = 20


def transcribe_chunks(
    model: Whisper,
    audio: np.ndarray,
    chunks: Sequence[Chunk],
    *,
    options: Mapping[str, Any] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    cancel: CancelToken | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """Transcribe the given ``chunks`` of ``audio`` (each at most 30 s), ``batch_size`` at a time;
    ``dtype``, the activations' (None: float16 on CUDA, else float32).

    Raises ``Cancelled`` at the next decoder step (or between batches) once ``cancel`` is set.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size!r}")
    decode_options = DecodeOptions.from_options(model, options or {}, dtype=dtype)
    windows = prepare_windows(model, audio, chunks)
    if windows:
        decode_options = detect_language(model, decode_options, language_mel(model, audio))

    async def decode(batch: list[tuple[int, WindowInput]]) -> list[Segments]:
        found: list[Segments] = []
        for start in range(0, len(batch), batch_size):
            if cancel is not None:
                cancel.check()
            found += decode_windows(model, [window for _, window in batch[start : start + batch_size]],
                                    decode_options)
        return found

    with cancellable(model, cancel):
        return _finished(transcribe_windows(model, windows, decode_options, width=batch_size, decode=decode))


async def transcribe_windows(
    model: Whisper, windows: Sequence[WindowInput], options: DecodeOptions, *, width: int, decode: Decode
) -> dict[str, Any]:
    """The transcript of a recording's ``windows`` (``whisper.transcribe``'s result shape), its
    sections ``width`` windows wide, each round's windows decoded by ``decode``.

    ``options`` has the language known (:func:`detect_language`), so every window decodes alike.
    """
    sections = Sections(windows, width=width, options=options, initial=initial_prompt(model, options))
    while batch := sections.next_round():  # each round's windows are prompted with the round before's text
        found = await decode(batch)
        for (index, _), segments in zip(batch, found, strict=True):
            sections.done(index, segments)
    return result_of(sections.segments(), options.language)


def _finished(driver: Coroutine[Any, Any, T]) -> T:
    """What ``driver`` returns, when nothing it awaits suspends (a ``decode`` that decodes here and
    now): no event loop is needed, so it runs on any thread, the warm-up's included."""
    try:
        driver.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    driver.close()
    raise RuntimeError("the driver waited on something: run it on an event loop")


def decode_windows(model: Whisper, inputs: Sequence[WindowInput], options: DecodeOptions) -> list[Segments]:
    """Each window's segments (windows of one or several recordings, decoded alike); ``options``
    has the language known (:func:`detect_language`).

    Whisper ends a window early when its last sentence runs on past the window (its training
    targets leave a cut-off sentence to the next window): ``whisper.transcribe`` decodes again
    from the last timestamp. Here each window's untranscribed tail is decoded again, the tails of
    all windows together, up to ``options.tail_rounds`` times; the last round keeps what it got.
    """
    if options.language is None:
        raise ValueError("options.language: detect it first (detect_language)")
    tokenizer = options.tokenizer(model)
    found: list[Segments] = [[] for _ in inputs]
    pending = list(enumerate(inputs))
    for round_ in range(options.tail_rounds + 1):
        last = round_ == options.tail_rounds or not options.timestamps
        outcomes = _decode_round(model, [item for _, item in pending], options, tokenizer, keep_tails=last)
        tails = []
        for (index, _), (segments, tail) in zip(pending, outcomes, strict=True):
            found[index].extend(segments)
            if tail is not None:
                tails.append((index, tail))
        if not tails:
            break
        pending = tails
    return found


def _decode_round(
    model: Whisper, inputs: Sequence[WindowInput], options: DecodeOptions, tokenizer: Tokenizer, *,
    keep_tails: bool,
) -> list[tuple[Segments, WindowInput | None]]:
    """One encoder pass and one decoder loop for all ``inputs``: each window's segments, and the
    window of its tail left untranscribed (None when there is none, or with ``keep_tails``)."""
    mels = torch.stack([item.mel for item in inputs]).to(model.device, options.dtype)
    with torch.no_grad():
        features = model.encoder(mels)
    results = decode_prompted(model, features, options, [item.prompt for item in inputs])
    outcomes: list[tuple[Segments, WindowInput | None]] = []
    for item, result, window_mel in zip(inputs, results, mels, strict=True):
        if options.is_silent(result):
            outcomes.append(([], None))
            continue
        tokens, tail = list(result.tokens), None
        if not keep_tails:
            tokens, tail = _split_tail(tokens, item, tokenizer.timestamp_begin)
            if tail is not None:
                prompt = next_prompt(item.prompt, tokens, result.temperature, condition=options.condition)
                tail = replace(tail, prompt=prompt)
        segments = segments_of(result, tokens, item.window, tokenizer)
        if options.word_timestamps and segments:
            # Windows are independent: speech before this one is not known here.
            add_words(model, tokenizer, segments, window_mel, item.window, item.window.offset_s)
        if tail is not None:  # word alignment may run past the timestamp where the tail begins
            end_by(segments, tail.window.offset_s)
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
    window = Window(item.window.seek + frames, rest, item.window.end_s)
    return tokens[:end], WindowInput(pad_or_trim(item.mel[:, frames : item.window.frames], N_FRAMES), window)


def detect_language(model: Whisper, options: DecodeOptions, mel: Tensor) -> DecodeOptions:
    """``options`` with the language set: as given, else detected on ``mel`` (one 30 s window,
    :func:`~handler.pipelines.whisper.windows.language_mel`) as ``whisper.transcribe`` detects it."""
    if options.language is not None:
        return options
    mel = mel.to(model.device)
    _, probabilities = model.detect_language(mel.to(options.dtype))
    return replace(options, language=max(probabilities, key=probabilities.get))


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
