"""Each job's private temporary directory: made on first use, removed whatever happens."""

from __future__ import annotations

import shutil
import tempfile
import threading
from collections.abc import Iterator
from concurrent.futures import Executor
from contextlib import contextmanager
from pathlib import Path

JOB_DIR_PREFIX = "media-job-"


class Workspace:
    """A job's directory under ``root``, created only when a task first asks for it.

    Jobs that fail validation, or need no files, never touch the disk.
    """

    def __init__(self, root: Path) -> None:
        self._root = root
        self._path: Path | None = None
        # A cancelled job's threads, which may still write here until they see the cancel.
        self._writers: Executor | None = None

    @property
    def path(self) -> Path:
        if self._path is None:
            self._root.mkdir(parents=True, exist_ok=True)
            self._path = Path(tempfile.mkdtemp(prefix=JOB_DIR_PREFIX, dir=self._root))
        return self._path

    def remove_after(self, writers: Executor) -> None:
        """Whoever removes the directory, it goes only once ``writers`` have stopped: a cancelled
        job is answered at once, but a thread of it may be in the middle of writing a file here."""
        self._writers = writers

    def remove(self) -> None:
        writers, self._writers = self._writers, None
        if writers is None:
            self._remove_now()
            return

        def after_writers() -> None:
            writers.shutdown(wait=True)
            self._remove_now()  # the directory too if a writer made it only now

        threading.Thread(target=after_writers, name="workspace-removal", daemon=True).start()

    def _remove_now(self) -> None:
        if self._path is not None:
            shutil.rmtree(self._path, ignore_errors=True)
            self._path = None


@contextmanager
def job_workspace(root: Path) -> Iterator[Workspace]:
    """A workspace for one job, deleted on exit."""
    workspace = Workspace(root)
    try:
        yield workspace
    finally:
        workspace.remove()
