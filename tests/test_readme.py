"""The README and docs/ held to the code: every input field and setting documented, the pinned versions
named as pinned, every relative link alive, and the README short enough to be a landing page."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from handler import config_docs
from handler.config import Settings, defaults, documented, shaping, variables
from handler.schema import schemas

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
JOBS = (ROOT / "docs" / "jobs.md").read_text()
CONFIGURATION = (ROOT / "docs" / "configuration.md").read_text()


def test_every_input_field_is_documented() -> None:
    """Each property of each task's JSON Schema appears in docs/jobs.md's field tables."""
    for task, schema in schemas().items():
        for field in schema["properties"]:
            if field != "task":
                assert f"`{field}`" in JOBS, f"{task}.{field} is not in docs/jobs.md"


def test_the_configuration_page_is_written_from_the_declarations() -> None:
    """docs/configuration.md's table of variables and its list of what shapes a cached result are what
    `make docs` writes from handler/config.py: a meaning, default or shaping setting edited in the page
    alone, or a declaration changed without `make docs`, fails here."""
    assert config_docs.rewrite(CONFIGURATION) == CONFIGURATION, "docs/configuration.md is stale: run `make docs`"


def test_every_variable_says_what_it_is_for() -> None:
    """Each declared variable carries its purpose, one line of Markdown (the table's meaning cell)."""
    vague = [v.env for v in documented() if not v.about.strip() or "\n" in v.about]
    assert vague == []


# Rows of the configuration table for variables other code reads (the SDK's own log level).
NOT_SETTINGS = {"RUNPOD_LOG_LEVEL"}


def configuration_rows() -> set[str]:
    """The variables named in the first cell of each row of docs/configuration.md's table."""
    cells = (line.split("|")[1] for line in CONFIGURATION.splitlines() if line.startswith("| `"))
    return {name for cell in cells for name in re.findall(r"`([A-Z0-9_]+)`", cell)}


def test_the_configuration_table_is_the_settings_declaration() -> None:
    """docs/configuration.md has a row for each variable config.py declares, and no
    other (but for NOT_SETTINGS): checked against the declaration itself, not its source text."""
    declared = set(variables())
    assert len(declared) > 25
    assert sorted(declared - configuration_rows()) == []
    assert sorted(configuration_rows() - declared - NOT_SETTINGS) == []


def test_what_shapes_a_cached_result_is_the_settings_declaration() -> None:
    """docs/configuration.md's "What shapes a cached result" names, for each task, the variables whose
    declaration names that task in ``shapes``, and no other."""
    section = CONFIGURATION.split("## What shapes a cached result", 1)[1].split("\n## ", 1)[0]
    listed = {task: set(re.findall(r"`([A-Z0-9_]+)`", names))
              for task, names in re.findall(r"^- `(\w+)`: (.*(?:\n  .*)*)", section, flags=re.MULTILINE)}
    env = {setting.name: setting.metadata.get("env") for setting in dataclasses.fields(Settings)}
    declared = {task: {env[name] for name in shaping(task)} for task in listed}
    assert listed.keys() >= {"transcribe", "speech", "text2image", "text2video"}
    assert listed == declared


# Variables whose default the configuration table says in words, not as the value the declaration holds.
IN_WORDS = {"WORK_DIR": "system temp", "ALLOW_MODEL_DOWNLOAD": "`true` (image: `false`)"}


def configuration_defaults() -> dict[str, str]:
    """The default cell of docs/configuration.md's table, by variable (a row of two variables
    with two defaults, ``5, 60``, gives each its own)."""
    found: dict[str, str] = {}
    for line in CONFIGURATION.splitlines():
        if line.startswith("| `"):
            names_cell, default_cell = line.split("|")[1:3]
            names = re.findall(r"`([A-Z0-9_]+)`", names_cell)
            cells = [c.strip() for c in default_cell.split(",")] if len(names) > 1 else [default_cell.strip()]
            found.update(zip(names, cells if len(cells) == len(names) else cells[:1] * len(names), strict=True))
    return found


def shown(variable: str, value: object) -> str:
    """A default as the configuration table writes it: blank for none, true/false, sizes of bytes in MiB or GiB."""
    if value is None or value in ((), ""):
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    if isinstance(value, int | float) and variable.endswith("_BYTES"):
        for unit, size in (("GiB", 2**30), ("MiB", 2**20)):
            if value >= size and value % size == 0:
                return f"{int(value // size)} {unit}"
    return f"{value:g}" if isinstance(value, float) else str(value)


def test_the_configuration_table_shows_each_declared_default() -> None:
    """Each row's default is the declared one: the value itself (backticks aside), or, where none is
    declared or the platform sets the variable, words that say what happens (``(set by RunPod)``,
    ``the family's``), or IN_WORDS."""
    table = configuration_defaults()
    wrong = {}
    for variable, value in defaults().items():
        cell = table[variable]
        if variable in IN_WORDS:
            assert cell == IN_WORDS[variable], variable
            continue
        expected = shown(variable, value)
        if cell.startswith("(") or (expected == "" and cell):
            continue  # set by the platform, or nothing declared: the table says in words what is used
        if cell.replace("`", "") != expected:
            wrong[variable] = (cell, expected)
    assert wrong == {}, "documented default != declared default: " + repr(wrong)


def test_the_two_commands_are_first() -> None:
    """The README's first commands are the ones that run the job and the suite; CI runs the second."""
    first_block = README.split("```bash", 1)[1].split("```", 1)[0]
    assert "make run" in first_block and "make test" in first_block
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def requirement_pins() -> dict[str, str]:
    """``name==version`` lines of requirements.txt, by lower-case name."""
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        name, sep, version = line.partition("==")
        if sep and not line.startswith("#"):
            pins[name.strip().lower()] = version.strip()
    return pins


def test_the_upstream_internals_name_the_pinned_versions() -> None:
    """Each ``library==version`` docs/architecture.md names beside an upstream internal is the pin in
    requirements.txt: the list says which release each internal was checked against."""
    architecture = (ROOT / "docs" / "architecture.md").read_text()
    named = re.findall(r"\b([a-z][a-z0-9-]*)==([0-9][0-9a-z.]*[0-9a-z])", architecture)
    assert len(named) >= 5
    pins = requirement_pins()
    assert [(name, version, pins.get(name)) for name, version in named if pins.get(name) != version] == []


# The README is the landing page; the references live in docs/.
README_MAX_BYTES = 12 * 1024
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "README.md"]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_the_readme_is_a_landing_page() -> None:
    """README.md stays short enough to read on a screen or two; whatever grows goes to docs/."""
    size = len((ROOT / "README.md").read_bytes())
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes; move reference text to docs/"


def prose(path: Path) -> list[str]:
    """The lines of a markdown file outside its fenced code blocks."""
    lines, fenced = [], False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def anchors(path: Path) -> set[str]:
    """The anchors GitHub gives the headings of a markdown file (``## `x` (y)`` -> ``x-y``)."""
    found: set[str] = set()
    for line in prose(path):
        if line.startswith("#"):
            slug = re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
            found.add(slug if slug not in found else next(f"{slug}-{n}" for n in range(1, 100)
                                                              if f"{slug}-{n}" not in found))
    return found


def broken_links(path: Path) -> list[str]:
    """The relative links of ``path`` whose file, or whose heading in a markdown file, does not exist."""
    broken = []
    for line in prose(path):
        for target in LINK.findall(line):
            if re.match(r"[a-z]+:", target):
                continue  # https:, mailto:: not this repository's
            file, _, anchor = target.partition("#")
            resolved = (path.parent / file).resolve() if file else path
            if not resolved.exists() or (anchor and resolved.suffix == ".md" and anchor not in anchors(resolved)):
                broken.append(target)
    return broken


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_points_at_a_file_and_heading(path: Path) -> None:
    """Each relative link in the README, docs/ and bench/README.md reaches an existing file, and its
    ``#anchor`` a heading of that file, so moving text between them cannot leave a dead link."""
    assert broken_links(path) == []


def test_the_link_check_sees_a_missing_file_and_a_missing_heading(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n## `x` (y)\n\n[a](page.md#x-y) [b](gone.md) [c](#nowhere) [d](https://e.org)\n"
                    "```\n[e](gone-too.md)\n```\n")
    assert broken_links(page) == ["gone.md", "#nowhere"]
