"""``upload``: a presigned POST so a client can put a large file into the job's bucket itself.

RunPod caps a request body at about 10 MB for ``/run`` (20 MB for ``/runsync``), so large
recordings cannot travel as base64. This task hands out a form upload into the job's bucket
(the worker's, or the job's ``s3Config``) under UPLOAD_PREFIX, a prefix only the worker writes
keys in, with a content-length-range condition so the store itself refuses a body of any size but the
declared one (itself at most DOWNLOAD_MAX_BYTES), valid for UPLOAD_EXPIRY_S. The next job passes the returned ``s3://``
reference as its media (and may ask for the object to be deleted once read).
"""

from __future__ import annotations

import functools
import time
import uuid
from typing import Any, Literal

from pydantic import Field

from handler.errors import InputTooLarge, InvalidInput
from handler.io.storage import object_key
from handler.job import JobContext
from handler.task_interface import Task, TaskInput


class UploadInput(TaskInput):
    """Input of the ``upload`` task."""

    task: Literal["upload"] = "upload"
    file_name: str = Field(min_length=1, max_length=255, description="the file's name (kept, made safe, in the key)")
    size: int = Field(ge=1, description="the file's exact size in bytes (checked here, and enforced by the store)")


async def run(ctx: JobContext, params: UploadInput) -> dict[str, Any]:
    settings = ctx.settings
    if params.size > settings.download_max_bytes:
        raise InputTooLarge(f"size: {params.size} bytes is over the limit of {settings.download_max_bytes}",
                            field="size")
    key = object_key(settings.upload_prefix, uuid.uuid4().hex, params.file_name)
    if ctx.bucket is None:
        raise InvalidInput("upload: uploads need a bucket (configure one, or send s3Config)")
    presign = functools.partial(ctx.bucket.presign_upload, key, size=params.size, expires_s=settings.upload_expiry_s)
    upload = await ctx.in_thread(presign)
    return {
        "upload": {"url": upload.url, "fields": upload.fields},
        "audio": upload.reference,
        "expires_in": settings.upload_expiry_s,
        "expires_at": round(time.time() + settings.upload_expiry_s),
        "max_bytes": params.size,
    }


TASK: Task[UploadInput] = Task(name="upload", input_model=UploadInput, run=run)
