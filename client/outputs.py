"""``<stem>.srt``, ``.vtt``, ``.json`` from a transcription result.

The worker returns SRT and VTT as files: inline base64 without a bucket, presigned URLs with
one (and then a ``transcript.json`` too). Without that JSON file the result itself, less its
``files``, is the JSON: it is what the worker would have stored.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from client.api import fetch_bytes

FORMATS = ("srt", "vtt", "json")


class OutputMissing(Exception):
    """The result has no file for a format the user asked for."""


def targets(source: Path, out_dir: Path | None, formats: tuple[str, ...]) -> list[Path]:
    """Where the outputs of ``source`` go: beside it, or in ``out_dir``."""
    directory = out_dir if out_dir is not None else source.parent
    return [directory / f"{source.stem}.{fmt}" for fmt in formats]


def _file_entry(output: dict[str, Any], name: str) -> dict[str, Any] | None:
    for entry in output.get("files") or []:
        if isinstance(entry, dict) and entry.get("name") == name:
            return entry
    return None


def content(output: dict[str, Any], fmt: str, *, timeout: float) -> bytes:
    """The bytes of the transcript in ``fmt``, from the result."""
    entry = _file_entry(output, f"transcript.{fmt}")
    if entry is not None and entry.get("base64"):
        return base64.b64decode(entry["base64"])
    if entry is not None and entry.get("url"):
        return fetch_bytes(entry["url"], timeout=timeout, what=f"transcript.{fmt}")
    if fmt == "json":
        document = {key: value for key, value in output.items() if key != "files"}
        return json.dumps(document, ensure_ascii=False, indent=2).encode()
    raise OutputMissing(f"the result has no transcript.{fmt}")


def write(output: dict[str, Any], source: Path, *, out_dir: Path | None, formats: tuple[str, ...],
          timeout: float) -> list[Path]:
    """Write each asked format of ``source``'s result; the paths written."""
    written = []
    for fmt, target in zip(formats, targets(source, out_dir, formats), strict=True):
        data = content(output, fmt, timeout=timeout)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        written.append(target)
    return written
