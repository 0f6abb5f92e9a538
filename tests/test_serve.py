"""Serve mode end to end: `python -m handler serve` (real uvicorn on loopback, real tiny models)
driven by the official `openai` client, raw sockets and plain HTTP."""

from __future__ import annotations

import base64
import io
import itertools
import json
import socket
import struct
import subprocess
import threading
import time
import urllib.error
import urllib.request
import wave
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jiwer
import numpy as np
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from whisper.normalizers import EnglishTextNormalizer

from testkit import media, speech_corpus
from testkit.jobserver import LOOPBACK, ServeProcess, serving
from testkit.sentences import KEYWORDS, SENTENCES
from tests.conftest import remember_secret

pytestmark = [pytest.mark.integration,
              # The client marks its translations route deprecated (OpenAI's own whisper-1 retirement).
              pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")]

KEY = remember_secret("sk-serve-test-" + "7f3a9c2e5b1d")
MAX_BYTES = 3_000_000
MAX_REQUESTS = 9
UPLOAD_DEADLINE_S = 4


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, model_dir: Path, tiny_vits: Path,
           tiny_sd: Path, voice_encoder: Path) -> Iterator[ServeProcess]:
    """One serving worker for the module: tiny.en (whisper-1 and gpt-4o-transcribe-diarize mapped to
    it), tiny VITS, tiny SD, the real voice encoder."""
    work = tmp_path_factory.mktemp("serve") / "jobs"
    work.mkdir()
    with serving(
        work, MODEL_DIR=str(model_dir), WHISPER_MODEL="tiny.en",
        WHISPER_MODEL_MAP="whisper-1=tiny.en,gpt-4o-transcribe-diarize=tiny.en",
        TTS_MODEL=str(tiny_vits), IMAGE_MODEL=str(tiny_sd), WHISPER_BATCH_WINDOW_MS="300", RESULT_CACHE="false",
        MAX_CONCURRENT_REQUESTS=str(MAX_REQUESTS), DOWNLOAD_MAX_BYTES=str(MAX_BYTES), API_KEY=KEY,
        PRELOAD="transcribe", DOWNLOAD_TIMEOUT_S=str(UPLOAD_DEADLINE_S),
    ) as server:
        yield server
    assert KEY not in server.log_text()


@pytest.fixture(scope="module")
def client(served: ServeProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{served.url}/v1", api_key=KEY, max_retries=0, timeout=120)


# Four sentences in one recording (15 s): tiny.en makes several segments of them.
LONG_SENTENCES = 4


@pytest.fixture(scope="module")
def long_speech(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first LONG_SENTENCES sentences in one recording: several segments."""
    return media.speak(" ".join(SENTENCES[:LONG_SENTENCES]), tmp_path_factory.mktemp("long") / "long.wav")


def upload(path: Path) -> tuple[str, bytes]:
    return path.name, path.read_bytes()


def metrics(served: ServeProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """/metrics parsed by prometheus_client's own parser: (sample name, labels) -> value."""
    request = urllib.request.Request(  # noqa: S310 (loopback)
        f"{served.url}/metrics", headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 (loopback)
        text = response.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def batches(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> tuple[float, float]:
    """(batches run, items in them) of the Whisper batcher."""
    labels = (("batcher", "whisper/tiny.en/cpu/int8"),)
    return samples.get(("worker_batch_size_count", labels), 0.0), samples.get(("worker_batch_size_sum", labels), 0.0)


def post_json(url: str, body: dict[str, Any], *, key: str | None = KEY,
              timeout: float = 60) -> tuple[int, dict[str, str], dict[str, Any]]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)  # noqa: S310 (loopback)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 (loopback)
            status, found, raw = response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        status, found, raw = exc.code, exc.headers, exc.read()
    return status, {k.lower(): v for k, v in found.items()}, json.loads(raw) if raw else {}


def assert_openai_error(body: dict[str, Any], *, code: str | None = None, param: str | None = None) -> None:
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    if code is not None:
        assert body["error"]["code"] == code, body
    if param is not None:
        assert body["error"]["param"] == param, body


@pytest.fixture(scope="module")
def real_speech(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """Two real LibriVox utterances (pocketsphinx's test data, one reader) with a 0.5 s pause, and their text."""
    utterances = speech_corpus.librivox(speech_corpus.default_cache())[:2]
    pause = np.zeros(speech_corpus.SAMPLE_RATE // 2, dtype=np.float32)
    path = tmp_path_factory.mktemp("real") / "librivox.wav"
    speech_corpus.write_wav(path, np.concatenate([utterances[0].audio, pause, utterances[1].audio]))
    return path, " ".join(u.text for u in utterances)


def word_error_rate(reference: str, text: str) -> float:
    """WER of ``text`` (subtitle numbering and timing lines dropped) against ``reference``."""
    spoken = " ".join(line for line in text.splitlines()
                      if line.strip() and "-->" not in line and not line.strip().isdigit() and line != "WEBVTT")
    normalise = EnglishTextNormalizer()
    return float(jiwer.wer(normalise(reference), normalise(spoken)))


@pytest.mark.parametrize("route", ["transcriptions", "translations"])
def test_openai_client_in_every_response_format(client: openai.OpenAI, real_speech: tuple[Path, str],
                                                route: str) -> None:
    """The official client transcribes real speech in json, text, srt, vtt and verbose_json; verbose_json
    carries segment timestamps and word timestamps in time order. Translations (one formatter serves
    both routes) in json, text and verbose_json."""
    api = client.audio.transcriptions if route == "transcriptions" else client.audio.translations
    translate = route == "translations"
    extra: dict[str, Any] = {} if translate else {"timestamp_granularities": ["word", "segment"]}
    formats = ["json", "text", "verbose_json"] if translate else ["json", "text", "srt", "vtt", "verbose_json"]
    # json is asked for by leaving the format out: the default.
    asks = [{} if fmt == "json" else {"response_format": fmt, **(extra if fmt == "verbose_json" else {})}
            for fmt in formats]
    speech, reference = real_speech
    with ThreadPoolExecutor(len(asks)) as pool:  # sent at once: they share one batch, which keeps this quick
        answers = dict(zip(formats, pool.map(lambda ask: api.create(model="whisper-1", file=upload(speech), **ask),
                                             asks), strict=True))
    plain, text, verbose = answers["json"], answers["text"], answers["verbose_json"]
    assert word_error_rate(reference, plain.text) <= 0.25, plain
    assert isinstance(text, str) and word_error_rate(reference, text) <= 0.25
    if not translate:
        srt, vtt = answers["srt"], answers["vtt"]
        assert "-->" in srt and "00:00:" in srt and word_error_rate(reference, srt) <= 0.25, srt
        assert vtt.startswith("WEBVTT") and word_error_rate(reference, vtt) <= 0.25, vtt
    assert verbose.language == "english" and verbose.duration > 5 and word_error_rate(reference, verbose.text) <= 0.25
    segments = verbose.segments
    assert segments and [s.id for s in segments] == list(range(len(segments)))
    assert all(s.start < s.end for s in segments) and segments[-1].end <= verbose.duration + 0.5
    if not translate:
        words = verbose.words
        assert words and len(words) >= 12
        assert all(a.start <= b.start for a, b in itertools.pairwise(words))
        assert word_error_rate(reference, " ".join(w.word for w in words)) <= 0.25


def test_streamed_transcription_sends_a_delta_per_segment(client: openai.OpenAI, long_speech: Path) -> None:
    """stream=true: server-sent text deltas, one per decoded segment, then the done event with the whole text."""
    with ThreadPoolExecutor(2) as pool:  # at once: one batch
        streamed = pool.submit(lambda: list(client.audio.transcriptions.create(
            model="whisper-1", file=upload(long_speech), stream=True)))
        whole = pool.submit(client.audio.transcriptions.create, model="whisper-1", file=upload(long_speech),
                            response_format="verbose_json")
        events, verbose = streamed.result(), whole.result()
    deltas = [event.delta for event in events if event.type == "transcript.text.delta"]
    assert events[-1].type == "transcript.text.done" and [e.type for e in events[:-1]] == ["transcript.text.delta"] * (
        len(events) - 1)
    spoken = KEYWORDS[:LONG_SENTENCES]
    assert "".join(deltas) == events[-1].text and all(word in events[-1].text.lower() for word in spoken)
    assert verbose.segments is not None and len(verbose.segments) > 1
    assert len(deltas) == len(verbose.segments)


def _probe(data: bytes, folder: Path, name: str) -> dict[str, Any]:
    path = folder / name
    path.write_bytes(data)
    done = subprocess.run(["ffprobe", "-v", "error", "-show_format", "-show_streams", "-of", "json", str(path)],
                          capture_output=True, timeout=30, check=True)
    return json.loads(done.stdout)


def test_speaks_and_draws(client: openai.OpenAI, tmp_path: Path) -> None:
    """/v1/audio/speech answers mp3 by default (OpenAI's default; ffprobe decodes it), wav, opus and flac
    when asked, slower speech for a lower `speed`; an unknown format is refused naming `response_format`.
    /v1/images/generations answers n PNGs of the asked size as b64_json."""
    say = "Hello there. How are you?"
    asks: list[dict[str, Any]] = [{}, {"response_format": "wav", "speed": 0.5}, {"response_format": "wav", "speed": 2},
                                  {"response_format": "opus"}, {"response_format": "flac"}]
    with ThreadPoolExecutor(len(asks)) as pool:
        mp3, slow, fast, opus, flac = pool.map(
            lambda ask: client.audio.speech.create(model="tts-1", voice="alloy", input=say, **ask).content, asks)
    found = _probe(mp3, tmp_path, "speech.mp3")
    assert found["format"]["format_name"] == "mp3" and float(found["format"]["duration"]) > 0.1, found
    assert found["streams"][0]["codec_name"] == "mp3"
    assert _probe(opus, tmp_path, "speech.opus")["streams"][0]["codec_name"] == "opus"
    assert _probe(flac, tmp_path, "speech.flac")["streams"][0]["codec_name"] == "flac"
    with wave.open(io.BytesIO(slow)) as slow_wav, wave.open(io.BytesIO(fast)) as fast_wav:
        assert slow_wav.getframerate() == 16000 and fast_wav.getnframes() > 1000
        assert slow_wav.getnframes() > 2 * fast_wav.getnframes()
    with pytest.raises(openai.BadRequestError) as refused:
        client.audio.speech.create(model="tts-1", voice="alloy", input=say,
                                   response_format="ogg")  # type: ignore[arg-type]
    assert_openai_error(refused.value.response.json(), code="INVALID_INPUT", param="response_format")
    drawn = client.images.generate(prompt="a red square", size="128x64", response_format="b64_json", n=2)
    assert drawn.data is not None and len(drawn.data) == 2
    for image in drawn.data:
        assert image.b64_json is not None
        png = base64.b64decode(image.b64_json)
        assert png.startswith(b"\x89PNG") and struct.unpack(">II", png[16:24]) == (128, 64)


def test_models_list_what_is_served(client: openai.OpenAI, tiny_vits: Path) -> None:
    """/v1/models lists the served Whisper model, its alias whisper-1, the speech and image models."""
    ids = {model.id for model in client.models.list()}
    assert {"tiny.en", "whisper-1", str(tiny_vits), "tts-1"} <= ids


@pytest.mark.slow
def test_eight_concurrent_requests_share_batches(served: ServeProcess, client: openai.OpenAI,
                                                 sentence_clips: list[Path]) -> None:
    """Eight transcriptions sent at once over HTTP meet in shared Whisper batches (counted by the worker's
    batcher, read from /metrics), and each request gets its own sentence back."""
    before = batches(metrics(served))

    def transcribe(clip: Path) -> str:
        return client.audio.transcriptions.create(model="whisper-1", file=upload(clip)).text.lower()

    with ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(transcribe, sentence_clips))
    for keyword, text in zip(KEYWORDS, texts, strict=True):
        assert keyword in text and not any(other in text for other in KEYWORDS if other != keyword), (keyword, text)
    after = batches(metrics(served))
    ran, items = after[0] - before[0], after[1] - before[1]
    assert items == 8 and ran < 8, (ran, items)


def test_not_media_unknown_model_and_missing_key(served: ServeProcess, client: openai.OpenAI,
                                                 speech_wav: Path) -> None:
    """Not media: 400 naming `file`; an unknown model: 400 naming what is served; no key or a wrong one: 401;
    all in OpenAI's error shape."""
    with pytest.raises(openai.BadRequestError) as bad_media:
        client.audio.transcriptions.create(model="whisper-1", file=("notes.wav", b"just some text, not audio" * 40))
    assert bad_media.value.status_code == 400
    assert_openai_error(bad_media.value.response.json(), code="INVALID_INPUT", param="file")
    with pytest.raises(openai.BadRequestError) as unknown:
        client.audio.transcriptions.create(model="whisper-9", file=upload(speech_wav))
    assert_openai_error(unknown.value.response.json(), code="INVALID_INPUT", param="model")
    assert "tiny.en" in unknown.value.response.json()["error"]["message"]
    for key in ("wrong-key", None):
        status, _, body = post_json(f"{served.url}/v1/jobs", {"input": {"task": "system"}}, key=key)
        assert status == 401
        assert_openai_error(body, code="invalid_api_key")
    assert served.health() == 200  # the health route needs no key


def _raw_upload_head(port: int, *, length: int | None) -> socket.socket:
    """A transcription request whose head (and the start of a big file part) is sent, the rest held back."""
    boundary = "b0undary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.wav\"\r\n"
            "Content-Type: audio/wav\r\n\r\n").encode()
    framing = f"Content-Length: {length}\r\n" if length is not None else "Transfer-Encoding: chunked\r\n"
    sock = socket.create_connection((LOOPBACK, port), timeout=30)
    sock.sendall((f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                  f"Content-Type: multipart/form-data; boundary={boundary}\r\n{framing}\r\n").encode())
    if length is not None:
        sock.sendall(head + b"\0" * 65536)
    else:
        sock.sendall(b"%x\r\n%s\r\n" % (len(head), head))
    return sock


def _response(sock: socket.socket) -> tuple[int, str]:
    data = b""
    while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode(errors="replace")


def _send_until_closed(sock: socket.socket, most: int) -> int:
    """Send chunks of a chunked body until the server closes the connection; the bytes sent by then."""
    piece = b"\0" * 262144
    sent = 0
    try:
        while sent < most:
            sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
            sent += len(piece)
    except (BrokenPipeError, ConnectionResetError):
        return sent
    raise AssertionError(f"the server read all {sent} bytes")


def test_over_the_size_limit_is_413_without_reading_the_body(served: ServeProcess) -> None:
    """A body announced over DOWNLOAD_MAX_BYTES gets 413 while most of it was never sent; one without a
    length is cut (413) as soon as its file part passes the limit, not at its end."""
    with _raw_upload_head(served.port, length=50 * MAX_BYTES) as sock:
        status, body = _response(sock)
    assert status == 413 and json.loads(body[body.index("{"):])["error"]["code"] == "INPUT_TOO_LARGE"
    with _raw_upload_head(served.port, length=None) as sock:
        sent = _send_until_closed(sock, 40 * MAX_BYTES)  # the server answers and closes long before the end
        # What was sent and never read sits in loopback's buffers (the client's send buffer and the
        # server's receive buffer, auto-tuned to a few MB each): 9.2 MB was seen under the suite's load.
        assert sent < 10 * MAX_BYTES, sent


def test_an_upload_that_stalls_is_answered_at_its_deadline(served: ServeProcess) -> None:
    """A client that announces a body within the limit and then sends no more holds its request place
    only until DOWNLOAD_TIMEOUT_S: then it gets DOWNLOAD_FAILED naming the file."""
    started = time.monotonic()
    with _raw_upload_head(served.port, length=MAX_BYTES // 2) as sock:
        status, body = _response(sock)
    error = json.loads(body[body.index("{"):])["error"]
    assert status >= 400 and error["code"] == "DOWNLOAD_FAILED" and error["param"] == "file", (status, body)
    assert UPLOAD_DEADLINE_S <= time.monotonic() - started < UPLOAD_DEADLINE_S + 10


def test_more_requests_than_the_cap_get_429(served: ServeProcess) -> None:
    """With MAX_CONCURRENT_REQUESTS held (slow jobs), one more request is refused at once: 429, Retry-After,
    OpenAI's shape; the held ones are all answered."""
    url = f"{served.url}/v1/jobs"
    slow = {"input": {"task": "fixture", "action": "sleep", "seconds": 0.3}}
    with ThreadPoolExecutor(MAX_REQUESTS) as pool:
        held = [pool.submit(post_json, url, slow) for _ in range(MAX_REQUESTS)]
        deadline = time.monotonic() + 20
        while metrics(served).get(("worker_http_in_flight", ()), 0) < MAX_REQUESTS:
            assert time.monotonic() < deadline, "the slow jobs never were all held"
            time.sleep(0.05)
        status, headers, body = post_json(url, slow)
        answers = [future.result() for future in held]
    assert status == 429 and int(headers["retry-after"]) > 0
    assert_openai_error(body, code="rate_limit_exceeded")
    assert [answer[0] for answer in answers] == [200] * MAX_REQUESTS
    assert all(answer[2]["output"] == "done" for answer in answers)


def test_native_job_route_answers_the_job_contract(served: ServeProcess, speech_wav: Path) -> None:
    """POST /v1/jobs answers what the queue handler answers: a result with request_id and timings, or the
    contract's error dict with an HTTP status from its code."""
    audio = base64.b64encode(speech_wav.read_bytes()).decode()
    status, headers, result = post_json(f"{served.url}/v1/jobs", {"input": {"audio_base64": audio}})
    assert status == 200 and media.recognised(result["transcription"]) >= 0.7
    assert headers["x-request-id"] == result["request_id"] and "total_ms" in result["timings"]
    done = [line for line in served.log_text().splitlines() if "job.done" in line and result["request_id"] in line]
    assert len(done) == 1, done  # each line once (the SDK's basicConfig used to print every line twice)
    too_many = {"input": {"task": "text2image", "prompt": "x", "steps": 999}}
    status, _, error = post_json(f"{served.url}/v1/jobs", too_many)
    assert status == 413 and error["error_code"] == "INPUT_TOO_LARGE" and error["retryable"] is False


def test_metrics_parse_and_move_with_jobs(served: ServeProcess, speech_wav: Path) -> None:
    """/metrics parses with prometheus_client's parser; job and request counters and latency histograms move."""
    jobs = ("worker_jobs_total", (("outcome", "success"), ("task", "transcribe")))
    runs = ("worker_job_seconds_count", (("stage", "run"), ("task", "transcribe")))
    before = metrics(served)
    audio = base64.b64encode(speech_wav.read_bytes()).decode()
    assert post_json(f"{served.url}/v1/jobs", {"input": {"audio_base64": audio}})[0] == 200
    after = metrics(served)
    assert after[jobs] == before.get(jobs, 0) + 1 and after[runs] == before.get(runs, 0) + 1
    assert after[("worker_slots", (("state", "total"),))] == 1
    assert after[("worker_memory_bytes", (("kind", "ram_total"),))] > 0
    requests = ("worker_http_requests_total", (("route", "/v1/jobs"), ("status", "200")))
    assert after[requests] >= before.get(requests, 0) + 1


def test_system_route_is_the_system_task(served: ServeProcess) -> None:
    """GET /system answers the `system` task's snapshot."""
    request = urllib.request.Request(  # noqa: S310 (loopback)
        f"{served.url}/system", headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 (loopback)
        snapshot = json.loads(response.read())
    assert snapshot["slots"]["total"] == 1 and any(p["model"] == "tiny.en" for p in snapshot["pipelines"])


def test_memory_pressure_is_503_before_the_body(tmp_path: Path) -> None:
    """Over MEMORY_PRESSURE_THRESHOLD a transcription is refused with 503 and Retry-After while its body is
    still unsent."""
    work = tmp_path / "jobs"
    work.mkdir()
    server = ServeProcess(work, MEMORY_PRESSURE_THRESHOLD="0.001", DOWNLOAD_MAX_BYTES=str(MAX_BYTES), API_KEY=KEY)
    try:
        server.wait_health(200)
        with _raw_upload_head(server.port, length=MAX_BYTES // 2) as sock:
            status, body = _response(sock)
        assert status == 503 and json.loads(body[body.index("{"):])["error"]["code"] == "OVERLOADED"
    finally:
        assert server.stop() == 0


def test_health_route_through_preload_and_drain(tmp_path: Path) -> None:
    """/ping (on its own PORT_HEALTH) answers 204 during a slow preload, then 200; after SIGTERM 503 while an
    in-flight request still finishes (answered 200), new ones get 503 with Retry-After, and the process exits 0."""
    work = tmp_path / "jobs"
    work.mkdir()
    server = ServeProcess(work, separate_health=True, PRELOAD="fixture", FIXTURE_PRELOAD_S="3",
                          SHUTDOWN_GRACE_S="20")
    try:
        assert server.wait_health(200)[-2:] == [204, 200]
        assert post_json(f"{server.health_url}/v1/jobs", {"input": {"task": "system"}}, key=None)[0] == 404
        answer: list[Any] = []
        slow = {"input": {"task": "fixture", "action": "sleep", "seconds": 3}}
        thread = threading.Thread(target=lambda: answer.append(post_json(f"{server.url}/v1/jobs", slow)))
        thread.start()
        deadline = time.monotonic() + 10
        while metrics(server).get(("worker_http_in_flight", ()), 0) < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        server.terminate()
        assert server.wait_health(503, timeout=5)
        status, headers, refused = post_json(f"{server.url}/v1/jobs", {"input": {"task": "fixture"}})
        assert status == 503 and refused["error_code"] == "CANCELLED" and int(headers["retry-after"]) > 0
        thread.join(30)
        assert answer and answer[0][0] == 200 and answer[0][2]["output"] == "done"
        assert server.process.wait(30) == 0
    finally:
        server.stop()


@pytest.fixture(scope="module")
def talk(tmp_path_factory: pytest.TempPathFactory,
         voice_pool: dict[str, list[np.ndarray]]) -> tuple[Any, Path, dict[str, str]]:
    """Two real people (the LibriVox reader, MFA's michael) in 5 turns, and a data URL of another
    clip of each (not in the talk), named after them."""
    from testkit import conversations

    voices = {speaker: list(pieces) for speaker, pieces in voice_pool.items()}
    references = {"reader": voices["reader"].pop(0), "michael": voices["michael"].pop(0)[: 10 * 16000]}
    conversation = conversations.conversation(voices, ("reader", "michael"), seed=11, turns=5)
    folder = tmp_path_factory.mktemp("talk")
    speech_corpus.write_wav(folder / "talk.wav", conversation.audio)
    urls = {}
    for name, clip in references.items():
        speech_corpus.write_wav(folder / f"{name}.wav", clip)
        urls[name] = "data:audio/wav;base64," + base64.b64encode((folder / f"{name}.wav").read_bytes()).decode()
    return conversation, folder / "talk.wav", urls


def _right_speaker_share(conversation: Any, segments: list[Any], names: dict[str, str]) -> float:
    """The share of segments whose speaker (``names`` maps it to the reference's) speaks at its middle."""
    right = [names.get(s.speaker) == conversation.speaker_at((s.start + s.end) / 2) for s in segments]
    return sum(right) / len(right)


def test_diarized_json_through_the_openai_client(client: openai.OpenAI, talk: tuple[Any, Path, dict[str, str]]) -> None:
    """``gpt-4o-transcribe-diarize`` (mapped) with ``diarized_json``: the client parses OpenAI's shape,
    segments of type ``transcript.text.segment`` with string ids, labels A and B in order of first
    speech, each segment's speaker the one speaking; streamed, the same segments come as
    ``transcript.text.segment`` events before the done event; with known speakers, their names."""
    conversation, path, urls = talk
    with ThreadPoolExecutor(3) as pool:
        plain = pool.submit(client.audio.transcriptions.create, model="gpt-4o-transcribe-diarize", file=upload(path),
                            response_format="diarized_json", chunking_strategy="auto")
        streamed = pool.submit(lambda: list(client.audio.transcriptions.create(
            model="gpt-4o-transcribe-diarize", file=upload(path), response_format="diarized_json", stream=True,
            chunking_strategy={"type": "server_vad", "threshold": 0.5})))
        named = pool.submit(client.audio.transcriptions.create, model="gpt-4o-transcribe-diarize", file=upload(path),
                            response_format="diarized_json", known_speaker_names=list(urls),
                            known_speaker_references=list(urls.values()))
        diarized, events, known = plain.result(), streamed.result(), named.result()
    assert isinstance(diarized, openai.types.audio.TranscriptionDiarized), type(diarized)
    assert diarized.task == "transcribe" and diarized.duration > 20 and diarized.text
    segments = diarized.segments
    assert all(s.type == "transcript.text.segment" and s.start < s.end and s.text for s in segments)
    assert [s.id for s in segments] == [f"seg_{i}" for i in range(len(segments))]
    assert segments[0].speaker == "A" and {s.speaker for s in segments} == {"A", "B"}
    assert _right_speaker_share(conversation, segments, {"A": "reader", "B": "michael"}) >= 0.9
    assert events[-1].type == "transcript.text.done" and events[-1].text == diarized.text
    assert [(e.type, e.speaker, e.text) for e in events[:-1]] == [(s.type, s.speaker, s.text) for s in segments]
    assert {s.speaker for s in known.segments} == {"reader", "michael"}
    assert _right_speaker_share(conversation, known.segments, {"reader": "reader", "michael": "michael"}) >= 0.9


def test_bad_speaker_fields_are_400_naming_them(served: ServeProcess, client: openai.OpenAI,
                                                 talk: tuple[Any, Path, dict[str, str]]) -> None:
    """Names without as many references, references that are not data URLs, known speakers without
    diarized_json, and a chunking strategy OpenAI does not have are 400 naming the field."""
    _, path, urls = talk
    asks: list[tuple[dict[str, Any], str]] = [
        ({"response_format": "diarized_json", "known_speaker_names": ["a", "b"],
          "known_speaker_references": [urls["reader"]]}, "known_speaker_references"),
        ({"response_format": "diarized_json", "known_speaker_names": ["a"],
          "known_speaker_references": ["https://example.com/a.wav"]}, "known_speaker_references"),
        ({"response_format": "json", "known_speaker_names": ["a"], "known_speaker_references": [urls["reader"]]},
         "known_speaker_names"),
        ({"response_format": "diarized_json", "chunking_strategy": "sometimes"}, "chunking_strategy"),
    ]
    for ask, param in asks:
        with pytest.raises(openai.BadRequestError) as raised:
            client.audio.transcriptions.create(model="whisper-1", file=upload(path), **ask)
        assert raised.value.body["param"] == param, (ask, raised.value.body)  # type: ignore[index]
