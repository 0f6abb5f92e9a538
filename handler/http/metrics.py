"""Prometheus metrics of the HTTP worker: requests, jobs by task and outcome, stage latencies,
and, read at scrape time, slots, batch sizes and memory (one registry per app, no globals)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from handler.runtime.container import Runtime
from handler.runtime.memory import read_memory

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
# The job's timings (ms) each latency histogram is made of.
_STAGES = {"queued": "queued_ms", "run": "run_ms", "total": "total_ms"}


class _RuntimeCollector(Collector):
    """What the runtime knows now: GPU slots, batches formed so far, memory."""

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime

    def collect(self) -> Iterator[Metric]:
        gate = self._runtime.gate
        slots = GaugeMetricFamily("worker_slots", "GPU slots by state", labels=["state"])
        slots.add_metric(["total"], gate.slots)
        slots.add_metric(["busy"], gate.busy)
        slots.add_metric(["waiting"], gate.waiting)
        yield slots
        yield self._batches()
        yield from self._residency()
        memory = read_memory()
        gauge = GaugeMetricFamily("worker_memory_bytes", "RAM and VRAM", labels=["kind"])
        for kind, value in (("ram_total", memory.ram_total), ("ram_available", memory.ram_available),
                            ("rss", memory.rss), ("vram_total", memory.vram_total), ("vram_free", memory.vram_free)):
            gauge.add_metric([kind], value)
        yield gauge

    def _residency(self) -> Iterator[Metric]:
        residency = self._runtime.residency
        placed = GaugeMetricFamily("worker_pipeline_bytes", "bytes of each loaded pipeline's weights, by where "
                                   "they are (device, parked in host RAM, dropped)", labels=["task", "model", "place"])
        for key, info in residency.snapshot():
            placed.add_metric([key.task, key.model, info["place"]], info["bytes"])
        yield placed
        moves = CounterMetricFamily("worker_pipeline_moves", "pipelines moved to make room on the device, by task "
                                    "and direction (to_device, park, drop)", labels=["task", "direction"])
        for (task, direction), count in sorted(residency.move_counts().items()):
            moves.add_metric([task, direction], count)
        yield moves

    def _batches(self) -> Metric:
        family = HistogramMetricFamily("worker_batch_size", "items per batch run, by batcher",
                                       labels=["batcher"])
        for key, batcher in self._runtime.batchers.all():
            stats = batcher.stats()
            buckets = [(str(bound), float(sum(n for size, n in stats.sizes.items() if size <= bound)))
                       for bound in _BATCH_BUCKETS]
            buckets.append(("+Inf", float(stats.batches)))
            family.add_metric(["/".join(str(part) for part in key) if isinstance(key, tuple) else str(key)],
                              buckets, float(stats.items))
        return family


class Metrics:
    """The app's metrics; ``record_job`` counts each job's result."""

    def __init__(self, runtime: Runtime, *, tasks: Iterable[str]) -> None:
        # Labels come from this closed set: a task name a client made up is `unknown`, so what
        # clients send cannot add series (each one kept for the process's life).
        self._tasks = frozenset(tasks)
        self.registry = CollectorRegistry()
        self.requests = Counter("worker_http_requests", "HTTP requests answered", ["route", "status"],
                                registry=self.registry)
        self.request_seconds = Histogram("worker_http_request_seconds", "HTTP request time", ["route"],
                                         buckets=_SECONDS, registry=self.registry)
        self.in_flight = Gauge("worker_http_in_flight", "HTTP requests held now", registry=self.registry)
        self.jobs = Counter("worker_jobs", "jobs answered by task and outcome (success or error code)",
                            ["task", "outcome"], registry=self.registry)
        self.cache_hits = Counter("worker_cache_hits", "jobs answered from the result cache", ["task"],
                                  registry=self.registry)
        self.job_seconds = Histogram("worker_job_seconds", "job time by stage (queued: waiting for a slot "
                                     "or batch; run: model work; total)", ["task", "stage"], buckets=_SECONDS,
                                     registry=self.registry)
        self.registry.register(_RuntimeCollector(runtime))

    def record_job(self, task: str, result: dict[str, Any]) -> None:
        task = task if task in self._tasks else "unknown"
        self.jobs.labels(task, str(result.get("error_code", "success"))).inc()
        if result.get("cached") is True:
            self.cache_hits.labels(task).inc()
        timings = result.get("timings", {})
        for stage, key in _STAGES.items():
            if isinstance(timings.get(key), int | float):
                self.job_seconds.labels(task, stage).observe(timings[key] / 1000)

    def text(self) -> bytes:
        return generate_latest(self.registry)
