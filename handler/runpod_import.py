"""The RunPod SDK, imported without the processor probe it runs at import.

Every ``import runpod`` imports ``runpod.serverless.utils.rp_debugger``, which calls
``cpuinfo.get_cpu_info()`` at import time only to label the output of ``--rp_debugger``.
py-cpuinfo answers that call by starting a second Python interpreter (``cpuinfo.py --json``):
about a second of every cold start, for a label no job reads (importing py-cpuinfo alone
runs ``file`` and ``uname`` too). :func:`import_runpod` imports the SDK with a stand-in
``cpuinfo`` module whose ``get_cpu_info`` reads the same label (py-cpuinfo's ``brand_raw``)
from ``/proc/cpuinfo``, then takes the stand-in out of ``sys.modules``, so a later
``import cpuinfo`` gets the real one.

The SDK uses nothing else of py-cpuinfo (checked for runpod 1.12; see tests/test_runpod_import.py).
"""

from __future__ import annotations

import platform
import sys
from types import ModuleType

_UNKNOWN = "Unable to get processor info."  # what rp_debugger says when py-cpuinfo has no name


def import_runpod() -> ModuleType:
    """``runpod``, imported once, without spawning a process."""
    if "runpod" in sys.modules:
        return sys.modules["runpod"]
    stand_in = ModuleType("cpuinfo", "in place of py-cpuinfo while the SDK is imported (handler.runpod_import)")
    stand_in.get_cpu_info = processor_info  # type: ignore[attr-defined]
    real = sys.modules.get("cpuinfo")
    sys.modules["cpuinfo"] = stand_in
    try:
        import runpod  # noqa: F401  # imported for sys.modules
    finally:
        if real is None:
            del sys.modules["cpuinfo"]
        else:
            sys.modules["cpuinfo"] = real
    return sys.modules["runpod"]


def processor_info() -> dict[str, str]:
    """What rp_debugger reads of ``cpuinfo.get_cpu_info()``: the processor's name."""
    return {"brand_raw": processor_name()}


def processor_name() -> str:
    """The processor's model name as Linux reports it, else the machine type (neither starts a process)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.machine() or _UNKNOWN
