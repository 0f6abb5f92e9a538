"""``python -m bench [NAME ...]``: print each figure against its baseline. Names: overhead,
transcription, upload, pipelining, soak, loop, client, prompt, batched, accuracy, coldstart, diarization, vad,
vad_thresholds, int8.

``prompt``, ``batched``, ``accuracy`` and ``diarization`` (each about 15 minutes on 2 CPU cores) run only when named.
"""

from __future__ import annotations

import sys

from bench import (
    accuracy,
    batched,
    bucket,
    client,
    coldstart,
    diarization,
    int8,
    loop,
    overhead,
    residency,
    scaleout,
    serve,
    shared,
    transcription,
    upload,
    vad,
)
from bench.common import HEADER, Comparison, quiet_logs


def main(names: list[str]) -> None:
    quiet_logs()
    chosen = names or ["overhead", "transcription", "upload", "pipelining", "soak", "loop", "client"]
    rows: list[Comparison] = []
    for name in chosen:
        if name == "overhead":
            rows.append(overhead.measure())
        elif name == "transcription":
            rows.append(transcription.measure())
        elif name == "upload":
            rows.extend(upload.measure())
        elif name == "pipelining":
            rows.append(loop.pipelining())
        elif name == "soak":
            row, facts = loop.soak()
            rows.append(row)
            print(facts)
        elif name == "loop":
            rows.extend(loop.loop_overhead())
        elif name == "client":
            rows.append(client.measure())
        elif name == "prompt":
            rows.extend(loop.prompt_loop())
        elif name == "batched":
            rows.extend(batched.measure())
        elif name == "accuracy":
            rows.extend(accuracy.measure())
        elif name == "diarization":
            rows.extend(diarization.measure())
        elif name == "batched_handler":
            rows.extend(batched.measure_handler())
        elif name == "residency":
            rows.extend(residency.measure())
        elif name == "coldstart":
            rows.extend(coldstart.measure())
        elif name == "first_job":
            rows.extend(transcription.first_job())
        elif name == "shared":
            rows.extend(shared.measure())
        elif name == "cache":
            rows.append(bucket.cache_hit())
        elif name == "upload_post":
            rows.append(bucket.upload_post())
        elif name == "serve_overhead":
            rows.append(serve.serve_overhead())
        elif name == "serve_throughput":
            rows.append(serve.serve_throughput())
        elif name == "scaleout":
            rows.extend(scaleout.measure())
        elif name == "vad":
            rows.extend(vad.measure())
        elif name == "vad_thresholds":
            rows.extend(vad.thresholds())
        elif name == "int8":
            rows.extend(int8.measure())
        else:
            sys.exit(f"unknown benchmark {name!r}")
        if rows:
            print(rows[-1].row(), flush=True)
    print()
    print(HEADER)
    for row in rows:
        print(row.row())


if __name__ == "__main__":
    main(sys.argv[1:])
