"""The SDK is imported without its processor probe: no process is started to label debug output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from handler.runpod_import import processor_info, processor_name

ROOT = Path(__file__).resolve().parents[1]

# Run in a fresh interpreter: records every call of py-cpuinfo's probe, and every process started
# while the worker's entry module (which imports the SDK) is imported. py-cpuinfo is imported
# first (its import runs `file` and `uname`), so a worker that let the SDK use it would call it.
_PROBE = """
import json, sys
import cpuinfo
calls = []
real = cpuinfo.get_cpu_info
def counted():
    calls.append(1)
    return real()
cpuinfo.get_cpu_info = counted
spawned = []
sys.addaudithook(lambda event, args: spawned.append(event) if event in (
    "subprocess.Popen", "os.posix_spawn", "os.fork", "os.forkpty", "os.exec", "os.system") else None)
import {module}
from runpod.serverless.utils import rp_debugger
print(json.dumps({{"spawned": spawned, "calls": len(calls), "label": rp_debugger.PROCESSOR,
                  "restored": sys.modules["cpuinfo"] is cpuinfo and cpuinfo.get_cpu_info is counted}}))
"""


def _import_in_fresh_interpreter(module: str) -> dict[str, object]:
    done = subprocess.run([sys.executable, "-c", _PROBE.format(module=module)], cwd=ROOT, capture_output=True,
                          text=True, check=True, timeout=120)
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.slow
def test_importing_the_worker_entry_runs_no_probe_and_starts_no_process() -> None:
    """Importing ``handler.__main__`` imports runpod without calling ``cpuinfo.get_cpu_info`` and
    without starting any process; the debug label is still the processor's name, and py-cpuinfo's
    own module is back in place afterwards."""
    found = _import_in_fresh_interpreter("handler.__main__")
    assert found["spawned"] == []
    assert found["calls"] == 0
    assert found["label"] == processor_name()
    assert found["restored"] is True


@pytest.mark.slow
def test_a_bare_sdk_import_does_run_the_probe() -> None:
    """The control: a plain ``import runpod`` calls the probe, which starts a process, so the
    test above would see one if the worker's import let it run."""
    found = _import_in_fresh_interpreter("runpod")
    assert found["calls"] == 1
    assert "subprocess.Popen" in found["spawned"]


def test_the_label_is_what_rp_debugger_reads() -> None:
    """rp_debugger reads ``get_cpu_info()["brand_raw"]``: a non-empty name."""
    label = processor_info()["brand_raw"]
    assert isinstance(label, str)
    assert label
