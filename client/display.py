"""Progress bars (one per file and a total, on stderr) and the summary table, drawn by rich.

A bar measures what can be measured: bytes while uploading, the worker's ``i/n`` while it
reports one (RunPod shows progress updates in ``/status`` while a job runs), and a full bar
once the file is done; the state column says where the file is: queued, uploading, running,
retrying, writing, done or failed.
"""

from __future__ import annotations

import threading
from pathlib import Path
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from client.transcribe import FileResult

_NOTE_CHARS = 48


class Display:
    """The live bars of a run; a ``transcribe.Report``."""

    def __init__(self, paths: list[Path], *, console: Console, enabled: bool = True) -> None:
        self._progress = Progress(
            TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[state]}"),
            TimeElapsedColumn(), TextColumn("{task.fields[note]}"), console=console, disable=not enabled,
        )
        self._bars = {path: self._progress.add_task(path.name, total=1, state="queued", note="") for path in paths}
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
        with self._lock:
            changed = self._states.get(path) != state
            self._states[path] = state
        if total is not None:
            self._progress.update(bar, total=total, completed=completed or 0, state=state, note=note[:_NOTE_CHARS])
        elif changed:  # a new stage with nothing to measure starts from an empty bar
            self._progress.update(bar, total=1, completed=0, state=state, note=note[:_NOTE_CHARS])
        else:
            self._progress.update(bar, state=state, note=note[:_NOTE_CHARS])

    def finished(self, result: FileResult) -> None:
        bar = self._bars[result.path]
        state = "done" if result.ok else f"failed: {result.code}"
        self._progress.update(bar, total=1, completed=1, state=state, note="")
        with self._lock:
            self._finished += 1
            done = self._finished
        self._progress.update(self._total, completed=done, state=f"{done}/{len(self._bars)} done")


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"


def _outcome(result: FileResult) -> str:
    if result.ok:
        return "ok"
    message = result.message.removeprefix(f"{result.code}: ")
    return f"{result.code}: {message}"[:120]


def summary_table(results: list[FileResult], *, wall_s: float) -> Table:
    """File, audio duration, outcome, attempts, time, real-time factor; totals in the caption."""
    table = Table(title="transcriptions")
    table.add_column("file", overflow="fold")
    table.add_column("duration", justify="right")
    table.add_column("outcome", overflow="fold")
    table.add_column("attempts", justify="right")
    table.add_column("time", justify="right")
    table.add_column("RTF", justify="right")
    for result in results:
        rtf = result.real_time_factor
        table.add_row(result.path.name, _seconds(result.duration_s), _outcome(result), str(result.attempts),
                      _seconds(result.wall_s), "-" if rtf is None else f"{rtf:.2f}x")
    succeeded = sum(result.ok for result in results)
    table.caption = (f"{succeeded} of {len(results)} files transcribed in {wall_s:.1f} s; "
                     f"sum of file times {sum(r.wall_s for r in results):.1f} s")
    return table
