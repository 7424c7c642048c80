"""Other models learn through the engine: FedAvg with LEAF's character LSTM beats predicting the most
frequent character on a Shakespeare-layout store; FedAvg and PeFLL (generating the head) with
ResNet-18 improve over their first round on a 32x32x3 store. Seeded, so every number here is
reproducible; the networks are narrowed by their width keys to keep CI fast."""

import dataclasses

import numpy as np
import polars as pl
import pytest

from simfed.algorithms.kit import models
from simfed.engine import metrics
from simfed.engine.loop import run_experiment
from simfed.partitions.store import PartitionStore
from tests.engine.conftest import make_exp


@pytest.fixture(scope="module")
def cifar_iid(tmp_path_factory):
    """8 IID clients of the generated CIFAR-10 archive (7 seen, 1 unseen), ~45 images each."""
    from simfed.partitions.cifar import import_cifar
    from simfed.partitions.samples import cifar10_contents, write_cifar

    d = tmp_path_factory.mktemp("cifar-iid")
    src = write_cifar(d / "cifar-10-python.tar.gz", cifar10_contents(per_batch=60, test=60))
    return import_cifar(src, str(d / "store"), scheme="iid", clients=8, seed=0)


def seen_test(run_dir) -> pl.DataFrame:
    """Per evaluated round: the seen clients' test accuracy (pooled over samples) and mean loss."""
    df = metrics.load(run_dir).filter((pl.col("split") == "test") & (pl.col("cohort") == "seen"))
    return (df.group_by("round").agg(((pl.col("accuracy") * pl.col("n")).sum() / pl.col("n").sum()).alias("acc"),
                                     pl.col("loss").mean()).sort("round"))


def run(tmp_path, store, model, algorithm, **kw):
    exp = make_exp(store, algorithm, checkpoint_every=0, eval_clients=0, **kw)
    run_experiment(dataclasses.replace(exp, model=models.parse_spec(model)), tmp_path / "run")
    return seen_test(tmp_path / "run")


def test_fedavg_charlstm_beats_the_most_frequent_character(shakespeare_store, tmp_path):
    st = PartitionStore.open(shakespeare_store)
    ys = np.concatenate([np.asarray(st.read(int(c), "test")[1]) for c in st.client_ids("seen")])
    majority = np.bincount(ys).max() / len(ys)  # always predicting the most frequent character
    curve = run(tmp_path, shakespeare_store, {"name": "charlstm", "hidden": 32}, "fedavg", rounds=6,
                clients_per_round=7, eval_every=0, local_steps=30, batch_size=16, lr=0.5)
    assert curve["acc"][-1] > majority + 0.1, (curve, majority)


@pytest.mark.parametrize("algorithm, algo", [
    ("fedavg", dict(local_steps=10, batch_size=16, lr=0.02)),
    ("pefll", dict(local_steps=10, batch_size=16, lr=0.02, generate="head", hidden=16, server_lr=0.005)),
])
def test_resnet18_improves_over_its_first_round(cifar_iid, tmp_path, algorithm, algo):
    curve = run(tmp_path, cifar_iid, {"name": "resnet18", "width": 8}, algorithm, rounds=4, clients_per_round=4,
                eval_every=1, **algo)
    assert curve["round"].to_list() == [1, 2, 3, 4]
    assert curve["acc"][-1] > curve["acc"][0] and curve["loss"][-1] < curve["loss"][0], curve
