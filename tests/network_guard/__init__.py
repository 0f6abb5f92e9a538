"""Tests reach loopback only: an audit hook refuses (and records) any other connection.

The hook sees every ``socket.connect`` and ``socket.getaddrinfo`` of the process it is installed
in. An address that is not loopback, or a name other than ``localhost``, is refused with
``PermissionError`` before a packet leaves (looking up a written-out address sends nothing, so it
passes; connecting to it does not), and written to the file named by ``NETWORK_GUARD_LOG``,
so a caller that swallows the error (a download translated to ``DOWNLOAD_FAILED``) still fails the
run: conftest reads that file when the session ends. Worker processes the tests start get the same
hook through ``sitecustomize.py`` in this folder (conftest puts it on their ``PYTHONPATH``).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
from typing import Any

LOG_VARIABLE = "NETWORK_GUARD_LOG"
_LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


def allowed_host(host: object) -> bool:
    """Whether ``host`` (an address or a name) is this machine's loopback."""
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    if not isinstance(host, str):
        return False
    name = host.strip("[]").split("%", 1)[0].rstrip(".").lower()
    if name in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def is_address(host: object) -> bool:
    """Whether ``host`` is an IP address written out (looking one up is a parse, not a query)."""
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    try:
        ipaddress.ip_address(str(host).strip("[]").split("%", 1)[0])
    except ValueError:
        return False
    return True


def _refuse(what: str, host: object, port: object) -> None:
    path = os.environ.get(LOG_VARIABLE)
    if path:
        with open(path, "a", encoding="utf-8") as log:
            log.write(f"{os.getpid()} {what} {host!r} port {port!r}\n")
    raise PermissionError(f"tests reach loopback only: {what} to {host!r} refused")


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if event == "socket.connect":
        sock, address = args
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not allowed_host(address[0]):
            _refuse("connect", address[0], address[1])
    elif event == "socket.getaddrinfo":
        host, port = args[0], args[1]
        if host is not None and not allowed_host(host) and not is_address(host):
            _refuse("getaddrinfo", host, port)


_installed = False


def install() -> None:
    """Install the hook in this process (once; an audit hook cannot be removed)."""
    global _installed
    if not _installed:
        sys.addaudithook(_audit)
        _installed = True
