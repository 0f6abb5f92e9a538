"""The routes: each request is one job through the same Worker as a queued job.

Order of a request: auth, the concurrency cap (429), admission (503: draining, memory pressure,
a dead GPU), the announced size (413), then the body, streamed; only then the job. Refusals
before the body leave it unread.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from handler.app import Arrival, Worker
from handler.errors import DownloadFailed, InputTooLarge, InvalidInput, WorkerError, printable
from handler.http import openai
from handler.http.errors import HttpRefusal, error_body, openai_error, retries_later, status_of
from handler.http.metrics import CONTENT_TYPE, Metrics
from handler.http.uploads import Form, check_length, read_form
from handler.io.media import audio_encoders
from handler.io.outputs import InlineStorage
from handler.io.workspace import Workspace
from handler.logs import get_logger
from handler.runtime.lifecycle import State

log = get_logger(__name__)
# The status counted for a request whose client hung up before its answer (nginx's "client closed
# request"); never sent.
CLIENT_GONE = 499
# A JSON body's bytes beyond its base64 media (the other fields).
_JSON_OVERHEAD = 1024 * 1024
# Most values (counted by their commas) a JSON body may hold: a job's fields need a few hundred,
# while each parsed value costs tens of bytes of RAM for a byte or two of JSON.
_MAX_JSON_VALUES = 100_000
# Bodies up to this size are parsed on the event loop (a thread's hand-off would cost more).
_PARSE_INLINE_BYTES = 256 * 1024


class Door:
    """How many requests are held now; refuses (429) beyond the limit, never queues without bound.

    Touched on the event loop only.
    """

    def __init__(self, limit: int, retry_after: int) -> None:
        self.limit = limit
        self._retry_after = retry_after
        self.held = 0
        self._tickets: set[Ticket] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> Ticket:
        if self.held >= self.limit:
            raise HttpRefusal(429, f"the worker holds {self.limit} requests already (MAX_CONCURRENT_REQUESTS); "
                              "retry later", kind="rate_limit_error", code="rate_limit_exceeded",
                              retry_after=self._retry_after)
        self.held += 1
        self._idle.clear()
        ticket = Ticket(self)
        self._tickets.add(ticket)
        return ticket

    def _leave(self, ticket: Ticket) -> None:
        self.held -= 1
        self._tickets.discard(ticket)
        if self.held == 0:
            self._idle.set()

    def stuck(self) -> bool:
        """Every place is held by a request past its deadline: nobody else can get in, and nobody
        inside is getting anywhere (what the health route must tell a balancer)."""
        now = time.monotonic()
        return self.held >= self.limit and all(t.deadline is not None and t.deadline < now for t in self._tickets)

    async def wait_idle(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True


@dataclass(eq=False)
class Ticket:
    """One held request; left once, whichever path ends it (a stream's end, once handed on)."""

    door: Door
    left: bool = False
    # A streamed response holds the ticket past its route: only the stream's end releases it.
    handed_on: bool = False
    # While the client sends its body: when it must have arrived (time.monotonic); None otherwise.
    deadline: float | None = None

    def leave(self) -> None:
        if not self.handed_on:
            self.release()

    def release(self) -> None:
        if not self.left:
            self.left = True
            self.door._leave(self)


@dataclass
class ServeState:
    """What the routes share: the worker, metrics, the door, and whether the preload is done."""

    worker: Worker
    metrics: Metrics
    door: Door
    ready: bool = False
    # Ports that serve only the health route (PORT_HEALTH when it differs from PORT).
    health_only_ports: frozenset[int] = field(default_factory=frozenset)

    def health_status(self) -> int:
        if self.worker.lifecycle.state is not State.SERVING or self.door.stuck():
            return 503
        return 200 if self.ready else 204


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
            await _refusal(HttpRefusal(400, "Authorization: sent more than once; send one header",
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
        refusal = None if scope["type"] != "http" or scope["path"] == self._exempt else self._refusal(scope)
        if refusal is None:
            await self._app(scope, receive, send)
            return
        await _refusal(refusal)(scope, receive, send)

    def _refusal(self, scope: Scope) -> HttpRefusal | None:
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


def _refusal(exc: HttpRefusal, *, close: bool = False) -> JSONResponse:
    headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else {}
    if close:
        headers["Connection"] = "close"
    body = error_body(exc.message, kind=exc.kind, code=exc.code, param=exc.param)
    return JSONResponse(body, status_code=exc.status, headers=headers)


class Routes:
    """The app's routes over one ServeState."""

    def __init__(self, state: ServeState) -> None:
        self.state = state
        self.worker = state.worker
        self.settings = state.worker.settings

    # --- the parts every job route shares --------------------------------------------

    def _headers(self, result: dict[str, Any]) -> dict[str, str]:
        headers = {"X-Request-Id": str(result.get("request_id", ""))}
        if retries_later(result):
            headers["Retry-After"] = str(self.settings.retry_after_s)
        return headers

    def _openai_error(self, result: dict[str, Any], fields: dict[str, str] | None = None) -> JSONResponse:
        headers = self._headers(result)
        if status_of(result) == 413:
            headers["Connection"] = "close"  # the rest of the body is never read
        return JSONResponse(openai_error(result, fields=fields), status_code=status_of(result), headers=headers)

    def _refused(self, err: WorkerError) -> dict[str, Any]:
        """A refusal before the job as the job's own error result (same codes, same mapping)."""
        result = err.payload(uuid.uuid4().hex)
        log.warning("http.refused", code=err.code, error=err.message, field=err.field)
        return result

    def _admit(self, task: str) -> None:
        self.worker.admit(self.worker.tasks[task])

    async def _job(self, task: str, inputs: dict[str, Any], arrival: Arrival, *, job_id: str | None = None,
                   extra: dict[str, Any] | None = None) -> dict[str, Any]:
        job = {"id": job_id or f"http-{uuid.uuid4().hex[:16]}", "input": inputs, **(extra or {})}
        result = await self.worker.handle(job, arrival)
        self.state.metrics.record_job(task, result)
        return result

    async def _held(self, work: Callable[[Ticket], Awaitable[Response]]) -> Response:
        """Run a job route holding a ticket; refusals of the HTTP layer answered in OpenAI's shape."""
        try:
            ticket = self.state.door.enter()
        except HttpRefusal as exc:
            return _refusal(exc)
        try:
            return await work(ticket)
        except HttpRefusal as exc:
            return _refusal(exc)
        except ClientDisconnect:
            # The client hung up in the middle of its body: not the server's error. Nobody reads
            # this answer; its status is what the request's log line and metrics count.
            return Response(status_code=CLIENT_GONE)
        finally:
            ticket.leave()

    # --- health, metrics, system, models ---------------------------------------------

    async def health(self, request: Request) -> Response:
        status = self.state.health_status()
        if status == 204:
            return Response(status_code=204)
        return JSONResponse({"status": {200: "ready", 503: "unavailable"}[status],
                             "state": self.worker.lifecycle.state.value}, status_code=status)

    async def metrics(self, request: Request) -> Response:
        self.state.metrics.in_flight.set(self.state.door.held)
        return Response(self.state.metrics.text(), media_type=CONTENT_TYPE)

    async def system(self, request: Request) -> Response:
        result = await self._job("system", {"task": "system"}, Arrival())
        return JSONResponse(result, status_code=status_of(result), headers=self._headers(result))

    async def models(self, request: Request) -> Response:
        return JSONResponse(openai.models_body(self.settings))

    # --- the native job contract -----------------------------------------------------

    async def jobs(self, request: Request) -> Response:
        async def work(ticket: Ticket) -> Response:
            try:
                self.worker.admit(None)  # the task is in the body, which a refusal leaves unread
                body = await self._json(request, ticket,
                                        limit=self.settings.base64_max_bytes * 4 // 3 + _JSON_OVERHEAD)
            except WorkerError as err:
                result = self._refused(err)
                return JSONResponse(result, status_code=status_of(result), headers=self._headers(result))
            inputs = body.get("input")
            task = str(inputs.get("task", "transcribe")) if isinstance(inputs, dict) else "none"
            job_id = body.get("id") if isinstance(body.get("id"), str) and len(body["id"]) <= 128 else None
            extra = {"s3Config": body["s3Config"]} if "s3Config" in body else None
            result = await self._job(task, inputs, Arrival(), job_id=job_id, extra=extra)  # type: ignore[arg-type]
            return JSONResponse(result, status_code=status_of(result), headers=self._headers(result))

        return await self._held(work)

    async def _json(self, request: Request, ticket: Ticket, *, limit: int) -> dict[str, Any]:
        """A JSON object body of at most ``limit`` bytes (refused by Content-Length before reading)
        and at most _MAX_JSON_VALUES values (counted as it arrives), read within the body deadline."""
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise InputTooLarge(f"body: {length} bytes, the limit is {limit}", field="body")
        data = bytearray()
        commas = 0
        async with self._body_deadline(ticket, field="body", what="the body"):
            async for chunk in request.stream():
                data += chunk
                commas += chunk.count(b",")
                if len(data) > limit:
                    raise InputTooLarge(f"body: over the limit of {limit} bytes", field="body")
                if commas >= _MAX_JSON_VALUES:
                    raise InputTooLarge(f"body: more than {_MAX_JSON_VALUES} JSON values", field="body")
        return await _json_object(data)

    @contextlib.asynccontextmanager
    async def _body_deadline(self, ticket: Ticket, *, field: str, what: str) -> AsyncIterator[None]:
        """A body read within DOWNLOAD_TIMEOUT_S: a client trickling (or withholding) its body must not
        hold one of the worker's request places for longer than a download may take."""
        limit = self.settings.download_timeout_s
        ticket.deadline = time.monotonic() + limit
        try:
            async with asyncio.timeout(limit):
                yield
        except TimeoutError:
            raise DownloadFailed(f"{field}: {what} did not arrive within {limit:g} s (DOWNLOAD_TIMEOUT_S)",
                                 field=field) from None
        finally:
            ticket.deadline = None

    # --- OpenAI's audio and image routes ---------------------------------------------

    async def transcriptions(self, request: Request) -> Response:
        return await self._transcription(request, translate=False)

    async def translations(self, request: Request) -> Response:
        return await self._transcription(request, translate=True)

    async def _transcription(self, request: Request, *, translate: bool) -> Response:
        async def work(ticket: Ticket) -> Response:
            workspace = Workspace(self.settings.job_root())
            try:
                try:
                    self._admit("transcribe")
                    check_length(request.headers.get("content-length"), max_file_bytes=self.settings.download_max_bytes)
                    form = await self._form(request, workspace, ticket)
                    inputs, ask = openai.transcription_job(form, translate=translate)
                except WorkerError as err:
                    return self._openai_error(self._refused(err), openai.TRANSCRIPTION_FIELDS)
                arrival = Arrival(workspace=workspace, attachments=dict(form.files))
                if ask.stream:
                    diarized = ask.response_format == "diarized_json"
                    return await self._stream(inputs, arrival, workspace, ticket, diarized=diarized)
                result = await self._job("transcribe", inputs, arrival)
            finally:
                if not ticket.handed_on:  # a stream hands both on to its response
                    workspace.remove()
            if "error" in result:
                return self._openai_error(result, openai.TRANSCRIPTION_FIELDS)
            body, media_type = openai.transcription_body(result, ask)
            if isinstance(body, dict):
                return JSONResponse(body, headers=self._headers(result))
            return Response(body, media_type=media_type, headers=self._headers(result))

        return await self._held(work)

    async def _form(self, request: Request, workspace: Workspace, ticket: Ticket) -> Form:
        """The upload, streamed to the job's directory within the body deadline."""
        async with self._body_deadline(ticket, field="file", what="the upload"):
            return await read_form(request.stream(), request.headers.get("content-type"), workspace.path,
                                   file_fields=frozenset({"file"}), spooled_fields=openai.LARGE_FIELDS,
                                   max_file_bytes=self.settings.download_max_bytes)

    async def _stream(self, inputs: dict[str, Any], arrival: Arrival, workspace: Workspace,
                      ticket: Ticket, *, diarized: bool = False) -> Response:
        """Server-sent events: a text delta per segment as it is decoded, then the done event.
        ``diarized``: a ``transcript.text.segment`` event per segment with its speaker, sent once the
        speakers are known (at the job's end), then the done event.

        The job's first event (or its end) is awaited before answering, so a job that fails at
        once gets its HTTP status, not a stream holding an error.
        """
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[list[dict[str, Any]] | None] = asyncio.Queue()

        def on_event(kind: str, data: dict[str, Any]) -> None:  # on a GPU thread
            if kind == "segments" and not diarized:
                loop.call_soon_threadsafe(events.put_nowait, list(data["segments"]))

        arrival = Arrival(workspace=arrival.workspace, attachments=arrival.attachments, on_event=on_event)
        job = asyncio.create_task(self._job("transcribe", inputs, arrival))
        job.add_done_callback(lambda _done: events.put_nowait(None))
        first = await events.get()
        if first is None and "error" in job.result():
            workspace.remove()
            return self._openai_error(job.result(), openai.TRANSCRIPTION_FIELDS)
        ticket.handed_on = True  # held by the stream from here: released when it ends
        return StreamingResponse(self._sse(first, events, job, workspace, ticket, diarized=diarized),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _sse(self, first: list[dict[str, Any]] | None, events: asyncio.Queue[list[dict[str, Any]] | None],
                   job: asyncio.Task[dict[str, Any]], workspace: Workspace, ticket: Ticket, *,
                   diarized: bool = False) -> AsyncIterator[bytes]:
        sent = 0
        try:
            batch = first
            while batch is not None:
                for segment in batch:
                    text = str(segment.get("text", "")).strip()
                    if text:
                        yield _sse(openai.delta_event(text if sent == 0 else " " + text))
                        sent += 1
                batch = await events.get()
            result = await job
            if "error" in result:
                yield _sse(openai_error(result, fields=openai.TRANSCRIPTION_FIELDS), event="error")
                return
            if diarized:
                for segment in openai.diarized_segments(result["segments"]):
                    yield _sse(segment)
            elif sent == 0 and result["transcription"]:  # answered whole (sequential path, cache)
                yield _sse(openai.delta_event(result["transcription"]))
            yield _sse(openai.done_event(result))
        finally:
            ticket.release()
            if job.done():
                workspace.remove()
            else:
                job.cancel()  # the client went away
                # Removed once the job has let go of it (its threads stopped), never under it.
                job.add_done_callback(lambda _job: workspace.remove())

    async def speech(self, request: Request) -> Response:
        async def work(ticket: Ticket) -> Response:
            try:
                self._admit("speech")
                body = await self._json(request, ticket, limit=self.settings.max_speech_chars * 4 + _JSON_OVERHEAD)
                encoders = await asyncio.to_thread(audio_encoders)  # ffmpeg asked once, off the loop
                inputs, fmt = openai.speech_job(body, self.settings, encoders=encoders)
            except WorkerError as err:
                return self._openai_error(self._refused(err), openai.SPEECH_FIELDS)
            result = await self._job("speech", inputs, Arrival(storage=self._inline()))
            if "error" in result:
                return self._openai_error(result, openai.SPEECH_FIELDS)
            try:
                audio, media_type = await asyncio.to_thread(openai.speech_audio, result, fmt,
                                                            timeout_s=self.settings.media_timeout_s)
            except WorkerError as err:
                return self._openai_error(err.payload(str(result.get("request_id", ""))), openai.SPEECH_FIELDS)
            return Response(audio, media_type=media_type, headers=self._headers(result))

        return await self._held(work)

    async def images(self, request: Request) -> Response:
        async def work(ticket: Ticket) -> Response:
            try:
                self._admit("text2image")
                body = await self._json(request, ticket, limit=_JSON_OVERHEAD)
                inputs, fmt = openai.image_job(body, has_bucket=self.settings.bucket is not None)
            except WorkerError as err:
                return self._openai_error(self._refused(err), openai.IMAGE_FIELDS)
            arrival = Arrival(storage=self._inline()) if fmt == "b64_json" else Arrival()
            result = await self._job("text2image", inputs, arrival)
            if "error" in result:
                return self._openai_error(result, openai.IMAGE_FIELDS)
            return JSONResponse(openai.image_body(result, fmt), headers=self._headers(result))

        return await self._held(work)

    def _inline(self) -> InlineStorage:
        """Outputs that travel in the HTTP response itself, within the inline budget."""
        return InlineStorage(self.settings.inline_output_max_bytes)


async def _json_object(data: bytearray) -> dict[str, Any]:
    """``data`` parsed: a JSON object, or the client's error (nesting too deep included)."""
    try:
        # A large body is parsed on a thread: the health route and other requests go on meanwhile.
        body = json.loads(data) if len(data) <= _PARSE_INLINE_BYTES else await asyncio.to_thread(json.loads, data)
    except RecursionError:
        raise InvalidInput("body: JSON nested too deeply", field="body") from None
    except ValueError as exc:
        raise InvalidInput(f"body: not JSON ({printable(str(exc))})", field="body") from exc
    if not isinstance(body, dict):
        raise InvalidInput("body: expected a JSON object", field="body")
    return body


def _sse(data: dict[str, Any], *, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


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
            await _refusal(refusal, close=True)(scope, receive, send)
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


class _Timing:
    """Counts and times every request by route (the route's template, never the raw path)."""

    def __init__(self, app: ASGIApp, state: ServeState) -> None:
        self._app = app
        self._state = state
        self._health_path = state.worker.settings.health_check_path
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
            if scope.get("server") and scope["server"][1] in self._state.health_only_ports \
                    and scope["path"] != self._health_path:
                await Response(status_code=404)(scope, receive, sending)
                return
            await self._app(scope, receive, sending)
        finally:
            known = scope["path"] in _KNOWN_PATHS or scope["path"] == self._health_path
            route = scope["path"] if known else "other"
            seconds = time.perf_counter() - started
            self._state.metrics.requests.labels(route, str(status)).inc()
            self._state.metrics.request_seconds.labels(route).observe(seconds)
            # A job's own line (job.done, job.failed) already says what it did: a line per request
            # only for what went wrong, or at DEBUG (it cost a good part of a trivial request).
            if status >= 400 and route != self._health_path:
                log.info("http.request", method=scope["method"], route=route, status=status,
                         ms=round(seconds * 1000, 1))
            elif self._debug and route not in (self._health_path, "/metrics"):
                log.debug("http.request", method=scope["method"], route=route, status=status,
                          ms=round(seconds * 1000, 1))


_KNOWN_PATHS = frozenset({"/metrics", "/system", "/v1/models", "/v1/jobs", "/v1/audio/transcriptions",
                          "/v1/audio/translations", "/v1/audio/speech", "/v1/images/generations"})


def build_app(state: ServeState, *, lifespan: Any = None) -> ASGIApp:
    """The ASGI app: Starlette routes (FastAPI's core), wrapped in auth (with API_KEY) and request metrics.

    Every endpoint takes the Request itself, so FastAPI's own layer (per-request dependency
    solving, its exit-stack, body-limit and telemetry middleware) would only add time.
    """
    settings = state.worker.settings
    routes = Routes(state)
    json, form = "application/json", "multipart/form-data"
    # path, endpoint, method, the media type of its body
    table = [
        (settings.health_check_path, routes.health, "GET", None), ("/metrics", routes.metrics, "GET", None),
        ("/system", routes.system, "GET", None), ("/v1/models", routes.models, "GET", None),
        ("/v1/jobs", routes.jobs, "POST", json), ("/v1/audio/transcriptions", routes.transcriptions, "POST", form),
        ("/v1/audio/translations", routes.translations, "POST", form),
        ("/v1/audio/speech", routes.speech, "POST", json), ("/v1/images/generations", routes.images, "POST", json),
    ]
    app = Starlette(routes=[Route(path, endpoint, methods=[method]) for path, endpoint, method, _ in table],
                    lifespan=lifespan)
    wrapped: ASGIApp = app
    if settings.api_key is not None:
        wrapped = BearerAuth(wrapped, key=settings.api_key, exempt=settings.health_check_path)
    elif not settings.on_runpod:
        wrapped = BrowserGuard(wrapped, allowed_hosts=frozenset(settings.http_allowed_hosts),
                               exempt=settings.health_check_path,
                               body_types={path: kind for path, _, _, kind in table if kind is not None})
    return _Timing(RequestBounds(wrapped, max_headers=settings.http_max_headers), state)
