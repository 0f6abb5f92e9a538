"""A file to the bucket by a presigned POST (S3's browser upload), streamed, with progress.

The worker's ``upload`` task answers a URL and form fields whose policy the store enforces
(size, key, expiry); the file goes as ``multipart/form-data``: the given fields first, then
``file`` last, as S3 requires. The body is streamed from disk, never held in memory.
"""

from __future__ import annotations

import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from client.addresses import UrlPolicy
from client.api import ApiError, checked_opener, http_errors

CHUNK = 1 << 20
OnBytes = Callable[[int], None]


def _part(boundary: str, name: str, value: str) -> bytes:
    return (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n").encode()


def _file_head(boundary: str, file_name: str) -> bytes:
    safe = file_name.replace('"', "_").replace("\r", "_").replace("\n", "_")
    return (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{safe}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()


def _stream(path: Path, head: bytes, tail: bytes, on_bytes: OnBytes | None) -> Iterator[bytes]:
    yield head
    with path.open("rb") as source:
        while chunk := source.read(CHUNK):
            yield chunk
            if on_bytes is not None:
                on_bytes(len(chunk))
    yield tail


def post_file(url: str, fields: Mapping[str, str], path: Path, *, policy: UrlPolicy, timeout: float,
              on_bytes: OnBytes | None = None) -> None:
    """POST ``path`` with ``fields`` to a presigned POST ``url``; raises ``ApiError`` on failure.

    S3 refuses with a 4xx (policy broken, too large, expired) which trying again will not change.
    The URL is the endpoint's word: it must pass ``policy``, and no key goes with the file.
    """
    with http_errors("upload"):
        policy.check(url, what="upload")
    boundary = uuid.uuid4().hex
    head = b"".join(_part(boundary, name, str(value)) for name, value in fields.items())
    head += _file_head(boundary, path.name)
    tail = f"\r\n--{boundary}--\r\n".encode()
    length = len(head) + path.stat().st_size + len(tail)
    request = urllib.request.Request(  # noqa: S310 (the URL is the worker's presigned POST)
        url, data=_stream(path, head, tail, on_bytes), method="POST",
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}", "Content-Length": str(length)},
    )
    with http_errors("upload"), checked_opener(policy, "upload").open(request, timeout=timeout) as response:
        response.read()


def upload_target(output: dict[str, Any]) -> tuple[str, dict[str, str], str]:
    """(POST URL, form fields, ``s3://`` reference) from the ``upload`` task's output."""
    upload = output.get("upload")
    audio = output.get("audio")
    if not isinstance(upload, dict) or not isinstance(audio, str) or not isinstance(upload.get("url"), str):
        raise ApiError("BAD_RESPONSE", "upload: the reply has no upload URL or audio reference", retryable=True)
    fields = upload.get("fields") or {}
    if not isinstance(fields, dict):
        raise ApiError("BAD_RESPONSE", "upload: the reply's upload fields are not an object", retryable=True)
    return upload["url"], {str(k): str(v) for k, v in fields.items()}, audio
