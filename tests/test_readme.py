"""The README documents every input field and every setting, so it cannot drift from the code."""

from __future__ import annotations

import re
from pathlib import Path

from handler.schema import schemas

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_every_input_field_is_documented() -> None:
    """Each property of each task's JSON Schema appears in the README's field tables."""
    for task, schema in schemas().items():
        for field in schema["properties"]:
            if field != "task":
                assert f"`{field}`" in README, f"{task}.{field} is not in the README"


def test_every_setting_is_documented() -> None:
    """Each environment variable config.py reads has a row in the README."""
    source = (ROOT / "handler" / "config.py").read_text()
    names = set(re.findall(r'env\.(?:get|text)\(\s*"([A-Z0-9_]+)"', source))
    names |= set(re.findall(r'"(BUCKET_[A-Z_]+)"', source))
    assert len(names) > 25
    missing = sorted(name for name in names if f"`{name}`" not in README)
    assert missing == []


def test_the_two_commands_are_first() -> None:
    """The README's first commands are the ones that run the job and the suite; CI runs the second."""
    first_block = README.split("```bash", 1)[1].split("```", 1)[0]
    assert "make run" in first_block and "make test" in first_block
    assert "make test" in (ROOT / ".ci" / "run").read_text()
