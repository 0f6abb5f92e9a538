"""The one mapping from the job contract to HTTP: error code -> status, and OpenAI's error body.

OpenAI's clients read ``{"error": {"message", "type", "param", "code"}}``; retry-worthy refusals
(overload, no slot, draining) carry ``Retry-After`` so a client waits instead of hammering.
"""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse

from handler.errors import ALL_ERRORS

# Status and OpenAI error type of each code of handler.errors; a test checks every code is here.
STATUS: dict[str, tuple[int, str]] = {
    "INVALID_INPUT": (400, "invalid_request_error"),
    "INPUT_TOO_LARGE": (413, "invalid_request_error"),
    "DOWNLOAD_FAILED": (502, "upstream_error"),
    "TIMEOUT": (503, "server_error"),
    "GPU_OOM": (503, "server_error"),
    "MODEL_LOAD_FAILED": (500, "server_error"),
    "UPLOAD_FAILED": (502, "upstream_error"),
    "OVERLOADED": (503, "server_error"),
    "CANCELLED": (503, "server_error"),
    "INTERNAL": (500, "server_error"),
    "CUDA_FATAL": (503, "server_error"),
}
# The status counted for a request whose client hung up before its answer (nginx's "client closed
# request"); never sent.
CLIENT_GONE = 499
# Codes a client should retry after a pause (with Retry-After), here or on another worker.
_RETRY_LATER = frozenset({"TIMEOUT", "GPU_OOM", "OVERLOADED", "CANCELLED", "CUDA_FATAL"})

assert {cls.code for cls in ALL_ERRORS} == set(STATUS), "every error code needs an HTTP status"


class HttpRefusal(Exception):
    """A request refused by the HTTP layer itself, before any job: auth, the request cap, a bad body."""

    def __init__(self, status: int, message: str, *, kind: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.code = code
        self.param = param
        self.retry_after = retry_after


def refusal_response(exc: HttpRefusal, *, close: bool = False) -> JSONResponse:
    """The HTTP layer's own refusal in OpenAI's shape, with its Retry-After; ``close``: the
    connection closes after it."""
    headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else {}
    if close:
        headers["Connection"] = "close"
    body = error_body(exc.message, kind=exc.kind, code=exc.code, param=exc.param)
    return JSONResponse(body, status_code=exc.status, headers=headers)


def error_body(message: str, *, kind: str, code: str | None, param: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def status_of(result: dict[str, Any]) -> int:
    """The HTTP status of a job's result (200 unless it is an error)."""
    code = result.get("error_code")
    return 200 if code is None else STATUS.get(code, (500, ""))[0]


def retries_later(result: dict[str, Any]) -> bool:
    return result.get("error_code") in _RETRY_LATER


def openai_error(result: dict[str, Any], *, fields: dict[str, str] | None = None) -> dict[str, Any]:
    """A job's error as OpenAI's error body; ``fields`` renames job fields to the request's own
    (``speaking_rate`` -> ``speed``), in ``param`` and at the head of the message."""
    code = str(result.get("error_code", "INTERNAL"))
    message = str(result.get("error", "")).removeprefix(f"{code}: ")
    param = result.get("field")
    renamed = (fields or {}).get(param) if isinstance(param, str) else None
    if renamed is not None and isinstance(param, str):
        message = renamed + message.removeprefix(param) if message.startswith(param) else message
        param = renamed
    return error_body(message, kind=STATUS.get(code, (500, "server_error"))[1], code=code, param=param)
