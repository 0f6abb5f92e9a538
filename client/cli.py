"""``python -m client transcribe FILE... [options]``: transcribe files through a worker endpoint.

Exit status: 0 when every file was transcribed, 1 when any failed for good, 2 for a usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from client import outputs
from client.api import RUNPOD_API, Endpoint
from client.display import Display, summary_table
from client.retry import Backoff
from client.transcribe import INLINE_LIMIT, FileResult, Settings, transcribe_files

LOCAL_URL = "http://127.0.0.1:8000"
_TEXT_FORMATS = ("plain_text", "formatted_text", "srt", "vtt")
# The transcription fields a user may set: (job field, type). Flags are the names with dashes;
# only the ones given go into the job, as the worker refuses fields it does not know.
JOB_FIELDS: tuple[tuple[str, Any], ...] = (
    ("model", str), ("language", str), ("translate", bool), ("word_timestamps", bool),
    ("beam_size", int), ("best_of", int), ("batch_size", int), ("enable_vad", bool),
    ("initial_prompt", str), ("temperature", float), ("temperature_increment_on_fallback", float),
    ("patience", float), ("length_penalty", float), ("suppress_tokens", str),
    ("condition_on_previous_text", bool), ("compression_ratio_threshold", float),
    ("logprob_threshold", float), ("no_speech_threshold", float),
    ("transcription", _TEXT_FORMATS), ("translation", _TEXT_FORMATS), ("cache", bool),
    ("diarize", bool), ("num_speakers", int), ("min_speakers", int), ("max_speakers", int),
)


def _add_job_fields(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("job options (sent only when given; see docs/jobs.md's transcribe table)")
    for name, kind in JOB_FIELDS:
        flag = "--" + name.replace("_", "-")
        if kind is bool:
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None)
        elif isinstance(kind, tuple):
            group.add_argument(flag, dest=name, choices=kind, default=None)
        else:
            group.add_argument(flag, dest=name, type=kind, default=None)


def _formats(value: str) -> tuple[str, ...]:
    chosen = tuple(dict.fromkeys(part.strip().lower() for part in value.split(",") if part.strip()))
    unknown = [fmt for fmt in chosen if fmt not in outputs.FORMATS]
    if not chosen or unknown:
        raise argparse.ArgumentTypeError(f"formats are a comma-separated list of {', '.join(outputs.FORMATS)}")
    return chosen


def _positive(kind: type[int] | type[float]) -> Any:
    def parse(value: str) -> int | float:
        number = kind(value)
        if number <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, not {value}")
        return number

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m client", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    sub = commands.add_parser("transcribe", help="transcribe audio/video files",
                              description="Transcribe files; outputs go beside each file or into --out.")
    sub.add_argument("files", nargs="+", type=Path, metavar="FILE")
    where = sub.add_mutually_exclusive_group()
    where.add_argument("--endpoint", metavar="ID", help="a RunPod endpoint id (RUNPOD_API_KEY from the environment)")
    where.add_argument("--url", help=f"base URL of a local API (default {LOCAL_URL})")
    sub.add_argument("--clients", type=_positive(int), default=2, help="files in flight at once (default 2)")
    sub.add_argument("--out", type=Path, help="directory for the outputs (default: beside each file)")
    sub.add_argument("--format", dest="formats", type=_formats, default=("srt", "vtt", "json"),
                     help="outputs to write: srt,vtt,json (default all three)")
    sub.add_argument("--inline-limit", type=_positive(int), default=INLINE_LIMIT,
                     help=f"largest base64 sent inline, in bytes; bigger files are uploaded (default {INLINE_LIMIT})")
    sub.add_argument("--attempts", type=_positive(int), default=5, help="tries per file (default 5)")
    sub.add_argument("--backoff", type=_positive(float), default=1.0,
                     help="ceiling of the first retry's delay in seconds, doubling per retry (default 1)")
    sub.add_argument("--timeout", type=_positive(float), default=3600.0,
                     help="seconds a file may take in all, retries included (default 3600)")
    sub.add_argument("--report", type=Path, help="also write the summary as JSON to this file")
    sub.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_job_fields(sub)
    return parser


def _endpoint(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Endpoint:
    if args.endpoint is None:
        return Endpoint.local(args.url or LOCAL_URL)
    key = os.environ.get("RUNPOD_API_KEY", "").strip()
    if not key:
        parser.error("--endpoint needs RUNPOD_API_KEY in the environment")
    return Endpoint.runpod(args.endpoint, key, api_base=os.environ.get("RUNPOD_ENDPOINT_BASE_URL") or RUNPOD_API)


def _check_files(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[Path]:
    paths: list[Path] = args.files
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        parser.error(f"not a file: {', '.join(missing)}")
    seen: dict[Path, Path] = {}
    for path in paths:
        for target in outputs.targets(path, args.out, args.formats):
            other = seen.setdefault(target.resolve(), path)
            if other != path:
                parser.error(f"{path} and {other} would both write {target}")
    return paths


def _settings(args: argparse.Namespace) -> Settings:
    fields = {name: getattr(args, name) for name, _ in JOB_FIELDS if getattr(args, name) is not None}
    return Settings(fields=fields, formats=args.formats, out_dir=args.out, inline_limit=args.inline_limit,
                    backoff=Backoff(base_s=args.backoff, attempts=args.attempts), deadline_s=args.timeout)


def _write_report(path: Path, results: list[FileResult], wall_s: float) -> None:
    document = {"wall_s": round(wall_s, 3), "files": [result.as_dict() for result in results]}
    path.write_text(json.dumps(document, indent=2))


def main(argv: Sequence[str] | None = None, *, rng: random.Random | None = None) -> int:
    """Run the CLI; the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    endpoint = _endpoint(args, parser)
    paths = _check_files(args, parser)
    settings = _settings(args)
    started = time.monotonic()
    display = Display(paths, console=Console(stderr=True), enabled=not args.no_progress)
    with display:
        results = transcribe_files(endpoint, paths, settings, clients=args.clients, report=display, rng=rng)
    wall_s = time.monotonic() - started
    Console(file=sys.stdout).print(summary_table(results, wall_s=wall_s))
    if args.report is not None:
        _write_report(args.report, results, wall_s)
    return 0 if all(result.ok for result in results) else 1
