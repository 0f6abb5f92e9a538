"""Bad input gets its code and a message naming the field, leaves nothing behind, and the worker goes on."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from testkit import media
from testkit.servers import HttpServer, redirect_to, serve_bytes
from tests.conftest import assert_no_job_dirs, b64, job, run_job

HLS = b"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\nfile:///etc/passwd\n#EXT-X-ENDLIST\n"


@pytest.mark.parametrize(
    ("inputs", "code", "field"),
    [
        ({"audio": "https://example.com/a.mp3", "colour": "blue"}, "INVALID_INPUT", "colour"),
        ({"audio": "https://example.com/a.mp3", "word_timestamps": "yes"}, "INVALID_INPUT", "word_timestamps"),
        ({"audio": "https://example.com/a.mp3", "temperature": "hot"}, "INVALID_INPUT", "temperature"),
        ({"audio": "https://example.com/a.mp3", "beam_size": 99}, "INVALID_INPUT", "beam_size"),
        ({"audio": "https://example.com/a.mp3", "transcription": "docx"}, "INVALID_INPUT", "transcription"),
        ({"audio": "https://example.com/a.mp3", "audio_base64": "AAAA"}, "INVALID_INPUT", None),
        ({"task": "transcribe"}, "INVALID_INPUT", None),
        ({"task": "paint"}, "INVALID_INPUT", "task"),
        ({"prompt": "a cat"}, "INVALID_INPUT", "task"),
        ({"audio_base64": "not base64 at all!"}, "INVALID_INPUT", "audio_base64"),
        ({"audio": "https://127.0.0.1/a.mp3"}, "DOWNLOAD_FAILED", "audio"),
        ({"audio": "https://169.254.169.254/latest/meta-data/"}, "DOWNLOAD_FAILED", "audio"),
        ({"audio": "https://10.0.0.1/a.mp3"}, "DOWNLOAD_FAILED", "audio"),
        ({"audio": "http://example.com/a.mp3"}, "DOWNLOAD_FAILED", "audio"),
        ({"audio": "file:///etc/passwd"}, "DOWNLOAD_FAILED", "audio"),
        ({"audio": "s3://some-bucket/key.mp3"}, "INVALID_INPUT", "audio"),
        ({"audio": "https://①②⑦.0.0.1/a.mp3"}, "DOWNLOAD_FAILED", "audio"),
        ({"audio": "http://[::1"}, "INVALID_INPUT", "audio"),
        ({"audio": "https://[::7f00:1]/a.mp3"}, "DOWNLOAD_FAILED", "audio"),
        ({"audio": "https://[64:ff9b::a9fe:a9fe]/latest/meta-data/"}, "DOWNLOAD_FAILED", "audio"),
        ({"audio": "https://[2002:a9fe:a9fe::]/a.mp3"}, "DOWNLOAD_FAILED", "audio"),
    ],
)
def test_bad_jobs_get_their_code(make_worker, work_dir: Path, inputs: dict, code: str, field: str | None) -> None:
    """Schema violations, impossible combinations and forbidden URLs, each with its code and field."""
    result = run_job(make_worker(), job(**inputs))
    assert result["error_code"] == code, result
    assert result["error"].startswith(f"{code}: ")
    assert result["retryable"] is False
    if field is not None:
        assert result["field"] == field
        assert field in result["error"]
    assert_no_job_dirs(work_dir)


def test_job_without_input_object(make_worker) -> None:
    """A job whose input is not an object is INVALID_INPUT, not a crash."""
    for bad in ({"id": "x"}, {"id": "x", "input": "audio.mp3"}, "not a job"):
        result = run_job(make_worker(), bad)  # type: ignore[arg-type]
        assert result["error_code"] == "INVALID_INPUT" and result["field"] == "input"


def test_oversize_base64_is_refused_before_decoding(make_worker, work_dir: Path) -> None:
    """Base64 over BASE64_MAX_BYTES is INPUT_TOO_LARGE (checked on the encoded length)."""
    worker = make_worker(BASE64_MAX_BYTES="1000")
    result = run_job(worker, job(audio_base64=base64.b64encode(b"\0" * 4000).decode()))
    assert result["error_code"] == "INPUT_TOO_LARGE" and result["field"] == "audio_base64"
    assert_no_job_dirs(work_dir)


def test_audio_over_max_duration(make_worker, speech_wav: Path) -> None:
    """Audio longer than MAX_AUDIO_DURATION_S is INPUT_TOO_LARGE before decoding."""
    result = run_job(make_worker(MAX_AUDIO_DURATION_S="2"), job(audio_base64=b64(speech_wav)))
    assert result["error_code"] == "INPUT_TOO_LARGE"


def _truncated_mp3(source: Path, target: Path) -> bytes:
    data = source.read_bytes()
    return data[: len(data) // 2]


@pytest.mark.parametrize("kind", ["text", "hls", "truncated_mp3", "empty", "header_only_mp3"])
def test_bad_media_is_invalid_input(make_worker, work_dir: Path, speech_mp3: Path, tmp_path: Path, kind: str) -> None:
    """Text, playlists, truncated and empty files are INVALID_INPUT; the next job is served."""
    payload = {
        "text": b"hello, this is not audio\n" * 20,
        "hls": HLS,
        "truncated_mp3": _truncated_mp3(speech_mp3, tmp_path / "t.mp3"),
        "empty": b"",
        "header_only_mp3": speech_mp3.read_bytes()[:300],
    }[kind]
    worker = make_worker()
    result = run_job(worker, job(audio_base64=base64.b64encode(payload).decode()))
    assert result["error_code"] == "INVALID_INPUT", result
    assert result["field"] == "audio_base64"
    assert str(work_dir) not in result["error"] and "input.media" not in result["error"]  # no worker paths
    assert_no_job_dirs(work_dir)
    good = run_job(worker, job(audio_base64=b64(speech_mp3)))
    assert media.recognised(good["transcription"]) >= 0.7


@pytest.mark.parametrize("target", ["http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/a.mp3",
                                    "http://[::1]:9/a.mp3"])
def test_redirect_to_internal_address(make_worker, work_dir: Path, target: str) -> None:
    """A URL that redirects to an internal address is refused at the redirect.

    The redirecting server itself runs on loopback, so only its exact address is allowed
    (DOWNLOAD_ALLOWED_NETWORKS=127.0.0.1/32); the targets are refused by the default rules.
    """
    worker = make_worker(DOWNLOAD_ALLOW_HTTP="true", DOWNLOAD_ALLOWED_NETWORKS="127.0.0.1/32")
    with HttpServer({"/a.mp3": redirect_to(target)}) as server:
        result = run_job(worker, job(audio=server.url("/a.mp3")))
    assert result["error_code"] == "DOWNLOAD_FAILED" and result["retryable"] is False
    assert "refused" in result["error"]
    assert_no_job_dirs(work_dir)


def test_url_input_is_downloaded_and_transcribed(make_worker, speech_mp3: Path, work_dir: Path) -> None:
    """An allowed URL is fetched into the job directory and transcribed; Whisper never sees the URL."""
    worker = make_worker(DOWNLOAD_ALLOW_HTTP="true", DOWNLOAD_ALLOWED_NETWORKS="127.0.0.1/32")
    with HttpServer({"/speech.mp3": serve_bytes(speech_mp3.read_bytes(), "audio/mpeg")}) as server:
        result = run_job(worker, job(audio=server.url("/speech.mp3")))
    assert media.recognised(result["transcription"]) >= 0.7
    assert result["timings"]["download_ms"] > 0
    assert_no_job_dirs(work_dir)


def test_data_uri_base64_is_accepted(make_worker, speech_mp3: Path) -> None:
    """audio_base64 may be a data: URI, as browsers produce."""
    result = run_job(make_worker(), job(audio_base64="data:audio/mpeg;base64," + b64(speech_mp3)))
    assert media.recognised(result["transcription"]) >= 0.7


@pytest.mark.parametrize(
    ("option", "value"),
    [("temperature_increment_on_fallback", 1e-7), ("temperature_increment_on_fallback", 1e-12),
     ("patience", 1000.0), ("patience", 1e308), ("logprob_threshold", -1e9), ("logprob_threshold", 5.0),
     ("compression_ratio_threshold", 1e9), ("compression_ratio_threshold", 0.0), ("no_speech_threshold", 5.0),
     ("temperature", float("nan")), ("no_speech_threshold", float("inf")), ("suppress_tokens", "1," * 1500),
     ("initial_prompt", "x" * 5000)],
)
def test_decoding_options_are_bounded(make_worker, option: str, value: object) -> None:
    """Every decoding option is bounded so one job's work stays bounded: values past the bounds (which
    would build millions of fallback temperatures or search for minutes) are INVALID_INPUT naming the field."""
    result = run_job(make_worker(), job(audio="https://example.com/a.mp3", **{option: value}))
    assert (result["error_code"], result["field"], result["retryable"]) == ("INVALID_INPUT", option, False)


@pytest.mark.parametrize("tokens", ["99999", "-1,51864", "-5"])
def test_suppress_tokens_outside_the_vocabulary(make_worker, speech_mp3: Path, tokens: str) -> None:
    """Token ids the served model does not have are INVALID_INPUT (on CUDA they would be a device-side
    assert that kills the worker), found before the GPU slot."""
    result = run_job(make_worker(), job(audio_base64=b64(speech_mp3), suppress_tokens=tokens))
    assert (result["error_code"], result["field"]) == ("INVALID_INPUT", "suppress_tokens"), result


def test_suppress_tokens_as_peers_send_them(make_worker, speech_mp3: Path) -> None:
    """The spellings worker-faster_whisper's clients send ("-1,50362", spaces after commas) work."""
    result = run_job(make_worker(), job(audio_base64=b64(speech_mp3), suppress_tokens="-1, 50362"))
    assert media.recognised(result["transcription"]) >= 0.7, result
