"""``python -m handler``: start the worker.

On RunPod this runs the SDK's job loop; locally it runs ``test_input.json`` (or
``--test_input '{...}'``) once, or serves an HTTP API with ``--rp_serve_api``.
"""

from __future__ import annotations

import os
import sys
import threading

# The SDK reads its level once, at import, and at DEBUG it logs whole job outputs.
os.environ.setdefault("RUNPOD_LOG_LEVEL", "INFO")

from handler.app import get_worker
from handler.config import SettingsError, load_settings
from handler.logs import configure_logging, get_logger, redact_sdk_logs


def main() -> None:
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"invalid configuration: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    json_logs = settings.log_format == "json" or (settings.log_format == "auto" and settings.on_runpod)
    configure_logging(level=settings.log_level, json=json_logs)
    redact_sdk_logs()
    worker = get_worker(settings)
    get_logger("handler").info(
        "worker.start", device=worker.runtime.device, slots=settings.max_concurrent_generations,
        model=settings.whisper_model, bucket=settings.bucket is not None,
    )
    if settings.preload:
        threading.Thread(target=worker.preload, name="preload", daemon=True).start()

    import runpod

    runpod.serverless.start({"handler": worker.handle})


if __name__ == "__main__":
    main()
