"""docs/configuration.md's table of variables and its list of what shapes a cached result, written
from the declarations in handler/config.py, so the page cannot drift from them.

``python -m handler.config_docs`` (``make docs``) rewrites both between their markers;
tests/test_readme.py fails while the committed page differs from what this writes.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from handler.config import Settings, Variable, documented, shaping

PAGE = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
TABLE = ("<!-- variables: written by `make docs` from handler/config.py -->", "<!-- end of variables -->")
SHAPES = ("<!-- shaping settings: written by `make docs` from handler/config.py -->",
          "<!-- end of shaping settings -->")
MIB = 2**20


def table() -> str:
    """One row per variable, in declaration order: its name, its default, what it is for."""
    rows = ["| variable | default | meaning |", "| --- | --- | --- |"]
    rows += [f"| `{v.env}` | {default_cell(v)} | {_escaped(v.about)} |" for v in documented()]
    return "\n".join(rows)


def _escaped(text: str) -> str:
    return text.replace("|", "\\|")


def default_cell(variable: Variable) -> str:
    """The default as the table writes it: blank for none, numbers and true/false as they are, sizes
    of bytes in MiB or GiB, anything else as code; or the declaration's words for it."""
    value = variable.default
    if variable.default_words:
        return variable.default_words
    if value is None or value in ((), ""):
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float):
        if variable.env.endswith("_BYTES"):
            for unit, size in (("GiB", 1024 * MIB), ("MiB", MIB)):
                if value >= size and value % size == 0:
                    return f"{int(value // size)} {unit}"
        return f"{value:g}" if isinstance(value, float) else str(value)
    return f"`{','.join(map(str, value)) if isinstance(value, tuple) else value}`"


def shapes() -> str:
    """For each task with settings that shape its results, those settings' variables."""
    env = {declared.name: declared.metadata.get("env") for declared in fields(Settings)}
    tasks = sorted({task for declared in fields(Settings) for task in declared.metadata["shapes"]})
    return "\n".join(f"- `{task}`: " + ", ".join(f"`{env[name]}`" for name in shaping(task)) for task in tasks)


def rewrite(page: str) -> str:
    """``page`` with the table and the shaping list between their markers written anew."""
    for (begin, end), content in ((TABLE, table()), (SHAPES, shapes())):
        head, found_begin, rest = page.partition(begin)
        _, found_end, tail = rest.partition(end)
        if not (found_begin and found_end):
            raise ValueError(f"{PAGE.name} lacks the markers {begin} ... {end}")
        page = f"{head}{begin}\n\n{content}\n\n{end}{tail}"
    return page


def main() -> None:
    before = PAGE.read_text()
    after = rewrite(before)
    PAGE.write_text(after)
    print(f"{PAGE.name}: {'rewritten' if after != before else 'already up to date'}")


if __name__ == "__main__":
    main()
