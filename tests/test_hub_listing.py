"""The RunPod Hub listing: .runpod/hub.json and tests.json in RunPod's format, consistent with the worker."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from handler.app import Worker
from handler.config import SettingsError, load_settings, variables

ROOT = Path(__file__).resolve().parents[1]
HUB = json.loads((ROOT / ".runpod" / "hub.json").read_text())
TESTS = json.loads((ROOT / ".runpod" / "tests.json").read_text())
OPERATIONS = (ROOT / "docs" / "operations.md").read_text()
ENV_TYPES = {"string": str, "number": (int, float), "boolean": bool, "huggingface": str}


def settings_read() -> set[str]:
    """Every variable the settings declare."""
    return set(variables())


# Host CUDA versions (what a host's driver supports) RunPod's endpoint settings offer, newest first.
RUNPOD_HOST_CUDA = ("13.0", "12.9", "12.8", "12.7", "12.6", "12.5", "12.4", "12.3", "12.2", "12.1", "12.0")
# What a plain `pip install torch==2.13.0` gets on Linux: PyPI's default wheel is a CUDA 13.0 build.
PYPI_TORCH_CUDA = (13, 0)


def version(text: str) -> tuple[int, int]:
    major, minor = text.split(".")[:2]
    return int(major), int(minor)


def dockerfile() -> str:
    return re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())


def build_arg(name: str) -> str:
    """The default of a Docker build argument, the one place its value is written."""
    found = re.search(rf"^ARG {name}=(\S+)", dockerfile(), re.MULTILINE)
    assert found, f"the Dockerfile declares no ARG {name} with a default"
    return found[1]


def torch_cuda() -> tuple[int, int]:
    """The CUDA version of the torch build the image installs: the wheel index it names, or PyPI's default."""
    install = next(line for line in dockerfile().splitlines() if re.search(r"pip install \S*torch==", line))
    index = re.search(r"--index-url\s+\"?https://download\.pytorch\.org/whl/([^\"\s]+)", install)
    if index is None:
        return PYPI_TORCH_CUDA
    build = index[1].replace("${TORCH_CUDA}", build_arg("TORCH_CUDA"))
    found = re.fullmatch(r"cu(\d+)(\d)", build)
    assert found, f"{build!r} is not a CUDA wheel index"
    return int(found[1]), int(found[2])


def cuda_of_base_image() -> tuple[int, int]:
    found = re.search(r"^FROM nvidia/cuda:(\S+)", dockerfile(), re.MULTILINE)
    assert found
    tag = found[1].replace("${CUDA_BASE}", build_arg("CUDA_BASE")) if "${" in found[1] else found[1]
    return version(tag)


def hosts_for_the_torch_build() -> list[str]:
    """Every RunPod host CUDA version whose driver runs the image's torch build (at least as new)."""
    return [v for v in RUNPOD_HOST_CUDA if version(v) >= torch_cuda()]


def test_hub_json_has_the_required_fields() -> None:
    """title, description, type serverless, a category, and a config with runsOn, containerDiskInGb,
    gpuIds, gpuCount and allowedCudaVersions of the right types."""
    assert isinstance(HUB["title"], str) and HUB["title"]
    assert isinstance(HUB["description"], str) and HUB["description"]
    assert HUB["type"] == "serverless"
    assert HUB["category"] in ("audio", "image", "video", "language", "embedding")
    config = HUB["config"]
    assert config["runsOn"] == "GPU"
    assert isinstance(config["containerDiskInGb"], int) and 10 <= config["containerDiskInGb"] <= 200
    assert isinstance(config["gpuIds"], str) and config["gpuIds"]
    assert config["gpuCount"] == 1


def test_allowed_cuda_versions_follow_the_torch_build() -> None:
    """allowedCudaVersions in hub.json and tests.json are exactly the RunPod host versions whose driver can
    run the torch build the image installs: none whose driver is too old for it, none left out."""
    expected = hosts_for_the_torch_build()
    for listing in (HUB["config"], TESTS["config"]):
        assert listing["allowedCudaVersions"] == expected, (torch_cuda(), listing["allowedCudaVersions"])


def test_base_image_cuda_is_the_torch_builds() -> None:
    """The nvidia/cuda base image carries the same CUDA major.minor as the torch build, so the base asks no
    newer driver than torch does (and the container runtime's own driver check agrees with the listing)."""
    assert cuda_of_base_image() == torch_cuda()


def test_the_operations_guide_tells_the_same_cuda_story() -> None:
    """docs/operations.md names the torch build and the host CUDA versions it allows, as derived from the
    Dockerfile."""
    major, minor = torch_cuda()
    assert f"`TORCH_CUDA=cu{major}{minor}`" in OPERATIONS
    assert ", ".join(hosts_for_the_torch_build()) in OPERATIONS


def test_every_env_entry_is_a_real_setting_with_a_typed_default() -> None:
    """Each env key is a variable the worker reads; its input has a name, a known type and a default
    of that type that the worker's own parser accepts."""
    known = settings_read()
    keys = [entry["key"] for entry in HUB["config"]["env"]]
    assert len(keys) == len(set(keys))
    for entry in HUB["config"]["env"]:
        assert entry["key"] in known, entry["key"]
        spec = entry["input"]
        assert spec["name"] and spec["description"]
        assert spec["type"] in ENV_TYPES
        assert isinstance(spec["default"], ENV_TYPES[spec["type"]]), entry
        load_settings({entry["key"]: str(spec["default"]).lower() if spec["type"] == "boolean"
                       else str(spec["default"])})


def env_inputs(kind: str) -> list[tuple[str, dict[str, Any]]]:
    return [(entry["key"], entry["input"]) for entry in HUB["config"]["env"] if entry["input"]["type"] == kind]


def test_booleans_say_what_they_write() -> None:
    """Every boolean input names the strings the Hub writes (trueValue, falseValue), and the worker's own
    parser reads them as true and false (never "False" read as true)."""
    booleans = env_inputs("boolean")
    assert booleans
    for key, spec in booleans:
        assert isinstance(spec["trueValue"], str) and isinstance(spec["falseValue"], str), key
        assert getattr(load_settings({key: spec["trueValue"]}), key.lower()) is True
        assert getattr(load_settings({key: spec["falseValue"]}), key.lower()) is False


def test_numbers_carry_the_workers_limits() -> None:
    """Every number input has a min (and a max where the worker has one) around its default; the worker
    accepts both ends and refuses a value just past either, so the form offers exactly what starts."""
    numbers = env_inputs("number")
    assert numbers
    for key, spec in numbers:
        low, high = spec["min"], spec.get("max")
        assert low <= spec["default"] and (high is None or spec["default"] <= high), key
        for accepted in (low, high):
            if accepted is not None:
                load_settings({key: str(accepted)})
        for refused in (low - 1, None if high is None else high + 1):
            if refused is not None:
                with pytest.raises(SettingsError):
                    load_settings({key: str(refused)})


def documented_disk_table() -> dict[str, float]:
    """docs/operations.md's container disk budget: what lies on the disk, in GB, one row each."""
    table = OPERATIONS.split("| on the container disk | GB |", 1)[1].split("\n\n", 1)[0]
    rows = re.findall(r"^\| (.+?) \| ([\d.]+) \|$", table, re.MULTILINE)
    return {what: float(gb) for what, gb in rows}


def test_container_disk_fits_the_all_tasks_preset() -> None:
    """containerDiskInGb holds the image and every model the *All tasks* preset downloads at first use, as
    docs/operations.md adds them up (its total is the sum of its rows); each default model has its row."""
    rows = documented_disk_table()
    total = rows.pop("total")
    assert abs(sum(rows.values()) - total) < 0.5, (sum(rows.values()), total)
    assert HUB["config"]["containerDiskInGb"] >= total
    defaults = {entry["key"]: entry["input"]["default"] for entry in HUB["config"]["env"]}
    for model in (defaults["WHISPER_MODEL"], defaults["TTS_MODEL"], defaults["IMAGE_MODEL"],
                  defaults["VIDEO_MODEL"]):
        assert any(f"`{model}`" in what for what in rows), model


def test_presets_set_real_settings() -> None:
    """The presets (transcription only, all tasks) only set listed variables, to values the worker accepts."""
    listed = {entry["key"] for entry in HUB["config"]["env"]}
    names = [preset["name"] for preset in HUB["config"]["presets"]]
    assert "Transcription only" in names and "All tasks" in names
    for preset in HUB["config"]["presets"]:
        assert set(preset["defaults"]) <= listed
        load_settings({k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in preset["defaults"].items()})


def test_tests_json_inputs_pass_the_workers_validation() -> None:
    """tests.json runs jobs that need no network: the shipped test_input.json and a `system` job; each
    passes the worker's own validation, and the test env only sets real settings."""
    shipped = json.loads((ROOT / "test_input.json").read_text())["input"]
    inputs = [test["input"] for test in TESTS["tests"]]
    assert shipped in inputs and {"task": "system"} in inputs
    worker = Worker(load_settings({}))
    for test in TESTS["tests"]:
        assert test["name"] and isinstance(test["timeout"], int)
        task, params = worker.route({"id": test["name"], "input": test["input"]})
        assert task.name in ("transcribe", "system")
        if task.name == "transcribe":
            assert params.audio is None  # base64: no download needed
    assert {entry["key"] for entry in TESTS["config"]["env"]} <= settings_read()
    assert TESTS["config"]["gpuCount"] == 1 and TESTS["config"]["gpuTypeId"]


def test_hub_entry_file_starts_the_same_worker(tmp_path: Path) -> None:
    """.runpod/handler.py (the Hub looks for a handler file) imports the real `handler` package, not itself."""
    done = subprocess.run([sys.executable, str(ROOT / ".runpod" / "handler.py"), "--help"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "WHISPER_MODEL_MAP": "x=not-served"})
    assert "invalid configuration" in done.stderr and "WHISPER_MODEL_MAP" in done.stderr, done.stderr[-2000:]


@pytest.mark.parametrize("path", [".runpod/hub.json", ".runpod/tests.json"])
def test_files_are_plain_json(path: str) -> None:
    """Both files parse as JSON objects (the Hub reads them as such)."""
    data: Any = json.loads((ROOT / path).read_text())
    assert isinstance(data, dict)
