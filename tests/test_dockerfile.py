"""The Dockerfile cannot be built here (no Docker engine), so its references are checked by reading."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def instructions(name: str) -> list[list[str]]:
    joined = re.sub(r"\\\n", " ", DOCKERFILE)
    return [shlex.split(line.strip()[len(name):]) for line in joined.splitlines()
            if line.strip().upper().startswith(name + " ")]


def test_every_copied_path_exists() -> None:
    """Each COPY source (other than from build stages) is a path in the repository."""
    copies = instructions("COPY")
    assert copies, "the Dockerfile copies nothing"
    for args in copies:
        args = [a for a in args if not a.startswith("--chown") and not a.startswith("--chmod")]
        assert not any(a.startswith("--from") for a in args), "multi-stage copies need their own check"
        for source in args[:-1]:
            assert (ROOT / source).exists(), f"COPY {source}: no such path"


def test_runs_the_handler_module() -> None:
    """The image starts the worker the way RunPod expects."""
    assert 'CMD ["python", "-u", "-m", "handler"]' in DOCKERFILE


def test_installs_ffmpeg_and_bakes_models() -> None:
    """ffmpeg comes from Debian/Ubuntu packages and the builder bakes the configured models."""
    assert re.search(r"apt-get install[^\n]*ffmpeg", re.sub(r"\\\n", " ", DOCKERFILE))
    assert "python -m builder bake" in DOCKERFILE


def test_requirements_do_not_pull_a_cuda_torch_in_ci() -> None:
    """requirements.txt leaves torch to the Dockerfile and .ci/run, which pick the build."""
    requirements = (ROOT / "requirements.txt").read_text()
    assert not re.search(r"^torch\b", requirements, re.MULTILINE)


def _handler_imports(path: Path) -> set[str]:
    return set(re.findall(r"^from (handler(?:\.\w+)*) import", path.read_text(), re.MULTILINE))


def test_the_bake_step_has_what_builder_imports() -> None:
    """Every handler module builder/ imports, and every one those import in turn, is copied into the
    image before `python -m builder bake` runs."""
    before_bake = DOCKERFILE.split("RUN python -m builder bake", 1)[0]
    copied = {source for args in (shlex.split(line[len("COPY "):]) for line in before_bake.splitlines()
                                  if line.startswith("COPY ")) for source in args[:-1]}
    pending = {module for path in (ROOT / "builder").glob("*.py") for module in _handler_imports(path)}
    seen: set[str] = set()
    while pending:
        module = pending.pop()
        seen.add(module)
        parts = module.split(".")
        needed = {"/".join(parts[:i]) + "/__init__.py" for i in range(1, len(parts))}
        needed.add("/".join(parts) + ".py")
        assert needed <= copied or "handler" in copied, (module, needed - copied)
        pending |= _handler_imports(ROOT / ("/".join(parts) + ".py")) - seen


def test_only_torch_comes_from_pytorchs_index() -> None:
    """torch is installed from download.pytorch.org/whl/${TORCH_CUDA} (a CUDA build chosen by one build
    argument, not PyPI's default); every other pip install uses PyPI, and the Makefile (CI) never names a
    CUDA wheel index."""
    joined = re.sub(r"\\\n", " ", DOCKERFILE)
    installs = [line for line in joined.splitlines() if "pip install" in line]
    torch_lines = [line for line in installs if re.search(r"pip install \S*torch==", line)]
    assert len(torch_lines) == 1
    assert '--index-url "https://download.pytorch.org/whl/${TORCH_CUDA}"' in torch_lines[0]
    assert re.search(r"^ARG TORCH_CUDA=cu\d{3}$", DOCKERFILE, re.MULTILINE)
    assert all("download.pytorch.org" not in line for line in installs if line not in torch_lines)
    assert not re.search(r"download\.pytorch\.org/whl/cu", (ROOT / "Makefile").read_text())
