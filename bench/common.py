"""Helpers shared by the benchmarks: timing, quiet logging, settings."""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from handler.config import Settings, load_settings
from handler.logs import configure_logging


@dataclass(frozen=True)
class Comparison:
    """A measured figure against its baseline, measured in the same process."""

    name: str
    ours_s: float
    baseline_s: float
    goal: str
    detail: str = ""

    def row(self) -> str:
        return (f"| {self.name} | {self.ours_s * 1000:.3f} ms | {self.baseline_s * 1000:.3f} ms | "
                f"{self.baseline_s / self.ours_s:.3f} | {self.goal} | {self.detail} |")


HEADER = ("| benchmark | ours (median) | baseline (median) | baseline/ours | goal | notes |\n"
          "| --- | --- | --- | --- | --- | --- |")


def median_time(fn: Callable[[], object], *, runs: int) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def quiet_logs() -> None:
    """Logs are formatted as in production but written to /dev/null."""
    configure_logging(level="INFO", stream=open(os.devnull, "w"))  # noqa: SIM115 (lives for the process)


def bench_settings(model_dir: Path | None = None, **env: str) -> Settings:
    base = {"WORK_DIR": tempfile.mkdtemp(prefix="bench-"), "DEVICE": "cpu", "ALLOW_MODEL_DOWNLOAD": "false",
            "WHISPER_MODEL": "tiny.en"}
    if model_dir is not None:
        base["MODEL_DIR"] = str(model_dir)
    return load_settings({**base, **env})
