"""Every example experiment, shortened, gives the same numbers as a recorded reference (==).

Runs each file of examples/ (sweeps excluded) through the real CLI, `simfed launch`, with the
same shortening overrides (2 rounds, a small cohort, a few evaluated clients, serial backend), then
hashes what the run produced: the per-client metric rows (every number, in a fixed row order),
the server's per-round scalars and the final checkpoint's server state (every tensor's dtype,
shape and bytes). The hashes go to a JSON file; `--check REF.json` compares with an earlier one
and exits 1 on any difference. Only the CLI, polars and torch are used, so the same script
records a reference on one version of simfed and checks another.

    python bench/example_parity.py --out bench/example_parity.json          # record
    python bench/example_parity.py --check bench/example_parity.json        # compare

Stores are built under data/ as each example's header says (Fashion-MNIST needs
`apt-get install -y dataset-fashion-mnist`); examples whose data cannot be built are reported
as skipped, never as passed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import polars as pl
import torch

ROOT = Path(__file__).resolve().parents[1]
FMNIST = "/usr/share/datasets/fashion-mnist"
STORES = {  # store path used by the examples -> the `simfed partition` arguments that build it
    "data/fmnist-c2-100": ["idx", FMNIST, "--scheme", "classes", "--classes-per-client", "2", "--clients", "100",
                           "--seed", "0"],
    "data/fmnist-dir01-100": ["idx", FMNIST, "--scheme", "dirichlet", "--alpha", "0.1", "--clients", "100",
                              "--seed", "0"],
}
SHORT = ["run.rounds=2", "run.clients_per_round=4", "run.eval_clients=4", "run.eval_every=0",
         "run.checkpoint_every=0", "engine.backend=serial"]
KEYS = ["round", "cohort", "phase", "split", "client_id"]
NUMBERS = ["n", "loss", "accuracy", "dropped", "bytes_up", "bytes_down"]


def simfed(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from simfed.cli.main import main; main()", *args], cwd=ROOT,
                          capture_output=True, text=True)


def ensure_store(path: str) -> str | None:
    """Build a store the examples read if it is missing; a reason when it cannot be built."""
    if (ROOT / path / "manifest.json").exists() or path not in STORES:
        return None
    if not Path(FMNIST).exists():
        return f"{FMNIST} missing (apt-get install -y dataset-fashion-mnist)"
    out = simfed("partition", *STORES[path][:2], path, *STORES[path][2:])
    return None if out.returncode == 0 else out.stderr.strip()


def digest_frame(df: pl.DataFrame) -> str:
    h = hashlib.sha256()
    for name in df.columns:
        h.update(name.encode())
        h.update(df[name].to_numpy().tobytes() if df[name].dtype != pl.String else "\0".join(df[name]).encode())
    return h.hexdigest()


def digest_state(obj, h=None) -> str:
    h = h or hashlib.sha256()
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            h.update(str(k).encode())
            digest_state(obj[k], h)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            digest_state(v, h)
    else:
        h.update(repr(obj).encode())
    return h.hexdigest()


def run_example(path: Path, work: Path) -> dict:
    doc = tomllib.loads(path.read_text())
    reason = ensure_store(doc.get("data", {}).get("path", ""))
    if reason:
        return {"skipped": reason}
    run_dir = work / path.stem
    t0 = time.perf_counter()
    out = simfed("launch", str(path), "-q", "--out", str(run_dir), *(a for s in SHORT for a in ("--set", s)))
    if out.returncode != 0:
        return {"failed": out.stderr.strip()[-400:]}
    rows = pl.scan_parquet(str(run_dir / "metrics" / "*.parquet")).collect()
    rows = rows.select([c for c in KEYS + NUMBERS if c in rows.columns]).sort(KEYS)
    rounds_dir = run_dir / "metrics" / "rounds"
    stats = (pl.scan_parquet(str(rounds_dir / "*.parquet")).collect().select("round", "stat", "value")
             .sort("round", "stat") if rounds_dir.exists() else pl.DataFrame())
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    return {"metrics": digest_frame(rows), "rows": rows.height, "rounds": digest_frame(stats),
            "model": digest_state(ckpt["server"]), "seconds": round(time.perf_counter() - t0, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="write the hashes here")
    ap.add_argument("--check", help="compare with this earlier --out file; exit 1 on a difference")
    ap.add_argument("--only", default="", help="comma-separated example stems")
    args = ap.parse_args()
    examples = [p for p in sorted((ROOT / "examples").glob("*.toml")) if "sweep" not in tomllib.loads(p.read_text())]
    if args.only:
        examples = [p for p in examples if p.stem in args.only.split(",")]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for path in examples:
            results[path.stem] = run_example(path, Path(tmp))
            print(json.dumps({path.stem: results[path.stem]}), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    if not args.check:
        return 0
    ref = json.loads(Path(args.check).read_text())
    fields = ("metrics", "rows", "rounds", "model")
    diff = {k: (ref.get(k), v) for k, v in results.items()
            if "metrics" not in v or {f: ref.get(k, {}).get(f) for f in fields} != {f: v[f] for f in fields}}
    print(json.dumps({"compared": len(results), "equal": len(results) - len(diff), "different": sorted(diff)}))
    return 1 if diff else 0


if __name__ == "__main__":
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    raise SystemExit(main())
