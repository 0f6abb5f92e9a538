"""Download a user-supplied URL without letting it reach the worker's own network.

The guard sits where sockets are opened: a custom httpcore network backend resolves the
host through the address policy (:mod:`handler.io.addresses`) and connects to the address
it checked. Every redirect hop opens its connections through the same backend and is
checked again; TLS still verifies the URL's hostname.

Bytes and time are capped: the declared length is checked before reading, the running total
while reading, and one deadline covers the whole download including redirects. A cancelled
job's download stops at once: the cancel token shuts the socket a blocked read waits on.

httpcore's errors are translated here, by :func:`httpcore_errors`, and nowhere else.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import certifi
import httpcore

from handler.cancel import CancelToken
from handler.errors import DownloadFailed, DownloadRefused, InputTooLarge, WorkerError, transient_status
from handler.io.addresses import AddressPolicy, IPNetwork, Resolver, check_url, system_resolver
from handler.io.streams import copy_capped
from handler.logs import get_logger

log = get_logger(__name__)

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_USER_AGENT = b"runpod-media-worker"


@contextlib.contextmanager
def httpcore_errors(field: str) -> Iterator[None]:
    """httpcore's exceptions as the worker's: refused, timed out, or failed (retryable)."""
    try:
        yield
    except httpcore.UnsupportedProtocol as exc:
        raise DownloadRefused(f"{field}: unsupported URL", field=field) from exc
    except httpcore.TimeoutException as exc:
        raise DownloadFailed(f"{field}: download timed out", field=field) from exc
    except (httpcore.NetworkError, httpcore.ProtocolError, httpcore.ProxyError,
            httpcore.ConnectionNotAvailable) as exc:
        raise DownloadFailed(f"{field}: download failed ({type(exc).__name__})", field=field) from exc
    except (UnicodeError, TypeError) as exc:  # a host or header httpcore cannot encode
        raise DownloadRefused(f"{field}: the URL cannot be requested", field=field) from exc


class GuardedBackend(httpcore.NetworkBackend):
    """httpcore backend that checks every address before it opens a TCP connection."""

    def __init__(self, policy: AddressPolicy) -> None:
        self._policy = policy
        self._inner = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        addresses = self._policy.resolve(host, port)
        last_error: Exception | None = None
        for address in addresses:
            try:
                return self._inner.connect_tcp(str(address), port, timeout, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last_error = exc
        assert last_error is not None
        raise last_error

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class Downloader:
    """Fetches URLs to files under the byte, time, scheme and address rules."""

    def __init__(
        self,
        *,
        max_bytes: int,
        timeout_s: float,
        max_redirects: int = 5,
        allow_http: bool = False,
        allowed_networks: Iterable[IPNetwork] = (),
        resolver: Resolver = system_resolver,
    ) -> None:
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.max_redirects = max_redirects
        self.schemes = frozenset({"https", "http"} if allow_http else {"https"})
        self.policy = AddressPolicy(allowed_networks, resolver)
        self._pool = httpcore.ConnectionPool(
            ssl_context=ssl.create_default_context(cafile=certifi.where()),
            network_backend=GuardedBackend(self.policy),
            max_connections=32,
            retries=0,
        )

    def check_url(self, url: str, *, field: str) -> None:
        """Refuse schemes, credentials and malformed URLs before any network use."""
        check_url(url, schemes=self.schemes, field=field)

    def fetch(self, url: str, target: Path, *, field: str, cancel: CancelToken | None = None) -> int:
        """Download ``url`` into ``target``; returns the number of bytes written."""
        cancel = cancel or CancelToken()
        deadline = time.monotonic() + self.timeout_s
        for _hop in range(self.max_redirects + 1):
            self.check_url(url, field=field)
            try:
                with httpcore_errors(field):
                    location = self._get(url, target, deadline=deadline, field=field, cancel=cancel)
            except WorkerError as exc:
                if exc.field is None:  # raised below httpcore (the address guard), where the field is unknown
                    exc.field, exc.message = field, f"{field}: {exc.message}"
                raise
            if location is None:
                return target.stat().st_size
            url = urljoin(url, location)
        raise DownloadFailed(f"{field}: more than {self.max_redirects} redirects", field=field, retryable=False)

    def _timeouts(self, deadline: float, *, field: str) -> dict[str, float]:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DownloadFailed(f"{field}: download took longer than {self.timeout_s:g}s", field=field)
        return {"connect": remaining, "read": remaining, "write": remaining, "pool": remaining}

    def _get(self, url: str, target: Path, *, deadline: float, field: str, cancel: CancelToken) -> str | None:
        """One request: the redirect location, or None once the body is in ``target``."""
        cancel.check()
        headers = [(b"User-Agent", _USER_AGENT), (b"Accept-Encoding", b"identity")]
        extensions: dict[str, Any] = {"timeout": self._timeouts(deadline, field=field)}
        with self._pool.stream("GET", url, headers=headers, extensions=extensions) as response:
            if response.status in _REDIRECTS:
                return _header(response, b"location") or _fail_redirect(field)
            _check_status(response.status, field=field)
            declared = _header(response, b"content-length")
            if declared and declared.isdigit() and int(declared) > self.max_bytes:
                raise self._too_large(field)
            with cancel.on_cancel(lambda: _abort(response)):
                self._save(response.iter_stream(), target, deadline=deadline, field=field, cancel=cancel)
            return None

    def _save(
        self, chunks: Iterable[bytes], target: Path, *, deadline: float, field: str, cancel: CancelToken
    ) -> None:
        def in_time() -> None:
            if time.monotonic() > deadline:
                raise DownloadFailed(f"{field}: download took longer than {self.timeout_s:g}s", field=field)

        copy_capped(chunks, target, max_bytes=self.max_bytes, cancel=cancel,
                    too_large=lambda: self._too_large(field), check=in_time)

    def _too_large(self, field: str) -> InputTooLarge:
        return InputTooLarge(f"{field}: download is larger than {self.max_bytes} bytes", field=field)

    def close(self) -> None:
        self._pool.close()


def _abort(response: httpcore.Response) -> None:
    """Unblock a read in another thread: shut the connection's socket down."""
    stream = response.extensions.get("network_stream")
    sock = stream.get_extra_info("socket") if stream is not None else None
    if isinstance(sock, socket.socket):
        sock.shutdown(socket.SHUT_RDWR)


def _header(response: httpcore.Response, name: bytes) -> str | None:
    for key, value in response.headers:
        if key.lower() == name:
            return value.decode("latin-1").strip()
    return None


def _fail_redirect(field: str) -> str:
    raise DownloadFailed(f"{field}: redirect without a Location", field=field, retryable=False)


def _check_status(status: int, *, field: str) -> None:
    if status == 200:
        return
    raise DownloadFailed(f"{field}: server answered HTTP {status}", field=field, retryable=transient_status(status))
