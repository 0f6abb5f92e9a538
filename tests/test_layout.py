"""The layers the folders promise: model code under ``handler/pipelines`` knows nothing of tasks or jobs."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

HANDLER = Path(__file__).resolve().parents[1] / "handler"
# What a pipeline may not reach: the tasks (and the JobContext they are handed), or the worker around them.
FORBIDDEN = ("handler.tasks", "handler.app")


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, at its top or inside a function."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


@pytest.mark.parametrize("path", sorted((HANDLER / "pipelines").rglob("*.py")), ids=lambda p: p.name)
def test_pipelines_import_no_task_and_no_job(path: Path) -> None:
    bad = sorted(m for m in imported_modules(path) if m.startswith(FORBIDDEN) or m.endswith(".JobContext"))
    assert not bad, f"{path.relative_to(HANDLER)} imports {bad}"


def test_the_check_sees_an_import_inside_a_function(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from handler.tasks.base import JobContext\n")
    assert "handler.tasks.base.JobContext" in imported_modules(source)
