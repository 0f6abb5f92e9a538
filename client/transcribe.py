"""One file through the worker: inline or uploaded, run with retries, outputs written.

Each attempt is the whole way from the file to a result: a file too big to go inline is
uploaded again on a retry, since the worker deletes an uploaded object once it has read it.
"""

from __future__ import annotations

import base64
import random
import re
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from client import outputs
from client.api import ApiError, Endpoint, Polling, remaining
from client.jobs import attempt
from client.retry import Backoff, Outcome, Wait, with_retries
from client.upload import post_file, upload_target

# Base64 of a file inline in /run stays under this, so the body stays under RunPod's 10 MB.
INLINE_LIMIT = 7_000_000
# Bounded digits: the message is the endpoint's, and int() refuses numbers over 4300 digits.
_FRACTION = re.compile(r"(\d{1,12})\s*/\s*(\d{1,12})")


class Report(Protocol):
    """Where a file's progress goes (the progress bars, or nothing)."""

    def update(self, path: Path, state: str, *, completed: float | None = None, total: float | None = None,
               note: str = "") -> None: ...

    def finished(self, result: FileResult) -> None: ...


@dataclass(frozen=True)
class Settings:
    """How files are transcribed."""

    # The job input's transcription fields the user set (nothing else: the worker refuses unknown fields).
    fields: Mapping[str, Any] = field(default_factory=dict)
    formats: tuple[str, ...] = outputs.FORMATS
    # None: outputs go beside each input file.
    out_dir: Path | None = None
    # Largest base64 of a file sent inline; bigger files go through the upload task.
    inline_limit: int = INLINE_LIMIT
    backoff: Backoff = field(default_factory=Backoff)
    # Seconds a file may take in all, retries and uploads included.
    deadline_s: float = 3600.0
    polling: Polling = field(default_factory=Polling)


@dataclass
class FileResult:
    """What happened to one file."""

    path: Path
    code: str
    message: str = ""
    via: str = "inline"
    attempts: int = 0
    waits: list[Wait] = field(default_factory=list)
    wall_s: float = 0.0
    # The audio's duration, as the worker measured it.
    duration_s: float | None = None
    # The worker's own time for the job (timings.total_ms), and the model's part of it (run_ms).
    job_s: float | None = None
    run_s: float | None = None
    written: list[Path] = field(default_factory=list)
    # With diarize: each speaker's label and seconds spoken, in order of first speech.
    speakers: list[tuple[str, float]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.code == "success"

    @property
    def real_time_factor(self) -> float | None:
        """Audio seconds per wall-clock second."""
        if self.duration_s is None or self.wall_s <= 0:
            return None
        return self.duration_s / self.wall_s

    def as_dict(self) -> dict[str, Any]:
        return {
            "file": str(self.path), "outcome": self.code, "message": self.message, "via": self.via,
            "attempts": self.attempts, "wall_s": round(self.wall_s, 3), "duration_s": self.duration_s,
            "job_s": self.job_s, "run_s": self.run_s, "real_time_factor": self.real_time_factor,
            "waits": [{"code": w.code, "delay_s": w.delay_s, "ceiling_s": w.ceiling_s} for w in self.waits],
            "written": [str(p) for p in self.written],
            "speakers": [{"label": label, "seconds": seconds} for label, seconds in self.speakers],
        }


class _Failed(Exception):
    """A step before the transcription job (the upload task) ended in this outcome."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.message)
        self.outcome = outcome


def fits_inline(path: Path, limit: int) -> bool:
    """Whether the base64 of ``path`` is within ``limit`` characters."""
    return 4 * -(-path.stat().st_size // 3) <= limit


class _Job:
    """One file's attempts: the state they share."""

    def __init__(self, endpoint: Endpoint, path: Path, settings: Settings, report: Report, deadline: float) -> None:
        self.endpoint = endpoint
        self.path = path
        self.settings = settings
        self.report = report
        self.deadline = deadline
        try:
            self.inline = fits_inline(path, settings.inline_limit)
        except OSError:  # gone since it was checked: the attempt's read says so as READ_FAILED
            self.inline = True

    def attempt(self) -> Outcome:
        try:
            job_input = self._inline_input() if self.inline else self._uploaded_input()
        except _Failed as exc:
            return exc.outcome
        except ApiError as exc:
            return Outcome(exc.code, exc.retryable, str(exc))
        except OSError as exc:  # the local file (urllib's OSErrors are ApiErrors by now)
            return Outcome("READ_FAILED", False, f"{self.path.name}: {exc.strerror or exc}")
        self.report.update(self.path, "running")
        return self._run(job_input)

    def _run(self, job_input: dict[str, Any]) -> Outcome:
        return attempt(self.endpoint, job_input, deadline=self.deadline, polling=self.settings.polling,
                       on_status=self._on_status)

    def _on_status(self, reply: dict[str, Any]) -> None:
        if reply.get("status") == "IN_QUEUE":
            self.report.update(self.path, "queued", note="at the endpoint")
            return
        message = reply.get("output")
        match = _FRACTION.search(message) if isinstance(message, str) else None
        if match:
            self.report.update(self.path, "running", completed=int(match[1]), total=int(match[2]), note=str(message))
        else:
            self.report.update(self.path, "running", note=str(message or ""))

    def _inline_input(self) -> dict[str, Any]:
        data = base64.b64encode(self.path.read_bytes()).decode("ascii")
        return {"task": "transcribe", "audio_base64": data, **self.settings.fields}

    def _uploaded_input(self) -> dict[str, Any]:
        size = self.path.stat().st_size
        self.report.update(self.path, "uploading", completed=0, total=size)
        result = self._run({"task": "upload", "file_name": self.path.name, "size": size})
        if not result.ok:
            raise _Failed(result)
        assert result.reply is not None
        url, form, reference = upload_target(result.reply["output"])
        sent = 0

        def on_bytes(count: int) -> None:
            nonlocal sent
            sent += count
            self.report.update(self.path, "uploading", completed=sent, total=size)

        post_file(url, form, self.path, policy=self.endpoint.url_policy, timeout=remaining(self.deadline),
                  on_bytes=on_bytes)
        return {"task": "transcribe", "audio": reference, "delete_after_read": True, **self.settings.fields}


def transcribe_file(endpoint: Endpoint, path: Path, settings: Settings, *, report: Report,
                    rng: random.Random) -> FileResult:
    """Transcribe ``path`` and write its outputs; never raises for a failed job."""
    started = time.monotonic()
    job = _Job(endpoint, path, settings, report, started + settings.deadline_s)

    def on_retry(wait: Wait) -> None:
        report.update(path, "retrying", total=None, note=f"{wait.code}, again in {wait.delay_s:.1f} s")

    retried = with_retries(job.attempt, settings.backoff, deadline=job.deadline, rng=rng, on_retry=on_retry)
    last = retried.outcome
    result = FileResult(path, last.code, last.message, "inline" if job.inline else "upload", retried.attempts,
                        retried.waits)
    if last.ok and last.reply is not None:
        _finish(result, last.reply["output"], endpoint, settings, report, job.deadline)
    result.wall_s = time.monotonic() - started
    report.finished(result)
    return result


def _finish(result: FileResult, output: dict[str, Any], endpoint: Endpoint, settings: Settings, report: Report,
            deadline: float) -> None:
    duration = output.get("duration_s")
    result.duration_s = float(duration) if isinstance(duration, int | float) else None
    timings = output.get("timings")
    timings = timings if isinstance(timings, dict) else {}
    result.job_s, result.run_s = _seconds(timings.get("total_ms")), _seconds(timings.get("run_ms"))
    result.speakers = _speakers(output.get("speakers"))
    report.update(result.path, "writing")
    try:
        result.written = outputs.write(output, result.path, out_dir=settings.out_dir, formats=settings.formats,
                                       policy=endpoint.url_policy, timeout=remaining(deadline, cap=120))
    except (ApiError, outputs.OutputError, OSError) as exc:
        result.code, result.message = "OUTPUT_FAILED", str(exc)


def _speakers(value: Any) -> list[tuple[str, float]]:
    """The result's ``speakers`` (a list of ``{label, seconds}``), what of it is well formed."""
    if not isinstance(value, list):
        return []
    return [(str(item["label"]), float(item["seconds"])) for item in value
            if isinstance(item, dict) and isinstance(item.get("seconds"), int | float) and "label" in item]


def _seconds(ms: Any) -> float | None:
    return ms / 1000 if isinstance(ms, int | float) else None


def transcribe_files(endpoint: Endpoint, paths: list[Path], settings: Settings, *, clients: int, report: Report,
                     rng: random.Random | None = None) -> list[FileResult]:
    """Every file, ``clients`` at a time; results in the order of ``paths``."""
    rng = rng or random.Random()  # noqa: S311 (jitter, not secrecy)
    with ThreadPoolExecutor(max_workers=clients, thread_name_prefix="client") as pool:
        futures = [pool.submit(transcribe_file, endpoint, path, settings, report=report, rng=rng) for path in paths]
        return [future.result() for future in futures]
