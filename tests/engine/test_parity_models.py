"""Runs with other models are bit-identical too: serial, Ray with 1 and 2 workers, and Ray
interrupted then resumed give the same per-client metrics and the same final server state (==),
for ResNet-18 (FedAvg, and PeFLL generating the head only), the character LSTM, a user model
loaded by module path (FedAvg), and pFedHN generating the LeNet's body (generate = "body": the
heads are client state, the unseen clients' heads fitted). The models are narrow (width / hidden
keys) to keep CI fast; their shapes are the built-ins' (tests/algorithms/test_models.py checks the full sizes)."""

import dataclasses

import pytest

from simfed.algorithms.kit import models
from simfed.engine import checkpoint, metrics
from simfed.engine.loop import run_experiment
from tests.engine.conftest import make_exp
from tests.engine.test_method_parity import StopAt, rows, same

CASES = {
    "resnet18-fedavg": ("cifar_store", {"name": "resnet18", "width": 2}, "fedavg", dict(local_steps=2, batch_size=8)),
    "resnet18-pefll-head": ("cifar_store", {"name": "resnet18", "width": 2}, "pefll",
                            dict(local_steps=2, batch_size=8, hidden=8, embed_dim=3, descriptor_batch=8,
                                 generate="head")),
    "lenet-pfedhn-body": ("engine_store", {"name": "lenet"}, "pfedhn",
                          dict(local_steps=3, hidden=16, embed_dim=4, unseen_exchanges=2, unseen_head_steps=2,
                               generate="body")),
    "charlstm-fedavg": ("shakespeare_store", {"name": "charlstm", "hidden": 8}, "fedavg",
                        dict(local_steps=2, batch_size=8)),
    "user-fedavg": ("cifar_store", {"name": "tests.engine.user_models:small_cnn"}, "fedavg",
                    dict(local_steps=2, batch_size=8)),
}


def experiment(store, model, algorithm, algo, **kw):
    exp = make_exp(store, algorithm, rounds=2, clients_per_round=4, eval_every=2, checkpoint_every=1,
                   eval_clients=2, **algo, **kw)
    return dataclasses.replace(exp, model=models.parse_spec(model))


@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize("case", sorted(CASES))
def test_model_runs_are_bit_identical_on_serial_ray_and_resumed(request, tmp_path, case):
    fixture, model, algorithm, algo = CASES[case]
    store = request.getfixturevalue(fixture)
    run_experiment(experiment(store, model, algorithm, algo), tmp_path / "serial")
    for workers in (1, 2):
        run_experiment(experiment(store, model, algorithm, algo, backend="ray", workers=workers),
                       tmp_path / f"ray{workers}")
    cut = experiment(store, model, algorithm, algo, backend="ray", workers=2)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cut, tmp_path / "resumed", on_event=StopAt(2))
    run_experiment(cut, tmp_path / "resumed", resume=True)

    ref, state = rows(tmp_path / "serial"), checkpoint.load(tmp_path / "serial")["server"]
    assert ref.filter(ref["split"] == "test").height > 0
    for name in ("ray1", "ray2", "resumed"):
        assert rows(tmp_path / name).equals(ref), name
        assert same(checkpoint.load(tmp_path / name)["server"], state), name
    train = metrics.load(tmp_path / "ray2").filter(metrics.load(tmp_path / "ray2")["split"] == "train")
    assert sorted(train["worker"].unique().to_list()) == [0, 1]  # two workers really shared the cohort
