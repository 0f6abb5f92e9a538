"""Transcription in chunks through the handler: VAD on every path, and batches shared by concurrent jobs."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import threading
import uuid
import wave
import weakref
from pathlib import Path
from typing import Any

import jiwer
import numpy as np
import pytest
import torch
import whisper as openai_whisper
from whisper.normalizers import EnglishTextNormalizer

from handler.app import Worker
from handler.pipelines.whisper import decoding
from handler.pipelines.whisper import pipeline as whisper_pipeline
from handler.pipelines.whisper.vad import fixed_chunks
from handler.pipelines.whisper.windows import prepare_windows
from handler.runtime.registry import Registry
from testkit import clips, media, speech_corpus
from testkit.sentences import KEYWORDS, SENTENCES
from tests.conftest import b64, job, run_job


class BatchSpy:
    """Records the size of every batch the real decode receives, and can make some of them fail."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.prompts: list[list[tuple[int, ...]]] = []  # each batch's windows' prompts
        self.lock = threading.Lock()
        self.fail_when: Any = None

    def __call__(self, original: Any) -> Any:
        spy = self

        def decode_windows(model: Any, inputs: Any, options: Any) -> Any:
            with spy.lock:
                spy.sizes.append(len(inputs))
                spy.prompts.append([window.prompt for window in inputs])
            if spy.fail_when is not None and spy.fail_when(inputs):
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return original(model, inputs, options)

        return decode_windows


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> BatchSpy:
    recorder = BatchSpy()
    monkeypatch.setattr(decoding, "decode_windows", recorder(decoding.decode_windows))
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
    # Whole-recording windows: no VAD pass (one recording at a time) staggers the jobs' arrival.
    jobs = [job(audio_base64=b64(clip), beam_size=1, best_of=1, enable_vad=False) for clip in sentence_clips[:4]]
    spy.fail_when = lambda inputs: len(inputs) > 1  # only single chunks fit
    results = handle_all(worker, jobs)
    assert all("error" not in r for r in results), results
    assert spy.sizes[0] == 4 and spy.sizes.count(1) == 4

    poisoned = _mel_sum(worker, sentence_clips[2])  # the third job's chunk fails even alone
    spy.fail_when = lambda inputs: len(inputs) > 1 or abs(float(inputs[0].mel.sum()) - poisoned) < 1e-3
    results = handle_all(worker, jobs)
    assert [r.get("error_code") for r in results] == [None, None, "GPU_OOM", None], results
    spy.fail_when = None
    after = run_job(worker, job(audio_base64=b64(sentence_clips[0]), beam_size=1, best_of=1, enable_vad=False))
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
    monkeypatch.setattr(decoding, "decode_windows",
                        lambda _model, inputs, _options: [[] for _ in inputs])  # the inputs are noise
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
    return float(prepare_windows(model, audio, fixed_chunks(audio))[0].mel.sum())


@pytest.mark.parametrize("condition", [True, False])
def test_a_window_is_prompted_with_the_text_before_it_as_whisper_transcribe_does(
    make_worker, spy: BatchSpy, librivox_chunk: tuple[Path, list[str]], tmp_path: Path, condition: bool
) -> None:
    """Real speech in two windows (the LibriVox chunk twice): with condition_on_previous_text (the
    default) the second window is decoded after the first, prompted with its text; without, both
    windows are decoded in one batch, unprompted."""
    audio = openai_whisper.load_audio(str(librivox_chunk[0]))
    path = tmp_path / "twice.wav"
    speech_corpus.write_wav(path, np.concatenate([audio, np.zeros(8000, np.float32), audio]))
    request = job(audio_base64=b64(path), condition_on_previous_text=condition)
    result = run_job(make_worker(RESULT_CACHE="false"), request)
    assert "error" not in result, result
    if not condition:
        assert spy.prompts == [[(), ()]]
        return
    assert spy.sizes[0] == 1 and spy.prompts[0] == [()]
    later = [prompt for batch in spy.prompts[1:] for prompt in batch if prompt]
    assert later, spy.prompts
    tokenizer = openai_whisper.tokenizer.get_tokenizer(False)
    heard = tokenizer.decode([token for token in later[0] if token < tokenizer.eot])
    assert media.words_of(heard) <= media.words_of(result["transcription"]) and len(media.words_of(heard)) > 10


@pytest.fixture(scope="module")
def librivox_chunk(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """pocketsphinx's five real LibriVox utterances (one reader) joined with 0.5 s pauses: 27 s,
    one window; and their transcripts."""
    utterances = speech_corpus.librivox(speech_corpus.default_cache())
    pause = np.zeros(speech_corpus.SAMPLE_RATE // 2, np.float32)
    audio = np.concatenate([part for utterance in utterances for part in (utterance.audio, pause)])
    assert len(audio) / speech_corpus.SAMPLE_RATE < 30
    path = tmp_path_factory.mktemp("librivox") / "joined.wav"
    speech_corpus.write_wav(path, audio)
    return path, [utterance.text for utterance in utterances]


def test_every_real_utterance_of_a_chunk_is_transcribed(make_worker, librivox_chunk: tuple[Path, list[str]]) -> None:
    """Five real utterances in one chunk: the default (batched) path transcribes all of them, the
    last included. Whisper stops a window early when speech runs on near its end, leaving the rest
    to the next window; a chunk has no next window, so that rest is decoded again, or it is lost
    (here the whole last utterance was)."""
    path, texts = librivox_chunk
    result = run_job(make_worker(), job(audio_base64=b64(path), word_timestamps=True))
    normalise = EnglishTextNormalizer()
    error_rate = jiwer.wer(normalise(" ".join(texts)), normalise(result["transcription"]))
    assert error_rate <= 0.1, (error_rate, result["transcription"])
    assert {"even", "himself"} <= media.words_of(result["transcription"]), result["transcription"]
    starts = [segment["start"] for segment in result["segments"]]
    assert starts == sorted(starts) and all(0 <= s["start"] <= s["end"] <= result["duration_s"]
                                            for s in result["segments"])
    times = [(word["start"], word["end"]) for word in result["word_timestamps"]]
    assert all(a <= b <= result["duration_s"] for a, b in times)
    assert [a for a, _ in times] == sorted(a for a, _ in times)


@pytest.fixture(scope="module")
def multilingual_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MODEL_DIR holding a random-weight multilingual Whisper checkpoint named ``random-ml``."""
    from whisper.model import ModelDimensions, Whisper

    torch.manual_seed(5)
    dims = ModelDimensions(n_mels=80, n_audio_ctx=1500, n_audio_state=64, n_audio_head=2, n_audio_layer=1,
                           n_vocab=51865, n_text_ctx=448, n_text_state=64, n_text_head=2, n_text_layer=1)
    model = Whisper(dims)
    torch.nn.init.normal_(model.decoder.positional_embedding, std=0.02)  # torch.empty otherwise
    with torch.no_grad():
        # Random cross-attention averages the 1500 audio positions evenly, so any audio would give
        # the same language; sharp and strong, it makes the language depend on what is heard
        # (with this seed, on whether the window starts with the noise).
        for block in model.decoder.blocks:
            block.cross_attn.query.weight.mul_(100)
            block.cross_attn.out.weight.mul_(100)
    root = tmp_path_factory.mktemp("multilingual")
    (root / "whisper").mkdir()
    torch.save({"dims": dataclasses.asdict(dims), "model_state_dict": model.state_dict()},
               root / "whisper" / "random-ml.pt")
    return root


# Random weights never finish a beam (see test_decoding.py for this numpy 2 deprecation).
@pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context and return_scalar:DeprecationWarning")
@pytest.mark.parametrize("enable_vad", [False, True])
def test_the_chunked_path_detects_the_language_whisper_transcribe_detects(
    make_settings, multilingual_dir: Path, tmp_path: Path, enable_vad: bool, gapped_clip: clips.Clip
) -> None:
    """On a multilingual model, the batched path (fixed windows or VAD chunks) detects the language
    that ``whisper.transcribe`` detects on the same audio: on the recording's first 30 s, not on
    its first chunk (which starts after the leading noise with VAD, and ends before 30 s)."""
    rng = np.random.default_rng(5)
    speech = gapped_clip.audio
    audio = np.concatenate([rng.normal(0, 0.02, 12 * speech_corpus.SAMPLE_RATE).astype(np.float32), speech])
    path = tmp_path / "noise-then-speech.wav"
    speech_corpus.write_wav(path, audio)
    settings = make_settings(MODEL_DIR=str(multilingual_dir), WHISPER_MODEL="random-ml", RESULT_CACHE="false")
    worker = Worker(settings, registry=Registry())
    # In float32, as whisper.transcribe runs it: the detection compared is on the same weights.
    result = run_job(worker, job(audio_base64=b64(path), enable_vad=enable_vad, beam_size=1, best_of=1,
                                 temperature_increment_on_fallback=None, compute_type="float32"))
    model = whisper_pipeline.load_checkpoint(multilingual_dir / "whisper" / "random-ml.pt", "cpu")
    expected = openai_whisper.transcribe(model, openai_whisper.load_audio(str(path)), fp16=False, verbose=None,
                                         temperature=0.0, sample_len=2)["language"]
    assert result["detected_language"] == expected, result.get("error")
