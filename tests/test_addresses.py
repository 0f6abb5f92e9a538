"""The one address policy: every non-public address refused, including those hidden inside IPv6 forms."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from handler.errors import DownloadRefused, InvalidInput
from handler.io.addresses import AddressPolicy, check_url
from handler.io.download import Downloader
from testkit.servers import HttpServer, serve_bytes


@pytest.mark.parametrize(
    "address",
    ["::7f00:1",  # IPv4-compatible 127.0.0.1
     "::a9fe:a9fe",  # IPv4-compatible 169.254.169.254
     "64:ff9b::a9fe:a9fe", "64:ff9b::7f00:1", "64:ff9b::a00:1",  # NAT64 of link-local, loopback, 10.0.0.1
     "64:ff9b:1::a9fe:a9fe",  # local-use NAT64
     "2002:a9fe:a9fe::", "2002:7f00:1::1", "2002:c0a8:101::",  # 6to4 of link-local, loopback, 192.168.1.1
     "2001:0:4136:e378:8000:63bf:80ff:fffe",  # Teredo whose client is 127.0.0.1
     "::ffff:10.0.0.1"],
)
def test_ipv6_forms_embedding_private_ipv4_are_refused(address: str) -> None:
    """An IPv6 address that leads to a private IPv4 address through a transition form is refused."""
    assert not AddressPolicy().permits(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["64:ff9b::808:808", "2002:808:808::1", "::ffff:8.8.8.8"])
def test_ipv6_forms_of_public_ipv4_pass(address: str) -> None:
    """The same forms around a public IPv4 address stay usable."""
    assert AddressPolicy().permits(ipaddress.ip_address(address))


def test_allowed_network_covers_its_embedded_forms() -> None:
    """An operator-allowed IPv4 network also allows that network reached through a mapped form."""
    policy = AddressPolicy([ipaddress.ip_network("127.0.0.1/32")])
    assert policy.permits(ipaddress.ip_address("::ffff:127.0.0.1"))
    assert not policy.permits(ipaddress.ip_address("::ffff:127.0.0.2"))


@pytest.mark.parametrize("address", ["::7f00:1", "64:ff9b::7f00:1", "2002:7f00:1::"])
def test_download_to_embedded_loopback_never_connects(address: str, tmp_path: Path) -> None:
    """A host resolving to such a form is refused before any connection (the loopback server sees none)."""
    with HttpServer({"/a": serve_bytes(b"secret")}) as server:
        guard = Downloader(max_bytes=1000, timeout_s=5, allow_http=True,
                           resolver=lambda _host, _port: [ipaddress.ip_address(address)])
        with pytest.raises(DownloadRefused):
            guard.fetch(f"http://media.example:{server.port}/a", tmp_path / "out", field="audio")
        assert server.connections == 0


@pytest.mark.parametrize(
    ("url", "error"),
    [("https://①②⑦.0.0.1/a.mp3", DownloadRefused),  # full-width digits normalise to 127.0.0.1
     ("https://exämple.com/a.mp3", DownloadRefused),
     ("http://[::1", InvalidInput), ("https://host:99999/a", InvalidInput), ("notaurl", InvalidInput),
     ("https://user:pw@example.com/a", DownloadRefused), ("https:///a", InvalidInput)],
)
def test_url_form_is_checked_before_any_network_use(url: str, error: type[Exception]) -> None:
    """Malformed URLs (no scheme, no host, a bad port) are INVALID_INPUT and non-ASCII hosts or
    credentials are refused; none
    of them is retryable, and each names the field."""
    with pytest.raises(error) as info:
        check_url(url, schemes={"https", "http"}, field="audio")
    assert info.value.retryable is False and info.value.field == "audio"  # type: ignore[attr-defined]
