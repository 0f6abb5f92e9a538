"""Download a user-supplied URL without letting it reach the worker's own network.

The guard sits where sockets are opened: a custom httpcore network backend resolves the
host itself, refuses the connection if any resolved address is loopback, private,
link-local, multicast or otherwise not globally routable (unless an operator allowed that
network), and connects to the address it checked, so a DNS answer that changes between the
check and the connect cannot slip through. Every redirect hop opens its connections through
the same backend and is checked again; TLS still verifies the URL's hostname.

Bytes and time are capped: the declared length is checked before reading, the running total
while reading, and one deadline covers the whole download including redirects.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import certifi
import httpcore

from handler.errors import DownloadFailed, DownloadRefused, InputTooLarge
from handler.logs import get_logger

log = get_logger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], list[IPAddress]]

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_USER_AGENT = b"runpod-media-worker"


def system_resolver(host: str, port: int) -> list[IPAddress]:
    """Every address the system resolver gives for ``host``, in its order."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses: list[IPAddress] = []
    for _family, _type, _proto, _name, sockaddr in infos:
        address = ipaddress.ip_address(sockaddr[0])
        if address not in addresses:
            addresses.append(address)
    return addresses


class AddressPolicy:
    """Which addresses a download may connect to."""

    def __init__(self, allowed_networks: Iterable[IPNetwork] = ()) -> None:
        self._allowed = tuple(allowed_networks)

    def permits(self, address: IPAddress) -> bool:
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if any(address in network for network in self._allowed):
            return True
        return address.is_global and not address.is_multicast

    def check(self, host: str, addresses: Sequence[IPAddress]) -> None:
        if not addresses:
            raise DownloadFailed(f"{host} did not resolve to any address")
        for address in addresses:
            if not self.permits(address):
                raise DownloadRefused(
                    f"refused to connect to {host} ({address}): not a public address"
                )


class GuardedBackend(httpcore.NetworkBackend):
    """httpcore backend that checks every address before it opens a TCP connection."""

    def __init__(self, policy: AddressPolicy, resolver: Resolver = system_resolver) -> None:
        self._policy = policy
        self._resolver = resolver
        self._inner = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        try:
            addresses = self._resolver(host, port)
        except (OSError, ValueError) as exc:
            raise DownloadFailed(f"could not resolve {host}: {exc}") from exc
        self._policy.check(host, addresses)
        last_error: Exception | None = None
        for address in addresses:
            try:
                return self._inner.connect_tcp(
                    str(address), port, timeout, local_address, socket_options
                )
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
        self._schemes = {"https", "http"} if allow_http else {"https"}
        self._pool = httpcore.ConnectionPool(
            ssl_context=ssl.create_default_context(cafile=certifi.where()),
            network_backend=GuardedBackend(AddressPolicy(allowed_networks), resolver),
            max_connections=32,
            retries=0,
        )

    def check_url(self, url: str, *, field: str) -> None:
        """Refuse schemes, credentials and malformed URLs before any network use."""
        parts = urlsplit(url)
        if parts.scheme not in self._schemes:
            allowed = " or ".join(sorted(self._schemes))
            raise DownloadRefused(f"{field}: URL scheme must be {allowed}", field=field)
        if not parts.hostname:
            raise DownloadRefused(f"{field}: URL has no host", field=field)
        if parts.username or parts.password:
            raise DownloadRefused(f"{field}: credentials in URLs are not accepted", field=field)

    def fetch(self, url: str, target: Path, *, field: str) -> int:
        """Download ``url`` into ``target``; returns the number of bytes written."""
        deadline = time.monotonic() + self.timeout_s
        for _hop in range(self.max_redirects + 1):
            self.check_url(url, field=field)
            try:
                location = self._get(url, target, deadline=deadline, field=field)
            except DownloadFailed as exc:
                if exc.field is None:  # raised below httpcore, where the field is unknown
                    exc.field, exc.message = field, f"{field}: {exc.message}"
                raise
            if location is None:
                return target.stat().st_size
            url = urljoin(url, location)
        raise DownloadFailed(
            f"{field}: more than {self.max_redirects} redirects", field=field, retryable=False
        )

    def _timeouts(self, deadline: float, *, field: str) -> dict[str, float]:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DownloadFailed(f"{field}: download took longer than {self.timeout_s:g}s", field=field)
        return {"connect": remaining, "read": remaining, "write": remaining, "pool": remaining}

    def _get(self, url: str, target: Path, *, deadline: float, field: str) -> str | None:
        """One request: the redirect location, or None once the body is in ``target``."""
        headers = [(b"User-Agent", _USER_AGENT), (b"Accept-Encoding", b"identity")]
        extensions: dict[str, Any] = {"timeout": self._timeouts(deadline, field=field)}
        try:
            with self._pool.stream("GET", url, headers=headers, extensions=extensions) as response:
                if response.status in _REDIRECTS:
                    return _header(response, b"location") or _fail_redirect(field)
                _check_status(response.status, field=field)
                declared = _header(response, b"content-length")
                if declared and declared.isdigit() and int(declared) > self.max_bytes:
                    raise self._too_large(field)
                self._save(response.iter_stream(), target, deadline=deadline, field=field)
                return None
        except httpcore.TimeoutException as exc:
            raise DownloadFailed(f"{field}: download timed out", field=field) from exc
        except httpcore.UnsupportedProtocol as exc:
            raise DownloadRefused(f"{field}: unsupported URL", field=field) from exc
        except (httpcore.NetworkError, httpcore.ProtocolError) as exc:
            raise DownloadFailed(f"{field}: download failed: {exc}", field=field) from exc

    def _save(self, chunks: Iterable[bytes], target: Path, *, deadline: float, field: str) -> None:
        written = 0
        with target.open("wb") as out:
            for chunk in chunks:
                written += len(chunk)
                if written > self.max_bytes:
                    raise self._too_large(field)
                if time.monotonic() > deadline:
                    raise DownloadFailed(
                        f"{field}: download took longer than {self.timeout_s:g}s", field=field
                    )
                out.write(chunk)

    def _too_large(self, field: str) -> InputTooLarge:
        return InputTooLarge(f"{field}: download is larger than {self.max_bytes} bytes", field=field)

    def close(self) -> None:
        self._pool.close()


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
    # Client errors other than throttling and request timeouts will not heal on retry.
    retryable = status >= 500 or status in (408, 429)
    raise DownloadFailed(f"{field}: server answered HTTP {status}", field=field, retryable=retryable)
