"""N copies of one pipeline; each job borrows one and gives it back."""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Generic, TypeVar

from handler.errors import GenerationTimeout

T = TypeVar("T")


class InstancePool(Generic[T]):
    """Exclusive borrowing of pipeline instances.

    Some pipelines keep per-call state on the model (openai-whisper installs key/value-cache
    hooks while decoding), so one instance must never serve two jobs at once.
    """

    def __init__(self, instances: list[T]) -> None:
        if not instances:
            raise ValueError("a pool needs at least one instance")
        self.size = len(instances)
        # For reading what all copies share (is the model multilingual?), never for running.
        self.first = instances[0]
        self._free: queue.SimpleQueue[T] = queue.SimpleQueue()
        for instance in instances:
            self._free.put(instance)

    @classmethod
    def build(cls, count: int, factory: Callable[[], T]) -> InstancePool[T]:
        return cls([factory() for _ in range(count)])

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
