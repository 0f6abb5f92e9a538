"""``python -m handler.schema``: print the JSON Schema of every task's input."""

from __future__ import annotations

import json
from typing import Any

from handler.tasks import TASKS


def schemas() -> dict[str, Any]:
    return {name: task.input_model.model_json_schema() for name, task in TASKS.items()}


if __name__ == "__main__":
    print(json.dumps(schemas(), indent=2))
