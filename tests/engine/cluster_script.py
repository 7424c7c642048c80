"""Run by test_cluster.py in its own process: a 2-node Ray cluster, a fake-GPU packing check, and a
stateful method (Local) with its store and client state on S3 (moto) against local disk."""

import dataclasses
import json
import sys

import polars as pl
import ray
from ray.cluster_utils import Cluster

from simfed.engine import metrics
from simfed.core.errors import SimfedError
from simfed.engine.loop import run_experiment
from tests.engine.conftest import make_exp, numbers

store, out, s3_store, s3_storage = sys.argv[1:5]


def start_cluster(tries: int = 3) -> Cluster:
    """Ray gives a node 30 s to register, hard-coded; on a loaded machine a start can miss it."""
    import psutil

    for attempt in range(tries):
        try:
            return Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 1,
                                                                 "include_dashboard": False})
        except Exception:
            if attempt == tries - 1:
                raise
            for child in psutil.Process().children(recursive=True):  # the half-started head
                child.kill()


cluster = start_cluster()
cluster.add_node(num_cpus=1)
ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
cluster.wait_for_nodes()

# Two 1-CPU workers on two 1-CPU nodes: one lands on each.
run_experiment(make_exp(store, rounds=1, clients_per_round=8, backend="ray", workers=2, local_steps=2), out + "/two")
train = metrics.load(out + "/two").filter(pl.col("split") == "train")

# gpus_per_worker 0.25 on one GPU: the pool holds four workers sharing GPU 0.
events = []
exp = make_exp(store, rounds=1, clients_per_round=8, backend="ray", local_steps=2)
exp = exp.__class__(**{**exp.__dict__, "engine": exp.engine.__class__(backend="ray", cpus_per_worker=0.25,
                                                                      gpus_per_worker=0.25)})
result = run_experiment(exp, out + "/gpu", on_event=lambda e: events.append(e) if e["type"] == "start" else None)
gpu_workers, gpu_pool = events[0]["workers"], result["workers"]

# Local keeps per-client state. On two nodes with the run directory as its home: refused at start.
local = make_exp(store, "local", rounds=2, clients_per_round=8, eval_every=0, backend="ray", workers=2,
                 local_steps=2, unseen_steps=2)
try:
    run_experiment(local, out + "/local-default")
    refused = ""
except SimfedError as exc:
    refused = str(exc)


def with_storage(exp, path, storage):
    return dataclasses.replace(exp, data=dataclasses.replace(exp.data, path=path),
                               engine=dataclasses.replace(exp.engine, storage=storage))


# A path every node mounts (here: the same disk) against the store and client state on S3.
run_experiment(with_storage(local, store, out + "/shared"), out + "/local-disk")
run_experiment(with_storage(local, s3_store, s3_storage), out + "/local-s3")
s3_train = metrics.load(out + "/local-s3").filter(pl.col("split") == "train")
print(json.dumps({"nodes": sorted(set(train["node_id"].to_list())),
                  "cluster_nodes": len([n for n in ray.nodes() if n["Alive"]]),
                  "gpu_workers": gpu_workers, "gpu_pool": gpu_pool, "refused": refused,
                  "s3_equals_disk": numbers(out + "/local-s3").equals(numbers(out + "/local-disk")),
                  "s3_rows": numbers(out + "/local-s3").height,
                  "s3_nodes": sorted(set(s3_train["node_id"].to_list())),
                  "s3_revisited": int(s3_train.group_by("client_id").len()["len"].max())}))
ray.shutdown()
cluster.shutdown()
