"""Results kept in the bucket, so the same request is never computed twice, on any worker.

A result is stored under a key derived from the task, the model's identity (a hash of its
weights, not its name), every input field that changes the output (after validation, so
defaults and spellings are normalised), and a hash of the input media's bytes. The bucket is
the only shared state of an endpoint's workers, so a result one worker computed is a hit on
every other. An entry carries a checksum of itself and is trusted only when it verifies and
every file it names still exists; anything else is a miss (and is overwritten by the next
result). The storage errors of a lookup or a store never fail the job: the cache is an
optimisation, so they are logged and the job computes (or keeps its computed result).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from handler.errors import WorkerError
from handler.io.storage import S3Storage
from handler.logs import get_logger

log = get_logger(__name__)

_VERSION = 1
_MAX_ENTRY_BYTES = 8 * 2**20
# Fields of a result that belong to one job, never to a cached answer.
_PER_JOB = ("request_id", "timings", "cached")


def cache_key(*, task: str, model: str, fields: dict[str, Any], media: str | None) -> str:
    """The entry's name: a hash of everything that decides the result."""
    identity = {"v": _VERSION, "task": task, "model": model, "fields": fields, "media": media}
    return hashlib.sha256(_canonical(identity)).hexdigest()


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


class ResultCache:
    """Entries under ``prefix/`` in one bucket."""

    def __init__(self, storage: S3Storage, prefix: str) -> None:
        self._storage = storage
        self._prefix = prefix
        # Which store this is: identical jobs share a flight only within one store.
        self.scope = (storage.bucket.endpoint_url, storage.bucket.bucket_name())

    def _entry_key(self, key: str) -> str:
        return f"{self._prefix}/{key[:2]}/{key}.json"

    def lookup(self, key: str) -> dict[str, Any] | None:
        """The cached output with fresh URLs, or None (no entry, a corrupt one, or a missing file)."""
        try:
            raw = self._storage.read_small(self._entry_key(key), max_bytes=_MAX_ENTRY_BYTES)
            output = _verified(raw, key) if raw is not None else None
            if output is None:
                return None
            return {**output, "files": [self._refresh(file) for file in output.get("files", [])]}
        except (_StaleEntry, WorkerError) as exc:
            log.warning("cache.ignored", key=key, reason=str(exc))
            return None

    def _refresh(self, file: dict[str, Any]) -> dict[str, Any]:
        if "key" not in file or not self._storage.exists(file["key"]):
            raise _StaleEntry(f"output {file.get('name')!r} is gone")
        return {**file, "url": self._storage.presign(file["key"])}

    def store(self, key: str, output: dict[str, Any]) -> None:
        kept = {name: value for name, value in output.items() if name not in _PER_JOB}
        kept["files"] = [{k: v for k, v in file.items() if k != "url"} for file in kept.get("files", [])]
        entry = {"key": key, "sha256": hashlib.sha256(_canonical(kept)).hexdigest(), "output": kept}
        try:
            self._storage.write_small(self._entry_key(key), _canonical(entry))
        except WorkerError as exc:
            log.warning("cache.store_failed", key=key, error=exc.message)


class _StaleEntry(Exception):
    """An entry that must not be returned: it names an output that no longer exists."""


def _verified(raw: bytes, key: str) -> dict[str, Any] | None:
    try:
        entry = json.loads(raw)
        output = entry["output"]
        sound = entry["key"] == key and entry["sha256"] == hashlib.sha256(_canonical(output)).hexdigest()
    except (ValueError, KeyError, TypeError):
        sound = False
    if not sound:
        raise _StaleEntry("corrupt entry")
    assert isinstance(output, dict)
    return output
