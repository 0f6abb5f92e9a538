"""Where output files go: an S3-compatible bucket (presigned URLs) or, with none, inline base64.

This is the only module that imports botocore; its errors become ``UPLOAD_FAILED`` (or
``DOWNLOAD_FAILED`` for bucket inputs) here. Object keys are built by the worker from the
prefix, the date, the request id and a fixed file name, never from user strings.

Checksums are computed only when the S3 API requires them: newer botocore defaults add CRC
trailers that several S3-compatible stores reject.
"""

from __future__ import annotations

import base64
import re
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import boto3
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from handler.config import BucketSettings, Settings
from handler.errors import DownloadFailed, InputTooLarge, InvalidInput, UploadFailed
from handler.logs import get_logger, register_secret

log = get_logger(__name__)

_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]")
_DOTS = re.compile(r"\.{2,}")
MIB = 1024 * 1024
# Multipart settings: 16 MiB parts keep part counts low for multi-GB videos.
_TRANSFER = TransferConfig(
    multipart_threshold=16 * MIB, multipart_chunksize=16 * MIB, max_concurrency=10
)
# S3 error codes that the same request will keep getting.
_PERMANENT_STATUS = range(400, 500)
_TRANSIENT_CODES = frozenset({"RequestTimeout", "SlowDown", "Throttling", "TooManyRequests"})


@dataclass(frozen=True)
class StoredFile:
    """One output file as the client sees it."""

    name: str
    content_type: str
    size: int
    key: str | None = None
    url: str | None = None
    base64: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


class Storage(Protocol):
    """Saves a job's output files and reads its bucket inputs."""

    # Whether saved files outlive the result (a bucket), or travel inside it (inline).
    durable: bool

    def save(self, path: Path, *, name: str, content_type: str, request_id: str) -> StoredFile: ...

    def fetch_object(self, bucket: str, key: str, target: Path, *, max_bytes: int, field: str) -> int: ...


def object_key(prefix: str, request_id: str, name: str) -> str:
    """``prefix/YYYY/MM/DD/request_id/name`` with ``name`` reduced to safe characters."""
    safe = _DOTS.sub(".", _SAFE_NAME.sub("_", name)).lstrip("._") or "file"
    day = time.strftime("%Y/%m/%d", time.gmtime())
    return "/".join(part for part in (prefix, day, request_id, safe) if part)


def bucket_from_job(job: dict[str, Any]) -> BucketSettings | None:
    """RunPod's per-request ``s3Config``, if the job carries one."""
    raw = job.get("s3Config")
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise InvalidInput("s3Config must be an object", field="s3Config")
    required = ("accessId", "accessSecret", "bucketName", "endpointUrl")
    missing = [name for name in required if not isinstance(raw.get(name), str) or not raw[name]]
    if missing:
        raise InvalidInput(f"s3Config is missing {', '.join(missing)}", field="s3Config")
    register_secret(raw["accessSecret"])
    return BucketSettings(
        endpoint_url=raw["endpointUrl"],
        access_key_id=raw["accessId"],
        secret_access_key=raw["accessSecret"],
        name=raw["bucketName"],
    )


class S3Storage:
    """Uploads to one bucket and presigns GET URLs for what it uploaded."""

    durable = True

    def __init__(self, bucket: BucketSettings, settings: Settings) -> None:
        register_secret(bucket.secret_access_key)
        self.bucket = bucket
        self._prefix = settings.bucket_prefix
        self._expiry_s = settings.presign_expiry_s
        config = Config(
            signature_version="s3v4",
            s3={"addressing_style": "path" if bucket.endpoint_url else "auto"},
            retries={"max_attempts": settings.upload_max_attempts, "mode": "standard"},
            connect_timeout=settings.s3_connect_timeout_s,
            read_timeout=settings.s3_read_timeout_s,
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        self.client = boto3.session.Session().client(
            "s3",
            endpoint_url=bucket.endpoint_url,
            aws_access_key_id=bucket.access_key_id,
            aws_secret_access_key=bucket.secret_access_key,
            region_name=bucket.region or "us-east-1",
            config=config,
        )

    def save(self, path: Path, *, name: str, content_type: str, request_id: str) -> StoredFile:
        key = object_key(self._prefix, request_id, name)
        size = path.stat().st_size
        started = time.perf_counter()
        try:
            self.client.upload_file(
                str(path),
                self.bucket.name,
                key,
                ExtraArgs={"ContentType": content_type},
                Config=_TRANSFER,
            )
            url = self.client.generate_presigned_url(
                "get_object",
                Params={"Bucket": self.bucket.name, "Key": key},
                ExpiresIn=self._expiry_s,
            )
        except (BotoCoreError, ClientError, S3UploadFailedError) as exc:
            raise _upload_error(exc, self.bucket.name) from exc
        ms = (time.perf_counter() - started) * 1000
        log.info("upload.done", key=key, bytes=size, ms=round(ms, 1))
        return StoredFile(name=name, content_type=content_type, size=size, key=key, url=url)

    def fetch_object(self, bucket: str, key: str, target: Path, *, max_bytes: int, field: str) -> int:
        if bucket != self.bucket.name:
            raise InvalidInput(
                f"{field}: only objects in the job's bucket can be read, not {bucket!r}", field=field
            )
        try:
            head = self.client.head_object(Bucket=bucket, Key=key)
            if int(head.get("ContentLength", 0)) > max_bytes:
                raise InputTooLarge(f"{field}: object is larger than {max_bytes} bytes", field=field)
            self.client.download_file(bucket, key, str(target))
        except ClientError as exc:
            status = _status(exc)
            if status == 404:
                raise DownloadFailed(
                    f"{field}: no object {key!r} in the bucket", field=field, retryable=False
                ) from exc
            raise DownloadFailed(f"{field}: bucket read failed ({_code(exc)})", field=field) from exc
        except BotoCoreError as exc:
            raise DownloadFailed(f"{field}: bucket unreachable: {exc}", field=field) from exc
        return target.stat().st_size


class InlineStorage:
    """No bucket: small files come back base64 in the result, within a per-job budget."""

    durable = False

    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._used_lock = threading.Lock()
        self._used = 0

    def save(self, path: Path, *, name: str, content_type: str, request_id: str) -> StoredFile:
        size = path.stat().st_size
        with self._used_lock:
            if self._used + size > self._max_bytes:
                raise InputTooLarge(
                    f"output {name!r} ({size} bytes) does not fit inline in the result "
                    f"(limit {self._max_bytes} bytes); configure a bucket or send s3Config"
                )
            self._used += size
        encoded = base64.b64encode(path.read_bytes()).decode("ascii")
        return StoredFile(name=name, content_type=content_type, size=size, base64=encoded)

    def fetch_object(self, bucket: str, key: str, target: Path, *, max_bytes: int, field: str) -> int:
        raise InvalidInput(f"{field}: s3:// inputs need a configured bucket", field=field)


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", "unknown"))


def _upload_error(exc: Exception, bucket: str) -> UploadFailed:
    # boto3 wraps client errors of managed uploads in S3UploadFailedError (as __context__).
    cause = exc.__context__ if isinstance(exc, S3UploadFailedError) else exc
    if isinstance(cause, ClientError):
        code = _code(cause)
        retryable = code in _TRANSIENT_CODES or _status(cause) not in _PERMANENT_STATUS
        return UploadFailed(f"storage refused the upload to {bucket!r} ({code})", retryable=retryable)
    return UploadFailed(f"storage unreachable for bucket {bucket!r}: {type(cause).__name__}")
