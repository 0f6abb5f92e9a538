"""The download guard: addresses, redirects, schemes, byte and time caps, against real local servers."""

from __future__ import annotations

import ipaddress
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from handler.errors import DownloadFailed, DownloadRefused, InputTooLarge
from handler.io.addresses import AddressPolicy
from handler.io.download import Downloader
from testkit.servers import HttpServer, redirect_to, serve_bytes

LOOPBACK_ONLY = (ipaddress.ip_network("127.0.0.1/32"),)


def downloader(**overrides: object) -> Downloader:
    options: dict[str, object] = {
        "max_bytes": 1024 * 1024, "timeout_s": 5.0, "allow_http": True, "allowed_networks": LOOPBACK_ONLY,
    }
    options.update(overrides)
    return Downloader(**options)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "address",
    ["127.0.0.1", "127.0.0.2", "10.0.0.1", "172.16.3.4", "192.168.1.1", "169.254.169.254", "100.64.0.1",
     "0.0.0.0",  # noqa: S104 (an address under test; nothing binds it)
     "::1", "fe80::1", "fd00::1", "::ffff:127.0.0.1", "::ffff:169.254.169.254", "224.0.0.1"],
)
def test_policy_refuses_non_public_addresses(address: str) -> None:
    """Loopback, private, link-local, CGNAT, unspecified, ULA, mapped and multicast addresses are refused."""
    assert not AddressPolicy().permits(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["93.184.216.34", "1.1.1.1", "2606:4700:4700::1111"])
def test_policy_permits_public_addresses(address: str) -> None:
    """Ordinary public addresses pass."""
    assert AddressPolicy().permits(ipaddress.ip_address(address))


@pytest.mark.parametrize(
    "url", ["https://127.0.0.1/a.mp3", "https://169.254.169.254/latest/meta-data/", "https://10.0.0.1/x",
            "https://localhost/x", "https://[::1]/x"],
)
def test_default_settings_refuse_internal_urls(url: str, tmp_path: Path) -> None:
    """With default settings, internal addresses are refused before any connection."""
    guard = Downloader(max_bytes=1000, timeout_s=5)
    with pytest.raises(DownloadRefused) as info:
        guard.fetch(url, tmp_path / "out", field="audio")
    assert info.value.retryable is False
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("target", ["http://127.0.0.2:9/x", "http://10.0.0.1/x", "http://169.254.169.254/",
                                    "http://[::1]:9/x"])
def test_redirect_to_internal_address_is_refused(target: str, tmp_path: Path) -> None:
    """A permitted server redirecting to an internal address is refused at the redirect hop."""
    with HttpServer({"/r": redirect_to(target)}) as server, pytest.raises(DownloadRefused):
        downloader().fetch(server.url("/r"), tmp_path / "out", field="audio")


def test_redirect_chain_is_followed_within_limits(tmp_path: Path) -> None:
    """Redirects to permitted places are followed; too many is an error."""
    routes = {"/data": serve_bytes(b"payload"), "/a": redirect_to("/b"), "/b": redirect_to("/data")}
    with HttpServer(routes) as server:
        assert downloader().fetch(server.url("/a"), tmp_path / "out", field="audio") == 7
        assert (tmp_path / "out").read_bytes() == b"payload"
        with pytest.raises(DownloadFailed, match="redirects"):
            downloader(max_redirects=1).fetch(server.url("/a"), tmp_path / "out2", field="audio")


def test_http_needs_the_setting(tmp_path: Path) -> None:
    """Plain http is refused unless DOWNLOAD_ALLOW_HTTP is on; other schemes always."""
    for url in ("http://example.com/a.mp3", "file:///etc/passwd", "ftp://example.com/a", "gopher://x/"):
        with pytest.raises(DownloadRefused, match="scheme"):
            downloader(allow_http=False).fetch(url, tmp_path / "o", field="audio")


def test_credentials_in_url_are_refused(tmp_path: Path) -> None:
    """user:password@host URLs are refused (they would end up in logs and Referer headers)."""
    with pytest.raises(DownloadRefused, match="credentials"):
        downloader().fetch("https://user:pw@example.com/a", tmp_path / "o", field="audio")


def test_declared_size_over_cap_is_refused(tmp_path: Path) -> None:
    """A Content-Length over the cap is INPUT_TOO_LARGE before the body is read."""
    with HttpServer({"/big": serve_bytes(b"x" * 5000)}) as server, pytest.raises(InputTooLarge):
        downloader(max_bytes=4000).fetch(server.url("/big"), tmp_path / "o", field="audio")


def test_undeclared_size_over_cap_is_refused(tmp_path: Path) -> None:
    """A chunked body that grows over the cap is cut off with INPUT_TOO_LARGE."""

    def chunked(request: BaseHTTPRequestHandler) -> None:
        request.protocol_version = "HTTP/1.1"
        request.send_response(200)
        request.send_header("Transfer-Encoding", "chunked")
        request.end_headers()
        for _ in range(10):
            request.wfile.write(b"400\r\n" + b"y" * 1024 + b"\r\n")
        request.wfile.write(b"0\r\n\r\n")

    with HttpServer({"/stream": chunked}) as server, pytest.raises(InputTooLarge):
        downloader(max_bytes=4096).fetch(server.url("/stream"), tmp_path / "o", field="audio")


def test_slow_server_hits_the_deadline(tmp_path: Path) -> None:
    """A server that stalls is DOWNLOAD_FAILED (retryable) within the download timeout."""

    def stall(request: BaseHTTPRequestHandler) -> None:
        request.send_response(200)
        request.send_header("Content-Length", "100")
        request.end_headers()
        request.wfile.write(b"x")
        request.wfile.flush()
        time.sleep(3)

    with HttpServer({"/slow": stall}) as server:
        started = time.monotonic()
        with pytest.raises(DownloadFailed) as info:
            downloader(timeout_s=1.0).fetch(server.url("/slow"), tmp_path / "o", field="audio")
        assert time.monotonic() - started < 2.0
        assert info.value.retryable is True


def test_http_errors_say_whether_a_retry_helps(tmp_path: Path) -> None:
    """404 is final, 503 is retryable."""

    def status(code: int):
        def route(request: BaseHTTPRequestHandler) -> None:
            request.send_response(code)
            request.send_header("Content-Length", "0")
            request.end_headers()

        return route

    with HttpServer({"/404": status(404), "/503": status(503)}) as server:
        with pytest.raises(DownloadFailed) as missing:
            downloader().fetch(server.url("/404"), tmp_path / "o", field="audio")
        with pytest.raises(DownloadFailed) as busy:
            downloader().fetch(server.url("/503"), tmp_path / "o", field="audio")
    assert missing.value.retryable is False and busy.value.retryable is True


def test_unreachable_host_is_download_failed(tmp_path: Path) -> None:
    """A closed port is DOWNLOAD_FAILED, retryable."""
    with HttpServer({}) as server:
        port = server.port
    with pytest.raises(DownloadFailed) as info:
        downloader().fetch(f"http://127.0.0.1:{port}/gone", tmp_path / "o", field="audio")
    assert info.value.retryable is True and not isinstance(info.value, DownloadRefused)
