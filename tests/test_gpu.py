"""Checks that need a CUDA GPU; skipped on CPU machines (run them where a GPU is lent)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from handler.app import Worker
from handler.runtime.registry import Registry
from tests.fixture_tasks import TABLE

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_real_cuda_oom_is_gpu_oom_and_the_worker_recovers(make_settings) -> None:
    """A request for more GPU memory than exists raises a real CUDA OOM: GPU_OOM, cache cleared, next job fine."""
    worker = Worker(make_settings(DEVICE="cuda"), tasks=TABLE, registry=Registry())
    total_gib = torch.cuda.get_device_properties(0).total_memory / 2**30

    async def scenario() -> tuple[dict, dict]:
        oom = await worker.handle({"id": "big", "input": {"task": "fixture", "action": "allocate",
                                                          "gigabytes": total_gib * 2}})
        small = await worker.handle({"id": "small", "input": {"task": "fixture", "action": "allocate",
                                                              "gigabytes": 0.5}})
        return oom, small

    oom, small = asyncio.run(scenario())
    assert oom["error_code"] == "GPU_OOM" and oom["retryable"] is True
    assert small["output"] == "done"
    assert torch.cuda.memory_allocated() < 2**30
