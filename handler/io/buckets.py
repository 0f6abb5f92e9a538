"""A job's ``s3Config`` bucket (handler.io.s3config) is described and parsed as the worker's own:
by :class:`handler.config.BucketSettings` and :func:`handler.config.split_bucket_endpoint`, named
here for the modules that import them from ``io``."""

from __future__ import annotations

from handler.config import BucketSettings, split_bucket_endpoint

__all__ = ["BucketSettings", "split_bucket_endpoint"]
