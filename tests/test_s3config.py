"""A job's ``s3Config`` read with the same endpoint parser as the worker's own bucket."""

from __future__ import annotations

import ipaddress

import pytest

from handler.io.addresses import AddressPolicy
from handler.io.s3config import bucket_from_job


def public_resolver(host: str, port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    return [ipaddress.IPv4Address("93.184.216.34")]


@pytest.mark.parametrize(("endpoint", "region"), [
    ("https://s3.eu-west-1.amazonaws.com", "eu-west-1"),
    ("https://mybucket.s3.eu-central-1.amazonaws.com", "eu-central-1"),
    ("https://storage.example.com", None),
])
def test_a_regional_job_endpoint_gets_its_region(endpoint: str, region: str | None) -> None:
    """As runpod's rp_upload does for both, a job's regional endpoint signs for its region, not
    us-east-1; the endpoint itself is used as the job gave it, with the bucket it named."""
    job = {"s3Config": {"accessId": "a", "accessSecret": "secret-of-the-job", "bucketName": "mybucket",
                        "endpointUrl": endpoint}}
    bucket = bucket_from_job(job, policy=AddressPolicy(resolver=public_resolver), schemes=frozenset({"https"}))
    assert bucket is not None
    assert (bucket.endpoint_url, bucket.name, bucket.region) == (endpoint, "mybucket", region)
