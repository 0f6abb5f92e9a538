"""Where Hugging Face models come from: a local directory, RunPod's model cache, or the baked cache.

A repo id is looked up, without any network call, in RunPod's cached models
(``RUNPOD_HF_CACHE``, mounted on endpoints that enable the model cache) and then in
MODEL_DIR/huggingface (where builder/ bakes them); only a repo found in neither is
downloaded, and only when ALLOW_MODEL_DOWNLOAD is on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from handler.config import Settings
from handler.runtime.identity import directory_identity


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
    for cache in (settings.runpod_hf_cache, hf_cache_dir(settings.model_dir)):
        ref = cache / f"models--{name.replace('/', '--')}" / "refs" / "main"
        if cached(cache, name) and ref.is_file():
            return f"revision:{ref.read_text().strip()}"
    return None
