"""Comments and docstrings in ``handler/`` say why, and leave benchmark figures to bench/RESULTS.md:
a figure copied into code goes stale the day the code or the machine changes."""

from __future__ import annotations

import ast
import io
import re
import tokenize
from collections.abc import Iterator
from pathlib import Path

import pytest

HANDLER = Path(__file__).resolve().parents[1] / "handler"
# A quantity: a duration, a ratio, a share or a WER difference ("0.2 s", "3.4x", "4.7%", "1.3 points").
QUANTITY = re.compile(r"(?<![\w.])~?\d+(?:\.\d+)?(?:-\d+(?:\.\d+)?)?\s?(?:(?P<compared>x|%|points)|ms|s)(?!\w)")
# WER given as a number ("WER 0.058"): a measurement whatever the sentence says.
WER = re.compile(r"\bWER (?:of )?\d")
# Words that make a duration a measurement: "30 s windows" is the design, "took 3.1 ms" a run's figure.
MEASURED = re.compile(r"\b(faster|slower|speed|speedup|took|takes|costs?|paid|spent|saves?|saved|measured|"
                      r"profiled|per layer)\b", re.IGNORECASE)


def figures(text: str) -> list[str]:
    """The sentences of ``text`` that hold a benchmark figure: a ratio, a share, a WER or a
    difference in points anywhere, or a duration in a sentence about what something cost."""
    found = []
    for sentence in re.split(r"(?<=[.;!?])\s+", " ".join(text.split())):
        quantities = list(QUANTITY.finditer(sentence))
        if WER.search(sentence) or any(q["compared"] for q in quantities) or (quantities and MEASURED.search(sentence)):
            found.append(sentence)
    return found


def prose(path: Path) -> Iterator[tuple[int, str]]:
    """Each comment (consecutive comment lines as one) and each docstring of ``path``, with its line."""
    source = path.read_text()
    block: list[str] = []
    start = last = 0
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type != tokenize.COMMENT:
            continue
        if block and token.start[0] != last + 1:
            yield start, " ".join(block)
            block = []
        if not block:
            start = token.start[0]
        block.append(token.string.lstrip("#").strip())
        last = token.start[0]
    if block:
        yield start, " ".join(block)
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            docstring = ast.get_docstring(node)
            if docstring:
                yield node.body[0].lineno, docstring


@pytest.mark.parametrize("path", sorted(HANDLER.rglob("*.py")), ids=lambda p: str(p.relative_to(HANDLER)))
def test_no_benchmark_figure_in_a_comment(path: Path) -> None:
    """A comment or docstring may give the design's numbers (a 30 s window, a 0.2 s tail) but not a
    measurement: it says why, and bench/RESULTS.md holds the figure. Citing RESULTS.md beside a copied
    figure is not enough, since the copy is what goes stale."""
    found = [f"{path.relative_to(HANDLER)}:{line}: {sentence}"
             for line, text in prose(path) for sentence in figures(text)]
    assert not found, "\n".join(found)


@pytest.mark.parametrize("text", [
    "a job runs 4.7% faster (bench/RESULTS.md, fifth run)",
    "upstream's broadcast took torch's CPU attention 3.1 ms per layer and step",
    "2 windows decoded 3.4x faster on the CPU",
    "VAD takes about 1.7 s per 4 minutes of audio on one core.",
    "those chunks cost 0.3 points of WER on real speech",
    "tiny.en's chunks made WER 0.065 without it",
])
def test_the_check_sees_a_figure(text: str) -> None:
    """The figures that comments in handler/ carried before they moved to bench/RESULTS.md."""
    assert figures(text)


@pytest.mark.parametrize("text", [
    "Windows of at most 30 s, each cut moved to the quietest 100 ms within 8 s before the boundary.",
    "A tail shorter than this (0.2 s) is not worth a window of its own.",
    "Silero's window at 16 kHz (32 ms).",
    "See bench/RESULTS.md for what it gains.",
])
def test_the_check_leaves_the_design_alone(text: str) -> None:
    """Lengths and steps that the code is built on are not measurements."""
    assert not figures(text)
