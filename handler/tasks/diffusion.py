"""Loading diffusers pipelines (images and video) the same way for every task."""

from __future__ import annotations

from typing import Any

import torch

from handler.runtime.hub import pretrained_source
from handler.runtime.instances import InstancePool
from handler.runtime.registry import PipelineKey
from handler.tasks.base import Runtime


def dtype_for(device: str) -> torch.dtype:
    """bf16 on the GPU (fp16 overflows in some of these models), fp32 on the CPU."""
    return torch.bfloat16 if device == "cuda" else torch.float32


def load_pipeline(name: str, runtime: Runtime) -> Any:
    """A diffusers pipeline from a directory or the baked cache, on the worker's device."""
    # Imported here: diffusers costs seconds at start-up, and a worker that only
    # transcribes never needs it.
    from diffusers import DiffusionPipeline

    source, options = pretrained_source(name, runtime.settings)
    pipeline = DiffusionPipeline.from_pretrained(  # type: ignore[no-untyped-call]
        source, dtype=dtype_for(runtime.device), **options
    )
    if runtime.settings.enable_cpu_offload and runtime.device == "cuda":
        pipeline.enable_model_cpu_offload()
    else:
        pipeline = pipeline.to(runtime.device)
    vae = getattr(pipeline, "vae", None)
    for switch in ("enable_tiling", "enable_slicing"):  # decode big images and frames in pieces
        if hasattr(vae, switch):
            getattr(vae, switch)()
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def pipelines(runtime: Runtime, task: str, name: str) -> InstancePool[Any]:
    """MODEL_INSTANCES copies of the pipeline ``name`` for ``task``, loaded on first use."""
    dtype = str(dtype_for(runtime.device)).removeprefix("torch.")
    key = PipelineKey(task, name, runtime.device, dtype)
    count = runtime.settings.model_instances
    return runtime.registry.get(key, lambda: InstancePool.build(count, lambda: load_pipeline(name, runtime)))
