"""A representative part of the method x model table (bench/models_table.py prints all of it, and
docs/methods.md holds it): 2 rounds through `simfed.launch` either run, above chance where the
model fits the data, or are refused before any work in one line that says why."""

import numpy as np
import polars as pl
import pytest

from simfed import SimfedError, launch, load_run
from simfed.partitions.store import PartitionStore
from tests.engine.test_method_parity import SMALL

USER = {"name": "tests.engine.user_models:small_cnn"}
RESNET = {"name": "resnet18"}  # the real ResNet-18: refusals happen before any training
RUNS = [  # (method, store fixture, [model], extra keys): must run, above chance
    ("fedavg", "features_store", {"name": "mlp"}, {}),
    ("fedacnnl", "cifar_store", USER, {}),  # its layers derived from the user's chain
    ("knnper", "cifar_store", USER, {}),
    ("fedrep", "shakespeare_store", {"name": "charlstm", "hidden": 8}, {}),
    ("pfedhn", "features_store", {"name": "mlp"}, {"generate": "head"}),
]
REFUSED = [  # (method, store fixture, [model], what the one line must say)
    ("fedacnnl", "cifar_store", RESNET, ("[model] resnet18 cannot be used by fedacnnl", "GroupNorm")),
    ("pfedacnnl", "shakespeare_store", {"name": "charlstm"}, ("cannot be used by pfedacnnl", "Embedding")),
    ("pefll", "cifar_store", RESNET, ("11,173,962 parameters", "max_generated = 2,000,000", 'generate = "head"')),
    ("fmlh", "cifar_store", RESNET, ("fmlh's offset covers every client parameter", "max_generated")),
    ("fedavg", "cifar_store", {"name": "charlstm"}, ("charlstm needs a sequence of token ids",)),
]
UNCHECKED_ACCURACY = {"fedrep"}  # 2 rounds of a character LSTM: it runs, nothing more is claimed


def doc(store, method, model, extra):
    return {"data": {"path": store}, "model": model, "algorithm": {"name": method, **SMALL[method], **extra},
            "run": {"rounds": 2, "clients_per_round": 4, "eval_every": 0, "checkpoint_every": 0, "eval_clients": 4},
            "engine": {"backend": "serial"}}


def majority(store) -> float:
    st = PartitionStore.open(store)
    ys = np.concatenate([np.asarray(st.read(int(c), "test")[1]) for c in st.client_ids("seen")])
    return float(np.bincount(ys).max() / len(ys))


@pytest.mark.parametrize("method, fixture, model, extra", RUNS, ids=[f"{r[0]}-{r[2]['name']}" for r in RUNS])
def test_method_runs_with_model(request, tmp_path, method, fixture, model, extra):
    store = request.getfixturevalue(fixture)
    launch(doc(store, method, model, extra), out=tmp_path / "run")
    df = load_run(tmp_path / "run").metrics()
    test = df.filter((pl.col("split") == "test") & (pl.col("cohort") == "seen"))
    assert test.height > 0 and df.filter(pl.col("split") == "train")["round"].max() == 2
    if method not in UNCHECKED_ACCURACY:
        assert test["accuracy"].mean() > majority(store), test


@pytest.mark.parametrize("method, fixture, model, needles", REFUSED, ids=[f"{r[0]}-{r[2]['name']}" for r in REFUSED])
def test_method_refuses_model_in_one_line(request, tmp_path, method, fixture, model, needles):
    store = request.getfixturevalue(fixture)
    with pytest.raises(SimfedError) as exc:
        launch(doc(store, method, model, {}), out=tmp_path / "run")
    line = str(exc.value)
    assert "\n" not in line and all(n in line for n in needles), line
    assert not (tmp_path / "run").exists()  # refused before the run directory exists
