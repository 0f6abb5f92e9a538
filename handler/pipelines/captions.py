"""Captions from Whisper word timings: short cues, written as SRT (text2video's subtitles)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from whisper.utils import WriteSRT

_MAX_WORDS = 6
_MAX_CUE_S = 3.0
_SENTENCE_END = (".", "!", "?")


@dataclass(frozen=True)
class Cue:
    start: float
    end: float
    text: str


def cues_from_words(words: list[dict[str, Any]]) -> list[Cue]:
    """Group words into cues of a few words, breaking at sentence ends and after ~3 s."""
    cues: list[Cue] = []
    current: list[dict[str, Any]] = []
    for word in words:
        current.append(word)
        text = str(word["word"]).strip()
        too_long = float(word["end"]) - float(current[0]["start"]) >= _MAX_CUE_S
        if len(current) >= _MAX_WORDS or text.endswith(_SENTENCE_END) or too_long:
            cues.append(_cue(current))
            current = []
    if current:
        cues.append(_cue(current))
    return [cue for cue in cues if cue.text]


def _cue(words: list[dict[str, Any]]) -> Cue:
    text = "".join(str(w["word"]) for w in words).strip()
    return Cue(float(words[0]["start"]), max(float(words[-1]["end"]), float(words[0]["start"]) + 0.3), text)


def write_srt(cues: list[Cue], path: Path) -> None:
    """The cues as SRT, by openai-whisper's writer: the one that writes transcripts' SRT too."""
    segments = [{"start": cue.start, "end": cue.end, "text": cue.text} for cue in cues]
    with path.open("w", encoding="utf-8") as file:
        WriteSRT(str(path.parent)).write_result({"segments": segments}, file=file)
