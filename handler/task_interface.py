"""What the worker needs from every task: its row of the task table, its input model's base,
and what shapes its result (so what its result cache key is made of)."""

from __future__ import annotations

import secrets
import types
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, model_validator

from handler.config import Settings
from handler.errors import InvalidInput

if TYPE_CHECKING:
    from handler.job import JobContext
    from handler.runtime.container import Runtime

InputT = TypeVar("InputT", bound=BaseModel)


class TaskInput(BaseModel):
    """Base of every task's input: unknown fields are errors, types are strict, numbers finite,
    and ``null`` for a field that has no meaning for null is "not given" (its default applies),
    as clients of other workers send ``"seed": null`` or ``"image_url": null``."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    cache: bool = Field(True, description="answer from (and store into) the result cache, when the worker has one")

    # Fields other workers take that this one cannot honour, and why: refused by name, not as unknown.
    unsupported: ClassVar[dict[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _null_means_not_given(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        for name, reason in cls.unsupported.items():
            if data.get(name) is not None:
                raise InvalidInput(f"{name}: not supported by this worker ({reason})", field=name)
        return {key: value for key, value in data.items()
                if value is not None or (key not in cls.unsupported and _takes_null(cls, key))}


def _takes_null(model: type[BaseModel], name: str) -> bool:
    field = model.model_fields.get(name)
    if field is None:
        return True  # not a field (an alias, or unknown): leave it to validation
    annotation = field.annotation
    return get_origin(annotation) in (Union, types.UnionType) and type(None) in get_args(annotation)


def new_seed() -> int:
    """A random seed for a job that gave none (the result reports it, so it can be replayed)."""
    return secrets.randbelow(2**32 - 1)


@dataclass(frozen=True)
class CachePolicy(Generic[InputT]):
    """What shapes a task's result, so what its cache key is made of, and what an entry may give back."""

    # The output fields a cached answer is rebuilt from; nothing else is ever taken from an entry.
    outputs: frozenset[str]
    # The effective value of every input field and setting that shapes the result (defaults
    # resolved: `batch_size: null` is the worker's WHISPER_BATCH_SIZE), model names included: the
    # settings are those whose declaration names the task in `shapes` (handler.config).
    shaping: Callable[[Settings, Any], dict[str, Any]]
    # Which of those fields name a model, and how to know its weights: the key holds the
    # weights' identity, not the name. An unknown identity makes the job uncacheable.
    models: Mapping[str, Callable[[str, Settings], str | None]]


def input_fields(params: BaseModel, *, exclude: Sequence[str] = ()) -> dict[str, Any]:
    """A job's validated input fields (defaults filled in), but those of ``exclude`` and the
    ones that never shape a result (`task`, `cache`)."""
    return params.model_dump(mode="json", exclude={"task", "cache", *exclude})


@dataclass(frozen=True)
class Task(Generic[InputT]):
    """A row of the task table: a name, its input model, and how to run and preload it."""

    name: str
    input_model: type[InputT]
    run: Callable[[JobContext, InputT], Awaitable[dict[str, Any]]]
    preload: Callable[[Runtime], None] | None = None
    # Input fields whose presence, without `task`, selects this task.
    implied_by: tuple[str, ...] = ()
    # How its results are cached; None: never.
    cache: CachePolicy[InputT] | None = None
