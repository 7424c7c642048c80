"""simfed on a real three-node Ray cluster built on this machine (tests/cluster/netns.py): every
node has its own address, /tmp and /dev/shm and one CPU, Ray runs with token authentication, the
store and client state live on an S3 server on the bridge, and every simfed command is the real
CLI run in the head node's namespace.

The node kill comes last: the tests before it need all three nodes.
"""

from __future__ import annotations

import ipaddress
import re
import shutil
import subprocess
import time
from pathlib import Path

import polars as pl
import psutil
import pyarrow.fs as pafs
import pytest

from simfed.engine import checkpoint, metrics, rundir
from simfed.engine.loop import run_experiment
from tests.cluster import netns
from tests.engine.conftest import make_exp, numbers
from tests.engine.test_method_parity import same

pytestmark = pytest.mark.slow

DITTO = dict(rounds=4, clients_per_round=12, eval_every=0, local_steps=5, personal_steps=5, unseen_epochs=1.0)
GCS_PROBE = """
import sys
from ray._raylet import GcsClient
try:
    GcsClient(address=sys.argv[1]).internal_kv_get(b"probe", None)
    print("OK")
except Exception as exc:
    print("ERR", type(exc).__name__)
"""
WILDCARD = {"0.0.0.0", "::"}


def toml(store: str, algorithm: str, storage: str = "", workers: int = 3, **keys) -> str:
    run = {k: keys.pop(k) for k in ("rounds", "clients_per_round", "eval_every") if k in keys}
    return "\n".join([
        "[data]", f'path = "{store}"',
        "[run]", *(f"{k} = {v}" for k, v in run.items()),
        "[algorithm]", f'name = "{algorithm}"', *(f"{k} = {v}" for k, v in keys.items()),
        "[engine]", 'backend = "ray"', f"workers = {workers}", *([f'storage = "{storage}"'] if storage else []),
    ]) + "\n"


def put(cluster, node: str, path: str, text: str) -> str:
    """A file in `node`'s own /tmp (only that node sees it); returns its path there."""
    (cluster.root(node) / path.lstrip("/")).write_text(text)
    return path


def cli(cluster, *args: str, node: str = "head", env: dict | None = None, timeout: float = 600):
    return cluster.run(node, cluster.python, "-m", "simfed.cli.main", *args, env=env, timeout=timeout)


def launch_argv(cluster, exp: str, out: str) -> list[str]:
    return [cluster.python, "-m", "simfed.cli.main", "launch", exp, "--address", cluster.head_address, "--out", out,
            "-q"]


def one_line_exit_2(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


def trained_on(cluster, run_dir) -> pl.DataFrame:
    """Training rows with the name of the node each client trained on."""
    names = cluster.node_names()
    rows = metrics.load(run_dir).filter(pl.col("split") == "train")
    return rows.with_columns(pl.col("node_id").replace_strict(names, default="?").alias("node"))


@pytest.fixture(scope="module")
def ditto_undisturbed(nscluster, ns_store):
    """Ditto (client state on S3) on all three nodes, undisturbed; its run directory on the head."""
    exp = put(nscluster, "head", "/tmp/ditto.toml", toml(ns_store, "ditto", nscluster.s3_uri("state-a"), **DITTO))
    proc = nscluster.run("head", *launch_argv(nscluster, exp, "/tmp/runs/ditto-a"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return nscluster.root("head") / "tmp/runs/ditto-a"


def test_fedavg_runs_on_every_node_and_nothing_listens_beyond_the_bridge(nscluster, ns_store, tmp_path):
    exp = put(nscluster, "head", "/tmp/fedavg.toml", toml(ns_store, "fedavg", rounds=2, clients_per_round=12,
                                                          eval_every=1, local_steps=5))
    run_dir = nscluster.root("head") / "tmp/runs/fedavg"
    driver = subprocess.Popen(nscluster.command("head", *launch_argv(nscluster, exp, "/tmp/runs/fedavg")),
                              env=nscluster.env(), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        deadline = time.time() + 600
        while (rundir.read_status(run_dir) or {}).get("state") != "running":
            assert driver.poll() is None and time.time() < deadline, driver.communicate()[1][-3000:]
            time.sleep(0.2)
        seen = {node: netns.listeners(nscluster, node) for node in nscluster.nodes}
        actors = {node: netns.processes(nscluster, node) for node in nscluster.nodes}
    finally:
        _, err = driver.communicate(timeout=600)
    assert driver.returncode == 0, err[-3000:]

    allowed = [netns.LOOPBACK, nscluster.subnet()]
    for node, socks in seen.items():
        reach = netns.interface_addresses(nscluster, node)
        assert reach == {"127.0.0.1", nscluster.ip(node)}, reach  # a wildcard listener reaches only these
        for addr, port, name in socks:
            for ip in (reach if addr in WILDCARD else {addr}):
                assert any(ipaddress.ip_address(ip) in net for net in allowed), (node, addr, port, name)
    assert {"gcs_server", "raylet"} <= {name for _, _, name in seen["head"]}
    assert all("raylet" in {name for _, _, name in seen[n]} for n in ("w1", "w2"))
    s3 = {c.laddr.ip for c in psutil.Process(int((nscluster.state / "s3.pid").read_text())).net_connections("inet")
          if c.status == "LISTEN"}
    assert s3 == {f"{nscluster.net}.1"}  # the S3 server answers on the bridge only

    def runs(node: str, actor: str) -> bool:  # Ray titles an actor's process ray::Class or ray::Class.method
        return any(p.split(".")[0] == f"ray::{actor}" for p in actors[node])

    assert runs("head", "ServerActor"), actors  # the server lives with the driver
    assert all(runs(n, "WorkerActor") and not runs(n, "ServerActor") for n in ("w1", "w2")), actors
    rows = trained_on(nscluster, run_dir)
    assert set(rows["node"]) == {"head", "w1", "w2"}  # workers on every node
    assert rundir.read_status(run_dir)["server_restarts"] == 0


def test_stateful_clients_move_between_nodes_and_keep_their_state(nscluster, ditto_undisturbed, engine_store,
                                                                    tmp_path):
    rows = trained_on(nscluster, ditto_undisturbed)
    moved = rows.group_by("client_id").agg(pl.col("node").n_unique().alias("nodes")).filter(pl.col("nodes") > 1)
    assert moved.height > 0  # some client trained on one node and later on another
    run_experiment(make_exp(engine_store, "ditto", **DITTO), tmp_path / "serial")
    assert numbers(ditto_undisturbed).equals(numbers(tmp_path / "serial"))
    assert same(checkpoint.load(ditto_undisturbed)["server"], checkpoint.load(tmp_path / "serial")["server"])
    fs, inner = pafs.FileSystem.from_uri(nscluster.s3_uri("state-a"))
    kept = fs.get_file_info(pafs.FileSelector(inner, recursive=True))
    assert any(re.search(r"/r\d+p\d+\.pt$", i.path) for i in kept)  # the state really lives on S3


def test_sweep_trials_spread_over_the_nodes(nscluster, ns_store):
    spec = toml(ns_store, "fedavg", workers=1, rounds=1, clients_per_round=8, eval_every=1, local_steps=2)
    put(nscluster, "head", "/tmp/sweep.toml", spec + '[sweep.grid]\n"run.seed" = [0, 1]\n')
    proc = cli(nscluster, "sweep", "/tmp/sweep.toml", "--address", nscluster.head_address, "--out", "/tmp/sweeps/s",
               "-q")
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = sorted((nscluster.root("head") / "tmp/sweeps/s/trials").iterdir())
    assert len(trials) == 2 and all(rundir.read_status(t)["state"] == "finished" for t in trials)
    nodes = set().union(*(set(trained_on(nscluster, t)["node"]) for t in trials))
    assert len(nodes) >= 2, nodes  # every node has one CPU: two trials at once use two nodes


def test_a_node_without_the_token_cannot_join_or_submit_work(nscluster):
    bridge = Path(f"/sys/class/net/{nscluster.prefix}-br")
    mac = (bridge / "address").read_text()
    nscluster.add("intr")  # a machine on the same network, without the cluster's token
    # The bridge's MAC is set, not inherited from its lowest port: a node joining cannot move the
    # S3 server's MAC under the other nodes' ARP entries (their store reads would then time out).
    assert (bridge / "address").read_text() == mac and (bridge / "addr_assign_type").read_text().strip() == "3"
    fast = {"RAY_gcs_server_port_wait_time_s": "3", "HOME": "/tmp"}  # give up after 3 s, not Ray's 20
    start = [nscluster.python, "-m", "ray.scripts.scripts", "start", "--address", nscluster.head_address,
             f"--node-ip-address={nscluster.ip('intr')}", "--num-cpus=1"]
    for auth in ({"RAY_AUTH_MODE": "disabled", "RAY_AUTH_TOKEN": None}, {"RAY_AUTH_TOKEN": "0" * 64}):
        joined = nscluster.run("intr", *start, env={**fast, **auth}, timeout=300)
        assert joined.returncode != 0 and "AuthenticationError" in joined.stdout + joined.stderr, auth
        probe = nscluster.run("intr", nscluster.python, "-c", GCS_PROBE, nscluster.head_address, env={**fast, **auth})
        assert probe.stdout.startswith("ERR AuthenticationError"), (auth, probe.stdout, probe.stderr[-2000:])
    right = nscluster.run("intr", nscluster.python, "-c", GCS_PROBE, nscluster.head_address, env=fast)
    assert right.stdout.startswith("OK"), right.stderr[-2000:]  # the network is open: only the token differs
    assert not {n for _, _, n in netns.listeners(nscluster, "intr")}  # nothing of Ray kept running there
    assert sorted(nscluster.node_names(alive=True).values()) == ["head", "w1", "w2"]
    # On a node of the cluster, a driver with a wrong token cannot run a task either.
    task = ("import ray; ray.init(address=%r, log_to_driver=False); print(ray.get(ray.remote(lambda: 'RAN').remote()))"
            % nscluster.head_address)
    wrong = nscluster.run("head", nscluster.python, "-c", task, env={**fast, "RAY_AUTH_TOKEN": "0" * 64})
    assert wrong.returncode != 0 and "RAN" not in wrong.stdout


def test_bad_input_is_one_line_and_exit_2_with_nothing_written(nscluster, ns_store, engine_store):
    head = nscluster.root("head")
    exp = put(nscluster, "head", "/tmp/bad.toml", toml(ns_store, "fedavg", rounds=1, clients_per_round=4,
                                                       local_steps=1))
    line = one_line_exit_2(cli(nscluster, "launch", exp, "--address", nscluster.head_address, "--out",
                               "/tmp/runs/bad1", env={"RAY_AUTH_TOKEN": "0" * 64}))
    assert "token" in line and nscluster.head_address in line
    # A store under the head's /tmp: the workers' nodes have no such directory.
    shutil.copytree(engine_store, head / "tmp/store")
    exp = put(nscluster, "head", "/tmp/bad.toml", toml("/tmp/store", "fedavg", rounds=1, clients_per_round=4,
                                                       local_steps=1))
    line = one_line_exit_2(cli(nscluster, "launch", exp, "--address", nscluster.head_address, "--out",
                               "/tmp/runs/bad2"))
    assert "data.path /tmp/store" in line and re.search(r"node (w1|w2)", line) and "s3://" in line, line
    # Client state under the head's /tmp: refused as well, and the check's marker is gone again.
    exp = put(nscluster, "head", "/tmp/bad.toml", toml(ns_store, "local", "/tmp/state", rounds=1,
                                                       clients_per_round=4, local_steps=1))
    line = one_line_exit_2(cli(nscluster, "launch", exp, "--address", nscluster.head_address, "--out",
                               "/tmp/runs/bad3"))
    assert "engine.storage" in line and re.search(r"node (w1|w2)", line), line
    assert not any((head / "tmp/runs").glob("bad*")) and not any((head / "tmp/state").iterdir())


def test_a_node_killed_mid_round_changes_no_number(nscluster, ns_store, ditto_undisturbed):
    exp = put(nscluster, "head", "/tmp/ditto-b.toml", toml(ns_store, "ditto", nscluster.s3_uri("state-b"), **DITTO))
    run_dir = nscluster.root("head") / "tmp/runs/ditto-b"
    fs, inner = pafs.FileSystem.from_uri(nscluster.s3_uri("state-b"))
    driver = subprocess.Popen(nscluster.command("head", *launch_argv(nscluster, exp, "/tmp/runs/ditto-b")),
                              env=nscluster.env(), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        deadline = time.time() + 600
        while not any(re.search(r"/r0*1p\d+\.pt$", i.path) for i in  # a chunk of round 2 is done (its state)
                      fs.get_file_info(pafs.FileSelector(inner, recursive=True, allow_not_found=True))):
            assert driver.poll() is None and time.time() < deadline, driver.communicate()[1][-3000:]
            time.sleep(0.05)
        nscluster.kill("w2")  # every process of the node: its raylet, object store and workers
        at_kill = rundir.read_status(run_dir)["completed_rounds"]
    finally:
        _, err = driver.communicate(timeout=900)
    assert driver.returncode == 0, err[-3000:]
    assert nscluster.pids("w2") == []
    assert at_kill < DITTO["rounds"]  # the kill came while training went on
    status = rundir.read_status(run_dir)
    assert status["state"] == "finished" and status["retries"] >= 1 and status["server_restarts"] == 0
    assert f"retried chunks: {status['retries']}" in err
    assert numbers(run_dir).equals(numbers(ditto_undisturbed))
    assert same(checkpoint.load(run_dir)["server"], checkpoint.load(ditto_undisturbed)["server"])
    # The rounds after ran on the nodes left, with one worker fewer: the pool had filled the cluster.
    later = trained_on(nscluster, run_dir).filter(pl.col("round") > at_kill + 1)
    assert later.height > 0 and set(later["node"]) == {"head", "w1"} and later["worker"].n_unique() == 2
