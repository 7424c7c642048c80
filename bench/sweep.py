"""The same 8-trial sweep run one trial at a time (`--max-concurrent 1`) and as many at a time as fit.

    python bench/sweep.py --json [--store DIR] [--rounds 3] [--cpus 2]

FedAvg x 2 learning rates x 4 seeds on a small synthetic FEMNIST store (generated when absent),
1 worker (1 CPU) per trial, on one embedded Ray with `--cpus` CPUs. Both sweeps run in the same
Ray session after a 1-trial warm-up sweep (Tune and the first trial processes started), each
timed from `run_sweep` start to end. Prints wall times, their ratio and the most trials that
ran at once (from each trial's own start/end record). On a 2-core machine shared with other
work, expect little gain: a trial's fixed costs (its process, its worker actor) dominate.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

SWEEP = """
[data]
path = "{store}"
[run]
rounds = {rounds}
clients_per_round = 8
eval_every = {rounds}
checkpoint_every = {rounds}
[algorithm]
name = "fedavg"
local_steps = 10
batch_size = 32
[engine]
backend = "ray"
workers = 1
[sweep.grid]
"algorithm.lr" = {lrs}
"run.seed" = {seeds}
"""


def _most_at_once(sweep_dir: Path) -> int:
    spans = []
    for rec in (sweep_dir / "trials").glob("*/trial.json"):
        for a in json.loads(rec.read_text())["attempts"]:
            spans.append((a["start"], a["end"]))
    return max(sum(1 for s, e in spans if s <= t < e) for t, _ in spans)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", default="")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import tomllib

    from simfed.sweeps.config import parse_sweep
    from simfed.engine import cluster
    from simfed.sweeps.sweep import TrialSpec, run_sweep

    work = Path(tempfile.mkdtemp(prefix="simfed-bench-sweep-"))
    store = args.store or str(work / "store")
    if not Path(store, "manifest.json").exists():
        from simfed.partitions.synthetic import make_synthetic_femnist

        make_synthetic_femnist(store, clients=40, seed=0)
    cluster.connect("", num_cpus=args.cpus)

    def sweep(name: str, lrs, seeds, max_concurrent):
        doc = tomllib.loads(SWEEP.format(store=store, rounds=args.rounds, lrs=lrs, seeds=seeds))
        spec = parse_sweep(doc, name)
        out = work / name
        for t in spec.trials:
            (out / "trials" / t.id).mkdir(parents=True)
        t0 = time.perf_counter()
        states = run_sweep(out, [TrialSpec(t.id, t.experiment) for t in spec.trials], spec.scheduler,
                           max_concurrent=max_concurrent)
        wall = time.perf_counter() - t0
        assert set(states.values()) == {"finished"}, states
        return wall, _most_at_once(out), len(spec.trials)

    sweep("warmup", [0.05], [0], None)
    one, at_once_one, n = sweep("one-at-a-time", [0.02, 0.05], [0, 1, 2, 3], 1)
    fit, at_once_fit, _ = sweep("as-many-as-fit", [0.02, 0.05], [0, 1, 2, 3], None)
    out = {"trials": n, "cpus": args.cpus, "rounds": args.rounds, "wall_max_concurrent_1_s": round(one, 2),
           "wall_as_many_as_fit_s": round(fit, 2), "ratio": round(one / fit, 3),
           "most_at_once_max_concurrent_1": at_once_one, "most_at_once_as_many_as_fit": at_once_fit}
    print(json.dumps(out) if args.json else json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
