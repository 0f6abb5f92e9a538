"""Turning a request (duration, fps, aspect ratio, resolution) into what a video model accepts.

Pure arithmetic, no models: sizes rounded to the model family's multiple, frame counts to
its ``k*n + 1`` rule, and long videos cut into segments that overlap by a short crossfade
(:class:`Joiner` joins the generated segments so).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np

AspectRatio = Literal["16:9", "9:16", "1:1", "4:3", "3:4"]
Resolution = Literal["144p", "240p", "360p", "480p", "720p", "1080p"]


@dataclass(frozen=True)
class Family:
    """What a video model family needs."""

    name: str
    side_multiple: int  # width and height divide by this
    frame_step: int  # frame counts are frame_step * n + 1
    max_clip_frames: int  # longest clip one generation makes well


FAMILIES = {
    "wan": Family("wan", side_multiple=16, frame_step=4, max_clip_frames=81),
    "ltx": Family("ltx", side_multiple=32, frame_step=8, max_clip_frames=121),
}
PIPELINE_FAMILIES = {"WanPipeline": "wan", "LTXPipeline": "ltx"}


def family_of(pipeline_class: str) -> Family | None:
    name = PIPELINE_FAMILIES.get(pipeline_class)
    return FAMILIES[name] if name else None


def frame_size(aspect: AspectRatio, resolution: Resolution, family: Family) -> tuple[int, int]:
    """(width, height): the short side is the resolution, both sides rounded to the family's multiple."""
    across, down = (int(part) for part in aspect.split(":"))
    short = int(resolution.removesuffix("p"))
    long = short * max(across, down) / min(across, down)
    m = family.side_multiple

    def fit(value: float) -> int:
        return max(m, round(value / m) * m)

    width, height = (long, short) if across >= down else (short, long)
    return fit(width), fit(height)


def aligned_frames(count: int, family: Family) -> int:
    """The smallest ``frame_step * n + 1`` at or above ``count`` (and at least one step)."""
    steps = max(1, math.ceil((count - 1) / family.frame_step))
    return family.frame_step * steps + 1


@dataclass(frozen=True)
class SegmentPlan:
    """How many frames each generated segment has, and how the joins overlap."""

    frames: int  # frames in the finished video (before any held tail)
    segments: tuple[int, ...]  # generated frames per segment
    overlap: int  # frames shared (crossfaded) by neighbouring segments
    hold: int  # frames of the last picture held at the end


def plan_segments(total: int, family: Family, *, fps: int, clip_frames: int | None = None,
                  overlap_s: float = 0.5, min_tail_s: float = 1.0) -> SegmentPlan:
    """Segments covering ``total`` frames; a tail shorter than ``min_tail_s`` holds the last frame."""
    clip = aligned_frames(min(clip_frames or family.max_clip_frames, family.max_clip_frames), family)
    if clip > family.max_clip_frames:
        clip -= family.frame_step
    if total <= clip:
        return SegmentPlan(total, (aligned_frames(total, family),), 0, 0)
    overlap = min(max(1, round(overlap_s * fps)), clip // 4)
    stride = clip - overlap
    full = 1 + (total - clip) // stride
    covered = clip + (full - 1) * stride
    tail = total - covered
    if tail <= 0:
        return SegmentPlan(total, (clip,) * full, overlap, 0)
    if tail < min_tail_s * fps:
        return SegmentPlan(covered, (clip,) * full, overlap, tail)
    last = aligned_frames(tail + overlap, family)
    return SegmentPlan(total, (*((clip,) * full), last), overlap, 0)


class FrameSink(Protocol):
    """Where joined frames go (handler.io.media_out.FrameWriter): the count so far, and more."""

    @property
    def frames(self) -> int: ...

    def write(self, frames: np.ndarray) -> None: ...


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """A pipeline's float frames in [0, 1] as the encoder's bytes."""
    scaled: np.ndarray = np.clip(frames, 0.0, 1.0) * 255.0 + 0.5
    return scaled.astype(np.uint8)


class Joiner:
    """Writes segments to the encoder, crossfading ``overlap`` frames where two meet."""

    def __init__(self, writer: FrameSink, plan: SegmentPlan) -> None:
        self._writer = writer
        self._plan = plan
        self._pending: np.ndarray | None = None  # the previous segment's tail
        self.poster: np.ndarray | None = None

    def add(self, frames: np.ndarray, *, last: bool) -> None:
        overlap = self._plan.overlap
        if self._pending is not None:
            weights = np.linspace(0.0, 1.0, overlap + 2, dtype=np.float32)[1:-1, None, None, None]
            blended = self._pending.astype(np.float32) * (1 - weights) + frames[:overlap].astype(np.float32) * weights
            self._emit(blended.round().astype(np.uint8))
            frames = frames[overlap:]
        if not last and overlap:
            frames, self._pending = frames[:-overlap], frames[-overlap:]
        self._emit(frames)

    def _emit(self, frames: np.ndarray) -> None:
        room = self._plan.frames - self._writer.frames
        frames = frames[:room]
        if len(frames):
            if self.poster is None:
                self.poster = frames[len(frames) // 2]
            self._writer.write(frames)
