"""The task table: the only place the handler learns which tasks exist."""

from __future__ import annotations

from typing import Any

from handler.tasks import transcribe
from handler.tasks.base import Task

TASKS: dict[str, Task[Any]] = {task.name: task for task in (transcribe.TASK,)}
