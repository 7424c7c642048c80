"""pFedHN with generate = "body" through the engine: on a store of 2 classes per client, the
generated body with each client's own head personalizes (its seen accuracy beats FedAvg's and its
own first round); the heads are client state on disk, one per trained client; [privacy] is refused
in one line. Seeded, so every number here is reproducible. Bit-identity on serial, Ray and resume:
tests/engine/test_parity_models.py ("lenet-pfedhn-body")."""

import polars as pl
import pytest
import torch

from simfed.algorithms import registry
from simfed.engine import metrics, privacy
from simfed.engine.clientstate import ClientStateStore
from simfed.engine.loop import run_experiment
from simfed.partitions.store import PartitionStore
from simfed.core.errors import SimfedError
from tests.engine.conftest import make_exp

LOCAL = dict(local_steps=10, batch_size=16)


def seen_test(run_dir) -> list[float]:
    """Per evaluated round: the seen clients' test accuracy, pooled over samples."""
    df = metrics.load(run_dir).filter((pl.col("split") == "test") & (pl.col("cohort") == "seen"))
    acc = df.group_by("round").agg(((pl.col("accuracy") * pl.col("n")).sum() / pl.col("n").sum()).alias("acc"))
    return acc.sort("round")["acc"].to_list()


def test_body_personalizes_on_two_classes_per_client(cifar_store, tmp_path):
    kw = dict(rounds=4, clients_per_round=10, eval_every=1, checkpoint_every=0, eval_clients=0)
    run_experiment(make_exp(cifar_store, "fedavg", lr=0.02, **LOCAL, **kw), tmp_path / "fedavg")
    run_experiment(make_exp(cifar_store, "pfedhn", generate="body", hidden=16, unseen_exchanges=1,
                            unseen_head_steps=10, **LOCAL, **kw), tmp_path / "body")
    fedavg, body = seen_test(tmp_path / "fedavg"), seen_test(tmp_path / "body")
    assert len(body) == 4 and body[-1] > fedavg[-1] + 0.2 and body[-1] > body[0], (body, fedavg)
    # 4 rounds of 10 of the seen clients trained every one of them (seeded): each has its own head on disk
    states = ClientStateStore(tmp_path / "body" / "client_state")
    seen = [int(c) for c in PartitionStore.open(cifar_store).client_ids("seen")]
    heads = {c: states.get(c, 99, 0) for c in seen}
    assert all(h is not None for h in heads.values()), heads
    assert len({h["head"].numpy().tobytes() for h in heads.values()}) == len(seen)
    assert all(h["head"].shape == heads[0]["head"].shape and torch.isfinite(h["head"]).all() for h in heads.values())


def test_privacy_is_refused_in_one_line():
    with pytest.raises(SimfedError) as exc:
        privacy.method_support("pfedhn", registry.get("pfedhn"))
    assert "\n" not in str(exc.value) and "[privacy] with pfedhn" in str(exc.value)


def test_vectorize_on_runs_the_per_client_loop_for_body(engine_store, tmp_path):
    """generate = "body" has no vectorized step: engine.vectorize = "on" gives the loop's numbers, ==."""
    import dataclasses

    from tests.engine.test_method_parity import rows

    exp = make_exp(engine_store, "pfedhn", rounds=1, clients_per_round=4, eval_clients=2, local_steps=3, hidden=16,
                   embed_dim=4, unseen_exchanges=1, unseen_head_steps=2, generate="body")
    for mode in ("on", "off"):
        run_experiment(dataclasses.replace(exp, engine=dataclasses.replace(exp.engine, vectorize=mode)), tmp_path / mode)
    assert rows(tmp_path / "on").equals(rows(tmp_path / "off"))
