"""The virtual clock's arithmetic, checked against hand computations: every method's stated work
against the rows it writes, traces (generated and hand-written) against the rows' virtual times,
partial stragglers against their step budgets, and FedBuff's schedule and staleness-weighted
server step against a replay of the paper's update."""

import dataclasses
import math

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from simfed.algorithms import registry
from simfed.algorithms.base import RoundInfo
from simfed.algorithms.fedavg import FedAvg
from simfed.algorithms.kit.workload import staleness_weight
from simfed.engine import checkpoint, metrics, traces
from simfed.engine.backends import open_backend
from simfed.engine.clock import RoundClock
from simfed.engine.loop import run_experiment
from simfed.engine.plan import check_experiment, n_train
from simfed.engine.system import SystemConfig
from simfed.engine.worker import Worker, WorkerSpec
from tests.engine.conftest import make_exp
from tests.engine.test_method_parity import SMALL

WORK_CONFIGS = {**SMALL, "pfedacnnl-groups": dict(patches_per_image=4, forward_dtype="float64", groups=2,
                                                  cluster_iters=1),
                "pfedhn-body": dict(SMALL["pfedhn"], generate="body", unseen_head_steps=2)}


@pytest.mark.parametrize("name", sorted(WORK_CONFIGS))
def test_every_method_states_the_work_its_rows_show(engine_store, tmp_path, name):
    """Algorithm.work (the clock's input) == the samples and bytes the engine counts, every phase."""
    algorithm = name.split("-")[0]
    exp = make_exp(engine_store, algorithm, **WORK_CONFIGS[name])
    plan = check_experiment(exp)
    sizes, algo, rows = n_train(plan.store.clients), registry.get(algorithm), []
    with open_backend(exp, plan, str(tmp_path / "state")) as be:
        for pi, phase in enumerate(be.phases("train", 0)):
            be.run_phase(phase, RoundInfo(round=0, seed=0, phase_index=pi), plan.seen[:4], plan.sizes,
                         lambda meta: rows.extend(meta["rows"]), -1)
    assert rows
    for row in rows:
        w = algo.work(row["phase"], exp.algorithm_config, plan.task, sizes[row["client_id"]])
        assert (row["n"], row["bytes_down"], row["bytes_up"]) == (w.samples, w.bytes_down, w.bytes_up), row


def with_system(exp, **kw):
    return dataclasses.replace(exp, system=SystemConfig(**kw))


def test_generated_traces_give_the_hand_computed_virtual_times(engine_store, tmp_path):
    """FedScale-style traces (engine.traces layouts) used by a run: each trained row's virtual
    seconds are n / compute + bytes_down / down + bytes_up / up with the trace's numbers, each
    trained client was online at its start, and each round starts when the last one ended."""
    ids = check_experiment(make_exp(engine_store)).seen
    avail = traces.write_availability(tmp_path / "avail.parquet", ids, seed=1, hours=24, sessions=16,
                                      mean_session=3600.0)
    speed = traces.write_speeds(tmp_path / "speed.parquet", ids, seed=2)
    exp = with_system(make_exp(engine_store, rounds=3, clients_per_round=4, local_steps=4, eval_every=3),
                      availability=str(avail), speed=str(speed), start=12 * 3600.0)  # noon: many online
    run_experiment(exp, tmp_path / "r")
    sp = {r["client_id"]: r for r in pq.read_table(speed).to_pylist()}
    online = pq.read_table(avail).to_pylist()
    train = metrics.load(tmp_path / "r").filter(pl.col("split") == "train").sort("round", "client_id")
    done = train.filter(pl.col("outcome") == "completed")
    assert done.height >= 6 and done["round"].n_unique() == 3
    for row in done.iter_rows(named=True):
        s = sp[row["client_id"]]
        hand = row["n"] / s["compute"] + (row["bytes_down"] / s["down"] + row["bytes_up"] / s["up"])
        assert row["virtual_seconds"] == pytest.approx(hand, rel=1e-12, abs=0)
        assert any(o["client_id"] == row["client_id"] and o["start"] <= row["virtual_start"] < o["end"] for o in online)
    # two clients by hand, numbers written out: FedAvg sends and receives LeNet (360,968 bytes + 8)
    for row in done.head(2).iter_rows(named=True):
        s = sp[row["client_id"]]
        assert row["bytes_down"] == 360_968 and row["bytes_up"] == 360_976 and row["n"] == 4 * 32
        assert row["virtual_seconds"] == pytest.approx(128 / s["compute"] + 360_968 / s["down"] + 360_976 / s["up"])
    ends = metrics.load_rounds(tmp_path / "r")["virtual_time"].to_list()
    starts = train.group_by("round").agg(pl.col("virtual_start").min()).sort("round")["virtual_start"].to_list()
    assert all(b >= a for a, b in zip(ends, starts[1:]))
    assert ends == [max(r["virtual_start"] + r["virtual_seconds"] for r in done.filter(pl.col("round") == k)
                        .iter_rows(named=True)) for k in (1, 2, 3)]


def test_a_hand_written_trace_decides_who_is_sampled_and_who_drops(engine_store, tmp_path):
    ids = check_experiment(make_exp(engine_store)).seen
    late, leaves, absent = ids[0], ids[1], ids[2]  # offline at 0; online for 0.5 s only; not in the trace
    rows = [(c, 0.0, 1e6) for c in ids if c not in (late, leaves, absent)] + [(late, 50.0, 1e6), (leaves, 0.0, 0.5)]
    path = tmp_path / "avail.parquet"
    pq.write_table(pa.table({"client_id": [r[0] for r in rows], "start": [r[1] for r in rows],
                             "end": [r[2] for r in rows]}), path)
    exp = with_system(make_exp(engine_store, rounds=1, clients_per_round=len(ids), local_steps=2),
                      availability=str(path), compute_spread=0.0, down_spread=0.0, up_spread=0.0)
    run_experiment(exp, tmp_path / "r")
    train = metrics.load(tmp_path / "r").filter(pl.col("split") == "train")
    assert late not in train["client_id"].to_list() and absent not in train["client_id"].to_list()
    assert train.height == len(ids) - 2
    gone = train.filter(pl.col("client_id") == leaves).row(0, named=True)
    assert gone["outcome"] == "dropped" and gone["virtual_seconds"] == 0.5 and gone["dropped"] and gone["n"] == 0
    done = train.filter(pl.col("outcome") == "completed")
    # equal speeds (spread 0): 2 steps of min(32, n) samples at 100/s, LeNet down at 1.25 MB/s and up at 250 kB/s
    sizes = n_train(check_experiment(exp).store.clients)
    hand = [2 * min(32, sizes[c]) / 100.0 + (360_968 / 1.25e6 + 360_976 / 2.5e5) for c in done["client_id"].to_list()]
    assert done["virtual_seconds"].to_list() == pytest.approx(hand, rel=1e-12)
    assert metrics.load_rounds(tmp_path / "r")["virtual_time"].item() == pytest.approx(max(hand), rel=1e-12)


def test_partial_stragglers_train_their_budget_and_stop_at_the_deadline(engine_store, tmp_path):
    """budget = floor(steps x (deadline - message seconds) / compute seconds), by hand from the speeds."""
    exp = with_system(make_exp(engine_store, rounds=2, clients_per_round=6, local_steps=8, eval_every=2),
                      compute_spread=1.0, deadline=4.0, stragglers="partial")
    run_experiment(exp, tmp_path / "r")
    plan = check_experiment(exp)
    sizes = n_train(plan.store.clients)
    speeds = RoundClock(exp, plan.task, plan.seen, sizes, ["update"]).clock.speeds
    train = metrics.load(tmp_path / "r").filter(pl.col("split") == "train")
    partial = train.filter(pl.col("outcome") == "partial")
    assert partial.height > 0
    for row in partial.iter_rows(named=True):
        compute, down, up = speeds[row["client_id"]]
        batch = min(32, sizes[row["client_id"]])
        steps = math.floor(8 * (4.0 - (360_968 / down + 360_976 / up)) / (8 * batch / compute))
        assert row["n"] == steps * batch and 0 < steps < 8 and row["virtual_seconds"] == 4.0


def plans(exp, engine_store, rounds):
    plan = check_experiment(exp)
    rc = RoundClock(exp, plan.task, plan.seen, n_train(plan.store.clients), ["update"])
    return [rc.plan(r, ["update"]) for r in range(rounds)], rc


def test_sync_rounds_keep_the_first_k_and_end_as_documented(engine_store):
    exp = with_system(make_exp(engine_store, clients_per_round=5), compute_spread=1.0, overcommit=1.6, deadline=6.0)
    for p in plans(exp, engine_store, 6)[0]:
        sampled = p.clients
        assert len(sampled) == math.ceil(1.6 * 5)
        done = sorted((c for c in sampled if c.outcome == "completed"), key=lambda c: (c.finish, c.client_id))
        on_time = [c for c in sampled if c.outcome != "dropped" and sum(c.phases) <= 6.0]
        assert len(done) == min(5, len(on_time))  # the first K to finish within the deadline are kept
        assert p.end - p.start == pytest.approx(done[-1].finish if len(done) == 5 else 6.0, rel=1e-12)


def test_nobody_available_means_nobody_trains_and_the_server_waits(engine_store, tmp_path):
    exp = with_system(make_exp(engine_store, rounds=2, local_steps=2, eval_every=2), availability=0.0, idle_wait=30.0)
    p, _ = plans(exp, engine_store, 2)
    assert [(q.start, q.end, q.cohort) for q in p] == [(0.0, 30.0, []), (30.0, 60.0, [])]
    run_experiment(exp, tmp_path / "r")
    assert metrics.load(tmp_path / "r").filter(pl.col("split") == "train").height == 0
    assert torch.equal(checkpoint.load(tmp_path / "r")["server"]["theta"], algo_init(exp, check_experiment(exp)))


def test_diurnal_availability_follows_the_documented_curve(engine_store):
    exp = with_system(make_exp(engine_store), availability="diurnal", diurnal_low=0.0, diurnal_high=1.0,
                      diurnal_period=100.0)
    p, rc = plans(exp, engine_store, 1)
    seen = rc.clock.seen
    assert not any(rc.clock.available(c, 0, 0.0) for c in seen)  # midnight: probability diurnal_low = 0
    assert all(rc.clock.available(c, 0, 50.0) for c in seen)  # noon: diurnal_high = 1
    quarter = sum(rc.clock.available(c, k, 25.0) for c in seen for k in range(40)) / (40 * len(seen))
    assert abs(quarter - 0.5) < 0.08  # (1 - cos(pi / 2)) / 2


def test_fedbuff_schedule_and_the_staleness_weighted_server_step(engine_store, tmp_path):
    """Replay FedBuff by hand from the schedule: theta_{v+1} = theta_v - sum_i w_i n_i delta_i / sum_i n_i,
    client i's delta from the version it started from, w_i = 1/sqrt(1 + staleness)."""
    exp = dataclasses.replace(make_exp(engine_store, rounds=4, clients_per_round=4, local_steps=2, eval_every=4),
                              system=SystemConfig(compute_spread=1.0))
    exp = dataclasses.replace(exp, run=dataclasses.replace(exp.run, aggregation="fedbuff", buffer_size=2))
    run_experiment(exp, tmp_path / "r")
    plan = check_experiment(exp)
    clock = RoundClock(exp, plan.task, plan.seen, n_train(plan.store.clients), ["update"])
    worker = Worker(WorkerSpec(plan.store.path, "fedavg", exp.algorithm_config, plan.task, 0, str(tmp_path / "s")))
    algo, versions = FedAvg(), [algo_init(exp, plan)]
    stale, kept, runs = 0, 0, []
    for r in range(4):
        p = clock.plan(r, ["update"])
        runs += p.clients
        # a buffer of 2; the server still holds every version this buffer's clients started from
        assert len(p.cohort) == 2 and all(kept <= v <= r for _, v in p.starts)
        kept = p.keep_from
        num, den = 0, 0.0
        for cid, v in p.starts:
            stale = max(stale, r - v)
            ctx = worker._context(cid, "update", RoundInfo(round=r, seed=0))
            data = worker._data(cid)
            reply = algo.client("update", exp.algorithm_config, versions[v], None, data, None, ctx)
            n = float(data.n("train"))
            num = num + reply.sums["delta"] / n * (n * staleness_weight(r - v))
            den += n
        versions.append(versions[-1] - num / den)
    assert stale > 0
    for cid in {c.client_id for c in runs}:  # a client trains one run at a time
        spans = sorted((c.start, c.start + c.spent) for c in runs if c.client_id == cid)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    assert torch.allclose(checkpoint.load(tmp_path / "r")["server"]["theta"], versions[-1], rtol=0, atol=1e-6)


def algo_init(exp, plan):
    return FedAvg().init(exp.algorithm_config, plan.task, exp.run.seed).theta


def test_staleness_weight_is_fedbuffs():
    assert [staleness_weight(s) for s in (0, 1, 3, 8)] == [1.0, 1 / math.sqrt(2), 0.5, 1 / 3]


def test_fedbuff_refuses_what_only_sync_rounds_have(engine_store):
    from simfed.core.errors import SimfedError

    base = make_exp(engine_store)
    fedbuff = dataclasses.replace(base, run=dataclasses.replace(base.run, aggregation="fedbuff", buffer_size=5))
    for system, needle in ((SystemConfig(deadline=10.0), "deadline, overcommit and stragglers"),
                           (SystemConfig(overcommit=1.3), "deadline, overcommit and stragglers")):
        with pytest.raises(SimfedError, match=needle):
            check_experiment(dataclasses.replace(fedbuff, system=system))
    with pytest.raises(SimfedError, match="buffer_size = 99"):
        check_experiment(dataclasses.replace(fedbuff, run=dataclasses.replace(fedbuff.run, buffer_size=99)))
    # without a [system] table FedBuff runs on its defaults
    p, _ = plans(fedbuff, engine_store, 2)
    assert [len(q.cohort) for q in p] == [5, 5] and p[0].end < p[1].end


@pytest.mark.parametrize("case", ["not-parquet", "column", "missing-client"])
def test_trace_files_are_checked_like_stores(engine_store, tmp_path, case):
    from simfed.core.errors import SimfedError

    seen = check_experiment(make_exp(engine_store)).seen
    path = tmp_path / "t.parquet"
    if case == "not-parquet":
        path.write_text("client_id,start,end\n")
        call, needle = (lambda: traces.read_availability(str(path), seen)), "not a readable Parquet file"
    elif case == "column":
        pq.write_table(pa.table({"client_id": seen, "begin": [0.0] * len(seen)}), path)
        call, needle = (lambda: traces.read_availability(str(path), seen)), "no column 'start'"
    else:
        pq.write_table(pa.table({"client_id": seen[1:], **{c: [1.0] * (len(seen) - 1) for c in ("compute", "up", "down")}}),
                       path)
        call, needle = (lambda: traces.read_speeds(str(path), seen)), f"no row for client {seen[0]}"
    with pytest.raises(SimfedError, match=needle) as err:
        call()
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_metrics_files_without_the_clock_columns_read_with_them_null(tmp_path):
    """Runs written before the clock existed still read (and resume)."""
    old = metrics.SCHEMA.remove(metrics.SCHEMA.get_field_index("virtual_start"))
    for name in metrics.CLOCK[1:]:
        old = old.remove(old.get_field_index(name))
    row = {f.name: None for f in old} | {"run": "r", "round": 1, "client_id": 3, "split": "train", "n": 5,
                                         "dropped": False}
    (tmp_path / "metrics").mkdir()
    pq.write_table(pa.Table.from_pylist([row], schema=old), tmp_path / "metrics" / "r000001-train.parquet")
    df = metrics.load(tmp_path)
    assert df.columns == metrics.SCHEMA.names and df["n"].to_list() == [5]
    assert df.select(metrics.CLOCK).null_count().row(0) == (1, 1, 1, 1)
