"""One FEMNIST-scale FedAvg round on a real Ray cluster built on this machine: 1 node against 3 nodes.

Each layout is a namespace cluster (tests/cluster/netns.py, driving examples/cluster/nscluster.sh;
needs root): nodes with their own addresses on a bridge, their own /tmp, Ray with token
authentication. The same pool runs in both: `--workers` workers of 1 CPU, all on the head (which
gets that many CPUs) or one per node (each node gets 1 CPU), so the layouts differ only in where
the workers sit. The store (`--clients` synthetic writers, every one a training client, made with
`simfed partition synthetic-femnist --unseen-fraction 0` if absent) is a directory of the host's
disk outside /tmp, which every node sees at the same path, as a shared filesystem mount would be.

The run: `simfed.launch` in the head's namespace against the head's address, rounds = 1, every
client in the cohort, FedAvg local_epochs = 1 (each sample once), then the engine's final
evaluation over --eval-clients clients (not timed). Per layout:
- round_s: the engine's own "round" event (the pool is up and warm before it starts);
  samples_per_s = training samples of the round / round_s;
- bytes_between_nodes: what the nodes sent into the bridge during the round (host-side veth
  rx_bytes, sampled every 0.2 s; the S3 server on the bridge is idle here), i.e. the broadcast
  fetched by the other nodes, chunk results sent to the server, metric rows and Ray's control
  traffic. The store is read from the shared disk, not over the bridge.
- overhead = 3-node round_s / 1-node round_s. All nodes share this machine's cores, so three
  nodes cannot be faster than one: the figure measures what spreading costs (transfers, object
  store hops, scheduling), never a speed-up.

Usage: python bench/cluster.py [--json] [--clients 3597] [--store DIR] [--workers 3] [--eval-clients 20]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def drive(exp_path: str, out: str, address: str, report: str) -> None:
    """Inside the head node: run the experiment and write the round's timings to `report`."""
    import simfed

    got = {"samples": 0}

    def on_event(e: dict) -> None:
        if e["type"] == "start":
            got["workers"] = e["workers"]
        elif e["type"] == "chunk" and e["round"] == 1:
            got["samples"] += e["samples"]
        elif e["type"] == "round":
            got.update(round_end=time.time(), round_s=e["seconds"])

    simfed.launch(exp_path, out=out, address=address, on_event=on_event)
    Path(report).write_text(json.dumps(got))


class VethSampler:
    """Host-side rx_bytes of every node's veth (what the node sent into the bridge), every 0.2 s."""

    def __init__(self, cluster):
        self.links = [f"{cluster.prefix}-{n}" for n in cluster.nodes]
        self.samples: list[tuple[float, int]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.loop, daemon=True)

    def read(self) -> int:
        return sum(int(Path(f"/sys/class/net/{link}/statistics/rx_bytes").read_text()) for link in self.links)

    def loop(self) -> None:
        while not self.stop.is_set():
            self.samples.append((time.time(), self.read()))
            time.sleep(0.2)

    def between(self, t0: float, t1: float) -> int:
        """Bytes sent from the last sample at or before t0 to the first at or after t1."""
        before = [b for t, b in self.samples if t <= t0] or [self.samples[0][1]]
        after = [b for t, b in self.samples if t >= t1] or [self.samples[-1][1]]
        return after[0] - before[-1]


def experiment(store: str, clients: int, workers: int, eval_clients: int) -> str:
    return (f'[data]\npath = "{store}"\n[run]\nrounds = 1\nclients_per_round = {clients}\neval_every = 0\n'
            f'eval_clients = {eval_clients}\n[algorithm]\nname = "fedavg"\nlocal_epochs = 1.0\n'
            f'[engine]\nbackend = "ray"\nworkers = {workers}\n')


def measure(nodes: tuple[str, ...], cpus: int, store: str, clients: int, workers: int, eval_clients: int) -> dict:
    from tests.cluster.netns import NsCluster

    cluster = NsCluster(nodes=nodes, cpus=cpus)
    try:
        t0 = time.perf_counter()
        cluster.up()
        up_s = time.perf_counter() - t0
        (cluster.root("head") / "tmp/exp.toml").write_text(experiment(store, clients, workers, eval_clients))
        sampler = VethSampler(cluster)
        sampler.thread.start()
        proc = cluster.run("head", cluster.python, str(Path(__file__).resolve()), "--drive", "/tmp/exp.toml",
                           "/tmp/run", cluster.head_address, "/tmp/report.json", timeout=24 * 3600)
        sampler.stop.set()
        if proc.returncode != 0:
            raise SystemExit(f"the run on {len(nodes)} node(s) failed: {proc.stderr[-3000:]}")
        got = json.loads((cluster.root("head") / "tmp/report.json").read_text())
    finally:
        cluster.down()
    sent = sampler.between(got["round_end"] - got["round_s"], got["round_end"])
    return {"nodes": len(nodes), "cpus_per_node": cpus, "workers": len(got["workers"]),
            "worker_nodes": len({w["node_id"] for w in got["workers"]}), "cluster_up_s": round(up_s, 1),
            "round_s": round(got["round_s"], 2), "samples": got["samples"],
            "samples_per_s": round(got["samples"] / got["round_s"], 1), "bytes_between_nodes": sent}


def ensure_store(path: Path, clients: int) -> str:
    if not (path / "manifest.json").exists():
        subprocess.run([sys.executable, "-m", "simfed.cli.main", "partition", "synthetic-femnist", str(path),
                        "--clients", str(clients), "--unseen-fraction", "0"], check=True)
    return str(path.resolve())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=3597)
    ap.add_argument("--store", default="", help="default data/synthetic-femnist-<clients>-all (outside /tmp)")
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--eval-clients", type=int, default=20)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--drive", nargs=4, metavar=("EXP", "OUT", "ADDRESS", "REPORT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.drive:
        return drive(*a.drive)
    from tests.cluster.netns import why_not

    if why_not():
        raise SystemExit(f"bench/cluster.py: {why_not()}")
    store = ensure_store(Path(a.store or ROOT / "data" / f"synthetic-femnist-{a.clients}-all"), a.clients)
    one = measure(("head",), a.workers, store, a.clients, a.workers, a.eval_clients)
    three = measure(("head", "w1", "w2"), max(1, a.workers // 3), store, a.clients, a.workers, a.eval_clients)
    out = {"store": store, "clients": a.clients, "one_node": one, "three_nodes": three,
           "overhead": round(three["round_s"] / one["round_s"], 3),
           "bytes_between_nodes_per_round": three["bytes_between_nodes"],
           "note": "every node shares this machine's cores: 3 nodes cannot be faster than 1; overhead is what "
                   "spreading the pool over nodes costs"}
    print(json.dumps(out, indent=2 if not a.json else None))


if __name__ == "__main__":
    main()
