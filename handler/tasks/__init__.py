"""The task table: the only place the handler learns which tasks exist."""

from __future__ import annotations

import importlib
from typing import Any

from handler.task_interface import Task
from handler.tasks import speech, system, text2image, text2video, transcribe, upload

TASKS: dict[str, Task[Any]] = {
    task.name: task
    for task in (transcribe.TASK, speech.TASK, text2image.TASK, text2video.TASK, upload.TASK, system.TASK)
}


def load_task_modules(names: tuple[str, ...]) -> dict[str, Task[Any]]:
    """Tasks from operator-named modules (TASK_MODULES), each exposing ``TASK``."""
    tasks: dict[str, Task[Any]] = {}
    for name in names:
        task = getattr(importlib.import_module(name), "TASK", None)
        if not isinstance(task, Task):
            raise ImportError(f"task module {name!r} has no TASK")
        tasks[task.name] = task
    return tasks
