"""A job's ``s3Config`` read with the same endpoint parser as the worker's own bucket."""

from __future__ import annotations

import ipaddress

import pytest

from handler.errors import InvalidInput
from handler.io.addresses import AddressPolicy
from handler.io.s3config import bucket_from_job


def public_resolver(host: str, port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    return [ipaddress.IPv4Address("93.184.216.34")]


@pytest.mark.parametrize(("endpoint", "used", "region"), [
    ("https://s3.eu-west-1.amazonaws.com", "https://s3.eu-west-1.amazonaws.com", "eu-west-1"),
    ("https://mybucket.s3.eu-central-1.amazonaws.com", "https://s3.eu-central-1.amazonaws.com", "eu-central-1"),
    ("https://mybucket.fra1.digitaloceanspaces.com", "https://fra1.digitaloceanspaces.com", "fra1"),
    ("https://storage.example.com", "https://storage.example.com", None),
])
def test_a_regional_job_endpoint_gets_its_region(endpoint: str, used: str, region: str | None) -> None:
    """As runpod's rp_upload does for both, a job's regional endpoint signs for its region, not
    us-east-1; a virtual-hosted endpoint of the job's bucket is split as the worker's own bucket
    is (the bucket in the request, not twice in the key); other endpoints are used as given."""
    job = {"s3Config": {"accessId": "a", "accessSecret": "secret-of-the-job", "bucketName": "mybucket",
                        "endpointUrl": endpoint}}
    bucket = bucket_from_job(job, policy=AddressPolicy(resolver=public_resolver), schemes=frozenset({"https"}))
    assert bucket is not None
    assert (bucket.endpoint_url, bucket.name, bucket.region) == (used, "mybucket", region)


def test_an_endpoint_of_another_bucket_is_refused() -> None:
    """A virtual-hosted endpoint names its bucket: one that is not the job's bucketName is a
    contradiction the job must resolve, refused at the door naming the field."""
    job = {"s3Config": {"accessId": "a", "accessSecret": "secret-of-the-job", "bucketName": "mybucket",
                        "endpointUrl": "https://other.s3.eu-central-1.amazonaws.com"}}
    with pytest.raises(InvalidInput) as refused:
        bucket_from_job(job, policy=AddressPolicy(resolver=public_resolver), schemes=frozenset({"https"}))
    assert refused.value.field == "s3Config.endpointUrl" and "'other'" in refused.value.message


def test_the_door_resolves_the_host_the_client_will_use() -> None:
    """The address check resolves the service host a split endpoint leaves, the one connected to."""
    asked: list[str] = []

    def resolver(host: str, port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        asked.append(host)
        return public_resolver(host, port)

    job = {"s3Config": {"accessId": "a", "accessSecret": "s", "bucketName": "mybucket",
                        "endpointUrl": "https://mybucket.s3.eu-central-1.amazonaws.com"}}
    bucket_from_job(job, policy=AddressPolicy(resolver=resolver), schemes=frozenset({"https"}))
    assert asked == ["s3.eu-central-1.amazonaws.com"]
