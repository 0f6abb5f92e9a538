"""Where models come from (RunPod's model cache, the baked cache, and no network at all with downloads off)
and what they are (the weights-hash memo: remembered for weights, never for job media, and bounded)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from handler.config import load_settings
from handler.pipelines import weights
from handler.pipelines.weights import cached, hf_cache_dir, pretrained_source

ROOT = Path(__file__).resolve().parents[1]
REVISION = "0123456789abcdef0123456789abcdef01234567"


def into_hf_cache(saved: Path, cache: Path, repo_id: str) -> None:
    """Lay a save_pretrained directory out as the Hugging Face cache holds a downloaded repo."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(saved, repo / "snapshots" / REVISION)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REVISION)


def test_repo_ids_resolve_in_runpod_cache_then_baked_cache(tmp_path: Path, tiny_vits: Path) -> None:
    """A repo id in RunPod's model cache is used from there, offline; else from MODEL_DIR's baked cache;
    else it is a download, allowed only when ALLOW_MODEL_DOWNLOAD is on; a directory is used as is."""
    runpod_cache, model_dir = tmp_path / "runpod", tmp_path / "models"
    into_hf_cache(tiny_vits, runpod_cache, "org/voice")
    into_hf_cache(tiny_vits, hf_cache_dir(model_dir), "org/baked")
    settings = load_settings({"RUNPOD_HF_CACHE": str(runpod_cache), "MODEL_DIR": str(model_dir),
                              "ALLOW_MODEL_DOWNLOAD": "false"})
    assert cached(runpod_cache, "org/voice") and not cached(runpod_cache, "org/baked")
    assert pretrained_source("org/voice", settings) == ("org/voice", {"cache_dir": str(runpod_cache),
                                                                      "local_files_only": True})
    assert pretrained_source("org/baked", settings)[1]["cache_dir"] == str(hf_cache_dir(model_dir))
    assert pretrained_source("org/missing", settings)[1]["local_files_only"] is True
    allowed = load_settings({"MODEL_DIR": str(model_dir), "ALLOW_MODEL_DOWNLOAD": "true"})
    assert pretrained_source("org/missing", allowed)[1]["local_files_only"] is False
    assert pretrained_source(str(tiny_vits), settings) == (str(tiny_vits), {})


AUDIT = """
import json, os, sys
events = []
sys.addaudithook(lambda event, args: events.append([event, repr(args)[:160]])
                 if event in ("socket.connect", "socket.getaddrinfo", "socket.gethostbyname") else None)
from handler.config import library_environment, load_settings
settings = load_settings()
os.environ.update(library_environment(settings))  # as python -m handler does at start
from handler.app import Worker
worker = Worker(settings)
worker.preload(("transcribe", "speech", "text2image", "text2video"))
loaded = sorted(key.task for key in worker.runtime.registry.loaded())
print(json.dumps({"events": events, "loaded": loaded}))
"""


@pytest.mark.slow
def test_no_network_call_with_downloads_off(tmp_path: Path, model_dir: Path, tiny_vits: Path, tiny_sd: Path,
                                            tiny_wan: Path) -> None:
    """With ALLOW_MODEL_DOWNLOAD=false, loading every task's model by repo id (from RunPod's cache) makes
    no socket call at all: an audit hook in a fresh interpreter sees no connect and no DNS lookup."""
    cache = tmp_path / "runpod-cache"
    for saved, repo in ((tiny_vits, "test/tiny-vits"), (tiny_sd, "test/tiny-sd"), (tiny_wan, "test/tiny-wan")):
        into_hf_cache(saved, cache, repo)
    env = {**os.environ, "MODEL_DIR": str(model_dir), "WHISPER_MODEL": "tiny.en", "ALLOW_MODEL_DOWNLOAD": "false",
           "RUNPOD_HF_CACHE": str(cache), "TTS_MODEL": "test/tiny-vits", "IMAGE_MODEL": "test/tiny-sd",
           "VIDEO_MODEL": "test/tiny-wan", "DEVICE": "cpu", "WORK_DIR": str(tmp_path),
           "HF_HOME": str(tmp_path / "hf-home")}
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        env.pop(name, None)
    done = subprocess.run([sys.executable, "-c", AUDIT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["loaded"] == ["speech", "text2image", "text2video", "transcribe"], done.stderr[-3000:]
    assert report["events"] == []



def test_media_hashes_are_not_remembered_and_the_memo_is_bounded(tmp_path: Path, monkeypatch) -> None:
    """A job's media (remember=False) leaves no entry; weights files are remembered, the least
    recently used dropped past the bound, so the memo of a long-lived worker stays small."""
    monkeypatch.setattr(weights, "_known", weights.OrderedDict())
    monkeypatch.setattr(weights, "_KNOWN_MAX", 3)
    files = []
    for number in range(6):
        path = tmp_path / f"f{number}.bin"
        path.write_bytes(bytes([number]) * 10)
        files.append(path)
    media = weights.file_identity(files[0], remember=False)
    assert len(weights._known) == 0
    assert media == weights.file_identity(files[0])  # the same hash either way
    for path in files[1:]:
        weights.file_identity(path)
    assert len(weights._known) == 3
    assert [Path(marker[0]).name for marker in weights._known] == ["f3.bin", "f4.bin", "f5.bin"]


def test_whisper_checkpoints_are_found_and_identified_where_builder_bakes_them(tmp_path: Path) -> None:
    """An official model under its download's file name (``turbo`` is large-v3-turbo.pt), an imported
    one as ``<name>.pt``, a path as itself; a baked file is its hash, an official model not baked yet
    the hash its URL pins, anything else nothing."""
    import hashlib

    import whisper

    settings = load_settings({"MODEL_DIR": str(tmp_path)})
    assert weights.whisper_checkpoint("turbo", tmp_path) == tmp_path / "whisper" / "large-v3-turbo.pt"
    assert weights.whisper_checkpoint("mine", tmp_path) == tmp_path / "whisper" / "mine.pt"
    assert weights.whisper_checkpoint("/elsewhere/model.pt", tmp_path) == Path("/elsewhere/model.pt")
    assert weights.whisper_identity("tiny.en", settings) == f"sha256:{whisper._MODELS['tiny.en'].split('/')[-2]}"
    assert weights.whisper_identity("mine", settings) is None
    baked = weights.whisper_checkpoint("mine", tmp_path)
    baked.parent.mkdir()
    baked.write_bytes(b"weights")
    assert weights.whisper_identity("mine", settings) == hashlib.sha256(b"weights").hexdigest()
