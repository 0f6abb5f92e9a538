"""HTTP to a worker endpoint: the SDK's local API or RunPod's, which differ in base URL, auth and one method.

Both serve ``POST /run`` (queue a job, answer its id), ``/status/{id}`` (GET on RunPod, POST
on the local API) and ``POST /runsync``. Long jobs go through ``/run`` and ``/status`` so that
no HTTP request is held open for a whole transcription on RunPod (whose ``/status`` answers at
once; the local API's answers when the job is done, which the same loop handles). urllib's
errors are translated here, and only here, into ``ApiError``::

    ApiError (code, retryable)
      HTTP_<status>   the endpoint answered an error status: 408, 425, 429 and 5xx retryable
      CONNECTION      refused, reset, timed out, DNS: retryable
      BAD_RESPONSE    a body that is not a JSON object: retryable
      DEADLINE        the file's deadline passed while its job ran: final

The API key travels only in the Authorization header, which no repr, message or log shows.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

RUNPOD_API = "https://api.runpod.ai/v2"
# Statuses of a job that is not finished yet (RunPod's names; the local API says IN_PROGRESS).
PENDING = frozenset({"IN_QUEUE", "IN_PROGRESS"})
_RETRYABLE_HTTP = frozenset({408, 425, 429})
# One HTTP exchange that is not a wait for a job never takes longer than this.
REQUEST_TIMEOUT_S = 60.0


class ApiError(Exception):
    """An exchange with the endpoint failed; ``code`` says how and ``retryable`` whether trying again may help."""

    def __init__(self, code: str, message: str, *, retryable: bool) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.retryable = retryable


@contextlib.contextmanager
def http_errors(what: str) -> Iterator[None]:
    """urllib's and the socket's exceptions as ``ApiError``s."""
    try:
        yield
    except urllib.error.HTTPError as exc:
        status = exc.code
        retryable = status in _RETRYABLE_HTTP or status >= 500
        raise ApiError(f"HTTP_{status}", f"{what}: {exc.reason}", retryable=retryable) from exc
    # URLError wraps refusals and DNS failures; OSError is a timeout or reset; HTTPException a cut reply.
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", exc)
        raise ApiError("CONNECTION", f"{what}: {reason}", retryable=True) from exc


def request_json(url: str, *, body: Any = None, method: str | None = None, headers: Mapping[str, str] | None = None,
                 timeout: float = REQUEST_TIMEOUT_S, what: str = "request") -> dict[str, Any]:
    """GET (no body) or POST (a JSON body) ``url``, unless ``method`` says otherwise; its JSON object reply."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(  # noqa: S310 (the URL is the user's endpoint)
        url, data=data, method=method or ("GET" if data is None else "POST"),
        headers={"Content-Type": "application/json", "Accept": "application/json", **(headers or {})},
    )
    with http_errors(what), urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
        raw = response.read()
    try:
        reply = json.loads(raw)
    except ValueError as exc:
        raise ApiError("BAD_RESPONSE", f"{what}: not JSON ({len(raw)} bytes)", retryable=True) from exc
    if not isinstance(reply, dict):
        raise ApiError("BAD_RESPONSE", f"{what}: not a JSON object", retryable=True)
    return reply


def fetch_bytes(url: str, *, timeout: float = REQUEST_TIMEOUT_S, what: str = "download") -> bytes:
    """GET ``url`` (a presigned output URL) and return the body."""
    with http_errors(what), urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310
        body: bytes = response.read()
    return body


def remaining(deadline: float, *, cap: float | None = None) -> float:
    """Seconds left until ``deadline`` (monotonic), at least a tenth of a second, at most ``cap``."""
    left = max(0.1, deadline - time.monotonic())
    return left if cap is None else min(left, cap)


@dataclass(frozen=True)
class Endpoint:
    """Where jobs go: a base URL and the headers every request carries (auth: never shown)."""

    base_url: str
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    # RunPod documents GET /status/{id}; the SDK's local API routes only POST there.
    status_method: str = "GET"

    @classmethod
    def local(cls, url: str) -> Endpoint:
        """The SDK's local API (``python -m handler --rp_serve_api``): no auth."""
        return cls(url.rstrip("/"), status_method="POST")

    @classmethod
    def runpod(cls, endpoint_id: str, api_key: str, *, api_base: str = RUNPOD_API) -> Endpoint:
        """A RunPod serverless endpoint, authorised by an API key as a Bearer token."""
        return cls(f"{api_base.rstrip('/')}/{endpoint_id}", {"Authorization": f"Bearer {api_key}"})

    def url(self, path: str) -> str:
        return f"{self.base_url}/{path.lstrip('/')}"

    def submit(self, job_input: dict[str, Any], *, timeout: float = REQUEST_TIMEOUT_S) -> str:
        """Queue a job (``/run``); its id."""
        reply = request_json(self.url("run"), body={"input": job_input}, headers=self.headers, timeout=timeout,
                             what="run")
        job_id = reply.get("id")
        if not isinstance(job_id, str) or not job_id:
            raise ApiError("BAD_RESPONSE", "run: the reply has no job id", retryable=True)
        return job_id

    def status(self, job_id: str, *, timeout: float) -> dict[str, Any]:
        """``/status/{id}``: the job's status, and its output once it has one."""
        return request_json(self.url(f"status/{job_id}"), method=self.status_method, headers=self.headers,
                            timeout=timeout, what="status")

    def runsync(self, job_input: dict[str, Any], *, timeout: float) -> dict[str, Any]:
        """``/runsync``: run a job and answer its result in the one request (short jobs)."""
        return request_json(self.url("runsync"), body={"input": job_input}, headers=self.headers,
                            timeout=timeout, what="runsync")

    def cancel(self, job_id: str) -> None:
        """Ask RunPod to stop a job (``/cancel/{id}``); best effort, as the local API has no such route."""
        with contextlib.suppress(ApiError):
            request_json(self.url(f"cancel/{job_id}"), body={}, headers=self.headers, timeout=10, what="cancel")


OnStatus = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class Polling:
    """How often ``/status`` is asked while a job is pending."""

    first_s: float = 0.5
    max_s: float = 5.0
    factor: float = 1.5


def run_job(endpoint: Endpoint, job_input: dict[str, Any], *, deadline: float, polling: Polling = Polling(),
            on_status: OnStatus | None = None) -> dict[str, Any]:
    """Submit a job and poll its status until it is final; the final status reply.

    Past ``deadline`` (monotonic) the job is cancelled and ``ApiError("DEADLINE")`` raised.
    """
    job_id = endpoint.submit(job_input, timeout=remaining(deadline, cap=REQUEST_TIMEOUT_S))
    interval = polling.first_s
    while True:
        # The local API answers /status only when the job is done: the wait is the deadline's.
        reply = endpoint.status(job_id, timeout=remaining(deadline))
        if reply.get("status") not in PENDING:
            return reply
        if on_status is not None:
            on_status(reply)
        if time.monotonic() + interval >= deadline:
            endpoint.cancel(job_id)
            raise ApiError("DEADLINE", f"job {job_id} still {reply.get('status')} at the deadline", retryable=False)
        time.sleep(interval)
        interval = min(polling.max_s, interval * polling.factor)
