"""Checks several tasks make the same way, each with the same message: the model a worker serves,
MAX_STEPS, MAX_IMAGE_PIXELS."""

from __future__ import annotations

from handler.errors import InputTooLarge, InvalidInput


def served_model(requested: str | None, served: str) -> str:
    """The model a job runs: the one this worker serves for its task, which a job may name."""
    if requested not in (None, served):
        raise InvalidInput(f"model: {requested!r} is not served here; use {served!r}", field="model")
    return served


def check_steps(steps: int, limit: int) -> None:
    """MAX_STEPS, for every generation task."""
    if steps > limit:
        raise InputTooLarge(f"num_inference_steps: {steps} is over the limit of {limit}", field="num_inference_steps")


def check_pixels(width: int, height: int, limit: int, *, field: str, label: str, unit: str = "pixels") -> None:
    """MAX_IMAGE_PIXELS, for an image or a video frame; ``label`` names what the client gave."""
    if width * height > limit:
        raise InputTooLarge(f"{label}: {width}x{height} is over the limit of {limit} {unit}", field=field)
