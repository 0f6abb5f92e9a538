"""Checks that need a CUDA GPU; skipped on CPU machines (the run-book, bench/gpu.py, runs them where
a GPU is lent). They need no Whisper weights nor the S3 server, so they run on a bare device with
only the wheels of `make gpu-bundle`."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from handler.app import Worker
from handler.runtime.registry import Registry
from testkit import fixture_tasks
from testkit.fixture_tasks import TABLE
from tests.test_half import batched_alignment

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """No real weights here (conftest's come from a package the device lacks): the fixture task needs none."""
    return tmp_path / "models"


def fixture_job(job_id: str, **fields: Any) -> dict[str, Any]:
    return {"id": job_id, "input": {"task": "fixture", **fields}}


def test_real_cuda_oom_is_gpu_oom_and_the_worker_recovers(make_settings) -> None:
    """A request for more GPU memory than exists raises a real CUDA OOM: GPU_OOM, cache cleared, next job fine."""
    worker = Worker(make_settings(DEVICE="cuda"), tasks=TABLE, registry=Registry())
    total_gib = torch.cuda.get_device_properties(0).total_memory / 2**30

    async def scenario() -> tuple[dict, dict]:
        oom = await worker.handle(fixture_job("big", action="allocate", gigabytes=total_gib * 2))
        small = await worker.handle(fixture_job("small", action="allocate", gigabytes=0.5))
        return oom, small

    oom, small = asyncio.run(scenario())
    assert oom["error_code"] == "GPU_OOM" and oom["retryable"] is True
    assert small["output"] == "done"
    assert torch.cuda.memory_allocated() < 2**30


STICKY = """
import asyncio, json, sys
from handler.app import Worker
from handler.config import load_settings
from handler.runtime.registry import Registry
from testkit.fixture_tasks import TABLE
from tests.test_half import batched_alignment

work = sys.argv[1]
settings = load_settings({"WORK_DIR": work, "MODEL_DIR": work, "WHISPER_MODEL": "tiny.en",
                          "ALLOW_MODEL_DOWNLOAD": "false", "DEVICE": "cuda"})
worker = Worker(settings, tasks=TABLE, registry=Registry())

async def scenario():
    first = await worker.handle({"id": "assert", "input": {"task": "fixture", "action": sys.argv[2]}})
    second = await worker.handle({"id": "next", "input": {"task": "fixture", "action": "ok"}})
    return first, second

first, second = asyncio.run(scenario())
print("RESULT " + json.dumps({"first": first, "second": second, "state": worker.lifecycle.state.value,
                              "busy": worker.runtime.gate.busy}))
"""


def test_a_real_device_side_assert_marks_the_worker_fatal(tmp_path: Path) -> None:
    """An index out of bounds inside a CUDA kernel (a device-side assert: the process's CUDA context
    is broken for good, so it runs in a process of its own) is CUDA_FATAL with refresh_worker, the
    worker goes FATAL, and the next job, which would have run fine, is refused the same way."""
    done = subprocess.run([sys.executable, "-c", STICKY, str(tmp_path), "device_assert"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, (done.returncode, done.stdout[-2000:], done.stderr[-4000:])
    seen = json.loads(lines[-1].removeprefix("RESULT "))
    first, second = seen["first"], seen["second"]
    assert first["error_code"] == "CUDA_FATAL" and first["refresh_worker"] is True, first
    assert second["error_code"] == "CUDA_FATAL" and second["refresh_worker"] is True, second
    assert seen["state"] == "fatal" and seen["busy"] == 0


def test_memory_goes_back_after_a_job(make_settings) -> None:
    """A job that takes 4 GiB on the GPU: afterwards the allocated bytes are back at the baseline,
    and the gate's empty_cache gave the allocator's cached blocks back to the driver (without it
    torch keeps the 4 GiB reserved for the next allocation)."""
    worker = Worker(make_settings(DEVICE="cuda"), tasks=TABLE, registry=Registry())
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    allocated, reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    free_before = torch.cuda.mem_get_info()[0]
    torch.cuda.reset_peak_memory_stats()
    result = asyncio.run(worker.handle(fixture_job("hold", action="allocate", gigabytes=4.0)))
    assert result["output"] == "done", result
    assert torch.cuda.max_memory_allocated() >= allocated + 4 * 2**30  # the job did take the memory
    assert torch.cuda.memory_allocated() == allocated
    assert torch.cuda.memory_reserved() <= reserved + 64 * 2**20
    assert torch.cuda.mem_get_info()[0] >= free_before - 256 * 2**20  # the driver has it back


@pytest.mark.parametrize("share", [0.1, 0.6])
def test_slots_are_sized_from_free_vram(make_settings, monkeypatch: pytest.MonkeyPatch, share: float) -> None:
    """MAX_CONCURRENT_GENERATIONS=auto: the preloaded model's footprint is read off the GPU's free
    memory before and after loading it, and the slots are what the rest of the free VRAM holds
    (less the reserve), within the cap: about 8 slots for a model of a tenth of the GPU, 1 when
    it takes more than half."""
    total = torch.cuda.get_device_properties(0).total_memory
    footprint_gib = share * total / 2**30
    monkeypatch.setenv("FIXTURE_PRELOAD_GIB", f"{footprint_gib:.3f}")
    settings = make_settings(DEVICE="cuda", MAX_CONCURRENT_GENERATIONS="auto", PRELOAD="fixture",
                             GENERATION_SLOTS_CAP="32", MEMORY_RESERVE_MB="4096")
    worker = Worker(settings, tasks=TABLE, registry=Registry())
    try:
        sizing = worker.size_gate()
        free = torch.cuda.mem_get_info()[0]
    finally:
        fixture_tasks.PRELOADED.clear()
        torch.cuda.empty_cache()
    assert abs(sizing["footprint_mb"] - footprint_gib * 1024) <= 64, sizing
    expected = max(1, min(32, (free - 4096 * 2**20) // int(footprint_gib * 2**30)))
    assert sizing["slots"] == expected and worker.runtime.gate.slots == expected, (sizing, expected)
    assert sizing["free_mb"] == pytest.approx(free / 2**20, abs=64)
    if share > 0.5:
        assert expected == 1
    else:
        assert expected >= 5


def test_batched_fp16_decoding_aligns_words_on_an_fp16_mel() -> None:
    """On CUDA in fp16 with word timings, the batched path's alignment pass (whisper.timing runs the
    whole model on the window's mel) gets the fp16 mel decoding got (tests/test_half.py: the same on the CPU)."""
    seen, words = batched_alignment("cuda")
    assert words
    assert len(seen) >= 2 and set(seen) == {torch.float16}, seen  # decoding, then each alignment
    assert all(0 <= w["start"] <= w["end"] <= 20 and np.isfinite([w["start"], w["end"]]).all() for w in words)


def test_parked_pipelines_free_the_gpu_and_come_back_intact() -> None:
    """Three 600 MiB pipelines on a 1.5 GiB budget, used in turn: what torch has allocated on the GPU
    never passes the budget, the least recently used one is parked in host RAM each time, and a
    parked one comes back with its weights unchanged."""
    from handler.runtime.instances import InstancePool, Placement, move_whole
    from handler.runtime.memory import module_bytes
    from handler.runtime.registry import PipelineKey
    from handler.runtime.residency import Residency

    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    memory = Residency(device="cuda", budget=1536 * 2**20)
    pools = []
    for name in "abc":
        module = torch.nn.Linear(8192, 19200, bias=False)  # 600 MiB of fp32
        pool = InstancePool([module], Placement(weights=module_bytes(module), move=move_whole))
        pool.key = PipelineKey(name, name, "cuda", "float32")
        pools.append(pool)
    sample = pools[0].first.weight[:4, :64].clone()
    for pool in pools * 2:
        with memory.hold(pool, timeout=5):
            assert pool.first.weight.device.type == "cuda"
            assert torch.cuda.memory_allocated() - base <= memory.budget
    assert sorted(memory.places().values()) == ["device", "device", "parked"]
    with memory.hold(pools[0], timeout=5):
        assert torch.equal(pools[0].first.weight[:4, :64].cpu(), sample)
