"""What runs between denoising steps: cancellation, and progress for the client."""

from __future__ import annotations

from typing import Any

from handler.cancel import CancelToken
from handler.runtime.progress import Progress


def step_callback(cancel: CancelToken, progress: Progress, total: int, label: str = "") -> Any:
    """A diffusers ``callback_on_step_end``: stop when cancelled, report progress."""

    def on_step_end(_pipeline: Any, step: int, _timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        cancel.check()
        progress.report(f"{label}step {step + 1}/{total}", force=step + 1 == total)
        return kwargs

    return on_step_end
