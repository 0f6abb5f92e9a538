"""The layers the folders promise: each layer of ``handler/`` imports only the layers below it (model
code knows nothing of tasks or jobs, ``io`` nothing of the runtime, ``config`` nothing of the worker's),
and a task never imports another task."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

HANDLER = Path(__file__).resolve().parents[1] / "handler"
# The worker's layers, lowest first: a module imports modules of its own layer or of a lower one, never
# of a higher one. A name is in the layer of the longest prefix that names it (``handler`` alone: the package).
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    # What every layer may use: the settings, the error tree, logging, the cancel token.
    ("base", ("handler", "handler.config", "handler.config_docs", "handler.errors", "handler.logs", "handler.cancel")),
    ("io", ("handler.io",)),  # bytes outside the process
    ("runtime", ("handler.runtime",)),  # sharing the GPU
    ("pipelines", ("handler.pipelines",)),  # model code
    # What a task is handed (job), what it hands the worker (task_interface), the checks tasks share.
    ("task interface", ("handler.job", "handler.task_interface", "handler.limits")),
    ("tasks", ("handler.tasks",)),
    ("worker", ("handler.app", "handler.schema")),  # parse, route, run: tasks only through their table
    ("serve", ("handler.http",)),
    ("start", ("handler.__main__", "handler.runpod_import")),
)
TASKS = sorted(path for path in (HANDLER / "tasks").glob("*.py") if path.name != "__init__.py")
# Task modules that still import a sibling (none now; kept so that an exception is visible here).
PENDING: set[tuple[str, str]] = set()


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, at its top or inside a function."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            # (the layout checks read absolute imports only)
            assert node.level == 0, f"{path.name}:{node.lineno}: a relative import"
            assert node.module is not None
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def module_name(path: Path) -> str:
    parts = path.relative_to(HANDLER.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def placed(module: str) -> int | None:
    """The index in LAYERS of the module ``module``, when LAYERS places it."""
    for index, (_, prefixes) in enumerate(LAYERS):
        if module in prefixes or any(module.startswith(f"{p}.") for p in prefixes if p != "handler"):
            return index
    return None


def layer_of(name: str) -> int | None:
    """The layer of the module ``name``, or of the module a name imported from it is in."""
    while name and placed(name) is None:
        name = name.rpartition(".")[0]
    return placed(name) if name else None


MODULES = sorted(HANDLER.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(HANDLER)))
def test_every_module_is_in_a_layer(path: Path) -> None:
    """A new module or folder is placed in a layer before its imports can be checked."""
    assert placed(module_name(path)) is not None, f"{module_name(path)}: add it to LAYERS"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(HANDLER)))
def test_each_layer_imports_only_the_layers_below_it(path: Path) -> None:
    own = layer_of(module_name(path))
    assert own is not None
    above = sorted(f"{m} ({LAYERS[layer][0]})" for m in imported_modules(path)
                   if m.split(".")[0] == "handler" and (layer := layer_of(m)) is not None and layer > own)
    assert not above, f"{module_name(path)} ({LAYERS[own][0]}) imports from a higher layer: {above}"


def test_config_imports_nothing_of_the_worker() -> None:
    """The settings are read first (builder/ reads them before the rest of handler/ is in the image)."""
    assert sorted(m for m in imported_modules(HANDLER / "config.py") if m.split(".")[0] == "handler") == []


def test_the_layer_check_sees_an_import_from_above(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text("from handler.runtime.gate import Gate\nimport handler.tasks.transcribe\n")
    modules = imported_modules(source)
    assert layer_of("handler.io.media_in") == 1
    assert sorted(layer_of(m) for m in modules) == [2, 2, 5]
    assert layer_of("handler.__version__") == 0


def test_the_check_sees_an_import_inside_a_function(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from handler.tasks.base import JobContext\n")
    assert "handler.tasks.base.JobContext" in imported_modules(source)


def sibling_tasks(path: Path) -> set[str]:
    """The task modules ``path`` imports (``from handler.tasks import x`` or ``handler.tasks.x``)."""
    names = {path.stem for path in TASKS}
    found = set()
    for module in imported_modules(path):
        if module.startswith("handler.tasks."):
            found.add(module.split(".")[2])
    return found & names


@pytest.mark.parametrize("path", TASKS, ids=lambda p: p.name)
def test_a_task_imports_no_other_task(path: Path) -> None:
    """What a task shares with another (loading, synthesis, captions) lives in pipelines/ or runtime/."""
    bad = sorted(other for other in sibling_tasks(path) - {path.stem} if (path.stem, other) not in PENDING)
    assert not bad, f"tasks/{path.name} imports the task modules {bad}"


def test_every_pending_exception_is_still_needed() -> None:
    """An exception left in PENDING after its import went would hide the next one."""
    for task, other in PENDING:
        assert other in sibling_tasks(HANDLER / "tasks" / f"{task}.py"), (task, other)


def _code_map() -> str:
    """The map in docs/architecture.md's "Where things are"."""
    architecture = (HANDLER.parent / "docs" / "architecture.md").read_text()
    return architecture.split("## Where things are", 1)[1].split("```", 2)[1]


# The top-level folders outside handler/ and what each may import of the others: testkit/ is shared by
# tests/ and bench/, which never import each other's way (tests may exercise bench's own code).
TOP_IMPORTS = {"testkit": {"handler", "builder"}, "bench": {"handler", "builder", "client", "testkit"},
               "tests": {"handler", "builder", "client", "testkit", "bench"}}


@pytest.mark.parametrize("folder", sorted(TOP_IMPORTS))
def test_top_level_folders_import_only_downward(folder: str) -> None:
    """testkit/ imports neither tests/ nor bench/, and bench/ does not import tests/: no cycle."""
    ours = set(TOP_IMPORTS) | {"handler", "builder", "client"}
    wrong = sorted(f"{path.name}: {module}" for path in (HANDLER.parent / folder).rglob("*.py")
                   for module in imported_modules(path)
                   if (top := module.split(".")[0]) in ours - {folder} and top not in TOP_IMPORTS[folder])
    assert wrong == []


def test_the_code_map_names_every_folder_and_module() -> None:
    """docs/architecture.md's "Where things are" names each folder of handler/ and each module at its
    top and under pipelines/, so a newcomer's map matches the tree."""
    names = {f"{p.name}/" for p in HANDLER.iterdir() if p.is_dir() and not p.name.startswith("__")}
    names |= {f"{p.name}/" for p in (HANDLER / "pipelines").iterdir() if p.is_dir() and not p.name.startswith("__")}
    names |= {p.name for p in [*HANDLER.glob("*.py"), *(HANDLER / "pipelines").glob("*.py")]
              if p.name != "__init__.py"}
    listed = _code_map()
    assert sorted(name for name in names if f" {name} " not in listed and f" {name}\n" not in listed) == []


def _map_entry(folder: str) -> str:
    """The map's entry for ``folder`` (``io``, ``pipelines/whisper``): its line and the description
    lines under it."""
    lines = _code_map().splitlines()
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith(f"{folder.split('/')[-1]}/ "))
    entry = [lines[start]]
    for line in lines[start + 1 :]:
        if not line.startswith(" " * 18):
            break
        entry.append(line)
    return " ".join(entry)


SUBFOLDERS = sorted(
    str(path.relative_to(HANDLER)) for path in [*HANDLER.iterdir(), *(HANDLER / "pipelines").iterdir()]
    if path.is_dir() and not path.name.startswith("__") and path.name != "pipelines"
)


@pytest.mark.parametrize("folder", SUBFOLDERS)
def test_the_code_map_names_every_module_of_a_folder(folder: str) -> None:
    """Inside each folder's entry, each of its modules is named (``result_cache`` as "result cache")."""
    entry = _map_entry(folder).lower()
    modules = [p.stem for p in (HANDLER / folder).glob("*.py") if p.name != "__init__.py"]
    missing = [m for m in modules if not re.search(rf"\b({m}|{m.replace('_', ' ')})\b", entry)]
    assert not missing, f"the code map's {folder}/ entry does not name {missing}"


# Library classes subclassed as the library means them to be: pydantic's models are how input is
# declared, torch's modules how a network is.
PUBLIC_BASES = {"BaseModel", "Module"}


def outside_names(tree: ast.Module) -> set[str]:
    """The names a module binds to what it imports from outside the project and the standard library."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            module = node.module if isinstance(node, ast.ImportFrom) else None
            for alias in node.names:
                top = (module or alias.name).split(".")[0]
                if top not in ("handler", "builder") and top not in sys.stdlib_module_names:
                    names.add(alias.asname or alias.name.split(".")[0])
    return names


OURS = ("handler", "builder")


def _root(node: ast.expr) -> str | None:
    while isinstance(node, ast.Attribute | ast.Subscript):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def upstream_reliances(path: Path) -> set[str]:
    """What ``path`` does to outside libraries beyond calling them: each class it derives from one
    (its own name), each attribute of one it assigns (``Owner.attr``), each private attribute of one
    it reads (``module._name``) or imports (``_name``)."""
    tree = ast.parse(path.read_text(), str(path))
    outside = outside_names(tree)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            if any(_root(base) in outside and ast.unparse(base).split(".")[-1] not in PUBLIC_BASES
                   for base in node.bases):
                found.add(node.name)
        elif isinstance(node, ast.Assign):
            found.update(ast.unparse(target) for target in node.targets
                         if isinstance(target, ast.Attribute) and _root(target) in outside)
        elif (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
              and isinstance(node.value, ast.Name) and node.value.id in outside):
            found.add(ast.unparse(node))
        elif isinstance(node, ast.ImportFrom) and (node.module or "handler").split(".")[0] not in OURS:
            found.update(alias.name for alias in node.names
                         if alias.name.startswith("_") and not alias.name.startswith("__"))
    return found


SOURCES = sorted([*HANDLER.rglob("*.py"), *(HANDLER.parent / "builder").rglob("*.py")])


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(HANDLER.parent)))
def test_every_upstream_internal_relied_on_is_listed(path: Path) -> None:
    """Each subclass of a library class, each attribute of a library assigned, and each private name
    of a library read is named in docs/architecture.md's list of upstream internals, so that list is
    what to check on an upgrade."""
    listed = (HANDLER.parent / "docs" / "architecture.md").read_text().split(
        "## Upstream internals the worker relies on", 1)[1]
    missing = sorted(name for name in upstream_reliances(path) if name not in listed)
    assert not missing, f"{path.name} relies on {missing}, which docs/architecture.md does not list"


def test_the_upstream_check_sees_a_subclass_a_patch_and_a_private_read(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text("import whisper\nfrom uvicorn import Server\nfrom pydantic import BaseModel\n"
                      "class S(Server): ...\nclass M(BaseModel): ...\nwhisper.load_model = None\n"
                      "x = whisper._MODELS\nfrom whisper.audio import _private\n")
    assert upstream_reliances(source) == {"S", "whisper.load_model", "whisper._MODELS", "_private"}


def test_the_files_scheduled_first_exist() -> None:
    """conftest's LONGEST_FILES names test files that are there (a renamed one would silently lose
    its place at the front of `make test`'s queue)."""
    from tests.conftest import LONGEST_FILES

    tests = Path(__file__).resolve().parent
    assert [name for name in LONGEST_FILES if not (tests / name).is_file()] == []
