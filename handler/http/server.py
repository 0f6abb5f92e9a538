"""``python -m handler serve``: uvicorn, RunPod's load-balancer health states, and draining.

The health route answers 204 while the preload runs (the balancer sends nothing yet), 200 when
ready, 503 once draining or after a sticky CUDA error. SIGTERM does not close the listener at
once, as uvicorn alone would: new jobs are refused (503, CANCELLED) while the health route keeps
answering 503, in-flight requests get SHUTDOWN_GRACE_S to finish (then their jobs are
cancelled and answered), and only then does the server stop; the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from types import FrameType
from typing import Any

import uvicorn

from handler.app import Worker
from handler.config import Settings
from handler.http.limiter import RequestLimiter
from handler.http.metrics import Metrics
from handler.http.protocol import with_head_deadline
from handler.http.routes import ServeState, build_app
from handler.logs import get_logger

log = get_logger(__name__)
# After the grace period cancels what still runs, the time its answers get to go out.
_ANSWER_S = 3.0


class DrainingServer(uvicorn.Server):
    """uvicorn whose first SIGTERM/SIGINT drains instead of closing; a second one stops at once."""

    def __init__(self, config: uvicorn.Config, state: ServeState) -> None:
        super().__init__(config)
        self._state = state
        self._draining = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task[None] | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets=sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not recorded as uvicorn does: it raises the signal again after shutdown, so the
        # process would die of it instead of exiting 0.
        if self._draining or self._loop is None:
            self.should_exit = self.force_exit = True
            return
        self._draining = True
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain_task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        worker = self._state.worker
        held = self._state.limiter.held
        worker.begin_shutdown()
        grace = worker.settings.shutdown_grace_s
        done = await self._state.limiter.wait_idle(grace + _ANSWER_S)
        log.info("http.drained", held=held, finished=done)
        self.should_exit = True


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def server_bounds(settings: Settings) -> dict[str, Any]:
    """uvicorn's options that bound what a client can hold: the protocol (h11 with a deadline on
    each request head, handler.http.protocol), the head's size, connections, keep-alive."""
    return {"http": with_head_deadline(settings.http_head_timeout_s),
            "h11_max_incomplete_event_size": settings.http_max_head_bytes,
            "limit_concurrency": settings.http_max_connections,
            "timeout_keep_alive": settings.http_keep_alive_s}


def _preload(worker: Worker) -> None:
    if worker.settings.max_concurrent_generations is None:
        worker.size_gate()  # needs the model loaded: this is the preload
    elif worker.settings.preload:
        worker.preload()


def serve(worker: Worker) -> None:
    """Serve HTTP until SIGTERM (drained) or a second signal."""
    settings = worker.settings
    health_port = settings.port_health if settings.port_health not in (None, settings.port) else None
    state = ServeState(worker, Metrics(worker.runtime, tasks=worker.tasks),
                       RequestLimiter(settings.max_concurrent_requests, settings.retry_after_s),
                       health_only_ports=frozenset({health_port} if health_port else ()))

    @contextlib.asynccontextmanager
    async def lifespan(_app: Any) -> AsyncIterator[None]:
        async def preload() -> None:
            try:
                await asyncio.to_thread(_preload, worker)
            except Exception:
                log.exception("preload.crashed")  # jobs still load their models on first use
            state.ready = True
            log.info("http.ready", port=settings.port, health_port=health_port or settings.port)

        task = asyncio.create_task(preload())
        yield
        task.cancel()

    config = uvicorn.Config(build_app(state, lifespan=lifespan), log_config=None, access_log=False,
                            lifespan="on", timeout_graceful_shutdown=int(_ANSWER_S), server_header=False,
                            **server_bounds(settings))
    sockets = [_listen(settings.http_host, settings.port)]
    if health_port is not None:
        sockets.append(_listen(settings.http_host, health_port))
    log.info("http.listen", host=settings.http_host, port=settings.port, health_port=health_port or settings.port,
             health_path=settings.health_check_path, auth=settings.api_key is not None)
    DrainingServer(config, state).run(sockets=sockets)
