"""Checks several tasks make the same way, each with the same message: the model a worker serves,
MAX_STEPS, MAX_IMAGE_PIXELS."""

from __future__ import annotations

from collections.abc import Sequence

from handler.errors import InputTooLarge, InvalidInput, printable


def served_model(requested: str | None, served: str, *, others: Sequence[str] = (),
                 aliases: Sequence[tuple[str, str]] = ()) -> str:
    """The model a job runs: ``served`` (this worker's default for the task) unless the job names
    another it also serves (``others``), or an alias (name, served model) of one."""
    if requested is None:
        return served
    if requested == served or requested in others:
        return requested
    mapped = dict(aliases).get(requested)
    if mapped is not None:
        return mapped
    accepted = [served, *others, *(alias for alias, _ in aliases)]
    offered = f"one of {', '.join(accepted)}" if len(accepted) > 1 else f"use {served!r}"
    raise InvalidInput(f"model: {printable(requested)!r} is not served here; {offered}", field="model")


def check_steps(steps: int, limit: int) -> None:
    """MAX_STEPS, for every generation task."""
    if steps > limit:
        raise InputTooLarge(f"num_inference_steps: {steps} is over the limit of {limit}", field="num_inference_steps")


def check_pixels(width: int, height: int, limit: int, *, field: str, label: str, unit: str = "pixels") -> None:
    """MAX_IMAGE_PIXELS, for an image or a video frame; ``label`` names what the client gave."""
    if width * height > limit:
        raise InputTooLarge(f"{label}: {width}x{height} is over the limit of {limit} {unit}", field=field)
