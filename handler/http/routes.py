"""The routes: each request is one job through the same Worker as a queued job.

Order of a request: the server's bounds (head size and deadline, connections), the header count,
auth (or, with no key, the browser guard), a place in the request limiter (429), admission (503:
draining, memory pressure, a dead GPU), the announced size (413), then the body, streamed within
its deadline; only then the job. Refusals before the body leave it unread (and close the
connection). The route table is declared once, in :func:`route_table`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp

from handler.app import JobChannel, Worker
from handler.errors import DownloadFailed, InputTooLarge, InvalidInput, WorkerError, printable
from handler.http import openai, sse
from handler.http.errors import CLIENT_GONE, HttpRefusal, openai_error, refusal_response, retries_later, status_of
from handler.http.limiter import RequestLimiter, RequestPlace
from handler.http.metrics import CONTENT_TYPE, Metrics
from handler.http.middlewares import BearerAuth, BrowserGuard, RequestBounds, RequestMetrics
from handler.http.uploads import Form, check_length, read_form
from handler.io.media_out import audio_encoders
from handler.io.outputs import InlineStorage
from handler.io.workspace import Workspace
from handler.logs import get_logger
from handler.runtime.lifecycle import State

log = get_logger(__name__)
# A JSON body's bytes beyond its base64 media (the other fields).
_JSON_OVERHEAD = 1024 * 1024
# Most values (counted by their commas) a JSON body may hold: a job's fields need a few hundred,
# while each parsed value costs tens of bytes of RAM for a byte or two of JSON.
_MAX_JSON_VALUES = 100_000
# Bodies up to this size are parsed on the event loop (a thread's hand-off would cost more).
_PARSE_INLINE_BYTES = 256 * 1024


@dataclass
class ServeState:
    """What the routes share: the worker, metrics, the request limiter, and whether the preload is done."""

    worker: Worker
    metrics: Metrics
    limiter: RequestLimiter
    ready: bool = False
    # Ports that serve only the health route (PORT_HEALTH when it differs from PORT).
    health_only_ports: frozenset[int] = field(default_factory=frozenset)

    def health_status(self) -> int:
        if self.worker.lifecycle.state is not State.SERVING or self.limiter.stuck():
            return 503
        return 200 if self.ready else 204


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
        # A body left unread (a 413) closes the connection: middlewares.RequestBounds.
        return JSONResponse(openai_error(result, fields=fields), status_code=status_of(result),
                            headers=self._headers(result))

    def _refused(self, err: WorkerError) -> dict[str, Any]:
        """A refusal before the job as the job's own error result (same codes, same mapping)."""
        result = err.payload(uuid.uuid4().hex)
        log.warning("http.refused", code=err.code, error=err.message, field=err.field)
        return result

    def _admit(self, task: str) -> None:
        self.worker.admit(self.worker.tasks[task])

    async def _job(self, task: str, inputs: dict[str, Any], channel: JobChannel, *, job_id: str | None = None,
                   extra: dict[str, Any] | None = None) -> dict[str, Any]:
        job = {"id": job_id or f"http-{uuid.uuid4().hex[:16]}", "input": inputs, **(extra or {})}
        result = await self.worker.handle(job, channel)
        self.state.metrics.record_job(task, result)
        return result

    async def _held(self, work: Callable[[RequestPlace], Awaitable[Response]]) -> Response:
        """Run a job route holding a request place; refusals of the HTTP layer answered in OpenAI's shape."""
        try:
            place = self.state.limiter.take()
        except HttpRefusal as exc:
            return refusal_response(exc)
        try:
            return await work(place)
        except HttpRefusal as exc:
            return refusal_response(exc)
        except ClientDisconnect:
            # The client hung up in the middle of its body: not the server's error. Nobody reads
            # this answer; its status is what the request's log line and metrics count.
            return Response(status_code=CLIENT_GONE)
        finally:
            place.leave()

    # --- health, metrics, system, models ---------------------------------------------

    async def health(self, request: Request) -> Response:
        status = self.state.health_status()
        if status == 204:
            return Response(status_code=204)
        return JSONResponse({"status": {200: "ready", 503: "unavailable"}[status],
                             "state": self.worker.lifecycle.state.value}, status_code=status)

    async def metrics(self, request: Request) -> Response:
        self.state.metrics.in_flight.set(self.state.limiter.held)
        return Response(self.state.metrics.text(), media_type=CONTENT_TYPE)

    async def system(self, request: Request) -> Response:
        result = await self._job("system", {"task": "system"}, JobChannel())
        return JSONResponse(result, status_code=status_of(result), headers=self._headers(result))

    async def models(self, request: Request) -> Response:
        return JSONResponse(openai.models_body(self.settings))

    # --- the native job contract -----------------------------------------------------

    async def jobs(self, request: Request) -> Response:
        async def work(place: RequestPlace) -> Response:
            try:
                self.worker.admit(None)  # the task is in the body, which a refusal leaves unread
                body = await self._json(request, place,
                                        limit=self.settings.base64_max_bytes * 4 // 3 + _JSON_OVERHEAD)
            except WorkerError as err:
                result = self._refused(err)
                return JSONResponse(result, status_code=status_of(result), headers=self._headers(result))
            inputs = body.get("input")
            task = str(inputs.get("task", "transcribe")) if isinstance(inputs, dict) else "none"
            job_id = body.get("id") if isinstance(body.get("id"), str) and len(body["id"]) <= 128 else None
            extra = {"s3Config": body["s3Config"]} if "s3Config" in body else None
            result = await self._job(task, inputs, JobChannel(), job_id=job_id, extra=extra)  # type: ignore[arg-type]
            return JSONResponse(result, status_code=status_of(result), headers=self._headers(result))

        return await self._held(work)

    async def _json(self, request: Request, place: RequestPlace, *, limit: int) -> dict[str, Any]:
        """A JSON object body of at most ``limit`` bytes (refused by Content-Length before reading)
        and at most _MAX_JSON_VALUES values (counted as it arrives), read within the body deadline."""
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise InputTooLarge(f"body: {length} bytes, the limit is {limit}", field="body")
        data = bytearray()
        commas = 0
        async with self._body_deadline(place, field="body", what="the body"):
            async for chunk in request.stream():
                data += chunk
                commas += chunk.count(b",")
                if len(data) > limit:
                    raise InputTooLarge(f"body: over the limit of {limit} bytes", field="body")
                if commas >= _MAX_JSON_VALUES:
                    raise InputTooLarge(f"body: more than {_MAX_JSON_VALUES} JSON values", field="body")
        return await _json_object(data)

    @contextlib.asynccontextmanager
    async def _body_deadline(self, place: RequestPlace, *, field: str, what: str) -> AsyncIterator[None]:
        """A body read within DOWNLOAD_TIMEOUT_S: a client trickling (or withholding) its body must not
        hold one of the worker's request places for longer than a download may take."""
        limit = self.settings.download_timeout_s
        place.deadline = time.monotonic() + limit
        try:
            async with asyncio.timeout(limit):
                yield
        except TimeoutError:
            raise DownloadFailed(f"{field}: {what} did not arrive within {limit:g} s (DOWNLOAD_TIMEOUT_S)",
                                 field=field) from None
        finally:
            place.deadline = None

    # --- OpenAI's audio and image routes ---------------------------------------------

    async def transcriptions(self, request: Request) -> Response:
        return await self._transcription(request, translate=False)

    async def translations(self, request: Request) -> Response:
        return await self._transcription(request, translate=True)

    async def _transcription(self, request: Request, *, translate: bool) -> Response:
        async def work(place: RequestPlace) -> Response:
            workspace = Workspace(self.settings.job_root())
            try:
                try:
                    self._admit("transcribe")
                    check_length(request.headers.get("content-length"), max_file_bytes=self.settings.download_max_bytes)
                    form = await self._form(request, workspace, place)
                    inputs, ask = openai.transcription_job(form, translate=translate)
                except WorkerError as err:
                    return self._openai_error(self._refused(err), openai.TRANSCRIPTION_FIELDS)
                channel = JobChannel(workspace=workspace, attachments=dict(form.files))
                if ask.stream:
                    diarized = ask.response_format == "diarized_json"
                    return await self._stream(inputs, channel, workspace, place, diarized=diarized)
                result = await self._job("transcribe", inputs, channel)
            finally:
                if not place.held_by_stream:  # a stream hands both on to its response
                    workspace.remove()
            if "error" in result:
                return self._openai_error(result, openai.TRANSCRIPTION_FIELDS)
            body, media_type = openai.transcription_body(result, ask)
            if isinstance(body, dict):
                return JSONResponse(body, headers=self._headers(result))
            return Response(body, media_type=media_type, headers=self._headers(result))

        return await self._held(work)

    async def _form(self, request: Request, workspace: Workspace, place: RequestPlace) -> Form:
        """The upload, streamed to the job's directory within the body deadline."""
        async with self._body_deadline(place, field="file", what="the upload"):
            return await read_form(request.stream(), request.headers.get("content-type"), workspace.path,
                                   file_fields=frozenset({"file"}), spooled_fields=openai.LARGE_FIELDS,
                                   max_file_bytes=self.settings.download_max_bytes)

    async def _stream(self, inputs: dict[str, Any], channel: JobChannel, workspace: Workspace,
                      place: RequestPlace, *, diarized: bool = False) -> Response:
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

        channel = JobChannel(workspace=channel.workspace, attachments=channel.attachments, on_event=on_event)
        job = asyncio.create_task(self._job("transcribe", inputs, channel))
        job.add_done_callback(lambda _done: events.put_nowait(None))
        first = await events.get()
        if first is None and "error" in job.result():
            workspace.remove()
            return self._openai_error(job.result(), openai.TRANSCRIPTION_FIELDS)
        place.held_by_stream = True  # held by the stream from here: released when it ends
        return StreamingResponse(sse.transcript_events(first, events, job, workspace, place, diarized=diarized),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def speech(self, request: Request) -> Response:
        async def work(place: RequestPlace) -> Response:
            try:
                self._admit("speech")
                body = await self._json(request, place, limit=self.settings.max_speech_chars * 4 + _JSON_OVERHEAD)
                encoders = await asyncio.to_thread(audio_encoders)  # ffmpeg asked once, off the loop
                inputs, fmt = openai.speech_job(body, self.settings, encoders=encoders)
            except WorkerError as err:
                return self._openai_error(self._refused(err), openai.SPEECH_FIELDS)
            result = await self._job("speech", inputs, JobChannel(storage=self._inline()))
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
        async def work(place: RequestPlace) -> Response:
            try:
                self._admit("text2image")
                body = await self._json(request, place, limit=_JSON_OVERHEAD)
                inputs, fmt = openai.image_job(body, has_bucket=self.settings.bucket is not None)
            except WorkerError as err:
                return self._openai_error(self._refused(err), openai.IMAGE_FIELDS)
            channel = JobChannel(storage=self._inline()) if fmt == "b64_json" else JobChannel()
            result = await self._job("text2image", inputs, channel)
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


@dataclass(frozen=True)
class RouteSpec:
    """One route: its path, its endpoint, its method, and the media type of its body (None: none)."""

    path: str
    endpoint: Callable[[Request], Awaitable[Response]]
    method: str
    body_type: str | None = None


def route_table(routes: Routes, *, health_path: str) -> list[RouteSpec]:
    """Every route the app serves: the one declaration (the app's router, the metrics' route labels
    and the browser guard's content types are all read from it)."""
    json, form = "application/json", "multipart/form-data"
    return [
        RouteSpec(health_path, routes.health, "GET"), RouteSpec("/metrics", routes.metrics, "GET"),
        RouteSpec("/system", routes.system, "GET"), RouteSpec("/v1/models", routes.models, "GET"),
        RouteSpec("/v1/jobs", routes.jobs, "POST", json),
        RouteSpec("/v1/audio/transcriptions", routes.transcriptions, "POST", form),
        RouteSpec("/v1/audio/translations", routes.translations, "POST", form),
        RouteSpec("/v1/audio/speech", routes.speech, "POST", json),
        RouteSpec("/v1/images/generations", routes.images, "POST", json),
    ]


def build_app(state: ServeState, *, lifespan: Any = None) -> ASGIApp:
    """The ASGI app: Starlette routes (FastAPI's core) inside the layers of handler.http.middlewares.

    Every endpoint takes the Request itself, so FastAPI's own layer (per-request dependency
    solving, its exit-stack, body-limit and telemetry middleware) would only add time.
    """
    settings = state.worker.settings
    table = route_table(Routes(state), health_path=settings.health_check_path)
    app = Starlette(routes=[Route(spec.path, spec.endpoint, methods=[spec.method]) for spec in table],
                    lifespan=lifespan)
    wrapped: ASGIApp = app
    if settings.api_key is not None:
        wrapped = BearerAuth(wrapped, key=settings.api_key, exempt=settings.health_check_path)
    elif not settings.on_runpod:
        wrapped = BrowserGuard(wrapped, allowed_hosts=frozenset(settings.http_allowed_hosts),
                               exempt=settings.health_check_path,
                               body_types={spec.path: spec.body_type for spec in table if spec.body_type})
    wrapped = RequestBounds(wrapped, max_headers=settings.http_max_headers)
    return RequestMetrics(wrapped, metrics=state.metrics, routes=frozenset(spec.path for spec in table),
                          health_path=settings.health_check_path, health_only_ports=state.health_only_ports)
