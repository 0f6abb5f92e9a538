"""Where Hugging Face models come from: a local directory, or the baked cache in MODEL_DIR."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from handler.config import Settings


def hf_cache_dir(model_dir: Path) -> Path:
    return model_dir / "huggingface"


def pretrained_source(name: str, settings: Settings) -> tuple[str, dict[str, Any]]:
    """``from_pretrained`` arguments for ``name``: a directory as is, a repo id from the cache.

    Repo ids resolve in MODEL_DIR/huggingface (where builder/ bakes them) and reach the hub
    only when ALLOW_MODEL_DOWNLOAD is on.
    """
    if Path(name).is_dir():
        return name, {}
    return name, {"cache_dir": str(hf_cache_dir(settings.model_dir)),
                  "local_files_only": not settings.allow_model_download}
