"""Does each example learn on its data? A short run of every examples/*.toml next to FedAvg.

Each experiment file of examples/ (sweep files excluded) runs through the Python API (`launch`)
with its own store, method settings, cohort and seed, shortened to `--rounds` rounds (a file with
fewer rounds, e.g. the one-shot FedACnnL, keeps its own), one evaluation after the last round of
`--eval-clients` clients per cohort, the serial backend and no checkpoints. FedAvg (its code
defaults) runs on the same store with the same rounds, cohort, seed and evaluation.

An example *learns* when its seen clients' mean test loss is under ln C (the loss of a model that
has not moved) and their mean test accuracy is at least 10 points above chance (1 / C) and has
covered at least half of the distance FedAvg covers from chance in the same rounds:
    loss < ln C   and   acc - 1/C >= max(0.1, 0.5 (acc_fedavg - 1/C)).
(FedACnnL's logits are least-squares outputs, so its cross-entropy stays near ln C at any
accuracy: only "under" is asked of the loss.) An example that does not learn gets a small `simfed sweep`
(examples/sweeps/) whose winner, chosen by `simfed compare` on validation accuracy, goes into the
example file (docs/claims.md).

    python bench/example_learning.py --json                        # every example, 10 rounds
    python bench/example_learning.py --only pfedme_fmnist ditto_fmnist --rounds 10

Prints one JSON object: per example the figures and the verdict, per store FedAvg's figures.
Stores are built as each example's header says (bench/example_parity.py's commands).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from example_parity import ensure_store  # noqa: E402

from simfed import launch, load_run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def examples(only: list[str]) -> list[Path]:
    files = sorted((ROOT / "examples").glob("*.toml"))
    files = [f for f in files if "sweep" not in tomllib.loads(f.read_text())]
    return [f for f in files if not only or f.stem in only]


def shorten(doc: dict, rounds: int, eval_clients: int) -> dict:
    """The example's own experiment, cut to `rounds` rounds with one evaluation at the end."""
    run = {**doc["run"], "rounds": min(rounds, int(doc["run"]["rounds"])), "eval_every": 0,
           "checkpoint_every": 0, "eval_clients": eval_clients}
    return {**doc, "run": run, "engine": {**doc.get("engine", {}), "backend": "serial"}}


def seen_test(run_dir: Path) -> dict:
    """Seen clients' test accuracy (client mean) and mean loss at the last evaluated round."""
    df = load_run(run_dir).metrics()
    ev = df.filter((pl.col("split") == "test") & (pl.col("cohort") == "seen") & pl.col("accuracy").is_not_null())
    last = ev.filter(pl.col("round") == ev["round"].max())
    return {"acc": round(float(last["accuracy"].mean()), 4), "loss": round(float(last["loss"].mean()), 4)}


def run_one(doc: dict, out: Path, name: str) -> dict:
    t0 = time.perf_counter()
    run_dir = launch(doc, out=out / name)
    return {**seen_test(run_dir), "seconds": round(time.perf_counter() - t0, 1)}


def num_classes(store: str) -> int:
    manifest = json.loads((ROOT / store / "manifest.json").read_text())
    return int(manifest["num_classes"])


def fedavg_doc(doc: dict) -> dict:
    return {**doc, "algorithm": {"name": "fedavg"}}


def verdict(row: dict, base: dict, classes: int) -> bool:
    chance = 1.0 / classes
    return row["loss"] < math.log(classes) and row["acc"] - chance >= max(0.1, 0.5 * (base["acc"] - chance))


def check(path: Path, a, out: Path, baselines: dict) -> dict:
    doc = shorten(tomllib.loads(path.read_text()), a.rounds, a.eval_clients)
    store = doc["data"]["path"]
    reason = ensure_store(store)
    if reason:
        return {"skipped": reason}
    row = run_one(doc, out, path.stem)  # a generated store exists only after this
    key = json.dumps([store, doc["run"]["rounds"], doc["run"]["clients_per_round"], doc["run"].get("seed", 0)])
    if key not in baselines:
        baselines[key] = run_one(fedavg_doc(doc), out, f"fedavg-{len(baselines)}")
    base, classes = baselines[key], num_classes(store)
    return {**row, "rounds": doc["run"]["rounds"], "store": store, "ln_classes": round(math.log(classes), 4),
            "chance": round(1 / classes, 4), "fedavg": base, "learns": verdict(row, base, classes)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--eval-clients", type=int, default=20, help="clients per cohort in the one evaluation")
    p.add_argument("--only", nargs="*", default=[], help="example stems (default: every example)")
    p.add_argument("--out", default=None, help="where the run directories go (default: a temp dir)")
    p.add_argument("--json", action="store_true", help="only the JSON report on stdout")
    a = p.parse_args()
    out = Path(a.out or tempfile.mkdtemp(prefix="example-learning-"))
    report, baselines = {"settings": {"rounds": a.rounds, "eval_clients": a.eval_clients}, "examples": {}}, {}
    for path in examples(a.only):
        report["examples"][path.stem] = row = check(path, a, out, baselines)
        print(json.dumps({path.stem: row}), file=sys.stderr, flush=True)
    print(json.dumps(report, indent=None if a.json else 1))


if __name__ == "__main__":
    main()
