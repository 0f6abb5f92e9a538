"""Test media made on the spot: espeak-ng speech and ffmpeg-encoded variants."""

from __future__ import annotations

import subprocess
from pathlib import Path

SENTENCES = (
    "Please send the report by Friday morning.",
    "The quick brown fox jumps over the lazy dog.",
)
# Words the real tiny.en model must recognise in SENTENCES (lower case, no punctuation).
EXPECTED_WORDS = ("please", "send", "report", "friday", "morning", "quick", "brown", "fox", "lazy", "dog")


def speak(text: str, target: Path, *, speed: int = 120) -> Path:
    """A WAV of espeak-ng saying ``text``."""
    subprocess.run(["espeak-ng", "-s", str(speed), "-w", str(target), text], check=True)
    return target


def encode(source: Path, target: Path, *args: str) -> Path:
    """``source`` re-encoded by ffmpeg into ``target`` (format from the extension)."""
    subprocess.run(
        ["ffmpeg", "-nostdin", "-v", "error", "-y", "-i", str(source), *args, str(target)], check=True
    )
    return target


def silence(target: Path, seconds: float) -> Path:
    subprocess.run(
        ["ffmpeg", "-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i",
         "anullsrc=r=16000:cl=mono", "-t", str(seconds), str(target)],
        check=True,
    )
    return target


def words_of(text: str) -> set[str]:
    return {w.strip(".,!?;:'\"").lower() for w in text.split()}


def recognised(text: str) -> float:
    """Share of EXPECTED_WORDS found in ``text``."""
    found = words_of(text)
    return sum(word in found for word in EXPECTED_WORDS) / len(EXPECTED_WORDS)
