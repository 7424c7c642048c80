"""The vectorized chunk trainer against the per-client loop, on a GPU (or, smaller, on CPU).

    python bench/gpu.py --json                    # CUDA: the full-size figures
    python bench/gpu.py --device cpu --json       # CPU: smaller defaults, the same code paths

Prints JSON with:
- `trainer`: samples/s of one local epoch (LeNet, batch 32, SGD momentum 0.9) for C synthetic-FEMNIST
  writers, per-client loop (`training.sgd_train`, one client after another) vs the vectorized
  trainer (`vectorized.sgd_train_chunk`, C clients per call), for each chunk size; both warm
  (one untimed pass first), both timed with a device synchronize at the end;
- `round_all_writers`: one FedAvg epoch-round over every writer of the store through the real
  engine (serial backend, the worker on the device, `engine.vectorize = "on"`), wall time of the
  round as the engine reports it (evaluation and start-up excluded);
- `flute`: FLUTE's FEMNIST workload (3,400 clients, 10 per round, 1,500 rounds, one local epoch)
  extrapolated from `--flute-rounds` timed engine rounds (10 clients each) x 1,500 / timed rounds.
The store is synthetic FEMNIST (3,597 writers by default, no unseen split, so a round covers all).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

import torch

from _common import add_bench_dir_to_path, ensure_store  # noqa: F401

add_bench_dir_to_path()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def trainer_rate(store, ids, chunk: int, device: torch.device, lr: float = 0.05) -> dict:
    from simfed.algorithms.kit import training
    from simfed.algorithms.kit.models import flat_params, init_model, lenet_for, load_flat
    from simfed.algorithms.kit.vectorized import sgd_train_chunk

    model = init_model(lenet_for((1, 28, 28), 62), 0).to(device)
    theta = flat_params(model)
    data = []
    for cid in ids[:chunk]:
        x, y = store.read(int(cid), "train")
        data.append((torch.from_numpy(x.astype("float32") / 255.0).to(device), torch.from_numpy(y.astype("int64")).to(device)))
    samples = sum(int(y.shape[0]) for _, y in data)
    gens = lambda: [torch.Generator().manual_seed(c) for c in range(len(data))]  # noqa: E731

    def loop():
        for (x, y), g in zip(data, gens()):
            load_flat(model, theta)
            training.sgd_train(model, x, y, steps=1, epochs=1.0, batch_size=32, lr=lr, momentum=0.9, gen=g)

    def vec():
        sgd_train_chunk(model, theta.expand(len(data), -1), [x for x, _ in data], [y for _, y in data], steps=1,
                        epochs=1.0, batch_size=32, lr=lr, momentum=0.9, gens=gens())

    out = {"chunk": len(data), "samples": samples}
    for name, fn in (("loop", loop), ("vectorized", vec)):
        fn()  # warm: first-use costs, cuDNN autotuning, allocator
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        dt = time.perf_counter() - t0
        out[f"{name}_s"] = round(dt, 4)
        out[f"{name}_samples_per_s"] = round(samples / dt, 1)
    out["speedup"] = round(out["loop_s"] / out["vectorized_s"], 3)
    return out


def engine_rounds(store_path: str, *, rounds: int, clients_per_round: int, device: torch.device,
                  vectorize: str, chunk: int) -> dict:
    from simfed.algorithms.fedavg import FedAvgConfig
    from simfed.engine.config import DataConfig, EngineConfig, Experiment, RunConfig
    from simfed.engine.loop import run_experiment

    exp = Experiment(
        algorithm="fedavg", algorithm_config=FedAvgConfig(local_epochs=1.0, lr=0.05),
        data=DataConfig(path=store_path),
        run=RunConfig(rounds=rounds, clients_per_round=clients_per_round, eval_every=0, checkpoint_every=0,
                      eval_clients=1, name="gpu-bench"),
        engine=EngineConfig(backend="serial", gpus_per_worker=1.0 if device.type == "cuda" else 0.0,
                            vectorize=vectorize, chunk_clients=chunk))
    seconds = []
    with tempfile.TemporaryDirectory(prefix="simfed-gpu-") as tmp:
        run_experiment(exp, f"{tmp}/run", on_event=lambda e: e["type"] == "round" and seconds.append(e["seconds"]))
    return {"rounds": rounds, "clients_per_round": clients_per_round, "vectorize": vectorize, "chunk": chunk,
            "round_s": [round(s, 3) for s in seconds], "total_s": round(sum(seconds), 3)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--store", default="data/synthetic-femnist-all")
    ap.add_argument("--clients", type=int, default=None, help="writers in the store (default 3597 on CUDA, 400 on CPU)")
    ap.add_argument("--chunks", default=None, help="comma-separated chunk sizes (default 8,32,128,512; CPU 8,32)")
    ap.add_argument("--flute-rounds", type=int, default=None, help="timed rounds (default 100; CPU 10)")
    ap.add_argument("--engine-chunk", type=int, default=512, help="clients per chunk in the engine round")
    ap.add_argument("--skip-round", action="store_true", help="skip the all-writers round")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench/gpu.py: --device cuda but torch sees no CUDA device; use --device cpu", file=sys.stderr)
        return 2
    cpu = device.type == "cpu"
    clients = a.clients or (400 if cpu else 3597)
    chunks = [int(c) for c in (a.chunks or ("8,32" if cpu else "8,32,128,512")).split(",")]
    flute_rounds = a.flute_rounds or (10 if cpu else 100)
    if cpu:
        torch.set_num_threads(1)

    from simfed.partitions.store import PartitionStore

    path, gen_s = ensure_store(f"{a.store}-{clients}", clients, unseen_fraction=0.0)
    store = PartitionStore.open(path)
    ids = [int(c) for c in store.client_ids("seen")]
    report = {"device": str(device), "device_name": torch.cuda.get_device_name(device) if not cpu else "cpu",
              "torch": torch.__version__, "threads": torch.get_num_threads(), "store": path,
              "writers": len(ids), "store_generated_s": round(gen_s, 1)}
    report["trainer"] = [trainer_rate(store, ids, c, device) for c in chunks if c <= len(ids)]
    if not a.skip_round:
        report["round_all_writers"] = engine_rounds(path, rounds=1, clients_per_round=len(ids), device=device,
                                                    vectorize="on", chunk=a.engine_chunk)
    fl = engine_rounds(path, rounds=flute_rounds, clients_per_round=10, device=device, vectorize="on", chunk=10)
    fl["extrapolated_1500_rounds_s"] = round(fl["total_s"] * 1500 / flute_rounds, 1)
    fl["flute_reported_s"] = 502.0  # FLUTE's paper: 8 min 22 s for this workload
    report["flute"] = fl
    print(json.dumps(report, indent=None if a.json else 2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
