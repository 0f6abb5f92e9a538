"""Loading diffusers pipelines (images and video) the same way for every task, and the image sizes a
loaded one takes."""

from __future__ import annotations

from typing import Any

import torch

from handler.pipelines.diffusion import speedups
from handler.pipelines.diffusion.speedups import VideoSpeedups
from handler.pipelines.weights import pretrained_source
from handler.runtime.container import Runtime
from handler.runtime.devices import half_precision
from handler.runtime.instances import InstancePool
from handler.runtime.registry import PipelineKey


def dtype_for(device: str, precision: str = "auto") -> torch.dtype:
    """bf16 in half precision (fp16 overflows in some of these models), else fp32."""
    return torch.bfloat16 if half_precision(device, precision) else torch.float32


def component_dtypes(device: str, precision: str, *, vae_fp32: bool) -> torch.dtype | dict[str, torch.dtype]:
    """The dtype of every component. A video VAE stays in fp32, as diffusers' Wan examples load it
    (it is small next to the transformer); Wan and LTX cast the latents to the VAE's dtype. An
    image VAE keeps the pipeline's: StableDiffusionPipeline hands it latents as they are."""
    dtype = dtype_for(device, precision)
    if vae_fp32 and dtype != torch.float32:
        return {"default": dtype, "vae": torch.float32}
    return dtype


def video_speedups(runtime: Runtime) -> VideoSpeedups:
    settings = runtime.settings
    return VideoSpeedups(cache=settings.video_cache, cache_threshold=settings.video_cache_threshold,
                         compile=settings.video_compile, attention_backend=settings.video_attention_backend,
                         group_offload=settings.video_group_offload)


def load_pipeline(name: str, runtime: Runtime, *, video: bool = False) -> Any:
    """A diffusers pipeline from a directory or the baked cache, on the worker's device; a video
    pipeline gets the VIDEO_* speed-ups."""
    # Imported here: diffusers costs seconds at start-up, and a worker that only
    # transcribes never needs it.
    from diffusers import DiffusionPipeline

    source, options = pretrained_source(name, runtime.settings)
    dtype = component_dtypes(runtime.device, runtime.settings.precision, vae_fp32=video)
    pipeline = DiffusionPipeline.from_pretrained(source, dtype=dtype, **options)  # type: ignore[no-untyped-call]
    if runtime.settings.enable_cpu_offload and runtime.device == "cuda":
        pipeline.enable_model_cpu_offload()
    elif video:
        pipeline = speedups.place(pipeline, runtime.device, video_speedups(runtime))
    else:
        pipeline = pipeline.to(runtime.device)
    vae = getattr(pipeline, "vae", None)
    for switch in ("enable_tiling", "enable_slicing"):  # decode big images and frames in pieces
        if hasattr(vae, switch):
            getattr(vae, switch)()
    if video:
        speedups.apply(pipeline, video_speedups(runtime))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def pipelines(runtime: Runtime, task: str, name: str, *, video: bool = False) -> InstancePool[Any]:
    """MODEL_INSTANCES copies of the pipeline ``name`` for ``task``, loaded on first use."""
    dtype = str(dtype_for(runtime.device, runtime.settings.precision)).removeprefix("torch.")
    key = PipelineKey(task, name, runtime.device, dtype)
    count = runtime.settings.model_instances
    return runtime.registry.get(
        key, lambda: InstancePool.build(count, lambda: load_pipeline(name, runtime, video=video))
    )


def size_multiple(pipeline: Any) -> int:
    """What width and height must divide by: the VAE's factor (SD pipelines insist on 8 at least),
    doubled for 2x2-patched latents (FLUX)."""
    factor = max(8, int(getattr(pipeline, "vae_scale_factor", 8)))
    return factor * 2 if "Flux" in type(pipeline).__name__ else factor


def default_size(pipeline: Any) -> int:
    sample = getattr(pipeline, "default_sample_size", None)
    if sample is None:
        sample = pipeline.unet.config.sample_size
    return int(sample) * int(getattr(pipeline, "vae_scale_factor", 8))
