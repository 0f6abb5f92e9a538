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
      URL_REFUSED     a URL or redirect outside ``addresses.UrlPolicy``: final
      REDIRECT_REFUSED  an API call redirected to another origin: final
      DEADLINE        the file's deadline passed while its job ran: final

The API key travels only in the Authorization header, which no repr, message or log shows, and
only to the endpoint's own origin: an API call redirected elsewhere is refused, not followed.
Downloads and uploads (presigned URLs) carry no key at all. Every request goes through an
opener that knows only http and https, so no URL reaches urllib's ``file:``, ``ftp:`` or
``data:`` handlers.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import IO, Any

from client.addresses import UrlPolicy, UrlRefused, origin, shown

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
    except UrlRefused as exc:
        raise ApiError("URL_REFUSED", str(exc), retryable=False) from exc
    except _CrossOrigin as exc:
        raise ApiError("REDIRECT_REFUSED", f"{what}: {exc}", retryable=False) from exc
    except urllib.error.HTTPError as exc:
        status = exc.code
        retryable = status in _RETRYABLE_HTTP or status >= 500
        raise ApiError(f"HTTP_{status}", f"{what}: {exc.reason}", retryable=retryable) from exc
    # URLError wraps refusals and DNS failures; OSError is a timeout or reset; HTTPException a cut reply.
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", exc)
        raise ApiError("CONNECTION", f"{what}: {reason}", retryable=True) from exc


class _CrossOrigin(Exception):
    """An API call was redirected to another scheme, host or port, where the key must not go."""


class _SameOrigin(urllib.request.HTTPRedirectHandler):
    """Redirects of API calls: followed within the endpoint's origin, refused elsewhere."""

    def redirect_request(self, req: urllib.request.Request, fp: IO[bytes], code: int, msg: str,
                         headers: Any, newurl: str) -> urllib.request.Request | None:
        if origin(newurl) != origin(req.full_url):
            fp.close()
            raise _CrossOrigin(f"{code} redirect to another origin ({shown(newurl)!r}) refused")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class _Checked(urllib.request.HTTPRedirectHandler):
    """Redirects of downloads and uploads: followed only to URLs the policy allows."""

    def __init__(self, policy: UrlPolicy, what: str) -> None:
        self.policy, self.what = policy, what

    def http_error_302(self, req: urllib.request.Request, fp: IO[bytes], code: int, msg: str,
                       headers: Any) -> IO[bytes] | None:
        # Checked before urllib's own scheme test, so that every refusal reads the same.
        location = headers.get("location") or headers.get("uri") or ""
        try:
            self.policy.check(urllib.parse.urljoin(req.full_url, location), what=f"{self.what} (redirected)")
        except UrlRefused:
            fp.close()
            raise
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


def opener(redirects: urllib.request.HTTPRedirectHandler) -> urllib.request.OpenerDirector:
    """An opener for http and https only (anything else is an unknown URL type), redirecting as told."""
    director = urllib.request.OpenerDirector()
    for handler in (urllib.request.ProxyHandler(), urllib.request.UnknownHandler(), urllib.request.HTTPHandler(),
                    urllib.request.HTTPSHandler(), urllib.request.HTTPDefaultErrorHandler(), redirects,
                    urllib.request.HTTPErrorProcessor()):
        director.add_handler(handler)
    return director


def checked_opener(policy: UrlPolicy, what: str) -> urllib.request.OpenerDirector:
    """The opener for a URL the endpoint named: its redirects must pass ``policy`` too."""
    return opener(_Checked(policy, what))


_API = opener(_SameOrigin())


def request_json(url: str, *, body: Any = None, method: str | None = None, headers: Mapping[str, str] | None = None,
                 timeout: float = REQUEST_TIMEOUT_S, what: str = "request") -> dict[str, Any]:
    """GET (no body) or POST (a JSON body) ``url``, unless ``method`` says otherwise; its JSON object reply."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(  # noqa: S310 (the URL is the user's endpoint)
        url, data=data, method=method or ("GET" if data is None else "POST"),
        headers={"Content-Type": "application/json", "Accept": "application/json", **(headers or {})},
    )
    with http_errors(what), _API.open(request, timeout=timeout) as response:
        raw = response.read()
    try:
        reply = json.loads(raw)
    except ValueError as exc:
        raise ApiError("BAD_RESPONSE", f"{what}: not JSON ({len(raw)} bytes)", retryable=True) from exc
    if not isinstance(reply, dict):
        raise ApiError("BAD_RESPONSE", f"{what}: not a JSON object", retryable=True)
    return reply


def fetch_bytes(url: object, *, policy: UrlPolicy, timeout: float = REQUEST_TIMEOUT_S,
                what: str = "download") -> bytes:
    """GET ``url`` (a presigned output URL, so no key goes with it) if ``policy`` allows it; the body."""
    with http_errors(what):
        request = urllib.request.Request(policy.check(url, what=what))  # noqa: S310 (checked just now)
        with checked_opener(policy, what).open(request, timeout=timeout) as response:
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

    @property
    def url_policy(self) -> UrlPolicy:
        """Where this endpoint's replies may send the client: see ``addresses``."""
        return UrlPolicy.for_endpoint(self.base_url)

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
