"""Drop-in for the official workers' clients: their own test inputs, their storage variables."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from handler.config import load_settings, split_bucket_endpoint
from testkit import media
from testkit.jobserver import LocalApi
from testkit.servers import HttpServer, SeaweedS3, serve_bytes
from tests.conftest import CAPTURED_LOGS, b64, job, run_job

pytestmark = pytest.mark.integration

_PEER_OPTIONS = {  # every field as runpod-workers/worker-faster_whisper sends it, but the audio
    "transcription": "plain text", "translate": False, "temperature": 0, "best_of": 5, "beam_size": 5,
    "suppress_tokens": "-1", "condition_on_previous_text": False, "temperature_increment_on_fallback": 0.2,
    "compression_ratio_threshold": 2.4, "logprob_threshold": -1, "no_speech_threshold": 0.6,
}
PEER_INPUTS = {
    "test_input.json": {"model": "turbo", **_PEER_OPTIONS},
    ".runpod/tests.json": {"model": "turbo", **_PEER_OPTIONS},
    ".github/tests.json": {"model": "base", **_PEER_OPTIONS},
}


@pytest.mark.slow
def test_peer_test_inputs_complete_through_the_local_api(tmp_path: Path, model_dir: Path, speech_wav: Path) -> None:
    """worker-faster_whisper's three test inputs, verbatim but for the audio URL (a loopback server),
    complete through `--rp_serve_api` /runsync on a worker serving tiny.en with a model-name map; the
    result names the model that ran, and segments are numbered from 1 as the peer numbers them."""
    with HttpServer({"/speech.wav": serve_bytes(speech_wav.read_bytes(), "audio/wav")}) as audio_server:
        api = LocalApi(tmp_path, MODEL_DIR=str(model_dir), WHISPER_MODEL="tiny.en",
                       WHISPER_MODEL_MAP="turbo=tiny.en,base=tiny.en", DOWNLOAD_ALLOW_HTTP="true",
                       DOWNLOAD_ALLOWED_NETWORKS="127.0.0.1/32")
        try:
            with api:
                replies: dict[str, Any] = {
                    name: api.runsync({"audio": audio_server.url("/speech.wav"), **inputs})
                    for name, inputs in PEER_INPUTS.items()
                }
        finally:
            CAPTURED_LOGS.write(api.log_path.read_text(errors="replace"))
    for name, reply in replies.items():
        assert reply.get("status") == "COMPLETED", (name, reply)
        output = reply["output"]
        assert output["model"] == "tiny.en"
        assert media.recognised(output["transcription"]) >= 0.7, output["transcription"]
        assert output["segments"][0]["id"] == 1


def test_unmapped_model_names_are_refused_naming_what_is_served(make_settings) -> None:
    """A name neither served nor mapped is INVALID_INPUT listing served models and accepted names; a map
    to a model the worker does not serve stops it at start."""
    from handler.app import Worker
    from handler.config import SettingsError

    worker = Worker(make_settings(WHISPER_MODEL_MAP="base=tiny.en"))
    result = run_job(worker, job(audio="https://example.com/a.mp3", model="large-v2"))
    assert result["error_code"] == "INVALID_INPUT" and result["field"] == "model"
    assert "tiny.en" in result["error"] and "base" in result["error"]
    with pytest.raises(SettingsError, match="not served"):
        make_settings(WHISPER_MODEL_MAP="base=large-v3")


def test_transcription_formats_as_peers_spell_them(make_worker, speech_wav: Path) -> None:
    """"plain text", "formatted text", "SRT" are the formats plain_text, formatted_text and srt."""
    worker = make_worker()
    formatted = run_job(worker, job(audio_base64=b64(speech_wav), transcription="formatted text",
                                    translation="Plain-Text", beam_size=1, best_of=1))
    assert "error" not in formatted, formatted
    srt = run_job(worker, job(audio_base64=b64(speech_wav), transcription="SRT", beam_size=1, best_of=1))
    assert srt["transcription"].startswith("1\n00:00:")


def test_bucket_from_the_sdk_variables_alone(make_worker, s3: SeaweedS3, speech_wav: Path) -> None:
    """Only BUCKET_ENDPOINT_URL, BUCKET_ACCESS_KEY_ID and BUCKET_SECRET_ACCESS_KEY (as runpod's rp_upload
    reads them): the worker starts and uploads to the bucket rp_upload would use, named after the month."""
    monthly = time.strftime("%m-%y")
    s3.create_bucket(monthly)
    env = {"BUCKET_ENDPOINT_URL": s3.endpoint, "BUCKET_ACCESS_KEY_ID": s3.access_key,
           "BUCKET_SECRET_ACCESS_KEY": s3.secret_key}
    result = run_job(make_worker(**env), job(audio_base64=b64(speech_wav), beam_size=1, best_of=1))
    assert "error" not in result, result
    listed = s3.client().list_objects_v2(Bucket=monthly)
    keys = {item["Key"] for item in listed.get("Contents", [])}
    assert {f["key"] for f in result["files"]} <= keys and keys


@pytest.mark.parametrize(
    ("url", "endpoint", "bucket", "region"),
    [("https://media.s3.eu-west-1.amazonaws.com", "https://s3.eu-west-1.amazonaws.com", "media", "eu-west-1"),
     ("https://my.media.s3.amazonaws.com", "https://s3.amazonaws.com", "my.media", None),
     ("https://clips.nyc3.digitaloceanspaces.com", "https://nyc3.digitaloceanspaces.com", "clips", "nyc3"),
     ("https://s3.us-west-2.amazonaws.com", "https://s3.us-west-2.amazonaws.com", None, "us-west-2"),
     ("https://x.s3.us-west-004.backblazeb2.com", "https://x.s3.us-west-004.backblazeb2.com", None,
      "us-west-004"),
     ("http://127.0.0.1:8333", "http://127.0.0.1:8333", None, None)],
)
def test_endpoint_urls_as_rp_upload_reads_them(url: str, endpoint: str, bucket: str | None,
                                               region: str | None) -> None:
    """A virtual-hosted endpoint gives the bucket (so it is never doubled in the key) and the region; a
    path-style endpoint is used as is, with the region read from it as rp_upload does."""
    assert split_bucket_endpoint(url) == (endpoint, bucket, region)
    settings = load_settings({"BUCKET_ENDPOINT_URL": url, "BUCKET_ACCESS_KEY_ID": "AKX123",
                              "BUCKET_SECRET_ACCESS_KEY": "secret-" + uuid.uuid4().hex})
    assert settings.bucket is not None
    assert settings.bucket.endpoint_url == endpoint and settings.bucket.name == bucket
    assert settings.bucket.bucket_name() == (bucket or time.strftime("%m-%y"))
