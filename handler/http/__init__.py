"""Serve mode (``python -m handler serve``): the worker as an HTTP server, on the same core.

RunPod load-balancing endpoints (and any container host) send HTTP straight to the worker.
Every route ends in :meth:`handler.app.Worker.handle`, as a queued job does, so registry, gate,
shared Whisper batches, result cache, storage, admission, error codes, request ids and logs are
the queue path's own. This package holds no model code:

    server.py    uvicorn, the health route's states, SIGTERM draining, the preload
    protocol.py  h11 with a deadline on each request head (the server's own bounds)
    routes.py    the route table and the routes, each one job through the Worker; JSON bodies
    limiter.py   the request limiter: MAX_CONCURRENT_REQUESTS places, 429 beyond them
    middlewares.py  request metrics and logs, request bounds, bearer key, browser guard
    sse.py       the server-sent events of a streamed transcription
    openai.py    OpenAI's request fields -> a job's input, a job's result -> OpenAI's response
    uploads.py   multipart bodies streamed into the job's directory, cut at the size limit
    errors.py    the one mapping from the job contract's error codes to HTTP statuses and bodies
    metrics.py   Prometheus metrics of requests, jobs, slots, batches, memory
"""
