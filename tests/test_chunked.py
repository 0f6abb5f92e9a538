"""Transcription in chunks through the handler: VAD on every path, and batches shared by concurrent jobs."""

from __future__ import annotations

import asyncio
import gc
import threading
import uuid
import wave
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import whisper as openai_whisper

from handler.app import Worker
from handler.runtime.registry import Registry
from handler.tasks import whisper_batch, whisper_pipeline
from handler.tasks.vad import fixed_chunks
from tests import media
from tests.conftest import b64, job, run_job

# Eight short sentences, one per job; each job must get its own back.
SENTENCES = (
    "Please send the report by Friday morning.",
    "The quick brown fox jumps over the lazy dog.",
    "We will meet again next week to review the numbers.",
    "Please close the window before you leave.",
    "The children are playing in the garden.",
    "Our meeting has been moved to Tuesday.",
    "Turn left at the bridge and follow the river north.",
    "My phone battery is almost empty.",
)
# A word of each sentence that tiny.en hears in espeak's voice (checked one by one).
KEYWORDS = ("report", "fox", "numbers", "window", "garden", "tuesday", "river", "battery")


@pytest.fixture(scope="module")
def sentence_clips(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("sentences")
    return [media.speak(text, folder / f"s{index}.wav") for index, text in enumerate(SENTENCES)]


class BatchSpy:
    """Records the size of every batch the real decode receives, and can make some of them fail."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.lock = threading.Lock()
        self.fail_when: Any = None

    def __call__(self, original: Any) -> Any:
        spy = self

        def decode_windows(pipeline: Any, inputs: Any, settings: Any) -> Any:
            with spy.lock:
                spy.sizes.append(len(inputs))
            if spy.fail_when is not None and spy.fail_when(inputs):
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return original(pipeline, inputs, settings)

        return decode_windows


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> BatchSpy:
    recorder = BatchSpy()
    monkeypatch.setattr(whisper_pipeline.WhisperPipeline, "decode_windows",
                        recorder(whisper_pipeline.WhisperPipeline.decode_windows))
    return recorder


@pytest.fixture
def worker(make_settings) -> Worker:
    # A batch window long enough that eight jobs started together meet in one batch on a busy CI.
    return Worker(make_settings(WHISPER_BATCH_WINDOW_MS="300", RESULT_CACHE="false"), registry=Registry())


def handle_all(worker: Worker, jobs: list[dict[str, Any]], cancel_index: int | None = None) -> list[dict[str, Any]]:
    async def scenario() -> list[dict[str, Any]]:
        tasks = [asyncio.create_task(worker.handle(one)) for one in jobs]
        if cancel_index is not None:
            await asyncio.sleep(0.05)
            tasks[cancel_index].cancel()
        return list(await asyncio.gather(*tasks))

    return asyncio.run(scenario())


def test_vad_is_accepted_on_every_path(make_worker, speech_wav: Path, tmp_path: Path) -> None:
    """enable_vad works with the sequential batch size 1 and with batches; silence alone is an empty
    transcript, not an error."""
    worker = make_worker()
    for batch in (1, 8):
        result = run_job(worker, job(audio_base64=b64(speech_wav), enable_vad=True, batch_size=batch))
        assert media.recognised(result["transcription"]) >= 0.7, result
    quiet = run_job(worker, job(audio_base64=b64(media.silence(tmp_path / "q.wav", 3)), enable_vad=True))
    assert quiet["transcription"] == "" and quiet["segments"] == []


@pytest.mark.slow
def test_concurrent_jobs_share_batches_and_get_their_own_text(worker: Worker, spy: BatchSpy,
                                                               sentence_clips: list[Path]) -> None:
    """Eight jobs held at once, eight sentences: each gets its own sentence back (no swap, no merge),
    and the batches the decoder received held chunks of more than one job."""
    results = handle_all(worker, [job(audio_base64=b64(clip), beam_size=1, best_of=1) for clip in sentence_clips])
    for keyword, result in zip(KEYWORDS, results, strict=True):
        assert "error" not in result, result
        text = result["transcription"].lower()
        assert keyword in text, (keyword, text)
        assert not any(other in text for other in KEYWORDS if other != keyword), text
    assert max(spy.sizes) > 1, spy.sizes
    assert sum(spy.sizes) == len(SENTENCES)


@pytest.mark.slow
def test_a_cancelled_job_leaves_and_the_others_finish(worker: Worker, spy: BatchSpy,
                                                      sentence_clips: list[Path]) -> None:
    """One of eight concurrent jobs is cancelled while its chunk waits for a batch: it answers CANCELLED
    and its chunk never reaches the decoder; the other seven complete with their own text."""
    results = handle_all(worker, [job(audio_base64=b64(clip), beam_size=1, best_of=1) for clip in sentence_clips],
                         cancel_index=3)
    assert results[3]["error_code"] == "CANCELLED"
    for index, (keyword, result) in enumerate(zip(KEYWORDS, results, strict=True)):
        if index != 3:
            assert keyword in result["transcription"].lower(), result
    assert sum(spy.sizes) == len(SENTENCES) - 1


@pytest.mark.slow
def test_out_of_memory_in_a_shared_batch_is_retried_smaller(worker: Worker, spy: BatchSpy,
                                                             sentence_clips: list[Path]) -> None:
    """A CUDA out-of-memory error (the real exception type, raised inside the real gate) in a shared
    batch of four is retried in smaller batches: jobs that fit alone complete; the one whose chunk
    fails even alone gets GPU_OOM; the next job is fine."""
    jobs = [job(audio_base64=b64(clip), beam_size=1, best_of=1) for clip in sentence_clips[:4]]
    spy.fail_when = lambda inputs: len(inputs) > 1  # only single chunks fit
    results = handle_all(worker, jobs)
    assert all("error" not in r for r in results), results
    assert spy.sizes[0] == 4 and spy.sizes.count(1) == 4

    poisoned = _mel_sum(worker, sentence_clips[2])  # the third job's chunk fails even alone
    spy.fail_when = lambda inputs: len(inputs) > 1 or abs(float(inputs[0].mel.sum()) - poisoned) < 1e-3
    results = handle_all(worker, jobs)
    assert [r.get("error_code") for r in results] == [None, None, "GPU_OOM", None], results
    spy.fail_when = None
    after = run_job(worker, job(audio_base64=b64(sentence_clips[0]), beam_size=1, best_of=1))
    assert "report" in after["transcription"].lower()


@pytest.mark.slow
def test_jobs_with_different_batch_sizes_share_a_batch(worker: Worker, spy: BatchSpy,
                                                       sentence_clips: list[Path]) -> None:
    """Four jobs held at once with batch_size 2, 3, 4 and 8 (one chunk each): their chunks meet in
    shared batches all the same, and each job gets its own sentence back."""
    sizes = (2, 3, 4, 8)
    jobs = [job(audio_base64=b64(clip), beam_size=1, best_of=1, batch_size=size)
            for clip, size in zip(sentence_clips, sizes, strict=False)]
    results = handle_all(worker, jobs)
    for keyword, result in zip(KEYWORDS, results, strict=False):
        assert keyword in result["transcription"].lower(), result
    assert max(spy.sizes) > 1, spy.sizes
    assert sum(spy.sizes) == len(sizes)


class _Watched(dict):  # type: ignore[type-arg]
    """A dict a weak reference can watch (a plain dict cannot be weakly referenced)."""


def _noise_wav(target: Path, seconds: float, seed: int) -> Path:
    samples = np.random.default_rng(seed).normal(0, 3000, int(16000 * seconds)).clip(-32768, 32767)
    with wave.open(str(target), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(16000)
        out.writeframes(samples.astype("<i2").tobytes())
    return target


def test_no_job_input_outlives_its_job(worker: Worker, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """20 jobs with 20 different batch_size values and 20 s (about 850 KB of base64) inputs: once they
    are answered, nothing the worker keeps (its batchers included) still references any job or its
    input: weak references to them are dead after a collection, while the worker lives on."""
    monkeypatch.setattr(whisper_pipeline.WhisperPipeline, "decode_windows",
                        lambda _pipeline, inputs, _settings: [[] for _ in inputs])  # the inputs are noise
    jobs = [_Watched(id=f"leak-{uuid.uuid4().hex[:8]}",
                     input=_Watched(audio_base64=b64(_noise_wav(tmp_path / f"n{i}.wav", 20, i)), batch_size=2 + i))
            for i in range(20)]
    watched = [weakref.ref(one) for one in jobs] + [weakref.ref(one["input"]) for one in jobs]
    results = handle_all(worker, jobs)
    assert all("error" not in result for result in results), results
    del jobs, results
    gc.collect()
    assert [ref for ref in watched if ref() is not None] == []
    assert worker.runtime.batchers is not None  # the worker, and what it keeps, still lives


def _mel_sum(worker: Worker, clip: Path) -> float:
    """The sum of the one window the worker makes of ``clip`` (how the fixture recognises its chunk)."""
    model = next(iter(worker.runtime.registry.loaded().values())).pipeline.first.model
    audio = openai_whisper.load_audio(str(clip))
    return float(whisper_batch.prepare_windows(model, audio, fixed_chunks(audio))[0].mel.sum())
