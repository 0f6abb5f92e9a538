"""Transcription end to end on real Whisper tiny.en weights and espeak-ng speech."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from handler.errors import GenerationTimeout
from handler.pipelines.whisper.pipeline import get_pipelines
from handler.pipelines.whisper.transcript import CAPTION_OPTIONS
from handler.tasks.transcribe import TranscribeInput, preload
from testkit import media
from tests.conftest import CAPTURED_LOGS, assert_no_job_dirs, b64, job, run_job

ROOT = Path(__file__).resolve().parents[1]


def test_handler_transcribes_speech(make_worker, speech_wav: Path, work_dir: Path) -> None:
    """Calling the handler on espeak speech gives a transcript with the spoken words."""
    result = run_job(make_worker(), job(audio_base64=b64(speech_wav)))
    assert "error" not in result, result
    assert media.recognised(result["transcription"]) >= 0.7, result["transcription"]
    assert result["detected_language"] == "en"
    assert result["model"] == "tiny.en"
    assert len(result["request_id"]) == 32
    assert {"download_ms", "decode_ms", "load_ms", "queued_ms", "run_ms", "upload_ms", "total_ms"} <= set(
        result["timings"]
    )
    assert result["segments"] and result["segments"][0]["end"] > result["segments"][0]["start"]
    assert_no_job_dirs(work_dir)


def test_word_timestamps_are_ordered(make_worker, speech_mp3: Path) -> None:
    """Word timings come back in order, inside the audio, with the recognised words."""
    result = run_job(make_worker(), job(audio_base64=b64(speech_mp3), word_timestamps=True))
    words = result["word_timestamps"]
    assert media.recognised(" ".join(w["word"] for w in words)) >= 0.7
    starts = [w["start"] for w in words]
    assert starts == sorted(starts)
    assert all(0 <= w["start"] <= w["end"] <= result["duration_s"] + 0.5 for w in words)


@pytest.mark.parametrize(("fmt", "marker"), [("srt", " --> "), ("vtt", "WEBVTT"), ("formatted_text", "")])
def test_output_formats(make_worker, speech_wav: Path, fmt: str, marker: str) -> None:
    """`transcription` honours the requested format; SRT/VTT files come back inline without a bucket."""
    result = run_job(make_worker(), job(audio_base64=b64(speech_wav), transcription=fmt))
    assert marker in result["transcription"]
    assert media.recognised(result["transcription"]) >= 0.7
    names = {f["name"]: f for f in result["files"]}
    assert set(names) == {"transcript.srt", "transcript.vtt"}
    assert "base64" in names["transcript.srt"] and "url" not in names["transcript.srt"]


@pytest.mark.parametrize("batch_size", [None, 1], ids=["batched", "sequential"])
def test_silence_gives_empty_transcript(make_worker, tmp_path: Path, batch_size: int | None) -> None:
    """Silence is not an error: on either path the transcript, and the translation asked for, are empty."""
    result = run_job(make_worker(), job(audio_base64=b64(media.silence(tmp_path / "s.wav", 3.0)),
                                        batch_size=batch_size, translate=True))
    assert "error" not in result, result
    assert result["transcription"] == "" and result["translation"] == ""
    assert result["segments"] == [] and result["translation_segments"] == []


def test_captions_are_timed_with_the_transcription_defaults() -> None:
    """text2video's captions decode as a transcription job with only word_timestamps set would."""
    defaults = TranscribeInput.model_construct(word_timestamps=True).decode_options()
    assert dict(CAPTION_OPTIONS) == defaults


def test_preload_warms_up_only_a_borrowed_instance(make_worker) -> None:
    """The warm-up (a decode, on CUDA) waits for a free instance like any job: with the only copy
    held, preload gives up at the acquire timeout rather than decode on a model in use."""
    worker = make_worker(GENERATION_ACQUIRE_TIMEOUT="0.2")
    pipelines = get_pipelines(worker.runtime, "tiny.en")
    with pipelines.borrow(1.0), pytest.raises(GenerationTimeout):
        preload(worker.runtime)
    preload(worker.runtime)


def test_video_file_is_transcribed(make_worker, speech_wav: Path, tmp_path: Path) -> None:
    """A video container with an audio track is transcribed from its audio."""
    video = tmp_path / "clip.mp4"
    subprocess.run(
        ["ffmpeg", "-nostdin", "-v", "error", "-f", "lavfi", "-i", "color=c=black:s=64x64:r=5",
         "-i", str(speech_wav), "-shortest", "-c:v", "libx264", "-c:a", "aac", str(video)],
        check=True,
    )
    result = run_job(make_worker(), job(audio_base64=b64(video)))
    assert media.recognised(result["transcription"]) >= 0.7


def test_english_only_model_translates_to_its_transcript_and_refuses_french(make_worker, speech_wav: Path) -> None:
    """tiny.en hears English only, so its translation into English is its transcript (on the sequential
    and the batched path, segments included); French is INVALID_INPUT naming the field, before any GPU work."""
    worker = make_worker()
    for batch in (1, 8):
        translated = run_job(worker, job(audio_base64=b64(speech_wav), translate=True, batch_size=batch))
        assert translated["translation"] == translated["transcription"], translated
        assert media.recognised(translated["translation"]) >= 0.7
        assert translated["translation_segments"] == translated["segments"]
    french = run_job(worker, job(audio_base64=b64(speech_wav), language="french"))
    assert french["error_code"] == "INVALID_INPUT" and french["field"] == "language"


def test_model_outside_the_served_set_is_refused(make_worker, speech_wav: Path) -> None:
    """A job cannot make the worker load an arbitrary model or path."""
    result = run_job(make_worker(), job(audio_base64=b64(speech_wav), model="/etc/passwd"))
    assert result["error_code"] == "INVALID_INPUT"
    assert result["field"] == "model"


def test_missing_weights_give_model_load_failed(make_worker, speech_wav: Path) -> None:
    """A served model without weights (and no download allowed) is MODEL_LOAD_FAILED, not a crash."""
    worker = make_worker(WHISPER_MODELS="base.en")
    result = run_job(worker, job(audio_base64=b64(speech_wav), model="base.en"))
    assert result["error_code"] == "MODEL_LOAD_FAILED"
    assert result["retryable"] is False


def test_decode_options_match_faster_whisper_names() -> None:
    """Inputs of worker-faster_whisper map onto openai-whisper's options with the same meaning."""
    params = TranscribeInput.model_validate(
        {"audio": "https://example.com/a.mp3", "temperature": 0.2, "temperature_increment_on_fallback": 0.4,
         "beam_size": 3, "best_of": 2, "language": "English", "initial_prompt": "Minutes."}
    )
    options = params.decode_options()
    assert options["temperature"] == pytest.approx((0.2, 0.6, 1.0))
    assert options["language"] == "en"
    assert (options["beam_size"], options["best_of"], options["initial_prompt"]) == (3, 2, "Minutes.")


@pytest.mark.integration
@pytest.mark.slow
def test_local_mode_runs_test_input(model_dir: Path, speech_wav: Path, tmp_path: Path) -> None:
    """`python -m handler --test_input` (RunPod's local mode) prints the transcript and exits 0."""
    # Opus keeps the JSON well under the kernel's limit for one argument (128 KiB).
    opus = media.encode(speech_wav, tmp_path / "speech.ogg", "-ac", "1", "-c:a", "libopus", "-b:a", "16k")
    payload = json.dumps({"input": {"audio_base64": b64(opus)}})
    work = tmp_path / "jobs"
    work.mkdir()
    env = {
        **os.environ, "MODEL_DIR": str(model_dir), "WHISPER_MODEL": "tiny.en",
        "ALLOW_MODEL_DOWNLOAD": "false", "WORK_DIR": str(work), "DEVICE": "cpu",
    }
    done = subprocess.run(
        [sys.executable, "-m", "handler", "--test_input", payload],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=180,
    )
    output = done.stdout + done.stderr
    CAPTURED_LOGS.write(output)  # checked for secrets with the rest of the suite's logs
    assert done.returncode == 0, output[-3000:]
    result_line = next(line for line in output.splitlines() if "Job result:" in line)
    assert media.recognised(result_line) >= 0.7, result_line
    assert "request_id" in output
    assert "DEBUG  |" not in output  # the SDK runs at INFO: at DEBUG it logs whole outputs
    assert list(work.iterdir()) == []


@pytest.mark.integration
def test_committed_test_input_is_a_transcription() -> None:
    """test_input.json is a valid transcription job the worker's schema accepts."""
    data = json.loads((ROOT / "test_input.json").read_text())
    params = TranscribeInput.model_validate(data["input"])
    assert params.audio_base64 is not None
