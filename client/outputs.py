"""``<stem>.srt``, ``.vtt``, ``.json`` from a transcription result.

The worker returns SRT and VTT as files: inline base64 without a bucket, presigned URLs with
one (and then a ``transcript.json`` too). Without that JSON file the result itself, less its
``files``, is the JSON: it is what the worker would have stored.

The result is the endpoint's word, read as data: an output's path comes from the input file's
name and the format alone (never from a name in the result), its base64 must be valid, and its
URL must pass the endpoint's ``addresses.UrlPolicy``.
"""

from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path
from typing import Any

from client.addresses import UrlPolicy
from client.api import fetch_bytes

FORMATS = ("srt", "vtt", "json")


class OutputError(Exception):
    """The result cannot give a file the user asked for."""


class OutputMissing(OutputError):
    """The result has no file for a format the user asked for."""


class OutputBroken(OutputError):
    """The result's entry for a file is not what the worker sends: not a list, not a string, not base64."""


def targets(source: Path, out_dir: Path | None, formats: tuple[str, ...]) -> list[Path]:
    """Where the outputs of ``source`` go: beside it, or in ``out_dir``."""
    directory = out_dir if out_dir is not None else source.parent
    return [directory / f"{source.stem}.{fmt}" for fmt in formats]


def _file_entry(output: dict[str, Any], name: str) -> dict[str, Any] | None:
    files = output.get("files") or []
    if not isinstance(files, list):
        raise OutputBroken(f"the result's files are of type {type(files).__name__}, not a list")
    for entry in files:
        if isinstance(entry, dict) and entry.get("name") == name:
            return entry
    return None


def _decoded(value: object, name: str) -> bytes:
    if not isinstance(value, str):
        raise OutputBroken(f"{name}: base64 is of type {type(value).__name__}, not a string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:  # ValueError: characters outside ASCII
        raise OutputBroken(f"{name}: base64 is not valid ({exc}), starting {value[:24]!r}") from exc


def content(output: dict[str, Any], fmt: str, *, policy: UrlPolicy, timeout: float) -> bytes:
    """The bytes of the transcript in ``fmt``, from the result."""
    name = f"transcript.{fmt}"
    entry = _file_entry(output, name)
    if entry is not None and entry.get("base64"):
        return _decoded(entry["base64"], name)
    if entry is not None and entry.get("url"):
        return fetch_bytes(entry["url"], policy=policy, timeout=timeout, what=name)
    if fmt == "json":
        document = {key: value for key, value in output.items() if key != "files"}
        return json.dumps(document, ensure_ascii=False, indent=2).encode()
    raise OutputMissing(f"the result has no transcript.{fmt}")


def write(output: dict[str, Any], source: Path, *, out_dir: Path | None, formats: tuple[str, ...],
          policy: UrlPolicy, timeout: float) -> list[Path]:
    """Write each asked format of ``source``'s result; the paths written."""
    written = []
    for fmt, target in zip(formats, targets(source, out_dir, formats), strict=True):
        data = content(output, fmt, policy=policy, timeout=timeout)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        written.append(target)
    return written
