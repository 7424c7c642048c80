"""Random 16x16 clients for the hypernetwork tests: {client_id: {split: (x uint8, y)}}, and the
(ClientData, ClientContext) maker the methods' serial phases take."""

import numpy as np

from simfed.algorithms.base import ClientContext, ClientData


def make_clients(sizes, seed=0, two_classes=False, val=4, test=6, patterns=False):
    """patterns: each class has its own fixed image (plus noise), so the classes can be learned."""
    rng = np.random.default_rng(seed)
    protos = np.random.default_rng(1234).integers(0, 256, size=(4, 1, 16, 16))
    out = {}
    for cid, n in enumerate(sizes):
        x = rng.integers(0, 256, size=(n, 1, 16, 16), dtype=np.uint8)
        # two_classes: client cid sees labels {0, 1} or {2, 3} only (label skew, as in PeFLL's protocol)
        y = rng.integers(0, 2, size=n) + 2 * (cid % 2) if two_classes else rng.integers(0, 4, size=n)
        if patterns:
            x = (0.7 * protos[y] + 0.3 * x).astype(np.uint8)
        out[cid] = {"train": (x, y), "val": (x[:val], y[:val]), "test": (x[:test], y[:test])}
    return out


def context_maker(clients, task, seed, round_=0, mode="train", cohort="seen"):
    """make(cid, phase) -> (ClientData, ClientContext) of `clients`, one model cache shared by all."""
    cache: dict = {}

    def make(cid, phase):
        d = clients[cid]
        data = ClientData(cid, cohort, reader=lambda c, s: d[s], counts={k: len(v[1]) for k, v in d.items()})
        return data, ClientContext(client_id=cid, cohort=cohort, round=round_, seed=seed, phase=phase,
                                   mode=mode, task=task, cache=cache)
    return make
