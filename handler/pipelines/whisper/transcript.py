"""What the tasks that run Whisper share about a transcript: digital silence (nothing to decode),
the words of a result with their times, results as plain JSON, and how captions are timed."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import numpy as np

from handler.cancel import CancelToken
from handler.pipelines.whisper.pipeline import WhisperPipeline

# Peak amplitude below which audio is digital silence: nothing to transcribe.
SILENCE_PEAK = 1e-4


def temperatures(start: float, increment: float | None) -> tuple[float, ...]:
    """``whisper.transcribe``'s temperatures: ``start``, then up by ``increment`` to 1 on fallback."""
    if increment is None:
        return (start,)
    return tuple(float(t) for t in np.arange(start, 1.0 + 1e-6, increment))


# How captions are timed: the transcribe task's default decoding (its input model's defaults), with
# word timestamps. tests/test_transcribe.py holds the two equal.
CAPTION_OPTIONS: Mapping[str, Any] = MappingProxyType({
    "temperature": temperatures(0.0, 0.2),
    "compression_ratio_threshold": 2.4,
    "logprob_threshold": -1.0,
    "no_speech_threshold": 0.6,
    "condition_on_previous_text": True,
    "initial_prompt": None,
    "word_timestamps": True,
    "language": None,
    "beam_size": 5,
    "best_of": 5,
    "patience": None,
    "length_penalty": None,
    "suppress_tokens": "-1",
})


def is_silent(audio: np.ndarray) -> bool:
    return audio.size == 0 or float(np.abs(audio).max()) < SILENCE_PEAK


def word_timings(pipeline: WhisperPipeline, audio: np.ndarray, cancel: CancelToken) -> list[dict[str, Any]]:
    """The words in ``audio`` (16 kHz mono) and their times, by ``whisper.transcribe`` with
    :data:`CAPTION_OPTIONS`; none in silence. Runs inside a GPU slot, on a borrowed instance."""
    if is_silent(audio):
        return []
    return words(pipeline.transcribe(audio, task="transcribe", cancel=cancel, **CAPTION_OPTIONS))


def words(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The words of a ``whisper.transcribe`` result (run with ``word_timestamps``), in order."""
    return [
        {key: plain(word[key]) for key in ("word", "start", "end", "probability", "speaker") if key in word}
        for segment in result["segments"]
        for word in segment.get("words", [])
    ]


def plain(value: Any) -> Any:
    """numpy scalars to Python numbers, so the result serialises as JSON."""
    if isinstance(value, np.generic):
        return value.item()
    return value
