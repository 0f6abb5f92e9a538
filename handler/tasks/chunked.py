"""Transcription in chunks, in batches shared by every job the worker holds.

A recording is cut into chunks of at most 30 s (speech found by Silero VAD, or fixed windows
cut at quiet points), their log-mel windows are computed on the CPU, and the windows go to the
model's batcher a round at a time (``decoding.Sections``: each window is prompted with the text
of the window before it in its section, so a section's next window waits for its last):
windows of every job held by this worker with the same decoding settings join the same batches
(one encoder pass, one decoder loop), each job getting back its own segments. The batcher
keeps each job's cancellation and error its own, and retries a batch
that ran out of GPU memory in halves (:mod:`handler.runtime.batcher`).
"""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import Tensor

from handler.job import JobContext
from handler.pipelines.whisper import decoding, vad
from handler.pipelines.whisper.pipeline import WhisperPipeline
from handler.runtime.batcher import Batcher
from handler.runtime.cancel import CancelToken
from handler.runtime.container import Runtime
from handler.runtime.instances import InstancePool
from handler.runtime.progress import Progress

Segments = list[dict[str, Any]]
# The most chunks of all jobs in one batch (batch_size's own bound, or WHISPER_BATCH_SIZE if larger): a
# batch holds at most the largest batch_size of the jobs waiting, and at most batch_size chunks of each job.
_MAX_BATCH = 64


class ChunkProgress:
    """One job's chunks in the batches: when the first began (its queued time ends there),
    ``chunk i/n`` reported (throttled) as they come back, and the job's segments handed to
    ``on_segments`` in time order as soon as every window before them is decoded."""

    def __init__(self, progress: Progress, total: int, label: str,
                 on_segments: Callable[[Segments], None] | None = None) -> None:
        self._progress = progress
        # The job's context: its lines carry its request id, whichever job's batch reports them.
        self._context = contextvars.copy_context()
        self._total = total
        self._label = label
        # Guards _done and first_started: batches of one job may run on different GPU threads.
        self._done_lock = threading.Lock()
        self._done = 0
        self.first_started: float | None = None
        self._on_segments = on_segments
        # Windows decoded but not yet handed on (an earlier one is still in a later batch); guarded too.
        self._decoded: dict[int, Segments] = {}
        self._next_window = 0

    def started(self) -> None:
        with self._done_lock:
            if self.first_started is None:
                self.first_started = time.perf_counter()

    def advance(self) -> None:
        with self._done_lock:  # also keeps the context entered by one thread at a time
            self._done += 1
            message = f"{self._label}chunk {self._done}/{self._total}"
            self._context.run(self._progress.report, message, force=self._done == self._total)

    def decoded(self, window: int, segments: Segments) -> None:
        """Window ``window``'s segments are known: hand on those now in order."""
        if self._on_segments is None:
            return
        with self._done_lock:  # one thread at a time, so segments go out in order
            self._decoded[window] = segments
            ready: Segments = []
            while self._next_window in self._decoded:
                ready.extend(self._decoded.pop(self._next_window))
                self._next_window += 1
            if ready:
                self._on_segments(ready)


@dataclass(frozen=True, eq=False)
class _Item:
    """One window of one job, with the settings its batch is decoded with."""

    window: decoding.WindowInput
    settings: decoding.BatchSettings
    progress: ChunkProgress
    pipelines: InstancePool[WhisperPipeline]
    # Its place among the job's windows.
    index: int = 0


def find_chunks(audio: np.ndarray, *, enable_vad: bool, cancel: CancelToken) -> list[vad.Chunk]:
    """Speech chunks (VAD, stopping when the job is cancelled) or windows covering everything,
    each at most 30 s; on the CPU."""
    return vad.speech_chunks(audio, cancel=cancel) if enable_vad else vad.fixed_chunks(audio)


def _batcher(runtime: Runtime, model: WhisperPipeline) -> Batcher[_Item, Segments]:
    """The model's batcher; it outlives every job, so it knows them only through their items."""
    timeout = runtime.settings.generation_acquire_timeout

    def run_batch(items: list[_Item]) -> list[Segments]:
        for item in items:
            item.progress.started()
        with items[0].pipelines.borrow(timeout) as pipeline:
            found = pipeline.decode_windows([item.window for item in items], items[0].settings)
        for item, segments in zip(items, found, strict=True):
            item.progress.advance()
            item.progress.decoded(item.index, segments)
        return found

    most = max(_MAX_BATCH, runtime.settings.whisper_batch_size)
    return runtime.batcher(("whisper", model.name, model.device), run_batch, max_batch=most,
                           window_s=runtime.settings.whisper_batch_window_ms / 1000)


async def recognise(
    ctx: JobContext, pipelines: InstancePool[WhisperPipeline], windows: list[decoding.WindowInput], *,
    options: dict[str, Any], batch_size: int, language_mel: Tensor | None, label: str = "",
    on_segments: Callable[[Segments], None] | None = None,
) -> dict[str, Any]:
    """The transcript of a job's ``windows`` (``whisper.transcribe``'s result shape).

    ``language_mel`` (``decoding.language_mel``) is where an unset language is detected;
    ``on_segments`` hears the segments in order as they are decoded (on a GPU thread).
    """
    settings = decoding.BatchSettings.from_options(pipelines.first.model, options, fp16=pipelines.first.fp16)
    if settings.language is None and windows:  # detected once, so the job's windows decode alike
        if language_mel is None:
            raise ValueError("language_mel: needed to detect the language")
        mel = language_mel
        settings = await ctx.on_model(pipelines, lambda p: p.with_language(settings, mel), stage="language")
    progress = ChunkProgress(Progress(ctx.job, enabled=ctx.settings.post_progress), len(windows), label,
                             on_segments)
    sections = decoding.Sections(windows, width=batch_size, settings=settings,
                                 initial=decoding.initial_prompt(pipelines.first.model, settings))
    submitted = time.perf_counter()
    batcher = _batcher(ctx.runtime, pipelines.first)
    while batch := sections.next_round():  # each round's windows are prompted with the round before's text
        items = [_Item(window, settings, progress, pipelines, index) for index, window in batch]
        found = await batcher.submit(settings, items, cancel=ctx.cancel, limit=batch_size)
        for (index, _), segments in zip(batch, found, strict=True):
            sections.done(index, segments)
    started = progress.first_started or submitted
    ctx.timings.add("queued", (started - submitted) * 1000)
    ctx.timings.add("run", (time.perf_counter() - started) * 1000)
    return decoding.result_of(sections.segments(), settings.language)
