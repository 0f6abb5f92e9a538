"""N copies of one pipeline; each job borrows one and gives it back."""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from handler.errors import GenerationTimeout

T = TypeVar("T")


def move_whole(instance: Any, device: str) -> None:
    """Move a pipeline by its own ``to`` (diffusers pipelines and the worker's pipeline classes have one)."""
    instance.to(device)


@dataclass(frozen=True)
class Placement:
    """What one copy of a pipeline takes on the device (measured on the loaded copy), and how it moves.

    ``weights`` go onto the device with it and are counted while it stays there; ``transient`` is
    what a call brings onto the device only while it runs, through offload hooks (a video model's
    text encoder, every component under ENABLE_CPU_OFFLOAD). ``move`` puts one copy's weights on a
    device; None when the hooks place the whole pipeline themselves, or when the pool did not say
    what it weighs (then there is nothing to park).
    """

    weights: int = 0
    transient: int = 0
    move: Callable[[Any, str], None] | None = None


class InstancePool(Generic[T]):
    """Exclusive borrowing of pipeline instances.

    Some pipelines keep per-call state on the model (openai-whisper installs key/value-cache
    hooks while decoding), so one instance must never serve two jobs at once.
    """

    def __init__(self, instances: list[T], placement: Placement | None = None) -> None:
        if not instances:
            raise ValueError("a pool needs at least one instance")
        self.size = len(instances)
        # Every copy, for moving them between the device and host RAM together (handler.runtime.residency).
        self.instances = tuple(instances)
        # For reading what all copies share (is the model multilingual?), never for running.
        self.first = instances[0]
        self.placement = placement or Placement()
        # The registry's key for it, set when published (the residency names moves by it).
        self.key: Any = None
        self._free: queue.SimpleQueue[T] = queue.SimpleQueue()
        for instance in instances:
            self._free.put(instance)

    @property
    def weights(self) -> int:
        """Bytes of all copies' weights while placed on the device."""
        return self.placement.weights * self.size

    @property
    def running_bytes(self) -> int:
        """Bytes on the device while one copy runs: all copies' placed weights and what hooks bring in."""
        placed = self.weights if self.placement.move is not None else 0
        return placed + self.placement.transient

    @classmethod
    def build(
        cls, count: int, factory: Callable[[], T], placement: Callable[[T], Placement] | None = None
    ) -> InstancePool[T]:
        """``count`` copies made by ``factory``; ``placement`` measures the first."""
        instances = [factory() for _ in range(count)]
        return cls(instances, placement(instances[0]) if placement is not None else None)

    @contextmanager
    def borrow(self, timeout: float) -> Iterator[T]:
        try:
            instance = self._free.get(timeout=timeout)
        except queue.Empty:
            raise GenerationTimeout(f"no free model instance within {timeout:g}s") from None
        try:
            yield instance
        finally:
            self._free.put(instance)
