"""The ASGI layers around the routes, outermost first: request metrics and logs, the request's
bounds (header count; an answer given before its body was read closes the connection), then
either the bearer key (API_KEY) or, with no key, the guard against what web pages could send.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import time
from typing import Any

from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from handler.errors import printable
from handler.http.errors import HttpRefusal, error_body, refusal_response
from handler.http.metrics import Metrics
from handler.logs import get_logger

log = get_logger(__name__)


class RequestMetrics:
    """Counts and times every request by route (the route's template, never the raw path: any
    other is `other`), and logs the ones that went wrong; a port that serves only the health
    route answers 404 to the rest."""

    def __init__(self, app: ASGIApp, *, metrics: Metrics, routes: frozenset[str], health_path: str,
                 health_only_ports: frozenset[int]) -> None:
        self._app = app
        self._metrics = metrics
        self._routes = routes
        self._health_path = health_path
        self._health_only_ports = health_only_ports
        self._debug = logging.getLogger(__name__).isEnabledFor(logging.DEBUG)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def sending(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if scope.get("server") and scope["server"][1] in self._health_only_ports \
                    and scope["path"] != self._health_path:
                await Response(status_code=404)(scope, receive, sending)
                return
            await self._app(scope, receive, sending)
        finally:
            route = scope["path"] if scope["path"] in self._routes else "other"
            seconds = time.perf_counter() - started
            self._metrics.requests.labels(route, str(status)).inc()
            self._metrics.request_seconds.labels(route).observe(seconds)
            # A job's own line (job.done, job.failed) already says what it did: a line per request
            # only for what went wrong, or at DEBUG (it cost a good part of a trivial request).
            if status >= 400 and route != self._health_path:
                log.info("http.request", method=scope["method"], route=route, status=status,
                         ms=round(seconds * 1000, 1))
            elif self._debug and route not in (self._health_path, "/metrics"):
                log.debug("http.request", method=scope["method"], route=route, status=status,
                          ms=round(seconds * 1000, 1))


class RequestBounds:
    """At most HTTP_MAX_HEADERS header fields (431; their bytes are bounded by the server), and an
    answer given while the request's body is still unread closes the connection: the rest of the
    body is never read, nor left to be taken for the next request."""

    def __init__(self, app: ASGIApp, *, max_headers: int) -> None:
        self._app = app
        self._max_headers = max_headers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        if len(scope["headers"]) > self._max_headers:
            refusal = HttpRefusal(431, f"the request has {len(scope['headers'])} header fields, the limit is "
                                  f"{self._max_headers} (HTTP_MAX_HEADERS)")
            await refusal_response(refusal, close=True)(scope, receive, send)
            return
        unread = any(name in (b"content-length", b"transfer-encoding") and value not in (b"0",)
                     for name, value in scope["headers"])

        async def receiving() -> Any:
            nonlocal unread
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                unread = False
            return message

        async def sending(message: Any) -> None:
            if message["type"] == "http.response.start" and unread:
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        await self._app(scope, receiving, sending)


class BearerAuth:
    """``Authorization: Bearer <API_KEY>`` on every route but the health route (constant-time compare).

    The scheme is case-insensitive (RFC 7235); a request with two Authorization headers is refused,
    as no one can say which of them a proxy in front checked.
    """

    def __init__(self, app: ASGIApp, *, key: str, exempt: str) -> None:
        self._app = app
        self._expected = key.encode()
        self._exempt = exempt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] == self._exempt:
            await self._app(scope, receive, send)
            return
        given = [value for name, value in scope["headers"] if name == b"authorization"]
        if len(given) > 1:
            await refusal_response(HttpRefusal(400, "Authorization: sent more than once; send one header",
                                       param="Authorization"))(scope, receive, send)
            return
        token = bearer_token(given[0]) if given else None
        if token is not None and hmac.compare_digest(token, self._expected):
            await self._app(scope, receive, send)
            return
        body = error_body("missing or wrong API key: send Authorization: Bearer <API_KEY>",
                          kind="invalid_request_error", code="invalid_api_key", param=None)
        await JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)


def bearer_token(value: bytes) -> bytes | None:
    """The token of an ``Authorization: Bearer <token>`` value: the scheme in any case, one or more
    spaces after it (RFC 7235 credentials); None for another scheme."""
    scheme, _, token = value.strip().partition(b" ")
    if scheme.lower() != b"bearer":
        return None
    return token.lstrip(b" ")


class BrowserGuard:
    """What a web page could make a visitor's browser send, refused when no key guards the worker
    (no API_KEY, off RunPod, whose own key guards it there).

    A page can POST a "simple" request (text/plain, a form) to any address without asking first,
    and by DNS rebinding make its own name point at the worker. So: a request that carries an
    ``Origin`` (browsers add it to every cross-site request and every POST) is refused, a body
    must have its route's Content-Type, and ``Host`` must be an IP address, ``localhost`` or a
    name of HTTP_ALLOWED_HOSTS. Clients that are not browsers send none of these wrong.
    """

    def __init__(self, app: ASGIApp, *, allowed_hosts: frozenset[str], exempt: str,
                 body_types: dict[str, str]) -> None:
        self._app = app
        self._allowed_hosts = allowed_hosts | {"localhost"}
        self._exempt = exempt
        self._body_types = body_types

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        refusal = None if scope["type"] != "http" or scope["path"] == self._exempt else self._refusal_of(scope)
        if refusal is None:
            await self._app(scope, receive, send)
            return
        await refusal_response(refusal)(scope, receive, send)

    def _refusal_of(self, scope: Scope) -> HttpRefusal | None:
        headers = {name: value for name, value in scope["headers"] if name in (b"origin", b"host", b"content-type")}
        if b"origin" in headers:
            return HttpRefusal(403, "Origin: requests from web pages are refused by a worker without API_KEY",
                               param="Origin")
        host = headers.get(b"host", b"").decode("latin-1")
        if host and not self._host_allowed(host):
            return HttpRefusal(421, f"Host: {printable(host)!r} is not a name of this worker (HTTP_ALLOWED_HOSTS)",
                               param="Host")
        wanted = self._body_types.get(scope["path"]) if scope["method"] == "POST" else None
        given = headers.get(b"content-type", b"").split(b";")[0].strip().lower().decode("latin-1")
        if wanted is not None and given != wanted:
            return HttpRefusal(415, f"Content-Type: expected {wanted}, got {printable(given)!r}",
                               param="Content-Type")
        return None

    def _host_allowed(self, host: str) -> bool:
        name = _host_name(host)
        try:
            ipaddress.ip_address(name)
        except ValueError:
            return name.lower().rstrip(".") in self._allowed_hosts
        return True


def _host_name(host: str) -> str:
    """A Host value's name or address, its port left off."""
    if host.startswith("["):  # [an IPv6 address]:port
        return host[1:host.find("]")]
    return host.rpartition(":")[0] if ":" in host else host
