"""The namespace cluster, started once for every cluster test: a head and two worker nodes of one
CPU each, with their own addresses, /tmp and /dev/shm (tests/cluster/netns.py), Ray with token
authentication on each, and the test store on the S3 server every node reaches. Skipped where root or `ip netns` is
missing; torn down at the end whatever happened."""

from __future__ import annotations

import pytest

from tests.cluster import netns


@pytest.fixture(scope="session")
def nscluster():
    reason = netns.why_not()
    if reason:
        pytest.skip(reason)
    cluster = netns.NsCluster(nodes=("head", "w1", "w2"), cpus=1)
    try:
        yield cluster.up()
    finally:
        cluster.down()


@pytest.fixture(scope="session")
def ns_store(nscluster, engine_store) -> str:
    """The engine tests' store (24 clients) on the cluster's S3 server; its URI."""
    return nscluster.upload(engine_store, "store")
