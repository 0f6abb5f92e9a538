"""The VIDEO_* speed-ups engage on tiny Wan and LTX pipelines loaded by the worker, and the video
stays valid; bad values stop the worker at start-up naming the variable. Their speed is the
run-book's to measure (bench/gpu.py), on a GPU."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from handler.config import SettingsError, load_settings
from handler.pipelines.diffusion import loading
from tests.conftest import job, run_job

FAMILIES = ["wan", "ltx"]


@pytest.fixture
def video_model(request: pytest.FixtureRequest, tiny_wan: Path, tiny_ltx: Path) -> Path:
    return tiny_wan if request.param == "wan" else tiny_ltx


def loaded(worker: Any, model: Path) -> Any:
    return loading.pipelines(worker.runtime, "text2video", str(model), video=True).first


def blocks(pipeline: Any) -> torch.nn.ModuleList:
    transformer = pipeline.transformer
    return transformer.blocks if hasattr(transformer, "blocks") else transformer.transformer_blocks


@contextmanager
def counted(module: torch.nn.Module) -> Iterator[list[int]]:
    """How many times ``module`` really ran (a torch hook: a cache that skips it never calls it)."""
    calls = [0]
    hook = module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        yield calls
    finally:
        hook.remove()


def make_video(worker: Any, steps: int = 6) -> dict[str, Any]:
    """A video through the worker, at the smallest frames both families take (64x64: the speed-ups
    act per step and per block, whatever the frame size; 144p took LTX's math attention 20 times longer)."""
    result = run_job(worker, job(task="text2video", prompt="a red boat", width=64, height=64, fps=8, duration_s=1.0,
                                 num_inference_steps=steps, seed=5, guidance_scale=1.0))
    assert "error" not in result, result
    assert result["frames"] >= 8 and {f["name"] for f in result["files"]} == {"video.mp4", "poster.jpg"}
    return result


def hook_names(module: torch.nn.Module) -> set[str]:
    registry = getattr(module, "_diffusers_hook", None)
    return set(registry.hooks) if registry is not None else set()


# First Block Cache needs two blocks at least (a head and a tail): both tiny transformers have two.
@pytest.mark.parametrize("video_model", FAMILIES, indirect=True)
def test_first_block_cache_skips_steps(make_fresh_worker, video_model: Path) -> None:
    """VIDEO_CACHE=first_block: hooks on the blocks, and with a high threshold the blocks after the
    first run on fewer steps than the first one does; the video is still made."""
    worker = make_fresh_worker(VIDEO_MODEL=str(video_model), VIDEO_CACHE="first_block", VIDEO_CACHE_THRESHOLD="1e6")
    pipeline = loaded(worker, video_model)
    assert pipeline.transformer.is_cache_enabled
    assert hook_names(blocks(pipeline)[0]) == {"fbc_leader_block_hook"}
    head, tail = blocks(pipeline)[0], blocks(pipeline)[-1]
    inner = next(m for name, m in tail.named_children() if name.startswith(("ff", "ffn")))
    with counted(head) as head_calls, counted(inner) as tail_calls:
        make_video(worker)
    assert head_calls[0] >= 6
    assert tail_calls[0] < head_calls[0], (tail_calls, head_calls)


@pytest.mark.parametrize("video_model", FAMILIES, indirect=True)
def test_faster_cache_reuses_attention(make_fresh_worker, video_model: Path) -> None:
    """VIDEO_CACHE=faster: FasterCache hooks on the attention layers, some attention calls reused."""
    worker = make_fresh_worker(VIDEO_MODEL=str(video_model), VIDEO_CACHE="faster")
    pipeline = loaded(worker, video_model)
    attention = blocks(pipeline)[0].attn1
    assert "faster_cache_block" in hook_names(attention)
    assert "faster_cache_denoiser" in hook_names(pipeline.transformer)
    inner = attention.to_q
    with counted(attention) as outer_calls, counted(inner) as computed:
        make_video(worker, steps=8)
    assert computed[0] < outer_calls[0], (computed, outer_calls)


@pytest.mark.parametrize("video_model", FAMILIES, indirect=True)
def test_attention_backend_is_set(make_fresh_worker, video_model: Path) -> None:
    """VIDEO_ATTENTION_BACKEND=_native_math: every attention processor of the transformer uses it."""
    worker = make_fresh_worker(VIDEO_MODEL=str(video_model), VIDEO_ATTENTION_BACKEND="_native_math")
    pipeline = loaded(worker, video_model)
    backends = {str(getattr(m.processor, "_attention_backend", None)) for m in pipeline.transformer.modules()
                if hasattr(m, "processor")}
    assert backends == {"AttentionBackendName._NATIVE_MATH"}, backends
    make_video(worker, steps=2)


@pytest.mark.parametrize("video_model", FAMILIES, indirect=True)
def test_group_offload_installs_its_hooks(make_fresh_worker, video_model: Path) -> None:
    """VIDEO_GROUP_OFFLOAD=leaf: group-offload hooks on the transformer's layers (onload device the
    CPU here); the video is made."""
    worker = make_fresh_worker(VIDEO_MODEL=str(video_model), VIDEO_GROUP_OFFLOAD="leaf")
    pipeline = loaded(worker, video_model)
    assert any("group_offloading" in name for m in pipeline.transformer.modules() for name in hook_names(m))
    make_video(worker, steps=2)


# torch's own compiler stack trips its deprecation of torch.jit.script_method while compiling.
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("video_model", ["wan"], indirect=True)
def test_regional_compilation_compiles_the_repeated_block(make_fresh_worker, video_model: Path) -> None:
    """VIDEO_COMPILE=true: each repeated transformer block is compiled (torch.compile's wrapper is in
    place); on the CPU the video is made through the compiled blocks."""
    worker = make_fresh_worker(VIDEO_MODEL=str(video_model), VIDEO_COMPILE="true")
    pipeline = loaded(worker, video_model)
    assert all(getattr(block, "_compiled_call_impl", None) is not None for block in blocks(pipeline))
    make_video(worker, steps=1)


def test_video_without_speedups_is_unchanged_by_an_unused_setting(make_fresh_worker, tiny_wan: Path) -> None:
    """With every speed-up off (the default), no cache or offload hook is on the transformer."""
    worker = make_fresh_worker(VIDEO_MODEL=str(tiny_wan))
    pipeline = loaded(worker, tiny_wan)
    assert not pipeline.transformer.is_cache_enabled
    assert not any(hook_names(m) for m in pipeline.transformer.modules())


@pytest.mark.parametrize(("name", "value"), [
    ("VIDEO_CACHE", "mag"), ("VIDEO_CACHE", "yes"), ("VIDEO_CACHE_THRESHOLD", "0"),
    ("VIDEO_CACHE_THRESHOLD", "fast"), ("VIDEO_COMPILE", "maybe"), ("VIDEO_ATTENTION_BACKEND", "flash_hub"),
    ("VIDEO_ATTENTION_BACKEND", "sage"), ("VIDEO_GROUP_OFFLOAD", "disk"), ("PRECISION", "fp8"),
])
def test_bad_values_are_refused_at_start_up(name: str, value: str) -> None:
    """Each bad value stops the worker at start-up with the variable named (sage: its package is
    not installed here, flash_hub: downloads kernels, not offered)."""
    with pytest.raises(SettingsError, match=name):
        load_settings({name: value})


def test_two_offloads_at_once_are_refused() -> None:
    """Group offload and model CPU offload are two ways of doing one thing: choose one."""
    with pytest.raises(SettingsError, match="VIDEO_GROUP_OFFLOAD"):
        load_settings({"VIDEO_GROUP_OFFLOAD": "block", "ENABLE_CPU_OFFLOAD": "true"})


def test_frames_stay_finite_with_the_cache(make_fresh_worker, tiny_wan: Path) -> None:
    """The cached pipeline's own frames (not only the mp4) are finite and in range."""
    worker = make_fresh_worker(VIDEO_MODEL=str(tiny_wan), VIDEO_CACHE="first_block", VIDEO_CACHE_THRESHOLD="1e6")
    pipeline = loaded(worker, tiny_wan)
    frames = np.asarray(pipeline(prompt="a boat", num_frames=9, height=64, width=64, num_inference_steps=4,
                                 output_type="np", generator=torch.Generator().manual_seed(0)).frames[0])
    assert frames.shape == (9, 64, 64, 3) and np.isfinite(frames).all() and 0 <= frames.min() <= frames.max() <= 1
