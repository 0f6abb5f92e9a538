"""The request limiter: how many requests the HTTP server holds at once (MAX_CONCURRENT_REQUESTS).

Beyond the limit a request is refused (429) at once, never queued without bound. Each held
request has a place, released once whichever path ends it: its route, or, for a streamed
response, the stream's end. Touched on the event loop only.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from handler.http.errors import HttpRefusal


class RequestLimiter:
    """Places for at most ``limit`` requests; ``take`` refuses (429) when all are held."""

    def __init__(self, limit: int, retry_after: int) -> None:
        self.limit = limit
        self._retry_after = retry_after
        self.held = 0
        self._places: set[RequestPlace] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    def take(self) -> RequestPlace:
        if self.held >= self.limit:
            raise HttpRefusal(429, f"the worker holds {self.limit} requests already (MAX_CONCURRENT_REQUESTS); "
                              "retry later", kind="rate_limit_error", code="rate_limit_exceeded",
                              retry_after=self._retry_after)
        self.held += 1
        self._idle.clear()
        place = RequestPlace(self)
        self._places.add(place)
        return place

    def _free(self, place: RequestPlace) -> None:
        self.held -= 1
        self._places.discard(place)
        if self.held == 0:
            self._idle.set()

    def stuck(self) -> bool:
        """Every place is held by a request past its deadline: nobody else can get in, and nobody
        inside is getting anywhere (what the health route must tell a balancer)."""
        now = time.monotonic()
        return self.held >= self.limit and all(p.deadline is not None and p.deadline < now for p in self._places)

    async def wait_idle(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True


@dataclass(eq=False)
class RequestPlace:
    """One held request's place; freed once, whichever path ends the request."""

    limiter: RequestLimiter
    freed: bool = False
    # A streamed response holds the place past its route: only the stream's end releases it.
    held_by_stream: bool = False
    # While the client sends its body: when it must have arrived (time.monotonic); None otherwise.
    deadline: float | None = None

    def leave(self) -> None:
        """The route is done: the place is freed unless a stream holds it on."""
        if not self.held_by_stream:
            self.release()

    def release(self) -> None:
        if not self.freed:
            self.freed = True
            self.limiter._free(self)
