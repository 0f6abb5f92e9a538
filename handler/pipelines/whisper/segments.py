"""A window's decoded tokens as ``whisper.transcribe``'s segments, in the recording's time, with word
timings kept inside the window; and the segments of a recording as its result."""

from __future__ import annotations

import itertools
from typing import Any

from torch import Tensor
from whisper.audio import HOP_LENGTH, SAMPLE_RATE
from whisper.decoding import DecodingResult
from whisper.model import Whisper
from whisper.timing import add_word_timestamps
from whisper.tokenizer import Tokenizer

from handler.pipelines.whisper.windows import Window

# Seconds per timestamp token: one encoder position is two mel frames.
_TIME_PRECISION = 2 * HOP_LENGTH / SAMPLE_RATE


def segments_of(
    result: DecodingResult, tokens: list[int], window: Window, tokenizer: Tokenizer
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


def _piece_span(piece: list[int], window: Window, timestamp_begin: int) -> tuple[float, float]:
    """Start and end of a piece: its timestamps, else the window's edges; clipped to the window."""
    start = window.offset_s + _TIME_PRECISION * (piece[0] - timestamp_begin if piece[0] >= timestamp_begin else 0)
    end = window.end_s
    if piece[-1] >= timestamp_begin and len(piece) > 1:
        end = window.offset_s + _TIME_PRECISION * (piece[-1] - timestamp_begin)
    start = min(max(start, window.offset_s), window.end_s)
    return start, min(max(end, start), window.end_s)


def add_words(
    model: Whisper,
    tokenizer: Tokenizer,
    segments: list[dict[str, Any]],
    mel: Tensor,
    window: Window,
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


def end_by(segments: list[dict[str, Any]], limit: float) -> None:
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
