"""The bucket: an S3-compatible store in two roles, the output sink of a job (files stored, presigned
URLs answered; handler.io.outputs has the inline sink for a worker without one) and the reader of
its ``s3://`` inputs, uploads and result cache entries.

This is the only module that imports botocore, boto3 and s3transfer; their errors become the
worker's in :func:`s3_errors`, one table for every call: ``UPLOAD_FAILED`` for writes,
``DOWNLOAD_FAILED`` for bucket inputs, retryable only when the failure can heal.

A job's own ``s3Config`` is checked completely at the door (handler.io.s3config): its
endpoint passes the same address policy as download URLs, resolved there and again at every
connect, and its bucket name must be a bucket name. Every call to such an endpoint has an
overall deadline and stops when its job is cancelled: the job's client is its own, so its open
connections are cut (:class:`_Connections`) when either comes first, whatever botocore or
s3transfer is waiting for. A trickling endpoint therefore holds only its own job's threads,
and only until its deadline. The operator's bucket is trusted: its client is shared by every
job and keeps botocore's socket timeouts.

Object keys are built by the worker from the prefix, the date, the request id and a fixed
file name, never from user strings. Checksums are computed only when the S3 API requires
them: newer botocore defaults add CRC trailers that several S3-compatible stores reject.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import botocore.exceptions as boto_errors
import s3transfer.exceptions as transfer_errors
from boto3.exceptions import Boto3Error, RetriesExceededError, S3UploadFailedError
from boto3.s3.transfer import TransferConfig, create_transfer_manager
from botocore.awsrequest import AWSHTTPConnectionPool, AWSHTTPSConnectionPool
from botocore.config import Config
from s3transfer.exceptions import CancelledError as TransferCancelled

from handler.cancel import CancelToken
from handler.config import BucketSettings, Settings
from handler.errors import (
    Cancelled,
    DownloadFailed,
    InputTooLarge,
    InvalidInput,
    UploadFailed,
    WorkerError,
    transient_status,
)
from handler.io.addresses import AddressPolicy
from handler.io.outputs import StoredFile
from handler.io.streams import copy_capped
from handler.logs import get_logger, register_secret

log = get_logger(__name__)

MIB = 1024 * 1024
_READ_CHUNK = MIB
# Multipart settings: 16 MiB parts keep part counts low for multi-GB videos.
_TRANSFER = TransferConfig(multipart_threshold=16 * MIB, multipart_chunksize=16 * MIB, max_concurrency=10)
# What the store says about a request that may succeed if sent again.
_TRANSIENT_CODES = frozenset({"RequestTimeout", "SlowDown", "Throttling", "TooManyRequests"})
# botocore errors of the network or the store's answer: another try may get through. Every
# other botocore error is about the request or its configuration and would fail again.
_TRANSIENT_BOTOCORE: tuple[type[Exception], ...] = (
    boto_errors.ConnectionError, boto_errors.HTTPClientError, boto_errors.IncompleteReadError,
    boto_errors.ChecksumError, boto_errors.FlexibleChecksumError, boto_errors.CapacityNotAvailableError,
    boto_errors.CredentialRetrievalError, boto_errors.MetadataRetrievalError, boto_errors.TokenRetrievalError,
    transfer_errors.RetriesExceededError, transfer_errors.FatalError, RetriesExceededError,
)
# s3transfer's own errors share no base class.
_TRANSFER_ERRORS: tuple[type[Exception], ...] = (
    TransferCancelled, transfer_errors.InvalidSubscriberMethodError, transfer_errors.RetriesExceededError,
    transfer_errors.S3CopyFailedError, transfer_errors.S3DownloadFailedError, transfer_errors.S3UploadFailedError,
    transfer_errors.S3ValidationError, transfer_errors.TransferNotDoneError,
)
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]")
_DOTS = re.compile(r"\.{2,}")


# One session for every client: it parses S3's service model once (a new session per tenant job
# would parse it again, on the CPU under the GIL: bench/RESULTS.md). Clients get explicit
# credentials, never the session's; sessions are not thread-safe, so clients are made one at a time.
_SESSION = boto3.session.Session()
_session_lock = threading.Lock()


def object_key(prefix: str, request_id: str, name: str) -> str:
    """``prefix/YYYY/MM/DD/request_id/name`` with ``name`` reduced to safe characters."""
    safe = _DOTS.sub(".", _SAFE_NAME.sub("_", name)).lstrip("._") or "file"
    day = time.strftime("%Y/%m/%d", time.gmtime())
    return "/".join(part for part in (prefix, day, request_id, safe) if part)


class ObjectMissing(DownloadFailed):
    """The bucket has no such object: an input error for a job, a miss for the result cache."""


@dataclass(frozen=True)
class PresignedUpload:
    """Where and how a client uploads one file itself: an S3 presigned POST (a form)."""

    url: str
    fields: dict[str, str]
    reference: str  # s3://bucket/key, for the next job's media field


def _s3_error(exc: BaseException, *, field: str | None, bucket: str) -> WorkerError:
    """The worker's error for a boto3/botocore/s3transfer failure (field None: an upload)."""
    if isinstance(exc, S3UploadFailedError | transfer_errors.S3UploadFailedError) and exc.__context__ is not None:
        exc = exc.__context__  # boto3 wraps the real cause of a managed upload
    if isinstance(exc, boto_errors.HTTPClientError) and isinstance(exc.kwargs.get("error"), WorkerError):
        return exc.kwargs["error"]  # type: ignore[no-any-return]  # the address guard refused a connect
    if isinstance(exc, TransferCancelled) and not isinstance(exc, transfer_errors.FatalError):
        return Cancelled("the job was cancelled")
    if isinstance(exc, boto_errors.ClientError):
        return _client_error(exc, field=field, bucket=bucket)
    retryable = isinstance(exc, _TRANSIENT_BOTOCORE)
    what = type(exc).__name__
    if field is None:
        return UploadFailed(f"storage unreachable or refused for bucket {bucket!r} ({what})", retryable=retryable)
    return DownloadFailed(f"{field}: bucket read failed ({what})", field=field, retryable=retryable)


def _client_error(exc: boto_errors.ClientError, *, field: str | None, bucket: str) -> WorkerError:
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
    code = str(exc.response.get("Error", {}).get("Code", "unknown"))
    retryable = code in _TRANSIENT_CODES or status < 400 or transient_status(status)
    if field is None:
        return UploadFailed(f"storage refused the upload to {bucket!r} ({code})", retryable=retryable)
    if status == 404 or code in ("NoSuchKey", "404"):
        return ObjectMissing(f"{field}: no such object in the bucket", field=field, retryable=False)
    return DownloadFailed(f"{field}: bucket read failed ({code})", field=field, retryable=retryable)


@contextlib.contextmanager
def s3_errors(*, bucket: str, field: str | None = None) -> Iterator[None]:
    """Translate every boto3, botocore and s3transfer error raised in the block."""
    try:
        yield
    except (boto_errors.BotoCoreError, boto_errors.ClientError, boto_errors.UndefinedModelAttributeError,
            Boto3Error, *_TRANSFER_ERRORS) as exc:
        raise _s3_error(exc, field=field, bucket=bucket) from exc


class _Connections:
    """The open sockets of one job's client, so that another thread can cut them.

    A thread blocked in a socket read cannot be interrupted, but shutting its socket down wakes
    it with an error. Sockets, not connections, are remembered: an HTTP/1.0 answer takes its
    socket away from the connection into the response. After a cut, sockets opened by retries
    are cut at once, until the bounded call that cut them has ended.
    """

    def __init__(self) -> None:
        # Guards _open and _cutting; never held while a socket is shut down.
        self._open_lock = threading.Lock()
        self._open: weakref.WeakSet[socket.socket] = weakref.WeakSet()
        self._cutting = False

    def add(self, sock: socket.socket) -> None:
        with self._open_lock:
            self._open.add(sock)
            cutting = self._cutting
        if cutting:
            _shut(sock)

    def cut(self) -> None:
        with self._open_lock:
            self._cutting = True
            sockets = list(self._open)
        for sock in sockets:
            _shut(sock)

    def reopen(self) -> None:
        with self._open_lock:
            self._cutting = False


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # closed already, or handed over to its TLS wrapper
        sock.shutdown(socket.SHUT_RDWR)


def _guarded_pool(base: type[Any], policy: AddressPolicy, connections: _Connections) -> type[Any]:
    """A botocore connection pool whose connections go only to addresses the policy permits,
    their sockets remembered in ``connections``."""

    class GuardedConnection(base.ConnectionCls):  # type: ignore[name-defined,misc]
        def _new_conn(self) -> Any:
            host: str = self._dns_host  # type: ignore[has-type]
            checked = policy.resolve(host, self.port)
            self._dns_host = str(checked[0])
            try:
                sock = super()._new_conn()
            finally:
                self._dns_host = host
            connections.add(sock)  # cut during a TLS handshake
            return sock

        def connect(self) -> None:
            super().connect()
            connections.add(self.sock)  # the TLS socket that replaced it, where there is one

    return type(f"Guarded{base.__name__}", (base,), {"ConnectionCls": GuardedConnection})


def _guard_connections(client: Any, policy: AddressPolicy, connections: _Connections) -> None:
    """Route every connection of ``client`` through the address policy, and into ``connections``.

    botocore offers no public hook where sockets open, so its session's pool classes are
    replaced; tests/test_storage.py proves the guard holds (a refused endpoint gets no connection).
    """
    session = client._endpoint.http_session
    classes = {"http": _guarded_pool(AWSHTTPConnectionPool, policy, connections),
               "https": _guarded_pool(AWSHTTPSConnectionPool, policy, connections)}
    session._pool_classes_by_scheme = classes
    session._manager.pool_classes_by_scheme = classes


class S3Storage:
    """Uploads to one bucket and presigns GET URLs for what it uploaded.

    ``policy`` marks a job's own bucket (its ``s3Config``): connections are checked against
    the address policy, and every call is bounded by its deadline and the job's cancel token;
    its secret is kept out of the logs by the job (``handler.logs.secret_held``), for its life only.
    """

    durable = True

    def __init__(self, bucket: BucketSettings, settings: Settings, *, policy: AddressPolicy | None = None) -> None:
        if policy is None:  # the operator's key, for the process's life; a job's is held by its job
            register_secret(bucket.secret_access_key)
        self.bucket = bucket
        self._prefix = settings.bucket_prefix
        self._expiry_s = settings.presign_expiry_s
        self._upload_timeout_s = settings.upload_timeout_s
        self._read_timeout_s = settings.download_timeout_s
        # A job's own client, whose connections a deadline or a cancel may cut; None: shared.
        self._connections = _Connections() if policy is not None else None
        config = Config(
            signature_version="s3v4",
            s3={"addressing_style": "path" if bucket.endpoint_url else "auto"},
            retries={"max_attempts": settings.upload_max_attempts, "mode": "standard"},
            connect_timeout=settings.s3_connect_timeout_s,
            read_timeout=settings.s3_read_timeout_s,
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        try:
            with s3_errors(bucket=bucket.bucket_name(), field="s3Config" if policy else None), _session_lock:
                self.client = _SESSION.client(
                    "s3", endpoint_url=bucket.endpoint_url, aws_access_key_id=bucket.access_key_id,
                    aws_secret_access_key=bucket.secret_access_key, region_name=bucket.region or "us-east-1",
                    config=config,
                )
        except ValueError as exc:  # botocore's own check of the endpoint URL
            raise InvalidInput("s3Config.endpointUrl: not a valid endpoint", field="s3Config.endpointUrl") from exc
        if policy is not None:
            assert self._connections is not None
            _guard_connections(self.client, policy, self._connections)

    @contextlib.contextmanager
    def _bounded(self, timeout_s: float, cancel: CancelToken | None, *, field: str | None) -> Iterator[None]:
        """Translate the block's storage errors; on a job's own bucket, also stop it at the
        deadline or on cancel (``field`` None: an upload)."""
        bucket = self.bucket.bucket_name()
        connections = self._connections
        if connections is None:
            with s3_errors(bucket=bucket, field=field):
                yield
            return
        cancel = cancel or CancelToken()
        expired = threading.Event()

        def expire() -> None:
            expired.set()
            connections.cut()

        timer = threading.Timer(timeout_s, expire)
        timer.daemon = True
        timer.start()
        try:
            with cancel.on_cancel(connections.cut), s3_errors(bucket=bucket, field=field):
                yield
        except WorkerError as exc:
            cancel.check()
            if expired.is_set():
                raise _timed_out(field, bucket, timeout_s) from exc
            raise
        finally:
            timer.cancel()
            connections.reopen()
        cancel.check()
        if expired.is_set():  # a cut read may end early instead of failing
            raise _timed_out(field, bucket, timeout_s)

    def save(
        self, path: Path, *, name: str, content_type: str, request_id: str, cancel: CancelToken | None = None
    ) -> StoredFile:
        key = object_key(self._prefix, request_id, name)
        size = path.stat().st_size
        started = time.perf_counter()
        bucket = self.bucket.bucket_name()
        with self._bounded(self._upload_timeout_s, cancel, field=None):
            self._upload(path, bucket, key, content_type, cancel or CancelToken())
        url = self.presign(key)
        ms = (time.perf_counter() - started) * 1000
        log.info("upload.done", key=key, bytes=size, ms=round(ms, 1))
        return StoredFile(name=name, content_type=content_type, size=size, key=key, url=url)

    def _upload(self, path: Path, bucket: str, key: str, content_type: str, cancel: CancelToken) -> None:
        cancel.check()
        with create_transfer_manager(self.client, _TRANSFER) as manager:
            future = manager.upload(str(path), bucket, key, extra_args={"ContentType": content_type})
            with cancel.on_cancel(future.cancel):
                future.result()

    def fetch_object(
        self, bucket: str, key: str, target: Path, *, max_bytes: int, field: str, cancel: CancelToken | None = None
    ) -> int:
        if bucket != self.bucket.bucket_name():
            raise InvalidInput(f"{field}: only objects in the job's bucket can be read", field=field)
        cancel = cancel or CancelToken()
        cancel.check()
        with self._bounded(self._read_timeout_s, cancel, field=field):
            response = self.client.get_object(Bucket=bucket, Key=key)
            body = response["Body"]
            try:
                if int(response.get("ContentLength") or 0) > max_bytes:
                    raise _too_large(field, max_bytes)
                with cancel.on_cancel(lambda: _abort_read(body)):
                    return copy_capped(body.iter_chunks(_READ_CHUNK), target, max_bytes=max_bytes, cancel=cancel,
                                       too_large=lambda: _too_large(field, max_bytes))
            finally:
                body.close()

    def read_small(
        self, key: str, *, max_bytes: int, timeout_s: float, cancel: CancelToken | None = None
    ) -> bytes | None:
        """A small object of the worker's own (a cache entry), or None if there is none."""
        try:
            with self._bounded(timeout_s, cancel, field="cache"):
                body = self.client.get_object(Bucket=self.bucket.bucket_name(), Key=key)["Body"]
                try:
                    data: bytes = body.read(max_bytes + 1)
                finally:
                    body.close()
        except ObjectMissing:
            return None
        return data if len(data) <= max_bytes else None

    def write_small(
        self, key: str, data: bytes, *, timeout_s: float, cancel: CancelToken | None = None,
        content_type: str = "application/json",
    ) -> None:
        with self._bounded(timeout_s, cancel, field=None):
            self.client.put_object(Bucket=self.bucket.bucket_name(), Key=key, Body=data, ContentType=content_type)

    def exists(self, key: str, *, timeout_s: float, cancel: CancelToken | None = None) -> bool:
        try:
            with self._bounded(timeout_s, cancel, field="cache"):
                self.client.head_object(Bucket=self.bucket.bucket_name(), Key=key)
        except ObjectMissing:
            return False
        return True

    def presign(self, key: str) -> str:
        """A fresh presigned GET URL for an object of this bucket (signed here: no request)."""
        bucket = self.bucket.bucket_name()
        with s3_errors(bucket=bucket):
            url: str = self.client.generate_presigned_url(
                "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=self._expiry_s
            )
        return url

    def presign_upload(self, key: str, *, size: int, expires_s: int) -> PresignedUpload:
        """A presigned POST for ``key`` (signed here: no request): the store itself refuses a
        body of any other size than ``size``."""
        bucket = self.bucket.bucket_name()
        with s3_errors(bucket=bucket):
            post = self.client.generate_presigned_post(
                Bucket=bucket, Key=key, Conditions=[["content-length-range", size, size]], ExpiresIn=expires_s
            )
        return PresignedUpload(url=post["url"], fields=dict(post["fields"]), reference=f"s3://{bucket}/{key}")

    def delete_object(self, bucket: str, key: str, *, field: str, cancel: CancelToken | None = None) -> None:
        with self._bounded(self._read_timeout_s, cancel, field=field):
            self.client.delete_object(Bucket=bucket, Key=key)
        log.info("input.deleted", key=key)


def _timed_out(field: str | None, bucket: str, timeout_s: float) -> WorkerError:
    if field is None:
        return UploadFailed(f"storage for bucket {bucket!r} did not answer within {timeout_s:g} s", retryable=True)
    return DownloadFailed(f"{field}: bucket read did not finish within {timeout_s:g} s", field=field,
                          retryable=True)


def _abort_read(body: Any) -> None:
    """Unblock a read of ``body`` in another thread: shut its socket down (closing would not wake it)."""
    raw = getattr(body, "_raw_stream", None)  # botocore's StreamingBody over urllib3's response
    shutdown = getattr(raw, "shutdown", None)
    if shutdown is not None:
        shutdown()
    else:
        body.close()


def _too_large(field: str, max_bytes: int) -> InputTooLarge:
    return InputTooLarge(f"{field}: object is larger than {max_bytes} bytes", field=field)
