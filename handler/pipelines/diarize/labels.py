"""Speakers onto a transcript: each word gets the speaker whose turn it overlaps most, each segment
is split where its words' speaker changes, and the speakers are summed up.

Transcripts are openai-whisper's result shape (segments with ``start``, ``end``, ``text``,
``words``); turns come from :mod:`.pipeline`.
"""

from __future__ import annotations

import bisect
from typing import Any

from handler.pipelines.diarize.pipeline import Turn


def speaker_of(turns: list[Turn], start: float, end: float, *, starts: list[float] | None = None) -> str | None:
    """The speaker of ``[start, end]``: the turn overlapping it most, else the nearest turn."""
    if not turns:
        return None
    starts = starts if starts is not None else [turn.start for turn in turns]
    first = max(bisect.bisect_right(starts, start) - 1, 0)
    best, best_overlap = None, 0.0
    for turn in turns[first:]:
        if turn.start > end:
            break
        overlap = min(end, turn.end) - max(start, turn.start)
        if overlap > best_overlap:
            best, best_overlap = turn.speaker, overlap
    if best is not None:
        return best
    middle = (start + end) / 2
    nearest = min(turns, key=lambda turn: 0.0 if turn.start <= middle <= turn.end
                  else min(abs(turn.start - middle), abs(turn.end - middle)))
    return nearest.speaker


def label_segments(segments: list[dict[str, Any]], turns: list[Turn]) -> list[dict[str, Any]]:
    """``segments`` with a ``speaker`` each (and on each word), split where the words' speaker
    changes. A split piece keeps its parent's scores; its ``tokens`` are empty (they are not
    cut along with the words)."""
    starts = [turn.start for turn in turns]
    labelled: list[dict[str, Any]] = []
    for segment in segments:
        words = [{**word, "speaker": speaker_of(turns, word["start"], word["end"], starts=starts)}
                 for word in segment.get("words") or []]
        if not words:
            labelled.append({**segment, "speaker": speaker_of(turns, segment["start"], segment["end"], starts=starts)})
            continue
        runs: list[list[dict[str, Any]]] = [[words[0]]]
        for word in words[1:]:
            if word["speaker"] == runs[-1][-1]["speaker"]:
                runs[-1].append(word)
            else:
                runs.append([word])
        if len(runs) == 1:
            labelled.append({**segment, "words": words, "speaker": words[0]["speaker"]})
            continue
        for number, run in enumerate(runs):
            labelled.append({
                **segment, "words": run, "speaker": run[0]["speaker"],
                "start": segment["start"] if number == 0 else run[0]["start"],
                "end": segment["end"] if number == len(runs) - 1 else run[-1]["end"],
                "text": "".join(word["word"] for word in run), "tokens": [],
            })
    return labelled


def speaker_summary(turns: list[Turn]) -> list[dict[str, Any]]:
    """Each speaker once, in order of first speech, with the seconds they spoke."""
    spoken: dict[str, float] = {}
    for turn in turns:
        spoken[turn.speaker] = spoken.get(turn.speaker, 0.0) + (turn.end - turn.start)
    return [{"label": label, "seconds": round(seconds, 3)} for label, seconds in spoken.items()]
