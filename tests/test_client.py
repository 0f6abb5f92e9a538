"""The transcription client (``python -m client``) against the real worker's local API."""

from __future__ import annotations

import base64
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

from client.addresses import UrlPolicy, UrlRefused
from client.api import RUNPOD_API, Endpoint
from client.cli import main
from client.jobs import run_with_retries
from client.retry import Backoff, Outcome, with_retries
from testkit import media
from testkit.jobserver import LOOPBACK, ROOT, LocalApi
from testkit.servers import SeaweedS3, ThreadedServer, loopback_server
from tests.conftest import CAPTURED_LOGS

pytestmark = pytest.mark.integration
# Greedy decoding: the same words from tiny.en, in a fraction of the time.
FAST = ["--beam-size", "1", "--best-of", "1"]


def b64_len(path: Path) -> int:
    return 4 * -(-path.stat().st_size // 3)


@pytest.fixture(scope="module")
def clips(speech_wav: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Speech in five formats (the WAV the largest) and one file that is not media."""
    directory = tmp_path_factory.mktemp("clips")
    made = {
        "meeting.mp3": media.encode(speech_wav, directory / "meeting.mp3", "-ar", "16000"),
        "call.ogg": media.encode(speech_wav, directory / "call.ogg", "-ar", "16000"),
        "memo.m4a": media.encode(speech_wav, directory / "memo.m4a", "-ar", "16000"),
        "lecture.flac": media.encode(speech_wav, directory / "lecture.flac", "-ar", "16000"),
        "interview.wav": media.encode(speech_wav, directory / "interview.wav", "-ar", "22050"),
    }
    notes = directory / "notes.wav"
    notes.write_text("These are meeting notes, not a recording.\n" * 20)
    made["notes.wav"] = notes
    return made


@pytest.fixture
def worker_env(model_dir: Path) -> dict[str, str]:
    return {"MODEL_DIR": str(model_dir), "WHISPER_MODEL": "tiny.en", "TASK_MODULES": "testkit.fixture_tasks"}


@pytest.fixture
def local_api(tmp_path: Path, worker_env: dict[str, str]) -> Iterator[LocalApi]:
    """The real worker's local API, no bucket (outputs come back inline)."""
    api = LocalApi(tmp_path, **worker_env)
    try:
        with api:
            yield api
    finally:
        CAPTURED_LOGS.write(api.log_path.read_text(errors="replace"))


def uploads_left(s3: SeaweedS3, bucket: str) -> list[str]:
    listing = s3.client().list_objects_v2(Bucket=bucket, Prefix="uploads/")
    return [item["Key"] for item in listing.get("Contents", [])]


def test_six_files_three_clients(tmp_path: Path, worker_env: dict[str, str], bucket_env: dict[str, str],
                                 s3: SeaweedS3, clips: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """Six files, three in flight, against the real worker with a bucket: four go inline, the one over
    the inline limit through the upload task (a presigned POST, deleted once read), and all five come
    back as SRT, VTT and JSON (fetched from presigned URLs) with the spoken words; the file that is not
    media fails once with INVALID_INPUT, is named with its code in the summary, and the exit status is 1."""
    big = clips["interview.wav"]
    limit = max(b64_len(path) for name, path in clips.items() if name != "interview.wav") + 1
    assert b64_len(big) > limit
    out, report = tmp_path / "out", tmp_path / "report.json"
    api = LocalApi(tmp_path, **worker_env, **bucket_env)
    try:
        with api:
            status = main(["transcribe", *map(str, clips.values()), "--url", api.url, "--clients", "3",
                           "--out", str(out), "--format", "srt,vtt,json", "--inline-limit", str(limit),
                           "--report", str(report), "--no-progress", *FAST])
    finally:
        CAPTURED_LOGS.write(api.log_path.read_text(errors="replace"))
    assert status == 1
    files = {Path(entry["file"]).name: entry for entry in json.loads(report.read_text())["files"]}
    assert (files["notes.wav"]["outcome"], files["notes.wav"]["attempts"]) == ("INVALID_INPUT", 1)
    assert files["interview.wav"]["via"] == "upload"
    for name in clips.keys() - {"notes.wav"}:
        assert files[name]["outcome"] == "success", files[name]
        assert files[name]["via"] == ("upload" if name == "interview.wav" else "inline")
        stem = Path(name).stem
        transcript = json.loads((out / f"{stem}.json").read_text())
        assert media.recognised(transcript["transcription"]) >= 0.7, (name, transcript["transcription"])
        srt, vtt = (out / f"{stem}.srt").read_text(), (out / f"{stem}.vtt").read_text()
        assert "-->" in srt and media.recognised(srt) >= 0.7, srt
        assert vtt.startswith("WEBVTT") and media.recognised(vtt) >= 0.7, vtt
        assert files[name]["duration_s"] > 3 and files[name]["real_time_factor"] > 0
    assert not list(out.glob("notes.*"))
    assert uploads_left(s3, bucket_env["BUCKET_NAME"]) == []
    summary = capsys.readouterr().out
    assert "notes.wav" in summary and "INVALID_INPUT" in summary and "5 of 6 files transcribed" in summary


def test_timeouts_are_retried_with_growing_jittered_delays(local_api: LocalApi) -> None:
    """A job the worker answers TIMEOUT twice is tried a third time and succeeds; each wait is within
    its full-jitter bound and the bounds double (0.2 s, then 0.4 s); a job that keeps failing stops
    after the attempts allowed, with its last code."""
    endpoint = Endpoint.local(local_api.url)
    policy = Backoff(base_s=0.2, cap_s=5.0, attempts=5)
    started = time.monotonic()
    retried = run_with_retries(endpoint, lambda: {"task": "fixture", "action": "flaky", "key": "a", "failures": 2},
                               policy, deadline=started + 120, rng=random.Random(3))
    elapsed = time.monotonic() - started
    assert retried.outcome.ok and retried.outcome.reply is not None
    assert (retried.attempts, retried.outcome.reply["output"]["attempt"]) == (3, 3)
    assert [wait.code for wait in retried.waits] == ["TIMEOUT", "TIMEOUT"]
    assert [wait.ceiling_s for wait in retried.waits] == [0.2, 0.4]
    assert all(0 <= wait.delay_s <= wait.ceiling_s for wait in retried.waits)
    assert elapsed >= sum(wait.delay_s for wait in retried.waits)
    stuck = run_with_retries(endpoint, lambda: {"task": "fixture", "action": "flaky", "key": "b", "failures": 99},
                             Backoff(base_s=0.01, attempts=3), deadline=time.monotonic() + 60, rng=random.Random(3))
    assert (stuck.outcome.code, stuck.attempts, len(stuck.waits)) == ("TIMEOUT", 3, 2)


def test_full_jitter_bounds_and_growth() -> None:
    """Delays are uniform in [0, min(cap, base * 2**k)]: never outside the bound, their mean about half
    the bound, so the expected wait doubles per retry until the cap."""
    policy = Backoff(base_s=1.0, cap_s=8.0, attempts=10)
    rng = random.Random(0)
    assert [policy.ceiling(k) for k in range(5)] == [1, 2, 4, 8, 8]
    means = []
    for retry in range(4):
        delays = [policy.delay(retry, rng) for _ in range(4000)]
        assert all(0 <= delay <= policy.ceiling(retry) for delay in delays)
        means.append(statistics.fmean(delays))
        assert means[-1] == pytest.approx(policy.ceiling(retry) / 2, rel=0.05)
    assert means == sorted(means) and means[-1] > 6 * means[0]


def test_retries_stop_at_a_final_code_and_before_the_deadline() -> None:
    """A code that is not retryable is never retried, and a wait that would end past the deadline is
    not made: the last outcome stands at once."""
    calls: list[str] = []
    slept: list[float] = []

    def fail(code: str, retryable: bool) -> Outcome:
        calls.append(code)
        return Outcome(code, retryable)

    final = with_retries(lambda: fail("INVALID_INPUT", False), Backoff(base_s=0.0), deadline=time.monotonic() + 60,
                         rng=random.Random(1), sleep=slept.append)
    assert (final.attempts, final.outcome.code, slept) == (1, "INVALID_INPUT", [])
    late = with_retries(lambda: fail("GPU_OOM", True), Backoff(base_s=1000.0, cap_s=1000.0), rng=random.Random(1),
                        deadline=time.monotonic() + 0.5, sleep=slept.append)
    assert (late.attempts, late.outcome.code, slept) == (1, "GPU_OOM", [])


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "client", "transcribe", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=240, env={**os.environ, **(env or {})})


def test_the_cli_as_a_process_writes_inline_outputs_beside_the_file(local_api: LocalApi, tmp_path: Path,
                                                                   clips: dict[str, Path]) -> None:
    """``python -m client transcribe`` as a real process, no bucket on the worker: the SRT comes back
    inline (base64) and the JSON is the result itself, both written beside the input; exit status 0,
    a summary table on stdout, the bars' final state on stderr."""
    clip = tmp_path / "meeting.mp3"
    clip.write_bytes(clips["meeting.mp3"].read_bytes())
    done = run_cli(str(clip), "--url", local_api.url, "--format", "srt,json", *FAST)
    assert done.returncode == 0, done.stderr + done.stdout
    assert media.recognised((tmp_path / "meeting.srt").read_text()) >= 0.7
    result = json.loads((tmp_path / "meeting.json").read_text())
    assert media.recognised(result["transcription"]) >= 0.7 and "files" not in result
    assert not (tmp_path / "meeting.vtt").exists()
    assert "meeting.mp3" in done.stdout and "1 of 1 files transcribed" in done.stdout
    assert "done" in done.stderr


def test_usage_errors_exit_2(tmp_path: Path, clips: dict[str, Path]) -> None:
    """A missing file, an unknown format, --endpoint without RUNPOD_API_KEY, and two inputs that would
    write the same output are usage errors: exit status 2 before any request."""
    clip = str(clips["meeting.mp3"])
    (tmp_path / "meeting.wav").write_bytes(b"x")
    cases = [[str(tmp_path / "missing.wav")], [clip, "--format", "srt,docx"], [clip, "--endpoint", "abc"],
             [clip, str(tmp_path / "meeting.wav"), "--out", str(tmp_path)], [clip, "--clients", "0"]]
    for args in cases:
        with pytest.raises(SystemExit) as exited:
            main(["transcribe", *args, "--url", "http://127.0.0.1:9"] if "--endpoint" not in args
                 else ["transcribe", *args])
        assert exited.value.code == 2, args


class RunPodStandIn(ThreadedServer):
    """RunPod's endpoint API on loopback, in front of the local API: Bearer auth on every request,
    ``/<endpoint>/run`` queues, ``/<endpoint>/status/<id>`` answers at once (IN_QUEUE, then IN_PROGRESS
    with a progress message, then the result), as RunPod's does."""

    def __init__(self, local: str, endpoint: str, key: str) -> None:
        self.local, self.prefix, self.key = local, f"/{endpoint}/", key
        self.seen: list[tuple[str, str]] = []  # (path, Authorization) of each request
        self.results: dict[str, dict[str, Any] | None] = {}
        self._lock = threading.Lock()  # guards seen and results
        super().__init__(loopback_server(self.answer))
        self.base = f"http://{LOOPBACK}:{self.port}"

    def answer(self, request: BaseHTTPRequestHandler) -> None:
        auth = request.headers.get("Authorization", "")
        with self._lock:
            self.seen.append((request.path, auth))
        body = request.rfile.read(int(request.headers.get("Content-Length", "0")))
        if auth != f"Bearer {self.key}":
            return self._reply(request, 401, {"error": "Unauthorized"})
        route = request.path.removeprefix(self.prefix)
        if route == "run":
            return self._reply(request, 200, self._run(body))
        if route.startswith("status/"):
            return self._reply(request, 200, self._status(route.removeprefix("status/")))
        return self._reply(request, 404, {"error": "no route"})

    def _run(self, body: bytes) -> dict[str, Any]:
        with urllib.request.urlopen(urllib.request.Request(  # noqa: S310 (loopback)
                f"{self.local}/run", data=body, headers={"Content-Type": "application/json"}), timeout=30) as reply:
            job_id = json.loads(reply.read())["id"]
        with self._lock:
            self.results[job_id] = None
        threading.Thread(target=self._wait, args=(job_id,), daemon=True).start()
        return {"id": job_id, "status": "IN_QUEUE"}

    def _wait(self, job_id: str) -> None:
        time.sleep(0.6)  # long enough for the client to see the job queued and then in progress
        status = urllib.request.Request(f"{self.local}/status/{job_id}", method="POST")  # noqa: S310 (loopback)
        with urllib.request.urlopen(status, timeout=200) as reply:  # noqa: S310
            result = json.loads(reply.read())
        with self._lock:
            self.results[job_id] = result

    def _status(self, job_id: str) -> dict[str, Any]:
        with self._lock:
            polls = sum(path.endswith(job_id) for path, _ in self.seen)
            result = self.results.get(job_id)
        if result is not None:
            return result
        if polls <= 1:
            return {"id": job_id, "status": "IN_QUEUE"}
        return {"id": job_id, "status": "IN_PROGRESS", "output": "chunk 1/2"}

    @staticmethod
    def _reply(request: BaseHTTPRequestHandler, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        request.send_response(status)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(data)))
        request.end_headers()
        request.wfile.write(data)


def test_a_runpod_endpoint_with_the_same_code_and_no_key_in_sight(local_api: LocalApi, tmp_path: Path,
                                                                  clips: dict[str, Path]) -> None:
    """``--endpoint`` talks to RunPod's routes (``/<id>/run``, ``/<id>/status/<job>``) with the API key
    as a Bearer token, polls through IN_QUEUE and IN_PROGRESS to the result, and writes the outputs;
    a wrong key is a final HTTP_401 (one attempt, exit 1); the key is printed in neither case."""
    key = "rpa_" + os.urandom(12).hex()
    clip = tmp_path / "call.ogg"
    clip.write_bytes(clips["call.ogg"].read_bytes())
    with RunPodStandIn(local_api.url, "ep-test", key) as runpod:
        env = {"RUNPOD_ENDPOINT_BASE_URL": runpod.base, "RUNPOD_API_KEY": key}
        done = run_cli(str(clip), "--endpoint", "ep-test", "--format", "vtt", *FAST, env=env)
        refused = run_cli(str(clip), "--endpoint", "ep-test", "--report", str(tmp_path / "r.json"),
                          env={**env, "RUNPOD_API_KEY": "rpa_wrong"})
    assert done.returncode == 0, done.stderr + done.stdout
    assert media.recognised((tmp_path / "call.vtt").read_text()) >= 0.7
    paths = [path for path, _ in runpod.seen]
    assert "/ep-test/run" in paths and sum("/ep-test/status/" in path for path in paths) >= 3
    assert {auth for _, auth in runpod.seen} == {f"Bearer {key}", "Bearer rpa_wrong"}
    failed = json.loads((tmp_path / "r.json").read_text())["files"][0]
    assert (refused.returncode, failed["outcome"], failed["attempts"]) == (1, "HTTP_401", 1)
    for run in (done, refused):
        assert key not in run.stdout + run.stderr and "rpa_wrong" not in run.stdout + run.stderr


def test_a_worker_that_is_not_there_is_a_connection_failure(tmp_path: Path, clips: dict[str, Path]) -> None:
    """Nothing listening: each attempt fails with CONNECTION (retryable), retried up to --attempts,
    then the file fails for good with exit status 1."""
    report = tmp_path / "report.json"
    status = main(["transcribe", str(clips["meeting.mp3"]), "--url", "http://127.0.0.1:9", "--attempts", "2",
                   "--backoff", "0.01", "--out", str(tmp_path), "--report", str(report), "--no-progress"])
    entry = json.loads(report.read_text())["files"][0]
    assert (status, entry["outcome"], entry["attempts"]) == (1, "CONNECTION", 2)


Reply = tuple[int, dict[str, str], bytes]


def json_reply(payload: Any, status: int = 200) -> Reply:
    return status, {"Content-Type": "application/json"}, json.dumps(payload).encode()


def redirect(location: str) -> Reply:
    return 302, {"Location": location}, b""


def completed(**output: Any) -> Reply:
    return json_reply({"status": "COMPLETED", "output": {"transcription": "hi", **output}})


def failed(code: str, message: str) -> Reply:
    output = {"error": message, "error_code": code, "retryable": False}
    return json_reply({"status": "FAILED", "output": output, "error": message})


class Scripted(ThreadedServer):
    """A hostile endpoint on loopback: RunPod's routes, answered from a script, every request recorded.

    A file's bytes are its scenario's name (the client sends them as ``audio_base64``; an upload task
    names the file, and the job after it the ``s3://`` reference it was given), and the job id too;
    ``/<endpoint>/status/<id>`` answers the scenario's replies in turn, the last one again and again.
    Any other path answers from ``paths``. The Authorization header is recorded, never checked: this
    server wants the key, it does not guard anything."""

    def __init__(self) -> None:
        self.scenarios: dict[str, list[Reply]] = {}
        self.paths: dict[str, Reply] = {}
        self.seen: list[tuple[str, str]] = []  # (path, Authorization) of each request
        self.jobs: list[dict[str, Any]] = []  # the input of each job run
        self._lock = threading.Lock()  # guards seen and jobs
        super().__init__(loopback_server(self.answer))
        self.base = f"http://{LOOPBACK}:{self.port}"

    def answer(self, request: BaseHTTPRequestHandler) -> None:
        body = request.rfile.read(int(request.headers.get("Content-Length", "0")))
        with self._lock:
            self.seen.append((request.path, request.headers.get("Authorization", "")))
            polls = sum(path == request.path for path, _ in self.seen)
        status, headers, data = self._route(request.path, body, polls)
        request.send_response(status)
        for name, value in {**headers, "Content-Length": str(len(data))}.items():
            request.send_header(name, value)
        request.end_headers()
        request.wfile.write(data)

    def _route(self, path: str, body: bytes, polls: int) -> Reply:
        if path.endswith("/run"):
            job = json.loads(body)["input"]
            with self._lock:
                self.jobs.append(job)
            if "audio_base64" in job:
                name = base64.b64decode(job["audio_base64"]).decode()
            else:
                name = "upload-" + Path(job.get("file_name") or job["audio"]).stem
            return json_reply({"id": name, "status": "IN_QUEUE"})
        if "/status/" in path:
            replies = self.scenarios[path.rpartition("/")[2]]
            return replies[min(polls, len(replies)) - 1]
        return self.paths.get(path, json_reply({"error": "no route"}, 404))

    def auth_of(self, fragment: str) -> set[str]:
        """The Authorization headers of the requests whose path holds ``fragment``."""
        with self._lock:
            return {auth for path, auth in self.seen if fragment in path}


KEY = "rpa_" + "7" * 24


def run_against(endpoint: Scripted, tmp_path: Path, names: list[str], *args: str) -> tuple[
        subprocess.CompletedProcess[str], dict[str, dict[str, Any]]]:
    """``python -m client`` on one file per scenario name against ``endpoint``; the run and its report by name."""
    clips = tmp_path / "in"
    clips.mkdir(exist_ok=True)
    paths = []
    for name in names:
        paths.append(clips / f"{name}.wav")
        paths[-1].write_text(name)
    env = {"RUNPOD_ENDPOINT_BASE_URL": endpoint.base, "RUNPOD_API_KEY": KEY, "COLUMNS": "400"}
    report = tmp_path / "report.json"
    done = run_cli(*map(str, paths), "--endpoint", "ep", "--out", str(tmp_path / "out"), "--format", "srt",
                   "--attempts", "1", "--report", str(report), *args, env=env)
    assert "Traceback" not in done.stderr, done.stderr
    entries = json.loads(report.read_text())["files"]
    return done, {Path(entry["file"]).stem: entry for entry in entries}


def test_result_urls_must_be_https_or_http_to_loopback_from_a_loopback_endpoint() -> None:
    """A result's URL is opened only when it is https, or http to loopback while the endpoint itself is
    on loopback; file:, ftp:, data:, plain http to another host, and http anywhere from a remote
    endpoint are refused, the message naming the field and the URL without its signature."""
    local, remote = UrlPolicy.for_endpoint("http://127.0.0.1:8000"), UrlPolicy.for_endpoint(RUNPOD_API)
    for url in ("https://bucket.example/k?X-Amz-Signature=s", "http://127.0.0.1:8333/k", "http://[::1]:9/k",
                "http://localhost:9/k"):
        assert local.check(url, what="transcript.srt") == url
    assert remote.check("https://bucket.example/k", what="f") == "https://bucket.example/k"
    refused = [(local, "file:///etc/passwd"), (local, "ftp://127.0.0.1/x"), (local, "data:text/plain,hi"),
               (local, "http://192.0.2.1/k"), (local, "http://127.0.0.1.example/k"), (local, "https:///k"),
               (remote, "http://127.0.0.1:8333/k"), (remote, "http://bucket.example/k")]
    for policy, url in refused:
        with pytest.raises(UrlRefused, match=r"transcript\.srt: url '.*' refused") as caught:
            policy.check(url + "?X-Amz-Signature=secret", what="transcript.srt")
        assert "secret" not in str(caught.value), url
    with pytest.raises(UrlRefused, match=r"transcript\.srt: the url is of type int, not a string"):
        local.check(5, what="transcript.srt")


def test_file_urls_in_a_result_fail_that_file_and_copy_nothing(tmp_path: Path) -> None:
    """An endpoint answering file:, data: and ftp: URLs, or an http URL redirecting to file:, gets
    each of those files failed with URL_REFUSED and the run finished with its summary (exit 1):
    neither the password file nor the client's environment (with its key) reaches an output."""
    with Scripted() as endpoint:
        endpoint.paths["/files/hop"] = redirect("file:///etc/passwd")
        urls = {"passwd": "file:///etc/passwd", "environ": "file:///proc/self/environ",
                "data": "data:text/plain;base64,aGk=", "ftp": f"ftp://{LOOPBACK}:9/x",
                "hop": endpoint.base + "/files/hop"}
        for name, url in urls.items():
            endpoint.scenarios[name] = [completed(files=[{"name": "transcript.srt", "url": url}])]
        done, files = run_against(endpoint, tmp_path, list(urls), "--no-progress")
    assert done.returncode == 1
    for name, url in {**urls, "hop": "file:///etc/passwd"}.items():
        assert files[name]["outcome"] == "OUTPUT_FAILED", files[name]
        assert files[name]["message"].startswith("URL_REFUSED: transcript.srt"), files[name]
        assert f"url {url!r} refused" in files[name]["message"], files[name]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    assert "0 of 5 files transcribed" in done.stdout and "URL_REFUSED" in done.stdout
    assert KEY not in done.stdout + done.stderr


def test_an_upload_url_outside_the_policy_is_not_posted_to(tmp_path: Path) -> None:
    """A file over the inline limit goes through the upload task; an upload URL that is file: or ftp:
    fails that file with URL_REFUSED (final, one attempt) and no transcription job is sent for it."""
    urls = {"file": "file:///etc/passwd", "ftp": f"ftp://{LOOPBACK}:9/up"}
    with Scripted() as endpoint:
        for name, url in urls.items():
            granted = completed(upload={"url": url, "fields": {}}, audio=f"s3://b/{name}-job")
            endpoint.scenarios[f"upload-{name}"] = [granted]
            endpoint.scenarios[f"upload-{name}-job"] = [completed(files=[{"name": "transcript.srt", "base64": "aGk="}])]
        done, files = run_against(endpoint, tmp_path, list(urls), "--no-progress", "--inline-limit", "1")
    assert done.returncode == 1 and "0 of 2 files transcribed" in done.stdout
    for name, url in urls.items():
        assert (files[name]["outcome"], files[name]["via"], files[name]["attempts"]) == ("URL_REFUSED", "upload", 1)
        assert f"upload: url {url!r} refused" in files[name]["message"]
    assert endpoint.auth_of("/status/upload-file-job") == set() == endpoint.auth_of("/status/upload-ftp-job")


def test_the_key_goes_only_to_the_endpoint_and_names_never_pick_the_path(tmp_path: Path) -> None:
    """A /status redirected to another origin (another loopback port) is refused with REDIRECT_REFUSED,
    so that server never sees the Bearer key; a presigned download (redirected to that other server,
    http on loopback as the endpoint is) carries no key either; and file names in a result
    (``../../escape.srt``, an absolute path) are ignored: the output goes to ``--out`` as ``<stem>.srt``."""
    outside = tmp_path / f"abs-{os.getpid()}.srt"
    with Scripted() as endpoint, Scripted() as elsewhere:
        elsewhere.paths["/steal"] = completed()
        elsewhere.paths["/srt"] = 200, {}, b"1\n00:00:00,000 --> 00:00:01,000\nhi\n"
        endpoint.paths["/files/hop"] = redirect(elsewhere.base + "/srt")
        endpoint.scenarios["status"] = [redirect(elsewhere.base + "/steal")]
        endpoint.scenarios["names"] = [completed(files=[
            {"name": "../../escape.srt", "base64": "ZXNjYXBl"}, {"name": str(outside), "base64": "ZXNjYXBl"},
            {"name": "transcript.srt", "url": endpoint.base + "/files/hop"}])]
        done, files = run_against(endpoint, tmp_path, ["status", "names"], "--no-progress")
    assert done.returncode == 1
    assert files["status"]["outcome"] == "REDIRECT_REFUSED", files["status"]
    assert "another origin" in files["status"]["message"] and "/steal" in files["status"]["message"]
    assert elsewhere.auth_of("/steal") == set() and elsewhere.auth_of("") == {""}
    assert endpoint.auth_of("/ep/") == {f"Bearer {KEY}"} and endpoint.auth_of("/files/") == {""}
    assert files["names"]["outcome"] == "success", files["names"]
    assert (tmp_path / "out" / "names.srt").read_text().endswith("hi\n")
    assert sorted(path.name for path in tmp_path.rglob("*.srt")) == ["names.srt"] and not outside.exists()
    assert "1 of 2 files transcribed" in done.stdout


def test_a_garbled_result_fails_that_file_and_the_summary_still_comes(tmp_path: Path) -> None:
    """Base64 that does not decode (bad padding, characters outside the alphabet, not a string) and a
    files list that is not a list each fail that file with OUTPUT_FAILED naming the file and the fault,
    not a traceback; a progress note with a 5000-digit fraction and timings that are not an object
    do not stop a good result; the summary counts them all."""
    good = base64.b64encode(b"1\n00:00:00,000 --> 00:00:01,000\nhi\n").decode()
    with Scripted() as endpoint:
        scenarios = {"padding": [{"name": "transcript.srt", "base64": "abc"}],
                     "alphabet": [{"name": "transcript.srt", "base64": "aGk*aGk="}],
                     "number": [{"name": "transcript.srt", "base64": 12}], "files": 5}
        for name, entries in scenarios.items():
            endpoint.scenarios[name] = [completed(files=entries)]
        endpoint.scenarios["noisy"] = [json_reply({"status": "IN_PROGRESS", "output": "9" * 5000 + "/1"}),
                                       completed(timings="x", files=[{"name": "transcript.srt", "base64": good}])]
        done, files = run_against(endpoint, tmp_path, [*scenarios, "noisy"], "--no-progress")
    assert done.returncode == 1
    assert files["noisy"]["outcome"] == "success", files["noisy"]
    messages = {name: files[name]["message"] for name in scenarios}
    assert all(files[name]["outcome"] == "OUTPUT_FAILED" for name in scenarios), files
    assert "transcript.srt: base64 is not valid" in messages["padding"] and "'abc'" in messages["padding"]
    assert "transcript.srt: base64 is not valid" in messages["alphabet"]
    assert "transcript.srt: base64 is of type int, not a string" in messages["number"]
    assert "files are of type int, not a list" in messages["files"]
    assert "1 of 5 files transcribed" in done.stdout


def test_server_text_reaches_the_terminal_as_plain_printable_text(tmp_path: Path) -> None:
    """An error code and message full of rich markup (a stray ``[/]`` included) and terminal escapes
    (OSC 52 clipboard write, OSC 8 link, C1 CSI, clear screen), and a progress note of the same, are
    shown literally: the markup as typed, each control as its visible escape, and no ESC, BEL or C1
    byte reaches stdout or stderr; the file fails with that code and the summary still comes."""
    escapes = "\x1b]52;c;ZXZpbA==\x07 \x1b]8;;http://evil.example/\x1b\\click\x1b]8;;\x1b\\ \x9b31m \x1b[2J"
    with Scripted() as endpoint:
        note = json_reply({"status": "IN_PROGRESS", "output": f"[blink]{escapes}"})
        message = f"[bold red]boom[/] [link=http://evil.example]x {escapes}"
        endpoint.scenarios["markup"] = [note, failed("BAD\x1b[31m[/]", message)]
        done, files = run_against(endpoint, tmp_path, ["markup"])
    shown = done.stdout + done.stderr
    assert done.returncode == 1 and files["markup"]["outcome"] == "BAD\x1b[31m[/]"
    assert not {"\x1b", "\x07", "\x9b"} & set(shown), repr(shown)
    assert "[bold red]boom[/] [link=http://evil.example]x" in done.stdout
    assert "\\x1b]52;c;ZXZpbA==" in done.stdout and "\\x9b31m" in done.stdout
    assert "failed: BAD\\x1b[31m[/]" in done.stderr
    assert "0 of 1 files transcribed" in done.stdout


def test_diarize_flags_reach_the_job_and_the_summary_shows_the_speakers(tmp_path: Path) -> None:
    """``--diarize --num-speakers 2`` put ``diarize`` and ``num_speakers`` in the job; the summary
    table and the report show each speaker's label and seconds; a file without speakers shows ``-``."""
    srt = base64.b64encode(b"1\n00:00:00,000 --> 00:00:01,000\n[A] hi\n").decode()
    with Scripted() as endpoint:
        endpoint.scenarios["talk"] = [completed(speakers=[{"label": "A", "seconds": 41.2},
                                                          {"label": "Ann", "seconds": 12.0}],
                                                files=[{"name": "transcript.srt", "base64": srt}])]
        endpoint.scenarios["alone"] = [completed(files=[{"name": "transcript.srt", "base64": srt}])]
        done, files = run_against(endpoint, tmp_path, ["talk", "alone"], "--diarize", "--num-speakers", "2",
                                  "--no-progress")
    assert done.returncode == 0, done.stdout + done.stderr
    assert all(job["diarize"] is True and job["num_speakers"] == 2 for job in endpoint.jobs), endpoint.jobs
    assert "A 41 s, Ann 12 s" in done.stdout
    assert files["talk"]["speakers"] == [{"label": "A", "seconds": 41.2}, {"label": "Ann", "seconds": 12.0}]
    assert files["alone"]["speakers"] == []
    assert (tmp_path / "out" / "talk.srt").read_text().endswith("[A] hi\n")
