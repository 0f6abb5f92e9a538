"""``make gpu-bundle``: what the GPU run-book needs on a bare device machine, in ``.gpu/`` (ignored).

The device has Python 3.12 with torch (CUDA), transformers, accelerate, numpy, pytest, psutil,
prometheus-client, tiktoken, numba, triton, httpx, huggingface-hub... but none of the worker's
other imports, and nothing can be fetched there. So this downloads here, for CPython 3.12 on
manylinux x86-64 and without dependencies (each one's needs were checked against the device's
package list), the wheels of exactly those imports, at the versions this venv runs (``WHEELS``):

- ``.gpu/wheels/``: openai-whisper (built from its sdist: it ships no wheel), more-itertools,
  diffusers, pydantic and its core, structlog, boto3 with botocore (its service data cut to S3
  and STS: 17 MB otherwise, and the worker calls no other service), s3transfer, jmespath,
  ffmpeg-python and future, typing-extensions (pydantic needs a newer one than the device may hold);
- ``.gpu/models/tiny.en.int8.pt``: real tiny.en weights, int8 with one fp16 scale per output row
  (the checkpoint is fp16 already, 75.6 MB: too big to travel; int8 is half), only when the
  whole tree that travels stays under ``LIMIT`` with ``MARGIN`` to spare. Else the run-book uses a
  random tiny.en-shaped model, which times the same: it decodes a fixed number of tokens a window.

bench/gpu_device.sh installs the wheels offline over the device's own torch and runs bench/gpu.py.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / ".gpu"
LIMIT = 64 * 2**20  # what travels to the device: tracked, untracked-not-ignored and carried files
MARGIN = 4 * 2**20  # room for results and edits made after the bundle was built
# Distributions the run-book's parts import that the device lacks (version: this venv's).
WHEELS = ("openai-whisper", "more-itertools", "diffusers", "pydantic", "pydantic-core", "annotated-types",
          "typing-inspection", "typing-extensions", "structlog", "boto3", "botocore", "s3transfer", "jmespath",
          "ffmpeg-python", "future")
SDIST_ONLY = frozenset({"openai-whisper"})
PLATFORM = ["--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux2014_x86_64",
            "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux_2_28_x86_64"]
BOTOCORE_SERVICES = frozenset({"s3", "sts"})
WEIGHTS = "tiny.en.int8.pt"


def pins(names: Iterable[str] = WHEELS) -> list[str]:
    return [f"{name}=={importlib.metadata.version(name)}" for name in names]


def download(wheels: Path) -> None:
    """The wheels of ``WHEELS`` into ``wheels`` (emptied first)."""
    shutil.rmtree(wheels, ignore_errors=True)
    wheels.mkdir(parents=True)
    binary = [pin for pin in pins() if pin.split("==")[0] not in SDIST_ONLY]
    source = [pin for pin in pins() if pin.split("==")[0] in SDIST_ONLY]
    pip = [sys.executable, "-m", "pip", "-q"]
    subprocess.run([*pip, "download", "--no-deps", "--only-binary=:all:", *PLATFORM, "-d", str(wheels), *binary],
                   check=True)
    subprocess.run([*pip, "wheel", "--no-deps", "-w", str(wheels), *source], check=True)  # pure Python
    for wheel in wheels.glob("botocore-*.whl"):
        slim_botocore(wheel)


def slim_botocore(wheel: Path, keep: frozenset[str] = BOTOCORE_SERVICES) -> None:
    """Rewrite botocore's wheel without the service models other than ``keep`` (its RECORD too)."""
    def wanted(name: str) -> bool:
        parts = name.split("/")
        return not (len(parts) > 3 and parts[:2] == ["botocore", "data"] and parts[2] not in keep)

    slim = wheel.with_suffix(".slim")
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            if not wanted(info.filename):
                continue
            data = source.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines(keepends=True)
                data = "".join(line for line in lines if wanted(line.split(",")[0])).encode()
            target.writestr(info, data)
    slim.replace(wheel)


def compact_weights(checkpoint: Path, out: Path) -> None:
    """An int8 copy of a Whisper checkpoint: each 2-D weight as int8 rows and one fp16 scale per
    row (symmetric, max-abs); vectors (biases, norms) and the rest stay as they were."""
    source = torch.load(checkpoint, map_location="cpu", weights_only=True)
    quantized: dict[str, torch.Tensor] = {}
    scales: dict[str, torch.Tensor] = {}
    kept: dict[str, torch.Tensor] = {}
    for name, tensor in source["model_state_dict"].items():
        if tensor.dim() == 2 and tensor.is_floating_point():
            scale = tensor.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127
            quantized[name] = (tensor.float() / scale).round().clamp(-127, 127).to(torch.int8)
            scales[name] = scale.half()
        else:
            kept[name] = tensor
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"dims": source["dims"], "alignment_heads": source.get("alignment_heads"), "int8": quantized,
                "scales": scales, "kept": kept}, out)


def expand_weights(compact: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint (``dims``, ``model_state_dict``, ``alignment_heads``) from :func:`compact_weights`'s."""
    state = dict(compact["kept"])
    for name, values in compact["int8"].items():
        state[name] = (values.float() * compact["scales"][name].float()).half()
    return {"dims": compact["dims"], "model_state_dict": state, "alignment_heads": compact["alignment_heads"]}


def load_compact(path: Path, device: str) -> Any:
    """The Whisper model of an int8 copy, on ``device``."""
    from whisper.model import ModelDimensions, Whisper

    checkpoint = expand_weights(torch.load(path, map_location="cpu", weights_only=True))
    model = Whisper(ModelDimensions(**checkpoint["dims"]))
    model.load_state_dict(checkpoint["model_state_dict"])
    if checkpoint["alignment_heads"] is not None:
        model.set_alignment_heads(checkpoint["alignment_heads"])
    return model.to(device)


def size(path: Path) -> int:
    """Bytes of a file, or of every file under a folder (links not followed)."""
    if path.is_symlink() or path.is_file():
        return path.lstat().st_size
    return sum(f.lstat().st_size for f in path.rglob("*") if f.is_symlink() or f.is_file())


def tree_bytes(root: Path = ROOT) -> int:
    """What travels without ``carry``: tracked files and untracked ones git does not ignore."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                            capture_output=True, check=True).stdout.decode().split("\0")
    return sum(size(root / name) for name in listed if name and (root / name).exists())


def fits(tree: int, wheels: int, weights: int, *, limit: int = LIMIT, margin: int = MARGIN) -> bool:
    """Whether the weights can travel too: the whole call, with room to spare."""
    return tree + wheels + weights + margin <= limit


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=BUNDLE)
    parser.add_argument("--model-dir", type=Path, default=Path(os.environ.get("MODEL_DIR", ROOT / "models")))
    parser.add_argument("--no-weights", action="store_true", help="wheels only: the random tiny.en-shaped model")
    args = parser.parse_args(argv)
    download(args.out / "wheels")
    weights_path = args.out / "models" / WEIGHTS
    weights_path.unlink(missing_ok=True)
    tree, wheels = tree_bytes(), size(args.out / "wheels")
    checkpoint = args.model_dir / "whisper" / "tiny.en.pt"
    note = "no weights asked for" if args.no_weights else f"{checkpoint} missing"
    if not args.no_weights and checkpoint.is_file():
        with tempfile.TemporaryDirectory() as scratch:
            candidate = Path(scratch) / WEIGHTS
            compact_weights(checkpoint, candidate)
            if fits(tree, wheels, size(candidate)):
                weights_path.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(candidate, weights_path)
                note = f"real tiny.en weights, int8 ({size(weights_path) / 2**20:.1f} MiB)"
            else:
                note = f"tiny.en int8 ({size(candidate) / 2**20:.1f} MiB) would not fit"
    total = tree + size(args.out)
    print(f"gpu bundle: tree {tree / 2**20:.1f} MiB + {args.out.name}/ {size(args.out) / 2**20:.1f} MiB "
          f"= {total / 2**20:.1f} MiB of {LIMIT / 2**20:.0f} MiB; {note}")
    if total > LIMIT:
        print("gpu bundle: too big to travel", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
