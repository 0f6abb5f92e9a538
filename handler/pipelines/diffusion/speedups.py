"""Video speed-ups through diffusers' own API, each off unless asked for.

- a transformer cache (``transformer.enable_cache``): First Block Cache skips the blocks after
  the first while its output barely changes from the last step; FasterCache reuses attention
  outputs of neighbouring steps. Both change the video a little, so both are in the result key.
- regional compilation (``compile_repeated_blocks``): the transformer's one repeated block is
  compiled once and reused for every layer, tens of seconds instead of minutes for the whole model.
- the attention backend (``set_attention_backend``).
- group offload (``enable_group_offload``): weights stay in RAM and groups of layers are moved to
  the GPU as they run, for GPUs too small for the model.

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
