"""What every task gets from the worker, and what the worker needs from every task."""

from __future__ import annotations

import secrets
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from pydantic import BaseModel

from handler.config import Settings
from handler.io.inputs import MediaInputs
from handler.io.storage import Storage
from handler.io.workspace import Workspace
from handler.runtime.cancel import CancelToken
from handler.runtime.gate import Gate
from handler.runtime.registry import Registry
from handler.runtime.stats import WorkerStats

InputT = TypeVar("InputT", bound=BaseModel)


def new_seed() -> int:
    """A random seed for a job that gave none (the result reports it, so it can be replayed)."""
    return secrets.randbelow(2**32 - 1)


@dataclass
class Timings:
    """Milliseconds spent per stage of one job."""

    stages: dict[str, float] = field(default_factory=dict)

    def add(self, stage: str, ms: float) -> None:
        self.stages[stage] = self.stages.get(stage, 0.0) + ms

    @contextmanager
    def measure(self, stage: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, (time.perf_counter() - started) * 1000)

    def as_dict(self) -> dict[str, float]:
        return {f"{stage}_ms": round(ms, 2) for stage, ms in self.stages.items()}


@dataclass(frozen=True)
class Runtime:
    """The long-lived parts of the worker that tasks use."""

    settings: Settings
    registry: Registry
    gate: Gate
    device: str
    stats: WorkerStats = field(default_factory=WorkerStats)
    # How the GPU slots were sized (fixed, or auto with its figures), for `system`.
    sizing: dict[str, Any] = field(default_factory=dict)


@dataclass
class JobContext:
    """One job: its id, directory, inputs, storage and timings."""

    runtime: Runtime
    request_id: str
    job: dict[str, Any]
    workspace: Workspace
    inputs: MediaInputs
    storage: Storage
    timings: Timings = field(default_factory=Timings)
    # Cancelled when RunPod cancels the job; model code checks it between steps.
    cancel: CancelToken = field(default_factory=CancelToken)

    @property
    def settings(self) -> Settings:
        return self.runtime.settings

    @property
    def workdir(self) -> Path:
        """The job's private directory (created on first use, removed after the job)."""
        return self.workspace.path


@dataclass(frozen=True)
class Task(Generic[InputT]):
    """A row of the task table: a name, its input model, and how to run and preload it."""

    name: str
    input_model: type[InputT]
    run: Callable[[JobContext, InputT], Awaitable[dict[str, Any]]]
    preload: Callable[[Runtime], None] | None = None
    # Input fields whose presence, without `task`, selects this task.
    implied_by: tuple[str, ...] = ()
