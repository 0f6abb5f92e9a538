"""The handler: parse the job, route it to its task, run it, answer with a result or an error.

Nothing here is model-specific; tasks are known only through the table in ``handler.tasks``.
Whatever happens inside a job, the handler returns a dict: a result with ``request_id`` and
``timings``, or ``{"error": "CODE: message", "error_code", "request_id", "retryable"}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from pydantic import BaseModel, ValidationError

from handler.cancel import CancelToken
from handler.config import Settings, load_settings
from handler.errors import Cancelled, CudaFatal, InvalidInput, Overloaded, WorkerError, printable, shown
from handler.io.download import Downloader
from handler.io.inputs import MediaInputs
from handler.io.outputs import InlineStorage, OutputSink
from handler.io.result_cache import cache_secret
from handler.io.s3config import bucket_from_job
from handler.io.storage import S3Storage
from handler.io.workspace import Workspace, job_workspace
from handler.job import JobContext
from handler.logs import get_logger, secret_held
from handler.runtime.container import Runtime
from handler.runtime.devices import resolve_device
from handler.runtime.gate import Gate
from handler.runtime.memory import (
    auto_slots,
    device_memory,
    free_for_models,
    memory_budget,
    model_bytes,
    read_memory,
)
from handler.runtime.registry import Registry
from handler.runtime.residency import Residency
from handler.runtime.threads import in_thread, job_threads, one_torch_thread
from handler.task_interface import Task
from handler.tasks import TASKS, load_task_modules

log = get_logger(__name__)


def validation_message(exc: ValidationError) -> tuple[str, str | None]:
    """The first schema error as ``field: problem (got value)``, and the field's name.

    This is pydantic's edge. Field names and values come from the client: they are escaped
    and shortened, so an echoed key can never forge a log line.
    """
    error = exc.errors(include_url=False)[0]
    # Each part cut before it is joined: a client's key may be megabytes long.
    field = printable(".".join(str(part)[:100] for part in error["loc"])) or None
    problem = printable(error["msg"].removeprefix("Value error, "), limit=300)
    if error["type"] == "extra_forbidden":
        problem = "unknown field"
    elif error["type"] != "value_error" and "input" in error:
        problem = f"{problem} (got {shown(error['input'])})"
    message = f"{field}: {problem}" if field else problem
    return message, field


@dataclass(frozen=True)
class JobChannel:
    """The way a job came and its answer goes back: over HTTP, the files uploaded with it and where
    its outputs and events go; from the queue, the defaults."""

    # The job's directory, made (and removed) by the caller, who streamed the uploads into it.
    workspace: Workspace | None = None
    # Files already in that directory, named by the job as ``attached://<name>``.
    attachments: Mapping[str, Path] = field(default_factory=dict)
    # Where outputs go instead of the worker's bucket (an HTTP reply carrying the bytes itself).
    storage: OutputSink | None = None
    # Told of a job's partial results as they come (a transcript's segments); called from any thread.
    on_event: Callable[[str, dict[str, Any]], None] | None = None


QUEUED = JobChannel()


class Worker:
    """Holds the long-lived parts (registry, gate, storage, downloader) and handles jobs."""

    def __init__(
        self,
        settings: Settings,
        *,
        tasks: Mapping[str, Task[Any]] = TASKS,
        registry: Registry | None = None,
        gate: Gate | None = None,
    ) -> None:
        self.settings = settings
        self.tasks = tasks
        registry = registry or Registry(load_wait_timeout=settings.model_load_wait_timeout)
        device = resolve_device(settings.device)
        self.runtime = Runtime(
            settings=settings,
            registry=registry,
            residency=Residency(
                device=device, forget=registry.forget, adopt=registry.adopt,
                budget=memory_budget(device=device, budget_mb=settings.gpu_memory_budget_mb,
                                     reserve_mb=settings.memory_reserve_mb, device_total=device_memory(device)),
                host_reserve=settings.memory_reserve_mb * 2**20,
            ),
            gate=gate
            or Gate(
                slots=settings.max_concurrent_generations or 1,
                acquire_timeout=settings.generation_acquire_timeout,
            ),
            device=device,
            cache_secret=cache_secret(settings),
        )
        self.runtime.sizing.update(mode="fixed", slots=self.runtime.gate.slots)
        self.lifecycle = self.runtime.lifecycle
        # Jobs in flight, so a shutdown can cancel them; touched on the event loop only.
        self._in_flight: set[asyncio.Task[Any]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.downloader = Downloader(
            max_bytes=settings.download_max_bytes,
            timeout_s=settings.download_timeout_s,
            max_redirects=settings.download_max_redirects,
            allow_http=settings.download_allow_http,
            allowed_networks=settings.download_allowed_networks,
        )
        self._bucket = S3Storage(settings.bucket, settings) if settings.bucket else None

    def route(self, job: Any) -> tuple[Task[Any], BaseModel]:
        """The job's task and its validated input."""
        data = job.get("input") if isinstance(job, dict) else None
        if not isinstance(data, dict):
            raise InvalidInput("input: the job needs an `input` object", field="input")
        task = self._select_task(data)
        try:
            return task, task.input_model.model_validate(data)
        except ValidationError as exc:
            message, field = validation_message(exc)
            raise InvalidInput(message, field=field) from exc

    def _select_task(self, data: dict[str, Any]) -> Task[Any]:
        name = data.get("task")
        if name is None:
            implied = [t for t in self.tasks.values() if any(f in data for f in t.implied_by)]
            if len(implied) == 1:
                return implied[0]
            raise InvalidInput(f"task: required, one of {', '.join(self.tasks)}", field="task")
        task = self.tasks.get(name) if isinstance(name, str) else None
        if task is None:
            raise InvalidInput(
                f"task: unknown task {shown(name)}, expected one of {', '.join(self.tasks)}", field="task"
            )
        return task

    def storage_for(self, job: dict[str, Any]) -> OutputSink:
        """Where the job's outputs go: its bucket (see :meth:`bucket_for`), else inline."""
        return self.bucket_for(job) or self._inline()

    def bucket_for(self, job: dict[str, Any]) -> S3Storage | None:
        """The job's own s3Config (checked like a download URL), else the worker's bucket; None: neither."""
        policy = self.downloader.policy
        per_job = bucket_from_job(job, policy=policy, schemes=self.downloader.schemes)
        if per_job is not None:
            return S3Storage(per_job, self.settings, policy=policy)
        return self._bucket

    def _inline(self) -> InlineStorage:
        return InlineStorage(self.settings.inline_output_max_bytes)

    async def handle(self, job: Any, channel: JobChannel = QUEUED) -> dict[str, Any]:
        """Answer one RunPod job; never raises (cancellation included: it is answered too)."""
        request_id = uuid.uuid4().hex
        job_id = job.get("id") if isinstance(job, dict) else None
        current = asyncio.current_task()
        self._loop = asyncio.get_running_loop()
        if current is not None:
            self._in_flight.add(current)
        try:
            with structlog.contextvars.bound_contextvars(request_id=request_id, job_id=job_id):
                return self._account(await self._answer(job, request_id, channel))
        finally:
            if current is not None:
                self._in_flight.discard(current)

    def _account(self, result: dict[str, Any]) -> dict[str, Any]:
        """Count the job, and ask for a fresh worker once MAX_JOBS_PER_WORKER is reached."""
        finished = self.runtime.stats.record(result)
        limit = self.settings.max_jobs_per_worker
        if limit is not None and finished >= limit:
            log.info("worker.recycle", jobs=finished)
            result["refresh_worker"] = True
        return result

    async def _answer(self, job: Any, request_id: str, channel: JobChannel) -> dict[str, Any]:
        started = time.perf_counter()
        try:
            task, params = self.route(job)
            self.admit(task)
            result = await self._run(task, params, job, request_id, channel)
        except WorkerError as err:
            if isinstance(err, CudaFatal):
                self.lifecycle.fail(err)
            log.warning("job.failed", code=err.code, error=err.message, field=err.field)
            return err.payload(request_id)
        except asyncio.CancelledError:
            # RunPod stops a job by cancelling its task; the job is still answered, once.
            log.warning("job.cancelled")
            return Cancelled("the job was cancelled").payload(request_id)
        except Exception:
            log.exception("job.crashed")
            return WorkerError(
                "unexpected error; the worker log has the details under this request_id"
            ).payload(request_id)
        total_ms = (time.perf_counter() - started) * 1000
        result["timings"]["total_ms"] = round(total_ms, 2)
        log.info("job.done", task=task.name, ms=round(total_ms, 1))
        return result

    def admit(self, task: Task[Any] | None) -> None:
        """Refuse work up front when the GPU is gone or memory is nearly full (raises the job's error).
        ``task`` None: a job not read yet (its body is refused unread)."""
        if task is not None and task.name == "system":  # the snapshot is how an operator sees why
            return
        self.lifecycle.admit()
        use = read_memory()
        threshold = self.settings.memory_pressure_threshold
        if max(use.ram_fraction, use.vram_fraction) > threshold:
            raise Overloaded(
                f"memory use (RAM {use.ram_fraction:.0%}, VRAM {use.vram_fraction:.0%}) is over "
                f"the admission threshold of {threshold:.0%}"
            )

    async def _run(
        self, task: Task[Any], params: BaseModel, job: dict[str, Any], request_id: str, channel: JobChannel
    ) -> dict[str, Any]:
        threads = job_threads()
        try:
            bucket = await self._bucket_of(job, channel, threads)
            storage = channel.storage or bucket or self._inline()
            cancel = CancelToken()
            inputs = MediaInputs(self.settings, self.downloader, bucket, cancel, attachments=channel.attachments)
            log.debug("job.start", task=task.name)
            with _job_secret(bucket, self._bucket), _workspace(self.settings, channel) as workspace:
                ctx = JobContext(self.runtime, request_id, job, workspace, inputs, storage, bucket, cancel=cancel,
                                 threads=threads, on_event=channel.on_event)
                try:
                    output = await task.run(ctx, params)
                except asyncio.CancelledError:
                    cancel.cancel()  # stops the job's threads: downloads, ffmpeg, model steps, uploads
                    workspace.remove_after(threads)
                    raise
        finally:
            threads.shutdown(wait=False, cancel_futures=True)
        return {**output, "request_id": request_id, "timings": ctx.timings.as_dict()}

    async def _bucket_of(self, job: dict[str, Any], channel: JobChannel, threads: Any) -> S3Storage | None:
        if channel.storage is not None:  # outputs travel in the HTTP reply: no bucket for this job
            return None
        if "s3Config" not in job:
            return self._bucket
        # A per-job endpoint is resolved (DNS) while it is checked: off the event loop, on the job's threads.
        return await in_thread(functools.partial(self.bucket_for, job), executor=threads,
                               on_late_error=self.lifecycle.late_error)

    def begin_shutdown(self) -> None:
        """SIGTERM: refuse new jobs, give running ones SHUTDOWN_GRACE_S, then cancel them.

        Safe to call from a signal handler on the event loop's thread.
        """
        self.lifecycle.drain()
        loop = self._loop
        grace = self.settings.shutdown_grace_s
        log.info("worker.shutdown", in_flight=len(self._in_flight), grace_s=grace)
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(loop.call_later, grace, self._cancel_in_flight)

    def _cancel_in_flight(self) -> None:
        for task in list(self._in_flight):
            task.cancel()

    def size_gate(self) -> dict[str, Any]:
        """MAX_CONCURRENT_GENERATIONS=auto: slots from free memory and the model's footprint."""
        settings = self.settings
        device = self.runtime.device
        before = read_memory()
        # The footprint is measured on what PRELOAD loads; with nothing named, on transcription.
        self.preload(settings.preload or ("transcribe",))
        after = read_memory()
        footprint = model_bytes(before, after, device) // settings.model_instances
        free = free_for_models(after, device)
        reserve = settings.memory_reserve_mb * 2**20
        slots = auto_slots(free=free, reserve=reserve, footprint=footprint, cap=settings.generation_slots_cap)
        self.runtime.gate.resize(slots)
        sizing = {"mode": "auto", "slots": slots, "free_mb": free // 2**20, "reserve_mb": reserve // 2**20,
                  "footprint_mb": footprint // 2**20, "cap": settings.generation_slots_cap, "device": device}
        self.runtime.sizing.update(sizing)
        log.info("gate.sized", **sizing)
        return sizing

    def preload(self, names: tuple[str, ...] | None = None) -> None:
        """Load the default pipeline of each task named (default: PRELOAD), on the calling thread,
        with torch on one thread of it (it is not one of the gate's: handler.runtime.threads)."""
        with one_torch_thread():
            self._preload(self.settings.preload if names is None else names)

    def _preload(self, names: tuple[str, ...]) -> None:
        for name in names:
            task = self.tasks.get(name)
            if task is None or task.preload is None:
                log.warning("preload.skipped", task=name)
                continue
            try:
                task.preload(self.runtime)
            except WorkerError as err:
                log.error("preload.failed", task=name, code=err.code, error=err.message)


def _job_secret(bucket: S3Storage | None, worker_bucket: S3Storage | None) -> contextlib.AbstractContextManager[None]:
    """A job's own bucket secret (it validated) kept out of the logs for the job's life."""
    if bucket is None or bucket is worker_bucket:
        return contextlib.nullcontext()
    return secret_held(bucket.bucket.secret_access_key)


@contextlib.contextmanager
def _workspace(settings: Settings, channel: JobChannel) -> Iterator[Workspace]:
    """The job's directory: the one it arrived with (its owner removes it), else a new one."""
    if channel.workspace is not None:
        yield channel.workspace
        return
    with job_workspace(settings.job_root()) as workspace:
        yield workspace


_worker: Worker | None = None


def get_worker(settings: Settings | None = None) -> Worker:
    """The process's worker, built on first use from the environment's settings."""
    global _worker
    if _worker is None:
        settings = settings or load_settings()
        _worker = Worker(settings, tasks={**TASKS, **load_task_modules(settings.task_modules)})
    return _worker
