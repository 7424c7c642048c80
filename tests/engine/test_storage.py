"""Remote storage through pyarrow.fs against a real S3-protocol server (moto) on loopback: the
partition store and the client-state store behave as on local disk."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from simfed.engine import storage
from simfed.engine.clientstate import ClientStateStore
from simfed.partitions.store import PartitionStore


@pytest.fixture(params=["local", "s3"])
def state_root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "cs")
    return request.getfixturevalue("s3_server")("client-state-unit")


def test_client_state_versions_on_local_disk_and_s3(state_root):
    s = ClientStateStore(state_root)
    assert s.get(5, 0, 0) is None
    s.put(5, 0, 0, {"w": torch.tensor([1.0])})
    s.put(5, 2, 0, {"w": torch.tensor([2.0])})
    assert s.get(5, 0, 0) is None  # a retry of round 0 must not see its own first attempt
    assert float(s.get(5, 1, 0)["w"]) == 1.0 and float(s.get(5, 3, 0)["w"]) == 2.0
    assert s.truncate_after(2) == 1
    assert float(s.get(5, 3, 0)["w"]) == 1.0
    for r in range(3, 6):
        s.put(7, r, 0, torch.tensor([float(r)]), checkpointed_round=r)
    assert [v[:2] for v in s._versions(7)] == [(4, 0), (5, 0)]  # collected once checkpointed
    # The marker every worker must see before a multi-node run keeps state here.
    token = storage.write_marker(state_root)
    assert storage.sees_marker(state_root, token) and not storage.sees_marker(state_root, "other")


def test_partition_store_read_from_s3_equals_local(engine_store, s3_store):
    local, remote = PartitionStore.open(engine_store), PartitionStore.open(s3_store, verify=True)
    assert remote.manifest == local.manifest
    assert remote.client_ids().tolist() == local.client_ids().tolist()
    for cid in local.client_ids()[:3].tolist():
        for split in ("train", "test"):
            (xl, yl), (xr, yr) = local.read(cid, split), remote.read(cid, split)
            assert np.array_equal(xl, xr) and np.array_equal(yl, yr) and len(yl) > 0


def test_uris_are_redacted_in_messages():
    uri = "s3://AK:SECRET@bucket/p?endpoint_override=h:1&secret_key=S2&scheme=http"
    shown = storage.redact(uri)
    assert "SECRET" not in shown and "S2" not in shown and "bucket/p" in shown and "scheme=http" in shown
