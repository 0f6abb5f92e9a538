"""GPU memory as a managed resource: which loaded pipelines reside on the device, and room made
for the next one before it is placed.

Every loaded pipeline (a pool of MODEL_INSTANCES copies) is a *resident* with a place:

- ``device``: its weights are on the device (counted against the budget);
- ``parked``: moved to host RAM, idle; coming back is a copy, not a load from disk;
- ``dropped``: forgotten (registry and here); its next job loads it again.

The budget is the device's memory less ``MEMORY_RESERVE_MB``, or ``GPU_MEMORY_BUDGET_MB``
(honoured on the CPU too, where it bounds the models' resident bytes, so the policy runs in tests).
A job *holds* a resident while its model code runs: the resident's weights plus the working
memory the job declared are counted, and a held resident is never moved. To place a resident, idle
ones leave the device in least-recently-used order (parked while host RAM allows, else dropped);
when not even that makes room (the rest are held), the job waits, like it waits for a GPU slot:
bounded by the acquire timeout and left at once when the job is cancelled.

Moves run under the residents' lock: placement decisions are serialised, and a job finishing
meanwhile waits for the move to end before it gives its hold back (seconds, at most).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

from handler.cancel import CancelToken
from handler.errors import Cancelled, GenerationTimeout, InputTooLarge
from handler.logs import get_logger
from handler.runtime.instances import InstancePool
from handler.runtime.memory import MIB, host_room

log = get_logger(__name__)

Place = Literal["device", "parked", "dropped"]
# How often a waiting job looks at its cancel token (a release wakes it at once).
_WAIT_STEP_S = 0.05


@dataclass(eq=False)
class Resident:
    """One loaded pool and where its weights are."""

    key: Any  # the registry's PipelineKey
    pool: InstancePool[Any]
    place: Place
    last_use: float = field(default_factory=time.monotonic)
    last_use_wall: float = field(default_factory=time.time)
    # Jobs holding it now, and the bytes they count beyond its weights.
    holders: int = 0
    working: int = 0

    @property
    def weights(self) -> int:
        """Bytes its weights take on the device when placed (0 when offload hooks place it)."""
        return self.pool.weights if self.pool.placement.move is not None else 0

    def as_dict(self) -> dict[str, Any]:
        return {"place": self.place, "bytes": self.pool.weights, "holders": self.holders,
                "last_use": round(self.last_use_wall, 3)}


@dataclass
class Moves:
    """How many times pipelines moved, by task and direction (``to_device``, ``park``, ``drop``)."""

    counts: dict[tuple[str, str], int] = field(default_factory=dict)

    def add(self, task: str, direction: str) -> None:
        self.counts[(task, direction)] = self.counts.get((task, direction), 0) + 1


def _ignore(key: Any, pool: InstancePool[Any]) -> None:
    return None


class Residency:
    """The pipelines of one device under one budget (None: unbounded, places still tracked).

    ``forget`` and ``adopt`` tell the registry of a dropped pool, and of one taken back in (a job
    still had it in hand); both are called with this object's lock held.
    """

    def __init__(
        self, *, device: str, budget: int | None, host_reserve: int = 0,
        forget: Callable[[Any, InstancePool[Any]], None] = _ignore,
        adopt: Callable[[Any, InstancePool[Any]], None] = _ignore,
        host_room: Callable[[], int] = host_room,
    ) -> None:
        self.device = device
        self.budget = budget
        self._host_reserve = host_reserve
        self._host_room = host_room
        self._forget = forget
        self._adopt = adopt
        # Guards _residents, _dropped, moves and every resident's fields; held during moves.
        self._residents_lock = threading.Condition()
        self._residents: dict[int, Resident] = {}
        # Keys of dropped pools and when they were last used, for `system` and the metrics.
        self._dropped: dict[Any, float] = {}
        self.moves = Moves()

    def check_fits(self, need: int, *, field: str, what: str) -> None:
        """Refuse, before any work, a request whose weights and working memory (``need`` bytes)
        could never fit the budget, even with every other pipeline moved out."""
        if self.budget is not None and need > self.budget:
            raise InputTooLarge(
                f"{field}: {what} needs about {need / MIB:,.0f} MiB of GPU memory with its model's weights, "
                f"more than this worker's budget of {self.budget / MIB:,.0f} MiB", field=field)

    def place(self, pool: InstancePool[Any], *, timeout: float) -> None:
        """Put ``pool`` on the device now (a preload), as an idle resident like any other."""
        with self.hold(pool, timeout=timeout):
            pass

    @contextmanager
    def hold(
        self, pool: InstancePool[Any], *, working: int = 0, timeout: float, cancel: CancelToken | None = None,
    ) -> Iterator[Resident]:
        """Place ``pool`` on the device with ``working`` bytes to spare (plus what its offloaded
        components bring in while they run) and keep it there, unmoved, until the block ends.
        Waits for room at most ``timeout`` seconds; ``Cancelled`` when ``cancel`` is set meanwhile."""
        counted = working + pool.placement.transient
        resident = self._take(pool, counted, timeout, cancel)
        try:
            yield resident
        finally:
            with self._residents_lock:
                resident.holders -= 1
                resident.working -= counted
                resident.last_use, resident.last_use_wall = time.monotonic(), time.time()
                self._residents_lock.notify_all()

    def _take(self, pool: InstancePool[Any], working: int, timeout: float, cancel: CancelToken | None) -> Resident:
        started = time.monotonic()
        with self._residents_lock:
            resident = self._resident_of(pool)
            self.check_fits(resident.weights + working, field="input", what="this request")
            while (victims := self._room_for(resident, working)) is None:
                if cancel is not None and cancel.cancelled:
                    raise Cancelled("the job was cancelled while waiting for GPU memory")
                left = started + timeout - time.monotonic()
                if left <= 0:
                    raise GenerationTimeout(
                        f"no room on the GPU for {resident.key.task} model {resident.key.model!r} within "
                        f"{timeout:g}s (the pipelines there are in use)")
                self._residents_lock.wait(min(left, _WAIT_STEP_S))
            for victim in victims:
                self._evict(victim, reason=f"room for {resident.key.task} {resident.key.model}")
            if resident.place != "device":
                self._move(resident, "device", reason="a job needs it")
            resident.holders += 1
            resident.working += working
            resident.last_use, resident.last_use_wall = time.monotonic(), time.time()
            return resident

    def _resident_of(self, pool: InstancePool[Any]) -> Resident:
        """The pool's record; a pool seen for the first time (just loaded, or dropped while a job
        still had it in hand) comes in from host RAM, where loaders build and drops leave pools."""
        resident = self._residents.get(id(pool))
        if resident is None:
            place: Place = "parked" if pool.placement.move is not None else "device"
            resident = self._residents[id(pool)] = Resident(pool.key, pool, place)
            if self._dropped.pop(pool.key, None) is not None:
                self._adopt(pool.key, pool)
        return resident

    # Room.

    def used(self) -> int:
        """Bytes counted on the device now: placed weights and held working memory."""
        return sum((r.weights if r.place == "device" else 0) + r.working for r in self._residents.values())

    def _room_for(self, resident: Resident, working: int) -> list[Resident] | None:
        """The idle residents to move out (least recently used first) so that ``resident`` (placed,
        if it is not yet) and ``working`` more bytes fit; None when even all of them would not do."""
        if self.budget is None:
            return []
        need = working + (0 if resident.place == "device" else resident.weights)
        over = self.used() + need - self.budget
        victims: list[Resident] = []
        idle = sorted((r for r in self._residents.values()
                       if r is not resident and r.place == "device" and r.holders == 0 and r.weights > 0),
                      key=lambda r: r.last_use)
        for candidate in idle:
            if over <= 0:
                break
            victims.append(candidate)
            over -= candidate.weights
        return victims if over <= 0 else None

    def _evict(self, resident: Resident, *, reason: str) -> None:
        """Move an idle resident off the device: parked when host RAM has room for it, else dropped."""
        self._move(resident, "host", reason=reason)
        # On the CPU parking frees nothing, yet the rule is the same: the weights stay in RAM only
        # while RAM has room for them beside the reserve.
        if self._host_room() - self._host_reserve >= resident.weights:
            return
        del self._residents[id(resident.pool)]
        resident.place = "dropped"
        self._dropped[resident.key] = resident.last_use_wall
        self.moves.add(resident.key.task, "drop")
        log.info("residency.drop", task=resident.key.task, model=resident.key.model, bytes=resident.weights,
                 reason="host RAM is short")
        self._forget(resident.key, resident.pool)

    def _move(self, resident: Resident, where: Literal["device", "host"], *, reason: str) -> None:
        started = time.perf_counter()
        target = self.device if where == "device" else "cpu"
        move = resident.pool.placement.move
        if move is not None:
            for instance in resident.pool.instances:
                move(instance, target)
        resident.place = "device" if where == "device" else "parked"
        direction = "to_device" if where == "device" else "park"
        self.moves.add(resident.key.task, direction)
        log.info(f"residency.{direction}", task=resident.key.task, model=resident.key.model,
                 bytes=resident.weights, ms=round((time.perf_counter() - started) * 1000, 1), reason=reason)

    def evict_idle(self, *, reason: str) -> None:
        """Move every idle pipeline off the device (parked, or dropped when host RAM is short)."""
        with self._residents_lock:
            for resident in [r for r in self._residents.values() if r.place == "device" and r.holders == 0]:
                if resident.pool.placement.move is not None:
                    self._evict(resident, reason=reason)

    # What `system` and /metrics show.

    def snapshot(self) -> list[tuple[Any, dict[str, Any]]]:
        """Every pipeline this worker has loaded, with its place, bytes and last use."""
        with self._residents_lock:
            found = [(r.key, r.as_dict()) for r in self._residents.values()]
            found += [(key, {"place": "dropped", "bytes": 0, "holders": 0, "last_use": round(at, 3)})
                      for key, at in self._dropped.items()]
            return found

    def move_counts(self) -> dict[tuple[str, str], int]:
        """A copy of the moves so far, (task, direction) -> count."""
        with self._residents_lock:
            return dict(self.moves.counts)

    def places(self) -> dict[tuple[str, str], Place]:
        """(task, model) -> place, for tests and logs."""
        return {(key.task, key.model): info["place"] for key, info in self.snapshot()}

    def summary(self) -> dict[str, Any]:
        with self._residents_lock:
            used = self.used()
        return {"budget_mb": None if self.budget is None else round(self.budget / MIB, 1),
                "used_mb": round(used / MIB, 1), "device": self.device}

