"""Start-up refuses a GPU it was given but cannot use; DEVICE=cpu stays possible; the driver is reported."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from handler.config import load_settings
from handler.runtime import devices
from handler.runtime.devices import GpuUnusable, check_device, describe, gpu_promises
from testkit.jobserver import JobServer
from tests.conftest import start_worker, stop_worker

ROOT = Path(__file__).resolve().parents[1]
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA works here: nothing to refuse")


@pytest.fixture
def no_dev(tmp_path: Path) -> Path:
    """A /dev without NVIDIA device nodes."""
    dev = tmp_path / "dev"
    dev.mkdir()
    return dev


@pytest.fixture
def driver(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """A driver version file the way the NVIDIA kernel module writes it; the cached reads start fresh."""
    version_file = tmp_path / "version"
    version_file.write_text("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  535.104.05  Release Build  "
                            "(dvs-builder@U16-I3-B03-4-3)  Thu Aug 17 2023\nGCC version:  gcc version 12.2.0\n")
    monkeypatch.setattr(devices, "DRIVER_VERSION_FILE", version_file)
    cached = (devices.driver_version, devices.driver_cuda)  # a test may replace them
    for read in cached:
        read.cache_clear()
    yield version_file
    for read in cached:
        read.cache_clear()


@pytest.mark.parametrize(("env", "signs"), [
    ({}, []),
    ({"RUNPOD_GPU_COUNT": "0"}, []),
    ({"RUNPOD_GPU_COUNT": "1"}, ["RUNPOD_GPU_COUNT=1"]),
    ({"NVIDIA_VISIBLE_DEVICES": "void"}, []),
    ({"NVIDIA_VISIBLE_DEVICES": "none"}, []),
    ({"NVIDIA_VISIBLE_DEVICES": "all"}, []),
    ({"NVIDIA_VISIBLE_DEVICES": "GPU-3f2c"}, ["NVIDIA_VISIBLE_DEVICES=GPU-3f2c"]),
])
def test_gpu_promises_read_runpod_and_the_container_runtime(env: dict[str, str], signs: list[str],
                                                            no_dev: Path) -> None:
    """RUNPOD_GPU_COUNT above 0 and NVIDIA_VISIBLE_DEVICES naming devices promise a GPU; void, none, empty
    and `all` (which the nvidia/cuda base image sets for every container) do not."""
    assert gpu_promises(load_settings(env), dev=no_dev) == signs


def test_an_nvidia_device_node_is_a_promise(no_dev: Path) -> None:
    """A /dev/nvidiaN node (the container runtime passed a GPU through, as `docker run --gpus` does) is a sign."""
    (no_dev / "nvidia0").touch()
    (no_dev / "nvidiactl").touch()
    assert gpu_promises(load_settings({}), dev=no_dev) == [str(no_dev / "nvidia0")]


@no_cuda
def test_a_promised_gpu_without_cuda_refuses_to_start(no_dev: Path) -> None:
    """DEVICE=auto with a GPU promised but torch unable to use CUDA raises GpuUnusable naming the sign, the
    cause and the way out; DEVICE=cuda refuses even with no promise; nothing promised is the CPU."""
    with pytest.raises(GpuUnusable) as refused:
        check_device(load_settings({"RUNPOD_GPU_COUNT": "2"}), dev=no_dev)
    message = str(refused.value)
    assert "RUNPOD_GPU_COUNT=2" in message and "DEVICE=cpu" in message and torch.__version__ in message
    with pytest.raises(GpuUnusable, match="DEVICE=cuda"):
        check_device(load_settings({"DEVICE": "cuda"}), dev=no_dev)
    assert check_device(load_settings({}), dev=no_dev) == "cpu"


def test_device_cpu_is_the_cpu_on_purpose(no_dev: Path) -> None:
    """DEVICE=cpu starts on the CPU whatever GPU was promised."""
    (no_dev / "nvidia0").touch()
    settings = load_settings({"DEVICE": "cpu", "RUNPOD_GPU_COUNT": "1", "NVIDIA_VISIBLE_DEVICES": "GPU-1"})
    assert check_device(settings, dev=no_dev) == "cpu"


@no_cuda
def test_a_driver_too_old_for_the_torch_build_is_named(monkeypatch: pytest.MonkeyPatch, driver: Path,
                                                       no_dev: Path) -> None:
    """With a CUDA 12.6 torch build and a driver that supports CUDA 12.2, the refusal names both versions
    and the driver's own (read from the kernel module's version file)."""
    monkeypatch.setattr(torch.version, "cuda", "12.6")
    monkeypatch.setattr(devices, "driver_cuda", lambda: "12.2")
    with pytest.raises(GpuUnusable) as refused:
        check_device(load_settings({"RUNPOD_GPU_COUNT": "1"}), dev=no_dev)
    message = str(refused.value)
    assert "built for CUDA 12.6" in message and "535.104.05" in message and "CUDA up to 12.2" in message


@no_cuda
def test_no_driver_in_the_container_is_named(monkeypatch: pytest.MonkeyPatch, driver: Path, no_dev: Path) -> None:
    """A CUDA build with no driver visible at all says so (no version file, no libcuda)."""
    monkeypatch.setattr(torch.version, "cuda", "12.6")
    monkeypatch.setattr(devices, "DRIVER_VERSION_FILE", driver.parent / "missing")
    monkeypatch.setattr(devices, "driver_cuda", lambda: None)
    with pytest.raises(GpuUnusable, match="no NVIDIA driver is visible"):
        check_device(load_settings({"RUNPOD_GPU_COUNT": "1"}), dev=no_dev)


def test_describe_reports_the_build_and_the_driver(driver: Path) -> None:
    """describe() gives the device, torch's version and CUDA build, and the driver version read from /proc."""
    described = describe("cpu")
    assert described["device"] == "cpu" and described["torch"] == torch.__version__
    assert described["torch_cuda"] == torch.version.cuda and described["driver"] == "535.104.05"
    assert described["gpu"] is None


def worker_env(tmp_path: Path, **env: str) -> dict[str, str]:
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(("RUNPOD_", "NVIDIA_", "DEVICE"))}
    return {**inherited, "WORK_DIR": str(tmp_path), "MODEL_DIR": str(tmp_path / "models"),
            "WHISPER_MODEL": "tiny.en", "ALLOW_MODEL_DOWNLOAD": "false", **env}


@pytest.mark.integration
@no_cuda
def test_the_worker_process_exits_when_its_gpu_is_unusable(tmp_path: Path) -> None:
    """`python -m handler` told by RunPod that it has a GPU, on a machine where torch has no CUDA, exits 3
    before serving anything, with the reason on stderr."""
    done = subprocess.run([sys.executable, "-m", "handler"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=worker_env(tmp_path, RUNPOD_GPU_COUNT="1", DEVICE="auto"))
    assert done.returncode == 3, done.stderr[-2000:]
    assert "cannot start: a GPU was given to this worker (RUNPOD_GPU_COUNT=1" in done.stderr
    assert "set DEVICE=cpu" in done.stderr


@pytest.mark.integration
def test_the_worker_process_runs_on_the_cpu_on_purpose(server: JobServer, tmp_path: Path) -> None:
    """The same promise with DEVICE=cpu starts the real worker: it answers a `system` job that reports the
    device, torch's CUDA build and the driver."""
    worker = start_worker(server, tmp_path, tmp_path / "models", DEVICE="cpu", RUNPOD_GPU_COUNT="1")
    try:
        server.submit("sys", {"task": "system"})
        assert server.wait_for(1, timeout=120), worker.log_path.read_text(errors="replace")[-2000:]
        snapshot = server.result("sys")["output"]
        assert snapshot["device"] == "cpu" and snapshot["torch_cuda"] == torch.version.cuda
        assert snapshot["torch"] == torch.__version__ and "driver" in snapshot
    finally:
        assert stop_worker(worker) == 0
    assert '"torch_cuda"' in worker.log_path.read_text() or "torch_cuda=" in worker.log_path.read_text()
