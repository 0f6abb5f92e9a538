"""Which URLs the client follows when the endpoint names them, and what counts as another origin.

A result names its files by URL, the upload task names where to POST, and any reply may
redirect. All of it is the endpoint's word, so none of it is trusted: the client fetches only
``https``, or ``http`` to loopback when the endpoint is itself on loopback (the SDK's local API
and a bucket beside it). ``file:``, ``ftp:``, ``data:`` and plain ``http`` elsewhere are refused
before any byte moves.
"""

from __future__ import annotations

import ipaddress
import urllib.parse
from dataclasses import dataclass

_SHOWN_CHARS = 80
_DEFAULT_PORTS = {"http": 80, "https": 443}


class UrlRefused(Exception):
    """A URL the endpoint named is outside the policy: the client will not open it."""


def is_loopback(host: str | None) -> bool:
    """Whether ``host`` (a name or an IP literal, IPv6 without brackets) is this machine."""
    if not host:
        return False
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def shown(url: str) -> str:
    """``url`` for a message: no query or fragment (a presigned URL's signature), and short."""
    parts = urllib.parse.urlsplit(url)
    bare = urllib.parse.urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))
    return bare if len(bare) <= _SHOWN_CHARS else bare[: _SHOWN_CHARS - 3] + "..."


def origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) of ``url``, the port filled in for http and https."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:  # a port that is not a number: an origin nothing else shares
        port = -1
    return scheme, (parts.hostname or "").lower(), port if port is not None else _DEFAULT_PORTS.get(scheme)


@dataclass(frozen=True)
class UrlPolicy:
    """The URLs a reply may send the client to."""

    # True when the endpoint is on loopback: its bucket may then be plain http on loopback too.
    loopback_http: bool = False

    @classmethod
    def for_endpoint(cls, base_url: str) -> UrlPolicy:
        """The policy for replies of the endpoint at ``base_url``."""
        return cls(loopback_http=is_loopback(urllib.parse.urlsplit(base_url).hostname))

    def check(self, url: object, *, what: str) -> str:
        """``url`` itself when it may be opened; else ``UrlRefused`` naming ``what`` and the URL."""
        if not isinstance(url, str):
            raise UrlRefused(f"{what}: the url is of type {type(url).__name__}, not a string")
        scheme, host, _ = origin(url)
        if scheme == "https" and host:
            return url
        if scheme == "http" and self.loopback_http and is_loopback(host):
            return url
        allowed = "https, or http to loopback" if self.loopback_http else "https"
        raise UrlRefused(f"{what}: url {shown(url)!r} refused: only {allowed} is fetched")
