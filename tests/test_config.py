"""Settings: parsed once, explicitly, and a bad value stops start-up naming the variable."""

from __future__ import annotations

import ipaddress
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from handler.config import SettingsError, load_settings

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_without_environment() -> None:
    """An empty environment gives the documented defaults: one slot, no bucket, https only."""
    settings = load_settings({})
    assert settings.max_concurrent_generations == 1
    assert settings.bucket is None
    assert settings.download_allow_http is False
    assert settings.download_allowed_networks == ()
    assert settings.whisper_model == "turbo"
    assert settings.on_runpod is False


@pytest.mark.parametrize(("raw", "expected"), [("false", False), ("0", False), ("no", False), ("OFF", False),
                                          ("true", True), ("1", True), ("Yes", True), ("on", True)])
def test_booleans_are_parsed_explicitly(raw: str, expected: bool) -> None:
    """'false' is false: booleans are parsed, not judged by truthiness."""
    assert load_settings({"USE_RAM_FILESYSTEM": raw}).use_ram_filesystem is expected


@pytest.mark.parametrize(
    ("name", "value"),
    [("USE_RAM_FILESYSTEM", "maybe"), ("MAX_CONCURRENT_GENERATIONS", "two"), ("MAX_CONCURRENT_GENERATIONS", "0"),
     ("GENERATION_ACQUIRE_TIMEOUT", "-1"), ("DOWNLOAD_ALLOWED_NETWORKS", "10.0.0.0/33"), ("DEVICE", "tpu"),
     ("LOG_LEVEL", "loud"), ("PRESIGN_EXPIRY_S", "1.5")],
)
def test_bad_values_name_the_variable(name: str, value: str) -> None:
    """A bad value raises SettingsError whose message names the variable and the value."""
    with pytest.raises(SettingsError, match=name) as info:
        load_settings({name: value})
    assert repr(value) in str(info.value)


def test_incomplete_bucket_is_an_error() -> None:
    """Half a bucket configuration is refused at start-up, naming what is missing."""
    with pytest.raises(SettingsError, match="BUCKET_SECRET_ACCESS_KEY"):
        load_settings({"BUCKET_ACCESS_KEY_ID": "AK", "BUCKET_NAME": "b"})


def test_bucket_and_networks_are_parsed() -> None:
    """The bucket's fields and the CIDR allow-list come through typed."""
    settings = load_settings({
        "BUCKET_ENDPOINT_URL": "http://127.0.0.1:9000", "BUCKET_ACCESS_KEY_ID": "AK",
        "BUCKET_SECRET_ACCESS_KEY": "s3cr3t-value", "BUCKET_NAME": "out",
        "DOWNLOAD_ALLOWED_NETWORKS": "127.0.0.0/8, fd00::/8", "RUNPOD_ENDPOINT_ID": "ep",
    })
    assert settings.bucket is not None and settings.bucket.name == "out"
    assert "s3cr3t-value" not in repr(settings)
    assert ipaddress.ip_address("127.0.0.5") in settings.download_allowed_networks[0]
    assert settings.on_runpod is True


def test_settings_are_frozen() -> None:
    """Nothing changes the settings after start-up."""
    settings = load_settings({})
    with pytest.raises(AttributeError):
        settings.max_concurrent_generations = 4  # type: ignore[misc]


def test_worker_refuses_to_start_on_a_bad_value() -> None:
    """`python -m handler` with a bad variable exits with status 2 and names it."""
    env = {**os.environ, "MAX_CONCURRENT_GENERATIONS": "lots"}
    done = subprocess.run([sys.executable, "-m", "handler"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2
    assert "MAX_CONCURRENT_GENERATIONS" in done.stderr


def test_ram_filesystem_moves_job_directories_to_shm(tmp_path) -> None:
    """USE_RAM_FILESYSTEM puts job directories under /dev/shm; otherwise under WORK_DIR."""
    assert load_settings({"WORK_DIR": str(tmp_path)}).job_root() == tmp_path
    shm = load_settings({"WORK_DIR": str(tmp_path), "USE_RAM_FILESYSTEM": "true"}).job_root()
    assert shm == (Path("/dev/shm") if Path("/dev/shm").is_dir() else tmp_path)


def test_settings_have_one_reader() -> None:
    """Only config.py reads the environment (the SDK's own log level in __main__ aside): builder/ and
    every handler module get their values from the one Settings object, with its one set of defaults.
    (Writing variables for the libraries, as __main__ does for offline mode, is not reading.)"""
    reads = re.compile(r"os\.environ\.get|os\.getenv|os\.environ\[[^\]]*\](?!\s*=)|in os\.environ|environ\)")
    readers = []
    for path in sorted([*(ROOT / "handler").rglob("*.py"), *(ROOT / "builder").rglob("*.py")]):
        if path.name == "config.py" and path.parent.name == "handler":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if reads.search(line) and "RUNPOD_LOG_LEVEL" not in line:
                readers.append(f"{path.relative_to(ROOT)}:{number}")
    assert readers == []


def test_runpod_variables_come_through_settings() -> None:
    """The pod id and the progress switch are settings like any other."""
    settings = load_settings({"RUNPOD_POD_ID": "pod-7", "RUNPOD_WEBHOOK_POST_OUTPUT": "http://x/$ID"})
    assert settings.worker_id == "pod-7" and settings.post_progress is True
    assert load_settings({}).post_progress is False and load_settings({}).bake_models == ("transcribe",)


@pytest.mark.parametrize("env", [
    {"UPLOAD_PREFIX": "outputs"}, {"UPLOAD_PREFIX": "outputs/uploads"}, {"RESULT_CACHE_PREFIX": "uploads"},
    {"BUCKET_PREFIX": "cache/out"}, {"BUCKET_PREFIX": "data", "UPLOAD_PREFIX": "data/in"},
])
def test_overlapping_prefixes_stop_start_up(env: dict[str, str]) -> None:
    """Outputs, uploads and cache entries under one prefix (equal or nested) would let
    delete_after_read delete other jobs' outputs: start-up stops, naming both variables."""
    with pytest.raises(SettingsError, match="overlaps") as info:
        load_settings(env)
    assert sum(name in str(info.value) for name in ("BUCKET_PREFIX", "UPLOAD_PREFIX", "RESULT_CACHE_PREFIX")) == 2


def test_prefixes_that_only_share_letters_are_fine() -> None:
    """`out` and `outputs` are different folders: no overlap."""
    settings = load_settings({"UPLOAD_PREFIX": "out", "RESULT_CACHE_PREFIX": "outputs-cache"})
    assert (settings.bucket_prefix, settings.upload_prefix) == ("outputs", "out")
