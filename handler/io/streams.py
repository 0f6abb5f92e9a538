"""One capped copy of a stream to a file, for every input that arrives in pieces (a download, a
bucket object): what really arrives is counted against the cap, not what the sender announced."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from handler.cancel import CancelToken


def copy_capped(
    chunks: Iterable[bytes], target: Path, *, max_bytes: int, cancel: CancelToken,
    too_large: Callable[[], Exception], check: Callable[[], None] | None = None,
) -> int:
    """Write ``chunks`` to ``target`` and return the bytes written; ``too_large()`` is raised past
    ``max_bytes``, ``check()`` runs before each write (a deadline). A read that fails after the job
    was cancelled (its socket shut down by the cancel hook) is a cancellation."""
    written = 0
    with target.open("wb") as out:
        try:
            for chunk in chunks:
                cancel.check()
                written += len(chunk)
                if written > max_bytes:
                    raise too_large()
                if check is not None:
                    check()
                out.write(chunk)
        except Exception:
            cancel.check()
            raise
    return written
