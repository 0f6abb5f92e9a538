"""Scores of a diarization against a conversation's reference: DER (pyannote.metrics, the
reference implementation of NIST's measure) and the share of words given the right speaker."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from testkit.conversations import Conversation

# Speech boundaries are the VAD's in the reference: 0.25 s either side of each is not scored.
COLLAR_S = 0.25


@dataclass(frozen=True)
class Scores:
    """DER and its parts (seconds), words right and words scored."""

    total_s: float
    confusion_s: float
    missed_s: float
    false_alarm_s: float
    words_right: int = 0
    words: int = 0

    @property
    def der(self) -> float:
        return (self.confusion_s + self.missed_s + self.false_alarm_s) / self.total_s if self.total_s else 0.0

    @property
    def word_accuracy(self) -> float:
        return self.words_right / self.words if self.words else 1.0

    def __add__(self, other: Scores) -> Scores:
        return Scores(self.total_s + other.total_s, self.confusion_s + other.confusion_s,
                      self.missed_s + other.missed_s, self.false_alarm_s + other.false_alarm_s,
                      self.words_right + other.words_right, self.words + other.words)


def _annotations(conversation: Conversation, turns: Iterable[tuple[float, float, str]]) -> tuple[Any, Any]:
    from pyannote.core import Annotation, Segment

    reference, hypothesis = Annotation(), Annotation()
    for turn in conversation.speech:
        reference[Segment(turn.start, turn.end)] = turn.speaker
    for start, end, speaker in turns:
        hypothesis[Segment(start, end)] = speaker
    return reference, hypothesis


def score(conversation: Conversation, turns: Iterable[tuple[float, float, str]],
          words: list[dict[str, Any]] | None = None) -> Scores:
    """DER of ``turns`` (start, end, speaker) with a 0.25 s collar, and of ``words`` (each with a
    ``speaker``) the share whose speaker, mapped to the reference's as DER maps them, is the
    one speaking at the word's middle."""
    from pyannote.metrics.diarization import DiarizationErrorRate

    reference, hypothesis = _annotations(conversation, turns)
    metric = DiarizationErrorRate(collar=COLLAR_S, skip_overlap=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pyannote warns when the hypothesis has no "uri"
        parts = metric(reference, hypothesis, detailed=True)
        mapping = metric.optimal_mapping(reference, hypothesis)
    right = scored = 0
    for word in words or []:
        truth = conversation.speaker_at((word["start"] + word["end"]) / 2)
        if truth is None:
            continue  # in the silence between turns
        scored += 1
        right += mapping.get(word.get("speaker")) == truth
    return Scores(parts["total"], parts["confusion"], parts["missed detection"], parts["false alarm"],
                  right, scored)


def known_names_right(conversation: Conversation, turns: Iterable[tuple[float, float, str]]) -> float:
    """The share of reference speech whose turn carries the reference speaker's own name."""
    from pyannote.core import Segment

    reference, hypothesis = _annotations(conversation, turns)
    right = total = 0.0
    for segment, _, speaker in reference.itertracks(yield_label=True):
        total += segment.duration
        for other, _, name in hypothesis.crop(segment).itertracks(yield_label=True):
            if name == speaker:
                right += (segment & Segment(other.start, other.end)).duration
    return right / total if total else 1.0
