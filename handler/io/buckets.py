"""Bucket settings: the worker's own bucket (BUCKET_*, read by handler.config) and a job's RunPod
``s3Config`` (checked by handler.io.s3config), both parsed by :func:`split_bucket_endpoint` as
runpod's rp_upload reads an endpoint (a virtual-hosted bucket's name, a region from ``.s3.<region>.``).

Standard library only: builder/ reads the settings in the image before the rest of handler/ is there.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit


@dataclass(frozen=True)
class BucketSettings:
    """Credentials and location of an S3-compatible bucket."""

    endpoint_url: str | None
    access_key_id: str
    secret_access_key: str = field(repr=False)
    # None: the bucket runpod's rp_upload would use, named after the month ("11-26").
    name: str | None
    region: str | None = None

    def bucket_name(self) -> str:
        return self.name or time.strftime("%m-%y")


# A virtual-hosted bucket endpoint: the bucket is the host's first labels.
_VIRTUAL_HOSTED = (
    re.compile(r"(?P<bucket>.+)\.(?P<service>s3[.-](?:(?P<region>[a-z0-9-]+)\.)?amazonaws\.com)"),
    re.compile(r"(?P<bucket>.+)\.(?P<service>(?P<region>[a-z0-9-]+)\.digitaloceanspaces\.com)"),
)


def split_bucket_endpoint(url: str) -> tuple[str, str | None, str | None]:
    """``https://<bucket>.s3.<region>.amazonaws.com`` -> (``https://s3.<region>.amazonaws.com``,
    bucket, region): the bucket goes in the request, not twice in the key. Other URLs pass as
    they are, with the region runpod's rp_upload reads from them (``.s3.<region>.``)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    for pattern in _VIRTUAL_HOSTED:
        found = pattern.fullmatch(host)
        if found:
            netloc = found["service"] + (f":{parts.port}" if parts.port else "")
            return urlunsplit((parts.scheme, netloc, "", "", "")), found["bucket"], found["region"]
    aws = re.fullmatch(r"s3[.-](?P<region>[a-z0-9-]+)\.amazonaws\.com", host)
    region = aws["region"] if aws else url.split(".s3.")[1].split(".")[0] if ".s3." in url else None
    return url, None, region
