"""Before a run on a multi-node cluster: what every node must reach, checked on every node.

On one machine every process sees the same disk. On a cluster a path names a different place on
each node: a store under /tmp on the driver's machine is missing on the others (the pool would
start and fail inside the workers' setup), or, worse, another node may hold a different store at
the same path. Client state kept under a path only the driver's node sees would silently start
fresh whenever a client is sampled on another node. So, before anything of the run is written:

- one task per live node opens the store and returns a digest of its manifest (which lists every
  file's sha256), and it must equal the driver's;
- for a method that keeps client state, engine.storage must be set, and every node must read a
  marker the driver writes there (engine.storage's marker, removed again afterwards).

A node that cannot is named in the one-line refusal, with what to use instead. Ours, not from a
paper.
"""

from __future__ import annotations

import hashlib
import json

from simfed.algorithms import registry
from simfed.core.errors import SimfedError
from simfed.engine import storage as st
from simfed.engine.config import Experiment

ANSWER_TIMEOUT_S = 120


def store_digest(path: str) -> str:
    """sha256 of the store's manifest; "" with the reason when it cannot be opened here."""
    from simfed.partitions.store import PartitionStore

    try:
        manifest = PartitionStore.open(path).manifest
    except (SimfedError, OSError) as exc:
        return f"!{exc}"
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


def _look(store_path: str, storage_root: str, token: str) -> tuple[str, bool]:
    """Run on one node: its digest of the store, and whether it sees engine.storage's marker."""
    return store_digest(store_path), (st.sees_marker(storage_root, token) if token else True)


def _live_nodes() -> list[dict]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def _ask_every_node(nodes: list[dict], store_path: str, storage_root: str, token: str) -> list[tuple[str, bool]]:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    look = ray.remote(_look)
    refs = [look.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
            .remote(store_path, storage_root, token) for n in nodes]
    ready, pending = ray.wait(refs, num_returns=len(refs), timeout=ANSWER_TIMEOUT_S)
    if pending:
        late = [_name(n) for n, r in zip(nodes, refs) if r in pending]
        raise SimfedError(f"node(s) {', '.join(late)} did not answer within {ANSWER_TIMEOUT_S} s whether they can "
                          "read the store; check that they are healthy (`ray status`) and try again")
    return ray.get(refs)


def _name(node: dict) -> str:
    return f"{node.get('NodeName') or node.get('NodeManagerAddress')} ({node['NodeID'][:8]})"


def check_nodes(exp: Experiment, store_path: str) -> None:
    """Raise SimfedError unless every live node of the connected cluster reads the store the
    driver reads and, for a method with client state, reaches engine.storage. One node: nothing
    to check."""
    nodes = _live_nodes()
    if len(nodes) < 2:
        return
    keeps = registry.get(exp.algorithm).keeps_client_state(exp.algorithm_config)
    storage = exp.engine.storage if keeps else ""
    if keeps and not storage:
        raise SimfedError(st.unshared_message("", ""))
    want = store_digest(store_path)
    token = st.write_marker(storage) if storage else ""
    try:
        answers = _ask_every_node(nodes, store_path, storage, token)
    finally:
        if token:
            st.drop_marker(storage)
    for node, (digest, sees) in zip(nodes, answers):
        if digest != want:
            why = digest[1:] if digest.startswith("!") else "it holds a different store at that path"
            raise SimfedError(f"data.path {st.redact(store_path)} is not the same store on every node of this "
                              f"multi-node cluster: node {_name(node)} cannot use it ({' '.join(why.split())}); put "
                              "the store where every node reads it: a URI (s3://bucket/prefix, gs://...) or a "
                              "filesystem mounted at the same path on every node (/mnt/nfs/...)")
        if not sees:
            raise SimfedError(st.unshared_message(storage, storage, f"node {_name(node)}"))
