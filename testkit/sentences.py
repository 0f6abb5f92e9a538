"""Eight short sentences, one per job where concurrent jobs must each get their own back, and a
word of each that tiny.en hears in espeak's voice (checked one by one, in float32 and int8: in int8 at
beam 1 the fox is a "round-foc", and the lazy dog still lazy)."""

from __future__ import annotations

SENTENCES = (
    "Please send the report by Friday morning.",
    "The quick brown fox jumps over the lazy dog.",
    "We will meet again next week to review the numbers.",
    "Please close the window before you leave.",
    "The children are playing in the garden.",
    "Our meeting has been moved to Tuesday.",
    "Turn left at the bridge and follow the river north.",
    "My phone battery is almost empty.",
)
KEYWORDS = ("report", "lazy", "numbers", "window", "garden", "tuesday", "river", "battery")
