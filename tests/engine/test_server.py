"""Server-side helpers."""

import torch

from simfed.engine.server import Server, add_into, compact


def test_compact_copies_views_of_larger_tensors_only():
    batch = torch.zeros(45, 1000)
    out = compact({1: batch[3], 2: [batch[4:6]], 3: torch.ones(5)})
    assert out[1].untyped_storage().nbytes() == 1000 * 4
    assert out[2][0].untyped_storage().nbytes() == 2 * 1000 * 4
    assert torch.equal(out[1], batch[3])
    whole = torch.ones(5)
    assert compact(whole) is whole  # no copy when the tensor owns its storage


def test_add_into_never_aliases_the_first_contribution():
    first = {"a": torch.ones(3, dtype=torch.float64)}
    acc = add_into(None, first)
    acc = add_into(acc, {"a": torch.ones(3, dtype=torch.float64)})
    assert torch.equal(first["a"], torch.ones(3, dtype=torch.float64))
    assert acc["a"].dtype == torch.float64 and torch.equal(acc["a"], torch.full((3,), 2.0, dtype=torch.float64))


def test_server_memory_figures():
    from simfed.algorithms.base import Task
    from simfed.algorithms.fedavg import FedAvgConfig

    server = Server("fedavg", FedAvgConfig(),
                    Task((1, 28, 28), 62), seed=0)
    assert 0 < server.private_memory_bytes() <= server.memory_bytes()
