"""[system] and FedBuff through the real `simfed` entry point: bad input is one line and exit 2 with
nothing written; `metrics --curve` and `plot --virtual-time` show the virtual clock."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from simfed.engine.plan import check_experiment
from tests.cli.inproc import run
from tests.cli.test_launch_cli import assert_user_error, write_exp
from tests.engine.conftest import make_exp


def launch(tmp_path, store, system: str = "", algorithm: str = 'name = "fedavg"', run_keys: str = ""):
    exp = write_exp(tmp_path, store, algorithm, run=run_keys)
    text = exp.read_text() if "acnnl" not in algorithm else exp.read_text().replace("local_steps = 3", "")
    exp.write_text(text + f"\n[system]\n{system}\n")
    return run("launch", exp, "--out", tmp_path / "run", "-q")


def trace(tmp_path, name: str, **columns) -> str:
    path = tmp_path / name
    pq.write_table(pa.table(columns), path)
    return str(path)


@pytest.mark.parametrize("case", ["probability", "dropout", "zero-speed", "negative-speed", "speed-trace",
                                  "unknown-client", "overlap", "unsorted", "deadline", "fedbuff", "partial"])
def test_bad_system_input_is_one_line_exit_2_and_writes_nothing(engine_store, tmp_path, case):
    seen = check_experiment(make_exp(engine_store)).seen
    a, b = seen[0], seen[1]
    if case == "probability":
        proc = launch(tmp_path, engine_store, "availability = 1.5")
        needles = ["[system] availability = 1.5", "[0, 1]"]
    elif case == "dropout":
        proc = launch(tmp_path, engine_store, "dropout = -0.2")
        needles = ["[system] dropout = -0.2", "[0, 1]"]
    elif case == "zero-speed":
        proc = launch(tmp_path, engine_store, "compute = 0")
        needles = ["[system] compute = 0", "out of range"]
    elif case == "negative-speed":
        proc = launch(tmp_path, engine_store, "up = -250000.0")
        needles = ["[system] up = -250000", "out of range"]
    elif case == "speed-trace":
        path = trace(tmp_path, "speed.parquet", client_id=seen, compute=[100.0] * len(seen),
                     up=[-1.0] + [2e5] * (len(seen) - 1), down=[1e6] * len(seen))
        proc = launch(tmp_path, engine_store, f'speed = "{path}"')
        needles = [path, f"client {a} has up = -1", "must be > 0"]
    elif case == "unknown-client":
        path = trace(tmp_path, "avail.parquet", client_id=[a, 99999], start=[0.0, 0.0], end=[10.0, 10.0])
        proc = launch(tmp_path, engine_store, f'availability = "{path}"')
        needles = [path, "client 99999", "store does not have"]
    elif case == "overlap":
        path = trace(tmp_path, "avail.parquet", client_id=[a, a, b], start=[0.0, 5.0, 0.0], end=[10.0, 20.0, 3.0])
        proc = launch(tmp_path, engine_store, f'availability = "{path}"')
        needles = [path, f"intervals of client {a} overlap"]
    elif case == "unsorted":
        path = trace(tmp_path, "avail.parquet", client_id=[a, a], start=[50.0, 0.0], end=[60.0, 10.0])
        proc = launch(tmp_path, engine_store, f'availability = "{path}"')
        needles = [path, f"intervals of client {a} are not sorted"]
    elif case == "deadline":
        proc = launch(tmp_path, engine_store, "deadline = 0.5")
        needles = ["[system] deadline = 0.5", "no client can finish a round in time", "the fastest, client"]
    elif case == "fedbuff":
        proc = launch(tmp_path, engine_store, algorithm='name = "pefll"', run_keys='aggregation = "fedbuff"')
        needles = ["aggregation = \"fedbuff\"", "pefll cannot run asynchronously", "fedavg"]
    else:
        proc = launch(tmp_path, engine_store, 'stragglers = "partial"\ndeadline = 100.0',
                      algorithm='name = "fedacnnl"')
        needles = ["stragglers = \"partial\"", "fedacnnl refuses partial work"]
    assert_user_error(proc, *needles)
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def clock_run(engine_store, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("clock")
    proc = launch(tmp, engine_store, "dropout = 0.2\ndeadline = 10.0\novercommit = 1.5")
    assert proc.returncode == 0, proc.stderr
    return tmp / "run"


def test_metrics_curve_has_the_virtual_time(clock_run):
    proc = run("metrics", clock_run, "--curve", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    times = {r["round"]: r["virtual_time"] for r in out["eval"]}
    assert set(times) == {1, 2} and 0 < times[1] < times[2]
    assert [r["virtual_time"] for r in out["train"]] == [times[1], times[2]]
    text = run("metrics", clock_run, "--curve").stdout
    assert "virtual_time" in text.splitlines()[0]
    from simfed import load_run

    run_ = load_run(clock_run)
    assert run_.curve()["virtual_time"].to_list() == [r["virtual_time"] for r in out["eval"]]
    assert run_.train_curve()["virtual_time"].to_list() == [times[1], times[2]]


def test_plot_virtual_time_axis(clock_run, tmp_path, run_dir_without_clock):
    pytest.importorskip("matplotlib")
    proc = run("plot", clock_run, "--virtual-time", "--out", tmp_path / "t.html")
    assert proc.returncode == 0, proc.stderr
    page = (tmp_path / "t.html").read_text()
    data = json.loads(page.split("id='simfed-data'>")[1].split("</script>")[0])
    assert all("virtual_time" in r for r in data["series"][0]["eval"])
    assert_user_error(run("plot", run_dir_without_clock, "--virtual-time", "--out", tmp_path / "u.png"),
                      "no virtual clock", "--virtual-time")


@pytest.fixture(scope="module")
def run_dir_without_clock(engine_store, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("noclock")
    proc = run("launch", write_exp(tmp, engine_store), "--out", tmp / "run", "-q")
    assert proc.returncode == 0, proc.stderr
    return tmp / "run"
