"""Wall time of the read-only `simfed` commands and of a launch's start-up (never part of the tests).

    python bench/cli_latency.py [--before PYTHON] [--repeats 5] [--workers 2] [--store STORE]
                                [--startup-repeats 1] [--json]

For each interpreter (`--before`: a venv's python with another checkout of simfed installed, e.g.
main's; the "after" one is this process's), in a fresh process each time:

- `simfed --help`, `simfed algorithms`, `simfed metrics RUN`, `simfed info STORE --no-verify`,
  `simfed compare SWEEP`: the median wall time of `--repeats` runs (target: under 1 s each on an
  idle machine);
- `simfed launch` to the start of round 1 with `--workers` Ray workers: the time from the process's
  creation to the run's "start" event, split into the checks before Ray (imports, config, store),
  Ray's start (`simfed.engine.cluster.connect`, timed from outside), the pool's start (the "run_dir"
  to the "start" event, less the warm-up) and the workers' warm-up (their `warmup_s`). The child
  measures this with the public API and a wrapper, so "before" needs no new event.
- with `--store STORE` (e.g. a 3,597-writer synthetic FEMNIST store), the same start-up measured
  on that store too, checksums verified as `simfed launch` does by default: where the store's
  size shows (its checksum pass overlaps Ray's start since this release).

The store, run and sweep directory are built here once (a 24-writer synthetic FEMNIST). Every
figure comes from one run of this script; the machine's load average is printed with them, and
with `--before` the ratios after/before (a launch: of its median time to round 1).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STARTUP = r"""
import json, os, sys, time, psutil
created = psutil.Process().create_time()
marks = {}
from simfed.engine import cluster
connect = cluster.connect
def timed(*a, **k):
    t = time.time(); r = connect(*a, **k); marks["ray_start"] = time.time() - t; return r
cluster.connect = timed
from simfed import launch
def on_event(e):
    if e["type"] == "run_dir":
        marks["run_dir"] = time.time()
    elif e["type"] == "start" and "start" not in marks:
        marks["start"] = time.time()
        marks["warmup"] = max(float(w.get("warmup_s") or 0) for w in e["workers"])
        raise SystemExit(0)
try:
    launch(sys.argv[1], out=sys.argv[2], overrides=[f"engine.workers={sys.argv[3]}", "engine.backend=ray"],
           on_event=on_event)
except SystemExit:
    pass
total = marks["start"] - created
pool = marks["start"] - marks["run_dir"]
print(json.dumps({"to_round_1": total, "ray_start": marks["ray_start"], "pool_start": pool - marks["warmup"],
                  "warmup": marks["warmup"], "checks": total - pool - marks["ray_start"]}))
"""

EXP = """
[data]
path = "{store}"
[run]
rounds = 2
clients_per_round = 4
eval_every = 1
[algorithm]
name = "fedavg"
local_steps = 2
[engine]
backend = "serial"
"""


def run(python: str, args: list[str], cwd: Path) -> float:
    t = time.perf_counter()
    proc = subprocess.run([python, "-m", "simfed.cli.main", *args], cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"{python} simfed {' '.join(args)} failed: {proc.stderr.strip()[-300:]}")
    return wall


def prepare(root: Path) -> dict[str, Path]:
    """A store, a finished run of it and a one-trial sweep directory made of that run."""
    store, exp, run_dir = root / "store", root / "exp.toml", root / "run"
    subprocess.run([sys.executable, "-m", "simfed.cli.main", "partition", "synthetic-femnist", str(store),
                    "--clients", "24"], check=True, capture_output=True)
    exp.write_text(EXP.format(store=store))
    subprocess.run([sys.executable, "-m", "simfed.cli.main", "launch", str(exp), "--out", str(run_dir), "-q"],
                   check=True, capture_output=True)
    sweep = root / "sweep"
    (sweep / "trials").mkdir(parents=True)
    subprocess.run(["cp", "-r", str(run_dir), str(sweep / "trials" / "t0")], check=True)
    doc = json.loads((run_dir / "config.json").read_text())
    (sweep / "sweep.json").write_text(json.dumps({"version": 1, "source": "x.toml", "scheduler": {"name": "fifo"},
                                                  "trials": [{"id": "t0", "overrides": {}, "doc": doc}]}))
    return {"store": store, "exp": exp, "run": run_dir, "sweep": sweep}


def commands(paths: dict[str, Path]) -> dict[str, list[str]]:
    return {"--help": ["--help"], "algorithms": ["algorithms"], "metrics RUN": ["metrics", str(paths["run"])],
            "info STORE": ["info", str(paths["store"]), "--no-verify"], "compare SWEEP": ["compare", str(paths["sweep"])]}


def measure(python: str, paths: dict[str, Path], repeats: int, workers: int, root: Path,
            startup_repeats: int = 1) -> dict:
    out = {}
    for name, args in commands(paths).items():
        out[name] = statistics.median(run(python, args, root) for _ in range(repeats))
    env = {**os.environ, "RAY_TMPDIR": os.environ.get("RAY_TMPDIR", str(root / "ray"))}
    out["launch to round 1"] = startup(python, paths["exp"], workers, root, env, startup_repeats)
    if "big_exp" in paths:
        out["launch to round 1 (--store)"] = startup(python, paths["big_exp"], workers, root, env, startup_repeats)
    return out


def startup(python: str, exp: Path, workers: int, root: Path, env: dict, repeats: int = 1) -> dict:
    """The start-up split of the run with the median time to round 1 among `repeats` fresh launches."""
    runs = []
    for _ in range(repeats):
        target = root / f"startup-{abs(hash(python))}-{time.time_ns()}"
        proc = subprocess.run([python, "-c", STARTUP, str(exp), str(target), str(workers)], cwd=root,
                              capture_output=True, text=True, env=env)
        if proc.returncode != 0 or not proc.stdout.strip():
            raise SystemExit(f"start-up run with {python} failed: {proc.stderr.strip()[-500:]}")
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    runs.sort(key=lambda r: r["to_round_1"])
    return {**runs[len(runs) // 2], "all_to_round_1": [round(r["to_round_1"], 2) for r in runs]}


def _seconds(figure: float | dict) -> float:
    """A command's median wall time, or a launch's median time to round 1."""
    return figure if isinstance(figure, float) else figure["to_round_1"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", help="python of a venv with the simfed to compare against (e.g. main's)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--store", help="also time the launch's start-up on this (large) store")
    ap.add_argument("--startup-repeats", type=int, default=1, help="launches per start-up figure (the median)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="cli-latency-") as tmp:
        root = Path(tmp)
        paths = prepare(root)
        if args.store:
            paths["big_exp"] = root / "big.toml"
            paths["big_exp"].write_text(EXP.format(store=Path(args.store).resolve()))
        result = {"load_average": list(os.getloadavg()), "repeats": args.repeats, "workers": args.workers,
                  "after": measure(sys.executable, paths, args.repeats, args.workers, root, args.startup_repeats)}
        if args.before:
            result["before"] = measure(args.before, paths, args.repeats, args.workers, root, args.startup_repeats)
            result["ratio_after_over_before"] = {
                k: _seconds(v) / _seconds(result["before"][k]) for k, v in result["after"].items()}
        result["load_average_end"] = list(os.getloadavg())
    print(json.dumps(result, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
