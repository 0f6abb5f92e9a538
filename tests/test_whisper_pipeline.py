"""Whisper pipelines: word alignment compiled once per machine (numba cache on disk), and a warm-up
that pays only first-call costs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from handler.pipelines.whisper.pipeline import compiled_dir

ROOT = Path(__file__).resolve().parents[1]

# A fresh interpreter (numba's options are per process): the first DTW call of a process, and
# what numba did for it.
_FIRST_DTW = """
import json, sys
import torch, whisper.timing
from pathlib import Path
from handler.pipelines.whisper.pipeline import cache_compiled_alignment
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


def test_warm_up_on_the_cpu_primes_first_call_caches_without_decoding(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Warm-up loads the DTW kernel, the tokenizer's vocabulary and the mel filters, and runs no
    decode on the CPU: a decode costs no more the first time, so it would only delay readiness."""
    import whisper.audio
    import whisper.tokenizer

    from handler.pipelines.whisper.pipeline import WhisperPipeline, load_checkpoint

    model = load_checkpoint(model_dir / "whisper" / "tiny.en.pt", "cpu")
    pipeline = WhisperPipeline(model, "tiny.en", "cpu")
    whisper.tokenizer.get_tokenizer.cache_clear()  # earlier tests may hold one (then no encoding is built)
    whisper.tokenizer.get_encoding.cache_clear()
    whisper.audio.mel_filters.cache_clear()
    decodes: list[str] = []
    monkeypatch.setattr(WhisperPipeline, "transcribe", lambda *_a, **_k: decodes.append("transcribe"))
    monkeypatch.setattr(WhisperPipeline, "transcribe_chunks", lambda *_a, **_k: decodes.append("chunks"))
    pipeline.warm_up()
    assert decodes == []
    assert whisper.tokenizer.get_encoding.cache_info().currsize == 1
    assert whisper.audio.mel_filters.cache_info().currsize == 1
