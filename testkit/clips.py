"""Recordings for the chunking and batched-decoding tests: espeak-ng sentences with known pauses."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import whisper

from testkit import media

SAMPLE_RATE = 16000
# Four sentences: the suite's two known ones first, then two more.
SENTENCES = (
    *media.SENTENCES,
    "We will meet again next week to review the numbers.",
    "The weather is nice today, so let us go outside.",
)
# A level no sample of espeak's speech stays under for long, and digital silence always does.
_QUIET = 1e-3


@dataclass(frozen=True)
class Clip:
    """Sentences separated by digital silence; ``gaps`` are the silences, in samples."""

    audio: np.ndarray
    gaps: tuple[tuple[int, int], ...]

    @property
    def duration_s(self) -> float:
        return len(self.audio) / SAMPLE_RATE


def sentence_audio(text: str, directory: Path, name: str) -> np.ndarray:
    """espeak-ng saying ``text``, 16 kHz mono float32, with its own leading and trailing silence cut off."""
    audio: np.ndarray = whisper.load_audio(str(media.speak(text, directory / f"{name}.wav")))
    loud = np.flatnonzero(np.abs(audio) > _QUIET)
    return audio[loud[0] : loud[-1] + 1]


def sentences_with_gaps(directory: Path, sentences: tuple[str, ...] = SENTENCES, *, gap_s: float = 2.0) -> Clip:
    """The sentences one after another, ``gap_s`` of digital silence between each two, 1 s before and after."""
    edge = np.zeros(SAMPLE_RATE, dtype=np.float32)
    gap = np.zeros(int(gap_s * SAMPLE_RATE), dtype=np.float32)
    parts: list[np.ndarray] = [edge]
    gaps: list[tuple[int, int]] = []
    for index, text in enumerate(sentences):
        if index:
            start = sum(len(part) for part in parts)
            gaps.append((start, start + len(gap)))
            parts.append(gap)
        parts.append(sentence_audio(text, directory, f"sentence-{index}"))
    return Clip(np.concatenate([*parts, edge]), tuple(gaps))


def rms(audio: np.ndarray, centre: int, half_width: int = 160) -> float:
    """Root mean square of ``audio`` within ``half_width`` samples (10 ms) either side of ``centre``."""
    window = audio[max(centre - half_width, 0) : centre + half_width]
    return float(np.sqrt(np.mean(np.square(window, dtype=np.float64)))) if len(window) else 0.0
