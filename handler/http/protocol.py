"""The HTTP/1.1 protocol the server speaks: uvicorn's h11 one, with a deadline on the request head.

h11 bounds a request head's bytes (``h11_max_incomplete_event_size``: past it the request is
answered 400 and the connection closed) and parses each byte once; uvicorn's httptools protocol
has no such bound. Neither has a deadline on the head itself: a client that sends a few bytes
of a request line and then nothing holds its connection (and a place in the server's
connection limit) for as long as it likes, so this subclass arms one timer per head.
"""

from __future__ import annotations

import asyncio
from typing import ClassVar

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


class HeadDeadlineProtocol(H11Protocol):
    """A connection must bring a complete request head within ``head_timeout_s`` of opening, and
    each later request on it within ``head_timeout_s`` of its first byte; else it is closed (with
    408 when part of a head had come). Between requests uvicorn's keep-alive timeout applies."""

    head_timeout_s: ClassVar[float] = 10.0
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE:  # still waiting for the rest of a head
            self._arm_head_timer()
        else:
            self._disarm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.conn.their_state is not h11.IDLE or self.transport.is_closing():
            return
        if self.conn.trailing_data[0]:
            self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        self.transport.close()


def with_head_deadline(seconds: float) -> type[HeadDeadlineProtocol]:
    """The protocol class for uvicorn's ``http`` option, with its head deadline (uvicorn builds one
    instance per connection with arguments of its own)."""
    return type("HeadDeadlineProtocol", (HeadDeadlineProtocol,), {"head_timeout_s": seconds})
