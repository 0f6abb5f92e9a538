"""``python -m handler``: start the worker.

On RunPod this runs the SDK's job loop; locally it runs ``test_input.json`` (or
``--test_input '{...}'``) once, or serves an HTTP API with ``--rp_serve_api``.
``python -m handler serve`` (or ``WORKER_MODE=http``) serves the worker's own HTTP API instead:
OpenAI-compatible routes and the native job route, for RunPod load-balancing endpoints
(:mod:`handler.http`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

# The SDK reads its level once, at import, and at DEBUG it logs whole job outputs.
os.environ.setdefault("RUNPOD_LOG_LEVEL", "INFO")
# Numba (whisper's word-timing DTW, one thread) would start an OpenMP thread per core on first
# use and keep them: past the cores, torch's own OpenMP threads stop spinning (handler.runtime.threads).
os.environ.setdefault("NUMBA_NUM_THREADS", "1")

from handler.app import get_worker
from handler.config import SettingsError, library_environment, load_settings
from handler.logs import configure_logging, get_logger, redact_sdk_logs
from handler.runpod_import import import_runpod
from handler.runtime.devices import GpuUnusable, check_device, describe
from handler.runtime.threads import torch_threads

# Before anything imports the SDK its own way, which would run its processor probe (handler.runpod_import).
runpod = import_runpod()


def main() -> None:
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"invalid configuration: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    # Before any model library is imported: they read these once, at import.
    os.environ.update(library_environment(settings))
    json_logs = settings.log_format == "json" or (settings.log_format == "auto" and settings.on_runpod)
    configure_logging(level=settings.log_level, json=json_logs)
    redact_sdk_logs()
    try:
        check_device(settings)
    except GpuUnusable as exc:
        print(f"cannot start: {exc}", file=sys.stderr)
        raise SystemExit(3) from exc
    torch_threads(1)  # the main thread loads and serves; the gate's threads compute (handler.runtime.threads)
    worker = get_worker(settings)
    if sys.argv[1:2] == ["serve"] or settings.worker_mode == "http":
        from handler.http.server import serve

        serve(worker)  # preloads in the background: the health route says 204 meanwhile
        return
    # Before the first job-take, so loading and warm-up are never paid inside a job.
    if settings.max_concurrent_generations is None:
        worker.size_gate()  # needs the model loaded: this is the preload
    elif settings.preload:
        worker.preload()
    get_logger("handler").info(
        "worker.start", **describe(worker.runtime.device), slots=worker.runtime.gate.slots,
        jobs=settings.max_concurrent_jobs, model=settings.whisper_model, bucket=settings.bucket is not None,
    )

    from handler.runtime.scaler import prompt_job_loop

    _chain_shutdown(worker.begin_shutdown)
    jobs = settings.max_concurrent_jobs
    with prompt_job_loop():  # no idle second between jobs (see handler.runtime.scaler)
        runpod.serverless.start({
            "handler": worker.handle, "concurrency_modifier": lambda _current: jobs,
            "shutdown_grace_s": settings.shutdown_grace_s,  # how long a take open at SIGTERM may last
        })


def _chain_shutdown(on_shutdown: Callable[[], None]) -> None:
    """Run ``on_shutdown`` when the SDK's job loop is told to stop (SIGTERM/SIGINT).

    The SDK installs its own signal handlers when its loop starts, replacing any set before,
    so its handler method is wrapped instead: the SDK still stops taking jobs and drains,
    and the worker cancels what outlives the grace period.
    """
    from runpod.serverless.modules.rp_scale import JobScaler

    original = JobScaler.handle_shutdown

    def handle_shutdown(scaler: JobScaler, signum: int, frame: Any) -> None:
        on_shutdown()
        original(scaler, signum, frame)

    JobScaler.handle_shutdown = handle_shutdown


if __name__ == "__main__":
    main()
