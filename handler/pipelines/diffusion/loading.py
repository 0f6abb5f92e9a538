"""Loading diffusers pipelines (images and video) the same way for every task, what a loaded one
takes on the device, and the image sizes it takes."""

from __future__ import annotations

from typing import Any

import torch

from handler.pipelines.diffusion import speedups
from handler.pipelines.diffusion.speedups import VideoSpeedups
from handler.pipelines.weights import pretrained_dir, pretrained_source, safetensors_elements
from handler.runtime.container import Runtime
from handler.runtime.devices import half_precision
from handler.runtime.instances import InstancePool, Placement
from handler.runtime.memory import module_bytes
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
    """A diffusers pipeline from a directory or the baked cache, in host RAM (the residency places it
    on the device), or under offload hooks that place it themselves; a video pipeline gets the
    VIDEO_* speed-ups, and its text encoder an offload hook where the budget needs the room."""
    # Imported here: diffusers costs seconds at start-up, and a worker that only
    # transcribes never needs it.
    from diffusers import DiffusionPipeline

    source, options = pretrained_source(name, runtime.settings)
    dtype = component_dtypes(runtime.device, runtime.settings.precision, vae_fp32=video)
    pipeline = DiffusionPipeline.from_pretrained(source, dtype=dtype, **options)  # type: ignore[no-untyped-call]
    if _places_itself(runtime, video=video):
        if runtime.settings.enable_cpu_offload:
            pipeline.enable_model_cpu_offload()
        else:
            pipeline = speedups.place(pipeline, runtime.device, video_speedups(runtime))
    elif video and offload_text_encoder(runtime, pipeline):
        speedups.offload_component(pipeline.text_encoder, runtime.device)
    vae = getattr(pipeline, "vae", None)
    for switch in ("enable_tiling", "enable_slicing"):  # decode big images and frames in pieces
        if hasattr(vae, switch):
            getattr(vae, switch)()
    if video:
        speedups.apply(pipeline, video_speedups(runtime))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _places_itself(runtime: Runtime, *, video: bool) -> bool:
    """Whether offload hooks place the whole pipeline: ENABLE_CPU_OFFLOAD (on a GPU), or a video
    model's VIDEO_GROUP_OFFLOAD."""
    if runtime.settings.enable_cpu_offload and runtime.device == "cuda":
        return True
    return video and runtime.settings.video_group_offload != "none"


def offload_text_encoder(runtime: Runtime, pipeline: Any) -> bool:
    """Whether a video pipeline's text encoder should live in host RAM and visit the device only to
    encode the prompt: VIDEO_TEXT_ENCODER_OFFLOAD, or with `auto` when the budget needs the room,
    that is when the pipeline's weights take more than half of it."""
    choice = runtime.settings.video_text_encoder_offload
    if choice != "auto" or getattr(pipeline, "text_encoder", None) is None:
        return choice == "true"
    budget = runtime.residency.budget
    return budget is not None and sum(module_bytes(m) for m in modules(pipeline).values()) > budget // 2


def modules(pipeline: Any) -> dict[str, torch.nn.Module]:
    """The pipeline's torch components by name (its text encoders, denoiser, VAE)."""
    return {name: c for name, c in pipeline.components.items() if isinstance(c, torch.nn.Module)}


def placement(pipeline: Any, *, places_itself: bool) -> Placement:
    """What one copy takes on the device and how it moves. Under offload hooks that place the whole
    pipeline, each component visits the device while it runs (the largest at most at once); else
    the components move with the pipeline, but for an offloaded text encoder, whose layers visit."""
    sizes = {name: module_bytes(module) for name, module in modules(pipeline).items()}
    if places_itself:
        return Placement(weights=0, transient=max(sizes.values(), default=0), move=None)
    hooked = {name for name, module in modules(pipeline).items() if speedups.is_offloaded(module)}
    return Placement(weights=sum(size for name, size in sizes.items() if name not in hooked),
                     transient=sum(speedups.offload_transient(modules(pipeline)[name]) for name in hooked),
                     move=_move_placed_components)


def _move_placed_components(pipeline: Any, device: str) -> None:
    """Move every component but those an offload hook places (diffusers' ``to`` would warn of each)."""
    for module in modules(pipeline).values():
        if not speedups.is_offloaded(module):
            module.to(device)


def pipelines(runtime: Runtime, task: str, name: str, *, video: bool = False) -> InstancePool[Any]:
    """MODEL_INSTANCES copies of the pipeline ``name`` for ``task``, loaded on first use."""
    dtype = str(dtype_for(runtime.device, runtime.settings.precision)).removeprefix("torch.")
    key = PipelineKey(task, name, runtime.device, dtype)
    count = runtime.settings.model_instances
    places_itself = _places_itself(runtime, video=video)
    return runtime.registry.get(key, lambda: InstancePool.build(
        count, lambda: load_pipeline(name, runtime, video=video),
        lambda pipeline: placement(pipeline, places_itself=places_itself)))


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


# Working memory per output pixel of one image (latents, the denoiser's activations for both halves
# of classifier-free guidance, the VAE decoding in tiles), and per pixel of one frame of a video
# segment: estimates that bench/README's GPU run-book measures.
IMAGE_WORKING_BYTES_PER_PIXEL = 3 * 1024
VIDEO_WORKING_BYTES_PER_PIXEL = 160


def image_working_bytes(width: int, height: int, count: int) -> int:
    """GPU memory ``count`` images of ``width`` x ``height`` take beyond the weights."""
    return width * height * count * IMAGE_WORKING_BYTES_PER_PIXEL


def video_working_bytes(width: int, height: int, frames: int) -> int:
    """GPU memory one generated segment of ``frames`` frames takes beyond the weights."""
    return width * height * frames * VIDEO_WORKING_BYTES_PER_PIXEL


def least_device_weights(runtime: Runtime, name: str, *, video: bool) -> int:
    """The fewest bytes the pipeline ``name`` can take on the device, from its files' headers
    before it loads: its components in their dtypes, less what offload hooks keep in host RAM
    (everything when they place the whole pipeline; a video model's text encoder unless
    VIDEO_TEXT_ENCODER_OFFLOAD is false). 0 when its files are not on this machine yet, or when
    there is no budget to hold it against."""
    if runtime.residency.budget is None:  # nothing to refuse against: no reading
        return 0
    folder = pretrained_dir(name, runtime.settings)
    if folder is None or _places_itself(runtime, video=video):
        return 0
    size = dtype_for(runtime.device, runtime.settings.precision).itemsize
    total = 0
    for component, elements in safetensors_elements(folder).items():
        if video and component == "text_encoder" and runtime.settings.video_text_encoder_offload != "false":
            continue
        total += elements * (4 if video and component == "vae" else size)
    return total * runtime.settings.model_instances
