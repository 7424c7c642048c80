"""Shared makers for the Table-1 baseline tests (FedRep, pFedMe, kNN-Per, Ditto)."""

from __future__ import annotations

from simfed.algorithms.base import ClientContext, ClientData, Task
from simfed.algorithms.kit.models import LeNet, init_model

TASK = Task(input_shape=(1, 16, 16), num_classes=4)
SEED = 5


def tiny_lenet(seed=0, double=True):
    m = init_model(LeNet(1, TASK.num_classes, 16, width=(2, 3), hidden=(8, 6)), seed)
    return m.double() if double else m


def client(clients, cid, mode="train", cohort="seen", round_=0, cache=None, phase="update"):
    d = clients[cid]
    data = ClientData(cid, cohort, reader=lambda c, split: d[split], counts={k: len(v[1]) for k, v in d.items()})
    ctx = ClientContext(client_id=cid, cohort=cohort, round=round_, seed=SEED, phase=phase, mode=mode, task=TASK,
                        cache={} if cache is None else cache)
    return data, ctx
