"""Results kept in the bucket, so the same request is never computed twice, on any worker.

A result is stored under a key derived from the task, the model's identity (a hash of its
weights, not its name), the effective value of every input field and setting that shapes the
output, and a hash of the input media's bytes. The bucket is the only shared state of an
endpoint's workers, so a result one worker computed is a hit on every other.

Whoever can write the bucket can write an entry (a job's own ``s3Config`` bucket is the job's
to write), so an entry is never obeyed as stored:

* it carries an HMAC over its key, its bucket and its output, made with a worker-side secret
  no job sees (``RESULT_CACHE_SECRET``); an entry that fails it is a miss, and is replaced;
* the result is rebuilt from the task's allow-list of output fields only, so nothing the
  handler itself adds (``refresh_worker``, ``error``, ...) can come from an entry;
* every file must be an object the worker wrote: under ``BUCKET_PREFIX``, in one job's folder,
  and still there.

A lookup has one deadline (``RESULT_CACHE_TIMEOUT_S``) and stops with its job: a slow,
failing or malformed entry is a miss, never a wait or an error. A store that fails is logged;
the job keeps its computed result.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import time
from collections.abc import Iterable
from typing import Any

from handler.cancel import CancelToken
from handler.config import Settings
from handler.errors import WorkerError
from handler.io.storage import S3Storage
from handler.logs import get_logger, register_secret

log = get_logger(__name__)

_VERSION = 2
_MAX_ENTRY_BYTES = 8 * 2**20
# What a cached file may say about itself; its URL is presigned afresh on every hit.
_FILE_FIELDS = {"name": str, "content_type": str, "size": int, "key": str}


def cache_key(*, task: str, fields: dict[str, Any], media: str | None) -> str:
    """The entry's name: a hash of everything that decides the result."""
    identity = {"v": _VERSION, "task": task, "fields": fields, "media": media}
    return hashlib.sha256(_canonical(identity)).hexdigest()


def cache_secret(settings: Settings) -> bytes:
    """The key of the entries' HMAC: RESULT_CACHE_SECRET, else one derived from the operator's
    bucket secret (every worker of an endpoint has it, no job sees it), else random (entries
    then verify only on the worker that wrote them)."""
    if settings.result_cache_secret is not None:
        register_secret(settings.result_cache_secret)
        return settings.result_cache_secret.encode()
    if settings.bucket is not None:
        return hmac.new(settings.bucket.secret_access_key.encode(), b"result-cache", hashlib.sha256).digest()
    return secrets.token_bytes(32)


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


class ResultCache:
    """Entries under ``prefix/`` in one bucket, authenticated with ``secret``."""

    def __init__(
        self, storage: S3Storage, *, prefix: str, output_prefix: str, secret: bytes, timeout_s: float
    ) -> None:
        self._storage = storage
        self._prefix = prefix
        self._secret = secret
        self._timeout_s = timeout_s
        bucket = storage.bucket
        # Which store this is, and who asks: identical jobs share a flight only within one
        # store and with the same credentials (a job with wrong ones must not join another's).
        credentials = hashlib.sha256(f"{bucket.access_key_id}\0{bucket.secret_access_key}".encode()).hexdigest()
        self.scope = (bucket.endpoint_url, bucket.bucket_name(), credentials)
        # An output object of the worker's: BUCKET_PREFIX/YYYY/MM/DD/<request id>/<file>.
        lead = re.escape(output_prefix + "/") if output_prefix else ""
        self._output_key = re.compile(lead + r"\d{4}/\d{2}/\d{2}/(?P<job>[0-9a-f]{32})/[A-Za-z0-9][A-Za-z0-9._-]*")

    def _entry_key(self, key: str) -> str:
        return f"{self._prefix}/{key[:2]}/{key}.json"

    def _mac(self, key: str, output: Any) -> str:
        message = _canonical({"key": key, "bucket": self.scope[:2], "output": output})
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    def lookup(self, key: str, *, fields: Iterable[str], cancel: CancelToken) -> dict[str, Any] | None:
        """The cached output (only ``fields``) with fresh URLs, or None: no entry, or one that is
        forged, malformed, names a file that is gone, or did not arrive within the deadline."""
        deadline = time.monotonic() + self._timeout_s
        try:
            raw = self._storage.read_small(self._entry_key(key), max_bytes=_MAX_ENTRY_BYTES,
                                           timeout_s=self._timeout_s, cancel=cancel)
            if raw is None:
                return None
            output = self._rebuild(self._verified(raw, key), fields)
            output["files"] = [self._refresh(file, deadline, cancel) for file in output.get("files", [])]
            return output
        except (_StaleEntry, WorkerError) as exc:
            cancel.check()
            log.warning("cache.ignored", key=key, reason=str(exc))
            return None

    def _verified(self, raw: bytes, key: str) -> dict[str, Any]:
        try:
            entry = json.loads(raw)
            output = entry["output"]
            sound = entry["key"] == key and hmac.compare_digest(str(entry["mac"]), self._mac(key, output))
        except (ValueError, KeyError, TypeError, RecursionError):
            sound = False
        if not sound or not isinstance(output, dict):
            raise _StaleEntry("entry not authentic")
        return output

    def _rebuild(self, output: dict[str, Any], fields: Iterable[str]) -> dict[str, Any]:
        """The task's fields of ``output``, its files checked one by one."""
        rebuilt = {name: output[name] for name in fields if name in output and name != "files"}
        files = output.get("files", [])
        if not isinstance(files, list):
            raise _StaleEntry("files is not a list")
        rebuilt["files"] = [_file(file) for file in files]
        jobs = {self._job_of(file["key"]) for file in rebuilt["files"]}
        if len(jobs) > 1:
            raise _StaleEntry("files of several jobs")
        return rebuilt

    def _job_of(self, key: str) -> str:
        found = self._output_key.fullmatch(key)
        if found is None or ".." in key:
            raise _StaleEntry("a file outside the worker's outputs")
        return found["job"]

    def _refresh(self, file: dict[str, Any], deadline: float, cancel: CancelToken) -> dict[str, Any]:
        left = deadline - time.monotonic()
        if left <= 0 or not self._storage.exists(file["key"], timeout_s=left, cancel=cancel):
            raise _StaleEntry(f"output {file['name']!r} is gone")
        return {**file, "url": self._storage.presign(file["key"])}

    def store(self, key: str, output: dict[str, Any], *, fields: Iterable[str], cancel: CancelToken) -> None:
        kept = {name: output[name] for name in fields if name in output}
        kept["files"] = [{k: v for k, v in file.items() if k in _FILE_FIELDS} for file in output.get("files", [])]
        entry = {"key": key, "mac": self._mac(key, kept), "output": kept}
        try:
            self._storage.write_small(self._entry_key(key), _canonical(entry), timeout_s=self._timeout_s,
                                      cancel=cancel)
        except WorkerError as exc:
            cancel.check()
            log.warning("cache.store_failed", key=key, error=exc.message)


class _StaleEntry(Exception):
    """An entry that must not be returned: not authentic, malformed, or naming a missing output."""


def _file(file: Any) -> dict[str, Any]:
    if not isinstance(file, dict) or any(not isinstance(file.get(k), t) for k, t in _FILE_FIELDS.items()):
        raise _StaleEntry("a malformed file")
    return {k: file[k] for k in _FILE_FIELDS}
