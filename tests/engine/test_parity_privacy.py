"""With [privacy] on, FedAvg and PeFLL give bit-identical numbers on serial, Ray with 1 and 2 workers,
and Ray interrupted then resumed: per-client metrics, the final server state (the adaptive clip
included), and the round statistics (epsilon, the clip), compared with ==.

The noise comes from the server's generator seeded by (run seed, round, phase, key), the cohort
from Poisson sampling seeded by (run seed, round), and the clipping happens per client before the
chunk sums: none of it depends on where or when a chunk ran."""

import dataclasses
import json

import polars as pl
import pytest

from simfed.engine import checkpoint, metrics
from simfed.engine.loop import run_experiment
from simfed.engine.privacy import parse_section
from tests.engine.conftest import make_exp
from tests.engine.test_method_parity import SMALL, StopAt, rows, same

PRIVATE = {
    # adaptive clipping: its clip is server state that the checkpoint must carry across a resume
    "fedavg": ({}, {"noise_multiplier": 1.0, "clip": 0.5, "target_quantile": 0.5, "clip_count_stddev": 2.0}),
    # two released parts (eta_h's terms clipped on the server, eta_v's on the workers)
    "pefll": ({"descriptor_norm": "public"}, {"noise_multiplier": 0.8, "clip": 1.0, "noise_cohort_size": 50}),
}


def private_exp(store, algorithm, **kw):
    extra, privacy = PRIVATE[algorithm]
    exp = make_exp(store, algorithm, **kw, **SMALL[algorithm], **extra)
    return dataclasses.replace(exp, privacy=parse_section(privacy))


@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize("algorithm", sorted(PRIVATE))
def test_private_runs_are_bit_identical(engine_store, tmp_path, algorithm):
    kw = dict(rounds=3, clients_per_round=5, eval_every=3, checkpoint_every=1, eval_clients=3)
    run_experiment(private_exp(engine_store, algorithm, **kw), tmp_path / "serial")
    for workers in (1, 2):
        run_experiment(private_exp(engine_store, algorithm, backend="ray", workers=workers, **kw),
                       tmp_path / f"ray{workers}")
    cut = private_exp(engine_store, algorithm, backend="ray", workers=2, **kw)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cut, tmp_path / "resumed", on_event=StopAt(3))
    assert checkpoint.load(tmp_path / "resumed")["round"] == 2
    run_experiment(cut, tmp_path / "resumed", resume=True)

    ref, model = rows(tmp_path / "serial"), checkpoint.load(tmp_path / "serial")["server"]
    stats = metrics.load_rounds(tmp_path / "serial")
    assert ref.filter(pl.col("split") != "train").height > 0
    for name in ("ray1", "ray2", "resumed"):
        assert rows(tmp_path / name).equals(ref), name
        assert same(checkpoint.load(tmp_path / name)["server"], model), name
        assert metrics.load_rounds(tmp_path / name).equals(stats), name
    # Poisson sampling: the cohort's size varies from round to round
    sizes = ref.filter(pl.col("split") == "train").group_by("round").agg(pl.col("client_id").n_unique())
    assert sizes.height == 3
    # epsilon after every round, growing; the last one is status.json's
    eps = stats["epsilon"].to_list()
    assert eps == sorted(eps) and eps[0] > 0
    status = json.loads((tmp_path / "resumed" / "status.json").read_text())
    assert status["epsilon"] == eps[-1] and status["privacy"]["sampling"] == "poisson"
    if algorithm == "fedavg":
        clips = stats["update.privacy_clip"].to_list()
        assert len(set(clips)) == 3 and float(model["__privacy__"]["clip"]) not in clips  # it moved every round
