"""ffmpeg and ffprobe as child processes: started, watched for cancellation, run to a deadline.

The one place subprocess's errors are translated (in :func:`start`, :func:`watch` and :func:`run`):
a tool that is missing or cannot start is the worker's fault, a run past its deadline is the
caller's timeout error, and a cancelled job's children are killed at once. A tool's message
reaches an error only through :func:`tail`, with every file path replaced by a name the client
knows (a client never learns the worker's paths).
"""

from __future__ import annotations

import contextlib
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from handler.cancel import CancelToken
from handler.errors import WorkerError

_STDERR_TAIL = 400
# An absolute path (optionally with ffmpeg's file: prefix) in a tool's message.
_PATH = re.compile(r"(?<![\w.])(?:file:)?(?:/[^\s:'\"/]+)+/?")


def tail(stderr: bytes, name: str = "file") -> str:
    """The end of a tool's message, each path in it replaced by ``name``."""
    text = _PATH.sub(name, stderr.decode("utf-8", "replace")).strip()
    return text[-_STDERR_TAIL:] if text else "no details"


def start(args: list[str], **options: Any) -> subprocess.Popen[bytes]:
    try:
        return subprocess.Popen(args, **options)
    except FileNotFoundError as exc:
        raise WorkerError(f"{args[0]} is not installed") from exc
    except OSError as exc:
        raise WorkerError(f"{args[0]} could not start ({type(exc).__name__})") from exc


@contextlib.contextmanager
def watch(process: subprocess.Popen[bytes], cancel: CancelToken | None) -> Iterator[None]:
    """Kill ``process`` if the job is cancelled (or the block fails); raise Cancelled after."""
    token = cancel or CancelToken()
    try:
        with token.on_cancel(process.kill):
            yield
    finally:
        if process.poll() is None:
            process.kill()
        for stream in (process.stdin, process.stdout, process.stderr):
            if stream is not None:
                stream.close()
        process.wait()
    token.check()


def run(
    args: list[str], *, timeout_s: float, timeout_error: WorkerError, cancel: CancelToken | None = None,
    cwd: Path | None = None, stdin: bytes | None = None,
) -> tuple[int, bytes, bytes]:
    """Run a tool to its end (``stdin`` fed to it): (exit code, stdout, stderr); past ``timeout_s``,
    ``timeout_error``."""
    process = start(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd,
                    stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL)
    with watch(process, cancel):
        try:
            stdout, stderr = process.communicate(stdin, timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            raise timeout_error from exc
    if cancel is not None:
        cancel.check()
    return process.returncode, stdout, stderr
