"""Turn a media input (https URL, base64, or an object in the job's bucket) into a local file.

Tasks never hand a URL to a model or to ffmpeg: they get a path inside the job's directory.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import unquote, urlsplit

from handler.cancel import CancelToken
from handler.config import Settings
from handler.errors import InputTooLarge, InvalidInput, shown
from handler.io.download import Downloader
from handler.io.storage import S3Storage

_DATA_URI = re.compile(r"^data:[\w/+.-]*(;[\w=.-]+)*;base64,", re.IGNORECASE)
_WHITESPACE = re.compile(r"\s+")
# A file that came with the job (an HTTP upload, already in the job's directory): attached://<name>.
ATTACHED = "attached://"


def decoded_size(encoded_length: int) -> int:
    """Upper bound of the bytes that ``encoded_length`` base64 characters decode to."""
    return (encoded_length * 3) // 4


def decode_base64_to(data: str, target: Path, *, max_bytes: int, field: str) -> int:
    """Write base64 ``data`` (optionally a data: URI) to ``target``, checking size first."""
    data = _DATA_URI.sub("", data, count=1)
    if decoded_size(len(data)) > max_bytes + 2:
        raise InputTooLarge(f"{field}: decoded data would exceed {max_bytes} bytes", field=field)
    try:
        raw = base64.b64decode(_WHITESPACE.sub("", data), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidInput(f"{field}: not valid base64 ({exc})", field=field) from exc
    if len(raw) > max_bytes:
        raise InputTooLarge(f"{field}: decoded data exceeds {max_bytes} bytes", field=field)
    target.write_bytes(raw)
    return len(raw)


def parse_bucket_url(url: str, *, field: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> (bucket, key)."""
    parts = urlsplit(url)
    key = unquote(parts.path.lstrip("/"))
    if not parts.netloc or not key:
        raise InvalidInput(f"{field}: expected s3://bucket/key", field=field)
    return parts.netloc, key


class MediaInputs:
    """Fetches one job's inputs into its directory; stops when the job is cancelled."""

    def __init__(
        self, settings: Settings, downloader: Downloader, bucket: S3Storage | None, cancel: CancelToken | None = None,
        *, attachments: Mapping[str, Path] | None = None,
    ) -> None:
        self._settings = settings
        self._downloader = downloader
        # The job's bucket, for its s3:// inputs; None: it has none.
        self._bucket = bucket
        self._cancel = cancel or CancelToken()
        # Only a job that arrived with files has any; a queued job naming attached:// gets an error.
        self._attachments = dict(attachments or {})

    def from_url(self, url: str, target: Path, *, field: str, delete_after_read: bool = False) -> int:
        """Fetch an ``https://`` (or allowed ``http://``) URL or an ``s3://`` object.

        ``delete_after_read`` removes an uploaded object (under UPLOAD_PREFIX) once it is here.
        """
        if url.startswith(ATTACHED):
            return self._attached(url.removeprefix(ATTACHED), target, field=field)
        if not url.lower().startswith("s3://"):
            if delete_after_read:
                raise InvalidInput("delete_after_read: only s3:// uploads can be deleted", field="delete_after_read")
            return self._downloader.fetch(url, target, field=field, cancel=self._cancel)
        bucket, key = parse_bucket_url(url, field=field)
        prefix = self._settings.upload_prefix + "/"
        if delete_after_read and not key.startswith(prefix):
            raise InvalidInput(f"delete_after_read: only uploads ({prefix}...) can be deleted",
                               field="delete_after_read")
        if self._bucket is None:
            raise InvalidInput(f"{field}: s3:// inputs need a configured bucket", field=field)
        size = self._bucket.fetch_object(
            bucket, key, target, max_bytes=self._settings.download_max_bytes, field=field, cancel=self._cancel
        )
        if delete_after_read:
            self._bucket.delete_object(bucket, key, field=field, cancel=self._cancel)
        return size

    def _attached(self, name: str, target: Path, *, field: str) -> int:
        """Move an attached file (size-checked as it arrived) to ``target``; it is in the same directory."""
        source = self._attachments.pop(name, None)
        if source is None:
            raise InvalidInput(f"{field}: no file {shown(name)} came with this job", field=field)
        size = source.stat().st_size
        if size > self._settings.download_max_bytes:
            raise InputTooLarge(f"{field}: {size} bytes, the limit is {self._settings.download_max_bytes}",
                                field=field)
        os.replace(source, target)
        return size

    def from_base64(self, data: str, target: Path, *, field: str) -> int:
        return decode_base64_to(data, target, max_bytes=self._settings.base64_max_bytes, field=field)
