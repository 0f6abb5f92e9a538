"""One address policy for every place a job can point the worker at.

Download URLs, their redirects and per-job ``s3Config`` endpoints all pass the same checks:
the URL's form (scheme, an ASCII host, no credentials) before any network use, and every
address the host resolves to, checked again where the socket is opened, so a DNS answer
that changes between the check and the connect cannot slip through. The operator's own
bucket is trusted and never passes here.

An address is refused when it, or an IPv4 address embedded in it (IPv4-mapped and
-compatible, NAT64, 6to4, Teredo), is loopback, private, link-local, multicast or otherwise
not globally routable, unless an operator allowed its network.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable, Sequence
from urllib.parse import SplitResult, urlsplit

from handler.errors import DownloadFailed, DownloadRefused, InvalidInput

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], list[IPAddress]]

# Prefixes whose addresses carry an IPv4 address in their last 32 bits.
_NAT64 = (ipaddress.IPv6Network("64:ff9b::/96"), ipaddress.IPv6Network("64:ff9b:1::/48"))
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")


def system_resolver(host: str, port: int) -> list[IPAddress]:
    """Every address the system resolver gives for ``host``, in its order."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses: list[IPAddress] = []
    for _family, _type, _proto, _name, sockaddr in infos:
        address = ipaddress.ip_address(sockaddr[0])
        if address not in addresses:
            addresses.append(address)
    return addresses


def embedded_ipv4(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses an IPv6 address leads to through a transition mechanism."""
    found: list[ipaddress.IPv4Address] = []
    if address.ipv4_mapped is not None:
        found.append(address.ipv4_mapped)
    if address.sixtofour is not None:
        found.append(address.sixtofour)
    if address.teredo is not None:
        found.extend(address.teredo)
    if any(address in net for net in _NAT64) or (address in _IPV4_COMPATIBLE and int(address) > 1):
        found.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return found


class AddressPolicy:
    """Which addresses the worker may connect to on a job's behalf."""

    def __init__(self, allowed_networks: Iterable[IPNetwork] = (), resolver: Resolver = system_resolver) -> None:
        self._allowed = tuple(allowed_networks)
        self.resolver = resolver

    def _allowed_here(self, address: IPAddress) -> bool:
        return any(address.version == net.version and address in net for net in self._allowed)

    def permits(self, address: IPAddress) -> bool:
        if self._allowed_here(address):
            return True
        if isinstance(address, ipaddress.IPv6Address):
            inner = embedded_ipv4(address)
            if inner:
                return all(self._allowed_here(v4) or _public(v4) for v4 in inner)
        return _public(address)

    def check(self, host: str, addresses: Sequence[IPAddress]) -> None:
        if not addresses:
            raise DownloadFailed(f"{host} did not resolve to any address")
        for address in addresses:
            if not self.permits(address):
                # Which address the name had is not told: it would map the network the worker sits in.
                raise DownloadRefused(f"refused to connect to {host}: not a public address")

    def resolve(self, host: str, port: int) -> list[IPAddress]:
        """The checked addresses of ``host``; raises if any of them is refused."""
        try:
            addresses = self.resolver(host, port)
        except (OSError, UnicodeError, ValueError) as exc:
            raise DownloadFailed(f"could not resolve {host}: {exc}") from exc
        self.check(host, addresses)
        return addresses


def _public(address: IPAddress) -> bool:
    return address.is_global and not address.is_multicast


def check_url(url: str, *, schemes: Iterable[str], field: str) -> SplitResult:
    """The URL's parts, once its form is acceptable: scheme, ASCII host, no credentials.

    A string that is not a URL is INVALID_INPUT; a URL the policy will not fetch is refused."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 (parsing the port is the check)
    except ValueError as exc:
        raise InvalidInput(f"{field}: not a valid URL", field=field) from exc
    allowed = sorted(schemes)
    if parts.scheme and parts.scheme not in allowed:
        raise DownloadRefused(f"{field}: URL scheme must be {' or '.join(allowed)}", field=field)
    if not parts.scheme or not host:  # not a URL at all ("notaurl", "https:///a"): the field is malformed
        raise InvalidInput(f"{field}: not a valid URL (expected scheme://host/...)", field=field)
    if not host.isascii():
        # Unicode hosts normalise in surprising ways (full-width digits become an IP address).
        raise DownloadRefused(f"{field}: the host must be ASCII (use its punycode form)", field=field)
    if parts.username or parts.password:
        raise DownloadRefused(f"{field}: credentials in URLs are not accepted", field=field)
    return parts
