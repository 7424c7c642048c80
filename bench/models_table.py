"""Method x model table: every registered method with every built-in model and a user model.

Each cell is 2 rounds through the real engine (serial backend, `simfed.launch`) on a small store
that fits the model, every seen client in both rounds and in the evaluation, with the method's
settings from LEARN below, overridden per model by MODEL_LEARN: "runs" with the seen clients' mean
test accuracy after the last round and whether it beats the store's majority class (chance), or the
one-line refusal the run gave before any work. A hypernetwork method refused for its
generated-parameter budget is tried again with generate = "head" where it has that option (pefll,
pfedhn); a cell whose MODEL_LEARN sets generate says so too.
`--settings small` uses the parity tests' tiny configs instead (tests/engine/test_method_parity.py's
SMALL: a check that the pair runs, too little work to learn).

Stores (built under --data on first use, from partitions/samples.py's generators): CIFAR-10 layout
(32x32x3, 12 clients of 2 classes, about 50 training images each) for lenet, resnet18 and the
user model; LEAF Shakespeare (8 roles) for charlstm; float feature vectors (16 features, 4
classes) for mlp. The user model is tests/engine/user_models.py's small_cnn, loaded by module path.

Usage: python bench/models_table.py [--resnet-width 64] [--rounds 2] [--methods a,b] [--models a,b]
       [--settings learn|small] [--data data/models-table-v2] [--markdown]
Prints JSON (cells and the markdown table); --markdown prints only the table for docs/methods.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.engine.user_models and the parity configs
USER = "tests.engine.user_models:small_cnn"
MODELS = ("lenet", "resnet18", "mlp", "charlstm", USER)
# Settings under which 2 rounds are enough to move each method (ours, for this table): the method's
# defaults where they already are; SGD's step cut to 0.01 where 0.05 with momentum 0.9 overshoots
# on these images; more local steps and larger server steps for the methods whose 2 rounds are
# otherwise 2 small server steps per client; the unseen client's fine-tuning cut (only seen
# clients count here).
LEARN = {
    "fedavg": {"lr": 0.01, "local_steps": 50}, "knnper": {}, "fedacnnl": {}, "pfedacnnl": {},
    "local": {"unseen_steps": 20},
    "ditto": {"unseen_epochs": 2.0},
    "fedrep": {"unseen_head_epochs": 2.0},
    "pfedme": {"lr": 0.05, "personal_lr": 0.05, "unseen_epochs": 2.0},
    "perfedavg": {},
    "metafl": {"nu": 2},
    "pefll": {"server_lr": 0.003, "local_steps": 50, "lr": 0.01},
    "pfedhn": {"server_lr": 0.3, "local_steps": 50, "lr": 0.01, "unseen_exchanges": 2},
    "fmlh": {"hn_lr": 0.01, "outer_lr": 0.1, "unseen_exchanges": 2},
}
# Per model, settings that override LEARN: "*" for every method that has the key, then per method.
# ResNet-18 trains at about 45 samples/s on this machine's CPU: its cells cap the local work so that
# its column takes minutes, not hours; metafl's exact meta-gradient through it did not finish a cell
# in 10 minutes, so its cell takes the first-order gradient. The character LSTM sits on the unigram
# plateau (always the most frequent character) for its first ~100 steps of SGD at the image models'
# step sizes; at lr 0.5 with momentum 0.9 (batch 16), or lr 4 without momentum, it leaves it within
# ~100-200 steps (0.65 after 200 steps trained centrally on the table's store; lr 1 without momentum:
# 0.25), so its cells take such steps and enough local steps to get there in 2 rounds. Per-FedAvg
# and meta-FL take the first-order meta-gradient there (their exact/Hessian-free cells took 9+
# minutes each).
MODEL_LEARN = {
    "resnet18": {"*": {"local_steps": 5, "batch_size": 16, "tau": 1},
                 "fedavg": {"lr": 0.05, "local_steps": 20},
                 "pefll": {"lr": 0.05, "local_steps": 20},
                 "metafl": {"gradient": "first_order"}},
    "charlstm": {"*": {"batch_size": 16, "lr": 0.5, "momentum": 0.9, "local_steps": 100},
                 "ditto": {"personal_lr": 0.5, "personal_steps": 100},
                 "fedrep": {"head_epochs": 5.0, "body_epochs": 20.0},
                 "pfedme": {"lam": 1.0, "K": 1, "lr": 1.0, "personal_lr": 0.9, "local_steps": 150},
                 "metafl": {"gradient": "first_order", "alpha": 0.5, "beta": 1.0, "tau": 60, "server_lr": 2.0},
                 "perfedavg": {"gradient": "first_order", "alpha": 0.5, "beta": 3.0, "tau": 60},
                 "pefll": {"generate": "head", "server_lr": 0.01},
                 "pfedhn": {"generate": "head", "server_lr": 0.03},
                 "fmlh": {"meta_steps": 50, "inner_steps": 1, "inner_lr": 0.5, "outer_lr": 3.0,
                          "finetune_steps": 20, "finetune_lr": 2.0, "hn_lr": 0.01}},
}
STORE_OF = {"lenet": "cifar", "resnet18": "cifar", "mlp": "features", "charlstm": "shakespeare", USER: "cifar"}


def build_stores(root: Path) -> dict[str, str]:
    from simfed.partitions.arrays import import_arrays
    from simfed.partitions.cifar import import_cifar
    from simfed.partitions.samples import (arrays_sample, cifar10_contents, shakespeare_json, write_cifar, write_npz,
                                           write_shakespeare)
    from simfed.partitions.shakespeare import import_shakespeare

    root.mkdir(parents=True, exist_ok=True)
    out = {k: str(root / k) for k in ("cifar", "shakespeare", "features")}
    if not (root / "cifar" / "manifest.json").exists():
        src = write_cifar(root / "cifar-10-sample.tar.gz", cifar10_contents(per_batch=120, test=120))
        import_cifar(src, out["cifar"], scheme="classes", classes_per_client=2, clients=12, seed=0)
    if not (root / "shakespeare" / "manifest.json").exists():
        import_shakespeare(write_shakespeare(root / "leaf-shakespeare", shakespeare_json(roles=8)), out["shakespeare"])
    if not (root / "features" / "manifest.json").exists():
        import_arrays(write_npz(root / "features.npz", arrays_sample("features")), out["features"])
    return out


def majority(store: str) -> float:
    """Share of the most frequent label in the store's test rows: the accuracy of always guessing it."""
    import numpy as np

    from simfed.partitions.store import PartitionStore

    st = PartitionStore.open(store)
    ys = np.concatenate([np.asarray(st.read(int(c), "test")[1]) for c in st.client_ids("seen")])
    return float(np.bincount(ys).max() / len(ys))


def settings(method: str, which: str, model: str = "") -> dict:
    from simfed.algorithms import registry
    from tests.engine.test_method_parity import SMALL

    if which == "small":
        return dict(SMALL[method])
    fields = registry.get(method).Config.__dataclass_fields__
    per = MODEL_LEARN.get(model, {})
    common = {k: v for k, v in per.get("*", {}).items() if k in fields}
    return {**LEARN.get(method, {}), **common, **per.get(method, {})}


def run_cell(method: str, model: dict, store: str, rounds: int, extra: dict, which: str = "learn") -> dict:
    """One method on one model: {"status": "runs", accuracy, seconds} or {"status": "refused", refusal}."""
    import polars as pl

    from simfed import SimfedError, launch, load_run
    from simfed.partitions.store import PartitionStore

    seen = len(PartitionStore.open(store).client_ids("seen"))
    cohort = {"clients_per_round": seen, "eval_clients": 0} if which == "learn" else {
        "clients_per_round": 4, "eval_clients": 4}
    doc = {"data": {"path": store}, "model": model, "algorithm": {"name": method, **settings(method, which, model["name"]), **extra},
           "run": {"rounds": rounds, "eval_every": 0, "checkpoint_every": 0, **cohort},
           "engine": {"backend": "serial"}}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            launch(doc, out=os.path.join(tmp, "run"))
        except SimfedError as exc:
            return {"status": "refused", "refusal": str(exc)}
        df = load_run(os.path.join(tmp, "run")).metrics()
    test = df.filter((pl.col("split") == "test") & (pl.col("cohort") == "seen"))
    return {"status": "runs", "accuracy": round(float(test["accuracy"].mean()), 4),
            "seconds": round(time.perf_counter() - t0, 1)}


def cell(method: str, name: str, store: str, rounds: int, resnet_width: int, which: str) -> dict:
    from simfed.algorithms import registry

    model = {"name": name, **({"width": resnet_width} if name == "resnet18" and resnet_width != 64 else {})}
    out = run_cell(method, model, store, rounds, {}, which)
    if out["status"] == "runs" and "generate" in settings(method, which, name):
        out["generate"] = settings(method, which, name)["generate"]
    over = out["status"] == "refused" and "max_generated" in out["refusal"]
    if over and "generate" in {f for f in registry.get(method).Config.__dataclass_fields__}:
        head = run_cell(method, model, store, rounds, {"generate": "head"}, which)
        out = {**head, "generate": "head", "default_refusal": out["refusal"]}
    return out


def markdown(cells: dict, models: list[str]) -> str:
    notes: dict[str, int] = {}

    def text(c: dict) -> str:
        if c["status"] == "runs":
            mark = "" if c["above_chance"] else " (not above chance)"
            how = f' with `generate = "{c["generate"]}"`' if c.get("generate") else ""
            return f"runs{how}, {c['accuracy']:.2f}{mark}"
        n = notes.setdefault(c["refusal"], len(notes) + 1)
        return f"refused ({n})"

    label = {USER: "user model"}
    lines = ["| method | " + " | ".join(label.get(m, f"`{m}`") for m in models) + " |",
             "| --- |" + " --- |" * len(models)]
    for method, row in cells.items():
        lines.append(f"| `{method}` | " + " | ".join(text(row[m]) for m in models) + " |")
    lines.append("")
    lines += [f"({n}) {msg}" for msg, n in notes.items()]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT / "data" / "models-table-v2"))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--resnet-width", type=int, default=64, help="64 = the real ResNet-18")
    ap.add_argument("--methods", default="", help="comma-separated (default: every registered method)")
    ap.add_argument("--models", default="", help=f"comma-separated among {', '.join(MODELS)}")
    ap.add_argument("--settings", choices=("learn", "small"), default="learn")
    ap.add_argument("--markdown", action="store_true")
    a = ap.parse_args()
    os.chdir(ROOT)  # the user model's module path is importable from the repository root
    from simfed.algorithms import registry

    stores = build_stores(Path(a.data))
    chance = {k: majority(v) for k, v in stores.items()}
    methods = a.methods.split(",") if a.methods else registry.names()
    models = a.models.split(",") if a.models else list(MODELS)
    cells: dict[str, dict] = {}
    for method in methods:
        cells[method] = {}
        for name in models:
            c = cell(method, name, stores[STORE_OF[name]], a.rounds, a.resnet_width, a.settings)
            if c["status"] == "runs":
                c["chance"] = round(chance[STORE_OF[name]], 4)
                c["above_chance"] = c["accuracy"] > c["chance"]
            cells[method][name] = c
            print(json.dumps({"method": method, "model": name, **c}), file=sys.stderr, flush=True)
    table = markdown(cells, models)
    if a.markdown:
        print(table)
        return
    print(json.dumps({"benchmark": "models_table", "rounds": a.rounds, "resnet_width": a.resnet_width,
                      "settings": {m: {n: settings(m, a.settings, n) for n in models} for m in methods},
                      "chance": chance, "cells": cells, "markdown": table}, indent=2))


if __name__ == "__main__":
    main()
