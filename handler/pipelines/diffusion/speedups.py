"""Video speed-ups through diffusers' own API, each off unless asked for.

- a transformer cache (``transformer.enable_cache``): First Block Cache skips the blocks after
  the first while its output barely changes from the last step; FasterCache reuses attention
  outputs of neighbouring steps. Both change the video a little, so both are in the result key.
- regional compilation (``compile_repeated_blocks``): the transformer's one repeated block is
  compiled once and reused for every layer, tens of seconds instead of minutes for the whole model.
- the attention backend (``set_attention_backend``).
- group offload (``enable_group_offload``): weights stay in RAM and groups of layers are moved to
  the GPU as they run, for GPUs too small for the model.
- the text encoder alone offloaded (``apply_group_offloading`` at leaf level): used once per
  prompt, it stays in RAM and its layers visit the GPU while they encode (see loading.py for when).

MagCache is not offered: diffusers 0.42 needs magnitude ratios calibrated per checkpoint (it ships
them for FLUX only) and the step count fixed when the hook is installed, while each job picks its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class VideoSpeedups:
    """Which speed-ups a video pipeline gets (see the VIDEO_* settings)."""

    cache: str = "none"  # none, first_block or faster
    cache_threshold: float = 0.05  # first_block's relative change below which a step is reused
    compile: bool = False  # regional torch.compile of the repeated transformer block
    attention_backend: str | None = None  # a diffusers AttentionBackendName value; None: default
    group_offload: str = "none"  # none, block or leaf


def cache_config(pipeline: Any, speedups: VideoSpeedups) -> Any:
    """The diffusers cache config for ``speedups.cache``; None for none."""
    from diffusers import FasterCacheConfig, FirstBlockCacheConfig

    if speedups.cache == "first_block":
        return FirstBlockCacheConfig(threshold=speedups.cache_threshold)  # type: ignore[no-untyped-call]
    if speedups.cache == "faster":
        # Attention reuse only: Wan runs its unconditional pass as a separate call, which
        # FasterCache's skipping of a batched unconditional half would cut in two.
        def timestep() -> int:
            current = pipeline.current_timestep
            return int(current) if current is not None else 0

        return FasterCacheConfig(  # type: ignore[no-untyped-call]
            spatial_attention_block_skip_range=2, current_timestep_callback=timestep,
                                 is_guidance_distilled=True)
    return None


def place(pipeline: Any, device: str, speedups: VideoSpeedups) -> Any:
    """Move ``pipeline`` onto ``device``, or group-offload it there."""
    if speedups.group_offload == "none":
        return pipeline.to(device)
    options: dict[str, Any] = {"offload_type": f"{speedups.group_offload}_level"}
    if speedups.group_offload == "block":
        options.update(num_blocks_per_group=1, use_stream=device == "cuda")
    pipeline.enable_group_offload(onload_device=torch.device(device), offload_device=torch.device("cpu"), **options)
    return pipeline


def offload_component(module: torch.nn.Module, device: str) -> None:
    """Keep ``module`` in host RAM; each of its layers comes onto ``device`` while it runs (the next
    one copied meanwhile on a CUDA stream) and goes back after."""
    from diffusers.hooks.group_offloading import apply_group_offloading

    apply_group_offloading(module, onload_device=torch.device(device), offload_device=torch.device("cpu"),
                           offload_type="leaf_level", use_stream=device == "cuda")


def is_offloaded(module: torch.nn.Module) -> bool:
    """Whether diffusers' group offload hooks place ``module``."""
    from diffusers.hooks.group_offloading import _is_group_offload_enabled

    return bool(_is_group_offload_enabled(module))


def offload_transient(module: torch.nn.Module) -> int:
    """Bytes a leaf-offloaded module has on the device at once: the layer running and the next one
    being copied, at most twice its largest layer."""
    from handler.runtime.memory import module_bytes

    leaves = [m for m in module.modules() if not list(m.children())]
    return 2 * max((module_bytes(leaf) for leaf in leaves), default=0)


def apply(pipeline: Any, speedups: VideoSpeedups) -> None:
    """Install the attention backend, the cache and the compilation on the pipeline's transformer."""
    transformer = pipeline.transformer
    if speedups.attention_backend is not None:
        transformer.set_attention_backend(speedups.attention_backend)
    config = cache_config(pipeline, speedups)
    if config is not None:
        transformer.enable_cache(config)
    if speedups.compile:
        transformer.compile_repeated_blocks(fullgraph=False, dynamic=False)
