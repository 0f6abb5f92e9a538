"""What a model is, by its bytes: the result cache keys on weights, not on names.

Hashing a multi-GB checkpoint takes seconds, so each weights file's hash is computed once per
process (remembered by path, size and modification time, for the most recent few hundred files)
and, for models in the Hugging Face cache, the snapshot's revision (the commit of the weights)
stands for its files. A job's media is hashed once and never remembered: it is never seen again.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from pathlib import Path

_CHUNK = 4 * 2**20
# Weights files remembered: far more than a worker serves, so a memo that never grows past it.
_KNOWN_MAX = 512
# Guards _known: the hashes of files already read, by (path, size, mtime), least recent first.
_known_lock = threading.Lock()
_known: OrderedDict[tuple[str, int, int], str] = OrderedDict()


def file_identity(path: Path, *, remember: bool = True) -> str:
    """sha256 of a file's bytes (remembered while the file is unchanged, unless ``remember`` is False)."""
    stat = path.stat()
    marker = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    with _known_lock:
        found = _known.get(marker)
        if found is not None:
            _known.move_to_end(marker)
            return found
    digest = hashlib.sha256()
    with path.open("rb") as source:
        while chunk := source.read(_CHUNK):
            digest.update(chunk)
    value = digest.hexdigest()
    if remember:
        with _known_lock:
            _known[marker] = value
            while len(_known) > _KNOWN_MAX:
                _known.popitem(last=False)
    return value


def directory_identity(path: Path) -> str:
    """A hash over every file of a model directory (names and contents)."""
    if path.parent.name == "snapshots":  # a Hugging Face cache snapshot: its name is the revision
        return f"revision:{path.name}"
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode())
        digest.update(file_identity(file).encode())
    return digest.hexdigest()
