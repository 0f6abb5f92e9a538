"""Each job's private temporary directory, removed whatever happens."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

JOB_DIR_PREFIX = "media-job-"


@contextmanager
def job_directory(root: Path) -> Iterator[Path]:
    """A fresh directory under ``root`` for one job, deleted on exit."""
    root.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=JOB_DIR_PREFIX, dir=root))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
