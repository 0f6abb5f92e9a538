"""A client for this worker's endpoints: the SDK's local API or a RunPod endpoint, the same code.

  python -m client transcribe talk.mp3 interview.wav --clients 3 --format srt,json

Modules, each one concern: ``api`` (HTTP to ``/run``, ``/status``, ``/runsync``, errors
translated at that one edge), ``retry`` (outcomes of a reply, backoff with full jitter),
``upload`` (a presigned POST of a file), ``outputs`` (SRT/VTT/JSON files from a result),
``transcribe`` (one file: inline or uploaded, run with retries, outputs written),
``display`` (progress bars and the summary table) and ``cli``.

Only the standard library and ``rich`` are imported, so the client runs without the worker's
dependencies (``requirements-client.txt``).
"""
