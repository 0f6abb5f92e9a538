"""A job's own bucket: RunPod's per-request ``s3Config``, checked completely at the door. Its
endpoint must pass the one address policy, as any URL a job names must, and is read by the same
parser as the worker's own bucket (handler.config): a virtual-hosted endpoint of the bucket
the job names (``https://<bucket>.s3.<region>.amazonaws.com``) is its service endpoint and region,
so the bucket goes in the request, not twice in the key."""

from __future__ import annotations

import re
from typing import Any

from handler.config import BucketSettings, split_bucket_endpoint
from handler.errors import InvalidInput, WorkerError, printable
from handler.io.addresses import AddressPolicy, check_url

# S3's bucket naming rules, with the upper case and underscores some compatible stores allow.
_BUCKET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{1,61}[A-Za-z0-9]")
_MAX_CONFIG_CHARS = 2048


def bucket_from_job(job: dict[str, Any], *, policy: AddressPolicy, schemes: frozenset[str]) -> BucketSettings | None:
    """RunPod's per-request ``s3Config``, checked completely, or None if the job has none.

    Runs before any work of the job; resolves the endpoint's host, so call it off the event loop.
    Registers nothing: only a job whose bucket validated holds its secret out of the logs, while
    it runs (see ``Worker._run``).
    """
    raw = job.get("s3Config")
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise InvalidInput("s3Config: must be an object", field="s3Config")
    required = ("accessId", "accessSecret", "bucketName", "endpointUrl")
    for name in required:
        value = raw.get(name)
        if not isinstance(value, str) or not value.strip() or len(value) > _MAX_CONFIG_CHARS:
            raise InvalidInput(f"s3Config.{name}: required, a non-empty string", field=f"s3Config.{name}")
    unknown = sorted(str(name)[:80] for name in set(raw) - set(required))
    if unknown:
        raise InvalidInput("s3Config: unknown field", field=f"s3Config.{printable(unknown[0], limit=60)}")
    if not _BUCKET_NAME.fullmatch(raw["bucketName"]) or ".." in raw["bucketName"]:
        raise InvalidInput("s3Config.bucketName: not a valid bucket name", field="s3Config.bucketName")
    field = "s3Config.endpointUrl"
    check_url(raw["endpointUrl"], schemes=schemes, field=field)
    endpoint, hosted, region = split_bucket_endpoint(raw["endpointUrl"])
    if hosted is not None and hosted != raw["bucketName"]:
        raise InvalidInput(f"{field}: the endpoint is bucket {printable(hosted)!r}'s, not bucketName's", field=field)
    parts = check_url(endpoint, schemes=schemes, field=field)
    try:
        assert parts.hostname is not None
        policy.resolve(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
    except WorkerError as exc:
        exc.field, exc.message = field, f"{field}: {exc.message}"
        raise
    return BucketSettings(
        endpoint_url=endpoint, access_key_id=raw["accessId"], secret_access_key=raw["accessSecret"],
        name=raw["bucketName"], region=region,
    )
