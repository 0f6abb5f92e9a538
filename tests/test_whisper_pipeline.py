"""Word alignment is compiled once per machine, not once per process: numba's cache is kept on disk."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from handler.tasks.whisper_pipeline import compiled_dir

ROOT = Path(__file__).resolve().parents[1]

# A fresh interpreter (numba's options are per process): the first DTW call of a process, and
# what numba did for it.
_FIRST_DTW = """
import json, sys
import torch, whisper.timing
from pathlib import Path
from handler.tasks.whisper_pipeline import cache_compiled_alignment
cache_compiled_alignment(Path(sys.argv[1]))
whisper.timing.dtw(torch.rand(6, 9))
stats = whisper.timing.dtw_cpu.stats
print(json.dumps({"hits": sum(stats.cache_hits.values()), "misses": sum(stats.cache_misses.values())}))
"""


def _first_dtw(directory: Path) -> dict[str, int]:
    env = {key: value for key, value in os.environ.items() if key != "NUMBA_CACHE_DIR"}
    done = subprocess.run([sys.executable, "-c", _FIRST_DTW, str(directory)], cwd=ROOT, env=env,
                          capture_output=True, text=True, check=True, timeout=240)
    result: dict[str, int] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.slow
def test_a_second_process_loads_the_compiled_dtw_instead_of_compiling_it(tmp_path: Path) -> None:
    """The first process compiles the DTW and stores it; the next one finds it (a cache hit, no
    compilation), which is what takes seconds off a cold worker's first word timings."""
    cache = compiled_dir(tmp_path)
    assert _first_dtw(cache) == {"hits": 0, "misses": 1}
    assert any(cache.rglob("*.nbi"))
    assert _first_dtw(cache) == {"hits": 1, "misses": 0}
