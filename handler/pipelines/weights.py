"""Where weights come from and what they are: one place that finds and identifies them.

Finding. A Hugging Face repo id is looked up, without any network call, in RunPod's cached
models (``RUNPOD_HF_CACHE``, mounted on endpoints that enable the model cache) and then in
MODEL_DIR/huggingface (where builder/ bakes them); only a repo found in neither is
downloaded, and only when ALLOW_MODEL_DOWNLOAD is on. Whisper checkpoints are baked in
MODEL_DIR/whisper: official models under the file name of their official download
(``large-v3-turbo.pt`` for ``turbo``), imported ones as ``<name>.pt``.

Identifying. The result cache keys on weights, not on names. Hashing a multi-GB checkpoint
takes seconds, so each weights file's hash is computed once per process (remembered by path,
size and modification time, for the most recent few hundred files) and, for models in the
Hugging Face cache, the snapshot's revision (the commit of the weights) stands for its files.
A job's media is hashed once and never remembered: it is never seen again. A Whisper
checkpoint is its file's hash, or before it is baked the hash its official download URL pins.

builder/ bakes into the same places, through this module: it is copied into the image before the
bake, so it imports only the standard library, the settings, and openai-whisper's model table.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import whisper

from handler.config import Settings

_CHUNK = 4 * 2**20
# Weights files remembered: far more than a worker serves, so a memo that never grows past it.
_KNOWN_MAX = 512
# Guards _known: the hashes of files already read, by (path, size, mtime), least recent first.
_known_lock = threading.Lock()
_known: OrderedDict[tuple[str, int, int], str] = OrderedDict()
# A Whisper model named, not a path to a checkpoint.
_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def file_identity(path: Path, *, remember: bool = True) -> str:
    """sha256 of a file's bytes (remembered while the file is unchanged, unless ``remember`` is False)."""
    stat = path.stat()
    marker = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    with _known_lock:
        found = _known.get(marker)
        if found is not None:
            _known.move_to_end(marker)
            return found
    digest = hashlib.sha256()
    with path.open("rb") as source:
        while chunk := source.read(_CHUNK):
            digest.update(chunk)
    value = digest.hexdigest()
    if remember:
        with _known_lock:
            _known[marker] = value
            while len(_known) > _KNOWN_MAX:
                _known.popitem(last=False)
    return value


def directory_identity(path: Path) -> str:
    """A hash over every file of a model directory (names and contents)."""
    if path.parent.name == "snapshots":  # a Hugging Face cache snapshot: its name is the revision
        return f"revision:{path.name}"
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode())
        digest.update(file_identity(file).encode())
    return digest.hexdigest()


def hf_cache_dir(model_dir: Path) -> Path:
    return model_dir / "huggingface"


def cached(cache: Path, repo_id: str) -> bool:
    """Whether the Hugging Face cache at ``cache`` holds a snapshot of ``repo_id``."""
    snapshots = cache / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    return snapshots.is_dir() and any(snapshots.iterdir())


def pretrained_source(name: str, settings: Settings) -> tuple[str, dict[str, Any]]:
    """``from_pretrained`` arguments for ``name``: a directory as is, a repo id from a cache."""
    if Path(name).is_dir():
        return name, {}
    for cache in (settings.runpod_hf_cache, hf_cache_dir(settings.model_dir)):
        if cached(cache, name):
            return name, {"cache_dir": str(cache), "local_files_only": True}
    return name, {"cache_dir": str(hf_cache_dir(settings.model_dir)),
                  "local_files_only": not settings.allow_model_download}


def model_identity(name: str, settings: Settings) -> str | None:
    """What the weights of ``name`` are (for the result cache): a directory's file hashes, or the
    revision of the cached snapshot; None when the model is not on this machine yet."""
    if Path(name).is_dir():
        return directory_identity(Path(name))
    snapshot = pretrained_dir(name, settings)  # named after the revision refs/main points at
    return f"revision:{snapshot.name}" if snapshot is not None else None


def pretrained_dir(name: str, settings: Settings) -> Path | None:
    """The local folder of ``name``'s files: a directory as is, or the cached snapshot; None when
    the model is not on this machine yet."""
    if Path(name).is_dir():
        return Path(name)
    for cache in (settings.runpod_hf_cache, hf_cache_dir(settings.model_dir)):
        ref = cache / f"models--{name.replace('/', '--')}" / "refs" / "main"
        if cached(cache, name) and ref.is_file():
            return ref.parent.parent / "snapshots" / ref.read_text().strip()
    return None


# A weights file of no variant: `model.safetensors`, or one shard `model-00001-of-00002.safetensors`
# (`model.fp16.safetensors` is a variant, which from_pretrained without `variant` does not read).
_PLAIN_WEIGHTS = re.compile(r"[^.]+(-\d+-of-\d+)?\.safetensors")


@functools.lru_cache(maxsize=32)
def safetensors_elements(folder: Path) -> dict[str, int]:
    """Elements of the weights in each component folder of a diffusers or transformers model
    (``""``: the folder itself), read from the files' headers: what the model will weigh, before
    it loads. Read once per folder and process (jobs ask for it each time; weights do not change
    under a running worker)."""
    counts: dict[str, int] = {}
    for path in sorted(folder.rglob("*.safetensors")):
        if not _PLAIN_WEIGHTS.fullmatch(path.name):
            continue
        with path.open("rb") as file:
            header = json.loads(file.read(int.from_bytes(file.read(8), "little")))
        component = path.parent.relative_to(folder).as_posix().removeprefix(".")
        counts[component] = counts.get(component, 0) + sum(
            math.prod(entry["shape"]) for name, entry in header.items() if name != "__metadata__")
    return counts


def whisper_dir(model_dir: Path) -> Path:
    return model_dir / "whisper"


def whisper_checkpoint(name: str, model_dir: Path) -> Path:
    """Where the weights of Whisper model ``name`` are (or would be) baked."""
    if not _PLAIN_NAME.fullmatch(name):
        return Path(name)
    official = whisper._MODELS.get(name)
    filename = os.path.basename(urlsplit(official).path) if official else f"{name}.pt"
    return whisper_dir(model_dir) / filename


def diarization_weights(name: str, model_dir: Path) -> Path:
    """Where DIARIZATION_MODEL ``name`` is: a path as is, a file name under MODEL_DIR/diarize."""
    path = Path(name)
    return path if path.is_absolute() or len(path.parts) > 1 else model_dir / "diarize" / name


def whisper_identity(name: str, settings: Settings) -> str | None:
    """The weights of Whisper model ``name``: the hash of the baked file, else the hash openai-whisper's
    download URL pins; None when there are none to know (the load would fail anyway)."""
    path = whisper_checkpoint(name, settings.model_dir)
    if path.is_file():
        return file_identity(path)
    official = whisper._MODELS.get(name)
    return f"sha256:{official.split('/')[-2]}" if official else None
