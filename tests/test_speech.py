"""`speech` on a tiny random-weight VITS model, loaded through the production path."""

from __future__ import annotations

import base64
import io
import wave
from pathlib import Path

import pytest

from handler.pipelines.speech.pipeline import split_sentences
from tests.conftest import assert_no_job_dirs, job, run_job


def wav_of(result: dict) -> wave.Wave_read:
    (stored,) = result["files"]
    assert stored["name"] == "speech.wav" and stored["content_type"] == "audio/wav"
    return wave.open(io.BytesIO(base64.b64decode(stored["base64"])))


@pytest.fixture
def speaker(make_worker, tiny_vits: Path):
    return make_worker(TTS_MODEL=str(tiny_vits))


def test_text_becomes_a_16_bit_wav(speaker, work_dir: Path) -> None:
    """Two sentences give one mono 16-bit WAV at the model's rate, as long as reported."""
    result = run_job(speaker, job(task="speech", text="Hello there. This is a test of the voice.", seed=7))
    assert "error" not in result, result
    audio = wav_of(result)
    assert (audio.getnchannels(), audio.getsampwidth(), audio.getframerate()) == (1, 2, 16000)
    assert audio.getnframes() / 16000 == pytest.approx(result["duration_s"], abs=0.01)
    assert result["sentences"] == 2 and result["seed"] == 7
    assert audio.getnframes() > 0
    assert_no_job_dirs(work_dir)


def test_same_seed_same_audio_other_seed_other_audio(speaker) -> None:
    """The seed fixes the voice's random variation."""
    first = run_job(speaker, job(task="speech", text="Same words.", seed=1))
    again = run_job(speaker, job(task="speech", text="Same words.", seed=1))
    other = run_job(speaker, job(task="speech", text="Same words.", seed=2))
    assert first["files"][0]["base64"] == again["files"][0]["base64"]
    assert first["files"][0]["base64"] != other["files"][0]["base64"]


def test_long_text_is_refused_before_loading(make_fresh_worker, tiny_vits: Path) -> None:
    """Text over MAX_SPEECH_CHARS is INPUT_TOO_LARGE, and no model was loaded for it (a registry of
    its own shows it)."""
    worker = make_fresh_worker(TTS_MODEL=str(tiny_vits), MAX_SPEECH_CHARS="20")
    result = run_job(worker, job(task="speech", text="This sentence is longer than twenty characters."))
    assert result["error_code"] == "INPUT_TOO_LARGE" and result["field"] == "text"
    assert worker.runtime.registry.loaded() == {}


@pytest.mark.parametrize("text", ["😀😀", "🎉 🎉 ✨", "\u200b\u200b"])
def test_nothing_speakable_is_refused(speaker, text: str) -> None:
    """Text the voice has no letters for is INVALID_INPUT, never a 0-second WAV."""
    result = run_job(speaker, job(task="speech", text=text))
    assert result["error_code"] == "INVALID_INPUT" and result["field"] == "text", result


def test_only_the_configured_model_is_served(speaker) -> None:
    """A job cannot choose another speech model (or a path)."""
    result = run_job(speaker, job(task="speech", text="Hi.", model="/tmp"))
    assert result["error_code"] == "INVALID_INPUT" and result["field"] == "model"


def test_missing_model_is_model_load_failed(make_worker, tmp_path: Path) -> None:
    """A repo id that is not baked (and downloads off) is MODEL_LOAD_FAILED, not a crash."""
    result = run_job(make_worker(TTS_MODEL="nobody/not-baked"), job(task="speech", text="Hi."))
    assert result["error_code"] == "MODEL_LOAD_FAILED"


def test_sentences_are_split_and_long_ones_cut() -> None:
    """Text splits at sentence ends; a sentence over the piece limit is cut at a comma or space."""
    assert split_sentences("One. Two! Three? Four") == ["One.", "Two!", "Three?", "Four"]
    long = "word, " * 100
    pieces = split_sentences(long, max_chars=50)
    assert all(len(p) <= 50 for p in pieces)
    assert " ".join(pieces).replace(" ", "") == long.strip().replace(" ", "")
