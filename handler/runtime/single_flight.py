"""Single flight: identical work asked for at the same time runs once; the others wait for it."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

T = TypeVar("T")


class SingleFlight(Generic[T]):
    """Work in flight by key, on the event loop that runs it (touched on that loop's thread only)."""

    def __init__(self) -> None:
        self._running: dict[tuple[asyncio.AbstractEventLoop, Hashable], asyncio.Future[T | None]] = {}

    async def run(self, key: Hashable, compute: Callable[[], Awaitable[T]]) -> tuple[T, bool]:
        """``compute()``'s result, and whether it was another caller's (shared).

        A follower waits for the leader; if the leader fails or is cancelled, the follower
        computes for itself (its own error is its own). A follower's cancellation never
        touches the leader.
        """
        loop = asyncio.get_running_loop()
        slot = (loop, key)
        running = self._running.get(slot)
        if running is not None:
            shared = await asyncio.shield(running)
            if shared is not None:
                return shared, True
            return await self.run(key, compute)
        future: asyncio.Future[T | None] = loop.create_future()
        self._running[slot] = future
        try:
            result = await compute()
            future.set_result(result)
            return result, False
        finally:
            if not future.done():
                future.set_result(None)  # failed or cancelled: followers compute for themselves
            if self._running.get(slot) is future:
                del self._running[slot]
