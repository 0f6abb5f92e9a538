"""Progress bars (one per file and a total, on stderr) and the summary table, drawn by rich.

A bar measures what can be measured: bytes while uploading, the worker's ``i/n`` while it
reports one (RunPod shows progress updates in ``/status`` while a job runs), and a full bar
once the file is done; the state column says where the file is: queued, uploading, running,
retrying, writing, done or failed.

Codes, messages and progress notes are the endpoint's text, and file names the user's: both
reach the terminal through ``printable`` and as plain ``Text``, never as rich markup, so no
reply can style the output, plant a link, crash it with a stray ``[/]``, or send the
terminal escape sequences (OSC 8 links, OSC 52 clipboard writes, C1 controls).
"""

from __future__ import annotations

import threading
import unicodedata
from pathlib import Path
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from client.transcribe import FileResult

_NOTE_CHARS = 48
# Controls (C0, DEL, C1), format characters (bidi overrides) and line/paragraph separators.
_UNPRINTABLE = frozenset({"Cc", "Cf", "Zl", "Zp"})


def _visible(char: str) -> str:
    if char in "\t\n\r":
        return " "
    if unicodedata.category(char) not in _UNPRINTABLE:
        return char
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str) -> str:
    """``text`` with every control or format character shown as its escape (ESC as ``\\x1b``)."""
    return "".join(map(_visible, text))


def plain(text: str) -> Text:
    """``text`` for rich as it is: printable, and never read as markup."""
    return Text(printable(text))


class Display:
    """The live bars of a run; a ``transcribe.Report``."""

    def __init__(self, paths: list[Path], *, console: Console, enabled: bool = True) -> None:
        self._progress = Progress(
            TextColumn("{task.description}", markup=False), BarColumn(),
            TextColumn("{task.fields[state]}", markup=False), TimeElapsedColumn(),
            TextColumn("{task.fields[note]}", markup=False), console=console, disable=not enabled,
        )
        self._bars = {path: self._progress.add_task(printable(path.name), total=1, state="queued", note="")
                      for path in paths}
        self._total = self._progress.add_task("total", total=len(paths), state=f"0/{len(paths)} done", note="")
        # Guards _states and _finished (rich guards its own bars).
        self._lock = threading.Lock()
        self._states: dict[Path, str] = {}
        self._finished = 0

    def __enter__(self) -> Display:
        self._progress.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._progress.stop()

    def update(self, path: Path, state: str, *, completed: float | None = None, total: float | None = None,
               note: str = "") -> None:
        bar = self._bars[path]
        note = printable(note[:_NOTE_CHARS])
        with self._lock:
            changed = self._states.get(path) != state
            self._states[path] = state
        if total is not None:
            self._progress.update(bar, total=total, completed=completed or 0, state=state, note=note)
        elif changed:  # a new stage with nothing to measure starts from an empty bar
            self._progress.update(bar, total=1, completed=0, state=state, note=note)
        else:
            self._progress.update(bar, state=state, note=note)

    def finished(self, result: FileResult) -> None:
        bar = self._bars[result.path]
        state = "done" if result.ok else printable(f"failed: {result.code}"[:_NOTE_CHARS])
        self._progress.update(bar, total=1, completed=1, state=state, note="")
        with self._lock:
            self._finished += 1
            done = self._finished
        self._progress.update(self._total, completed=done, state=f"{done}/{len(self._bars)} done")


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"


def _outcome(result: FileResult) -> Text:
    if result.ok:
        return Text("ok")
    message = result.message.removeprefix(f"{result.code}: ")
    return plain(f"{result.code}: {message}"[:120])


def summary_table(results: list[FileResult], *, wall_s: float) -> Table:
    """File, audio duration, outcome, attempts, time, real-time factor (and, for diarized
    transcriptions, each speaker's seconds); totals in the caption."""
    table = Table(title="transcriptions")
    table.add_column("file", overflow="fold")
    table.add_column("duration", justify="right")
    table.add_column("outcome", overflow="fold")
    table.add_column("attempts", justify="right")
    table.add_column("time", justify="right")
    table.add_column("RTF", justify="right")
    diarized = any(result.speakers for result in results)
    if diarized:
        table.add_column("speakers", overflow="fold")
    for result in results:
        rtf = result.real_time_factor
        row: list[Text | str] = [plain(result.path.name), _seconds(result.duration_s), _outcome(result),
                                 str(result.attempts), _seconds(result.wall_s), "-" if rtf is None else f"{rtf:.2f}x"]
        if diarized:
            row.append(plain(", ".join(f"{label} {seconds:.0f} s" for label, seconds in result.speakers) or "-"))
        table.add_row(*row)
    succeeded = sum(result.ok for result in results)
    table.caption = (f"{succeeded} of {len(results)} files transcribed in {wall_s:.1f} s; "
                     f"sum of file times {sum(r.wall_s for r in results):.1f} s")
    return table
