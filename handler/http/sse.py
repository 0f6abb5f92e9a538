"""Server-sent events of a streamed transcription (OpenAI's ``stream=true``): a text delta per
segment as it is decoded, or, diarized, a segment event per segment with its speaker once the
speakers are known; then the done event, or an error event when the job fails midway."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from handler.http import openai
from handler.http.errors import openai_error
from handler.http.limiter import RequestPlace
from handler.io.workspace import Workspace

# What the job's event callback queues: a batch of decoded segments; None once the job ended.
Segments = list[dict[str, Any]] | None


def event_bytes(data: dict[str, Any], *, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


async def transcript_events(first: Segments, events: asyncio.Queue[Segments], job: asyncio.Task[dict[str, Any]],
                            workspace: Workspace, place: RequestPlace, *, diarized: bool) -> AsyncIterator[bytes]:
    """The stream's events from the first batch on. It holds the request's place and the job's
    directory: both are let go when it ends, the job cancelled if the client went away."""
    sent = 0
    try:
        batch = first
        while batch is not None:
            for segment in batch:
                text = str(segment.get("text", "")).strip()
                if text:
                    yield event_bytes(openai.delta_event(text if sent == 0 else " " + text))
                    sent += 1
            batch = await events.get()
        result = await job
        if "error" in result:
            yield event_bytes(openai_error(result, fields=openai.TRANSCRIPTION_FIELDS), event="error")
            return
        if diarized:
            for segment in openai.diarized_segments(result["segments"]):
                yield event_bytes(segment)
        elif sent == 0 and result["transcription"]:  # answered whole (sequential path, cache)
            yield event_bytes(openai.delta_event(result["transcription"]))
        yield event_bytes(openai.done_event(result))
    finally:
        place.release()
        if job.done():
            workspace.remove()
        else:
            job.cancel()  # the client went away
            # Removed once the job has let go of it (its threads stopped), never under it.
            job.add_done_callback(lambda _job: workspace.remove())
