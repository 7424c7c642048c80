"""Run by test_cluster.py in its own process: a 2-node Ray cluster and a fake-GPU packing check."""

import json
import sys

import polars as pl
import ray
from ray.cluster_utils import Cluster

from simfed.engine import metrics
from simfed.engine.loop import run_experiment
from tests.engine.conftest import make_exp

store, out = sys.argv[1], sys.argv[2]
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 1, "include_dashboard": False})
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
print(json.dumps({"nodes": sorted(set(train["node_id"].to_list())),
                  "cluster_nodes": len([n for n in ray.nodes() if n["Alive"]]),
                  "gpu_workers": events[0]["workers"], "gpu_pool": result["workers"]}))
ray.shutdown()
cluster.shutdown()
