"""Which of a recording's windows are decoded together, and what each is prompted with."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from whisper.model import Whisper

from handler.pipelines.whisper.options import DecodeOptions
from handler.pipelines.whisper.windows import WindowInput

# The fewest windows a section of conditioned windows holds (see Sections).
SECTION_WINDOWS = 3
# The most prompt tokens a window gets (DecodingTask keeps n_text_ctx // 2 - 1 = 223).
PROMPT_TOKENS = 223
# Text decoded above this temperature is not a prompt for what follows (as whisper.transcribe).
_PROMPT_RESET_TEMPERATURE = 0.5


class Sections:
    """Which of a recording's windows are decoded together, and what each is prompted with.

    ``whisper.transcribe`` prompts each window with the text before it
    (``condition_on_previous_text``, which lowers the WER of tiny.en's chunks on real speech here
    too: bench/RESULTS.md), which makes its windows one sequence. Here the windows are cut into
    sections of at least ``SECTION_WINDOWS`` consecutive windows, at most ``width`` (the batch
    size) of them, decoded side by side one round at a time; each window is prompted with the
    text before it in its section, the first of a section with the initial prompt. A long
    recording keeps full batches; a short one trades width for context. Without conditioning
    every window is decoded in the first round, each prompted with the initial prompt only.
    """

    def __init__(self, windows: Sequence[WindowInput], *, width: int, options: DecodeOptions,
                 initial: tuple[int, ...] = ()) -> None:
        self._windows = list(windows)
        self._rounds, self._prompted_by = _plan(len(self._windows), width, condition=options.condition)
        self._condition = options.condition
        self._initial = initial[-PROMPT_TOKENS:]
        self._prompt_after: dict[int, tuple[int, ...]] = {}  # the prompt of a window following window i
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
            prompt = next_prompt(prompt, tokens, segments[-1]["temperature"], condition=self._condition)
        self._prompt_after[index] = prompt

    def segments(self) -> list[dict[str, Any]]:
        """Every window's segments so far, in time order."""
        return [segment for index in sorted(self._found) for segment in self._found[index]]

    def _prompt(self, index: int) -> tuple[int, ...]:
        previous = self._prompted_by[index]
        return self._initial if previous is None else self._prompt_after[previous]


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


def next_prompt(prompt: tuple[int, ...], tokens: Sequence[int], temperature: float, *,
                 condition: bool) -> tuple[int, ...]:
    """The prompt of what follows text ``tokens`` decoded at ``temperature`` with ``prompt`` (the
    next window of a section, or a window's tail): as whisper.transcribe, the text appended and
    the last 223 tokens kept; nothing after text this uncertain; the same prompt without conditioning."""
    if not condition:
        return prompt
    if temperature > _PROMPT_RESET_TEMPERATURE:
        return ()
    return (*prompt, *tokens)[-PROMPT_TOKENS:]


def initial_prompt(model: Whisper, options: DecodeOptions) -> tuple[int, ...]:
    """The tokens of ``options.prompt`` (``initial_prompt``), as ``whisper.transcribe`` encodes it."""
    if not options.prompt:
        return ()
    return tuple(options.tokenizer(model).encode(" " + options.prompt.strip()))
