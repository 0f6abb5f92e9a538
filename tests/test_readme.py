"""The README documents every input field and every setting, so it cannot drift from the code."""

from __future__ import annotations

import re
from pathlib import Path

from handler.config import variables
from handler.schema import schemas

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_every_input_field_is_documented() -> None:
    """Each property of each task's JSON Schema appears in the README's field tables."""
    for task, schema in schemas().items():
        for field in schema["properties"]:
            if field != "task":
                assert f"`{field}`" in README, f"{task}.{field} is not in the README"


# Rows of the configuration table for variables other code reads (the SDK's own log level).
NOT_SETTINGS = {"RUNPOD_LOG_LEVEL"}


def configuration_rows() -> set[str]:
    """The variables named in the first cell of each row of the README's configuration table."""
    section = README.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    cells = (line.split("|")[1] for line in section.splitlines() if line.startswith("| `"))
    return {name for cell in cells for name in re.findall(r"`([A-Z0-9_]+)`", cell)}


def test_the_configuration_table_is_the_settings_declaration() -> None:
    """The README's configuration table has a row for each variable config.py declares, and no
    other (but for NOT_SETTINGS): checked against the declaration itself, not its source text."""
    declared = set(variables())
    assert len(declared) > 25
    assert sorted(declared - configuration_rows()) == []
    assert sorted(configuration_rows() - declared - NOT_SETTINGS) == []


def test_the_two_commands_are_first() -> None:
    """The README's first commands are the ones that run the job and the suite; CI runs the second."""
    first_block = README.split("```bash", 1)[1].split("```", 1)[0]
    assert "make run" in first_block and "make test" in first_block
    assert "make test" in (ROOT / ".ci" / "run").read_text()
