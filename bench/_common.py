"""Shared helpers of bench/efficiency.py and bench/femnist_scale.py (not part of the package).

- `ensure_store`: a synthetic-FEMNIST partition store, generated if absent.
- `run_engine`: one FedAvg run through the real engine (`simfed.engine.loop.run_experiment`, Ray
  backend, embedded local Ray), with every engine event time-stamped so that Ray startup, pool
  startup, the warm-up round, the timed rounds and the final evaluation are reported apart.
- `plain_baseline` (in _plain.py, re-exported): the same clients, the same local steps, batch size and even the same batch
  indices (the engine's per-client generator seed is reproduced), trained with a hand-written
  PyTorch loop in one 1-thread process per core (multiprocessing, spawn), clients split across the
  processes largest-first (LPT) and a barrier at each round (FedAvg rounds are synchronous).
- `MemorySampler`: peak of the summed RSS (and PSS) of the driver and every process it started
  (gcs_server, raylet, Ray's agents, the `ray::` actors), sampled every 0.5 s in a thread.

What the plain baseline does per client (all inside its timed region): uint8 -> float32 in [0, 1]
(like `ClientData.split`), load the global weights into the one model of the process, a fresh
SGD(momentum) optimizer, the local steps, delta = theta - params, acc += n * delta. What it does
*not* do: read the store inside the timed region (each process copies its clients' uint8 rows
out of the memory map before the first barrier), Ray, messages, metric rows, Parquet.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from _plain import PlainPool, lpt_split, plain_baseline, ray_worker_niceness  # noqa: F401  (re-exported)

ROOT = Path(__file__).resolve().parents[1]


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover (not Linux)
        return os.cpu_count() or 1


def loadavg() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def ensure_store(path: str | os.PathLike, clients: int, unseen_fraction: float = 0.1, seed: int = 0) -> tuple[str, float]:
    """(path, seconds spent generating: 0 when it already existed)."""
    from simfed.partitions.synthetic import make_synthetic_femnist

    path = Path(path)
    if (path / "manifest.json").exists():
        return str(path), 0.0
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    make_synthetic_femnist(str(path), clients=clients, seed=seed, unseen_fraction=unseen_fraction)
    return str(path), time.perf_counter() - t0


def ensure_model_store(path: str | os.PathLike, model: str, clients: int, seed: int = 0) -> tuple[str, float]:
    """A store in the layout a built-in model takes, from partitions/samples.py's generators:
    CIFAR-10 (32x32x3, 2 classes per client, about 100 training rows each) for resnet18, LEAF
    Shakespeare (one role per client) for charlstm, synthetic FEMNIST otherwise."""
    from simfed.partitions import samples

    if model not in ("resnet18", "charlstm"):
        return ensure_store(path, clients, seed=seed)
    path = Path(path)
    if (path / "manifest.json").exists():
        return str(path), 0.0
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if model == "resnet18":
            from simfed.partitions.cifar import import_cifar

            src = samples.write_cifar(Path(tmp) / "cifar-10.tar.gz",
                                      samples.cifar10_contents(per_batch=25 * clients, test=20 * clients, seed=seed))
            import_cifar(src, path, scheme="classes", classes_per_client=2, clients=clients, seed=seed)
        else:
            from simfed.partitions.shakespeare import import_shakespeare

            src = samples.write_shakespeare(Path(tmp) / "leaf", samples.shakespeare_json(roles=clients, seed=seed))
            import_shakespeare(src, path, seed=seed)
    return str(path), time.perf_counter() - t0


# --------------------------------------------------------------------------- engine


@dataclass
class EngineRun:
    """Time stamps (and CPU snapshots) of one run's engine events.

    `after_round(round)` (optional) runs inside the "round" event, i.e. between two engine rounds
    while the workers are idle (the paired plain rounds of bench/efficiency.py); its duration is
    recorded per round (`paused_s`) and its CPU is kept out of the engine's per-round CPU figures.
    """

    t_call: float = 0.0
    t_start: float | None = None  # "start" event: server + worker actors are up
    rounds: list[dict] = field(default_factory=list)
    chunk_samples: dict[int, int] = field(default_factory=dict)
    chunk_clients: dict[int, int] = field(default_factory=dict)
    t_eval: float | None = None
    t_return: float = 0.0
    result: dict | None = None
    workers: list = field(default_factory=list)
    after_round: object = None
    exclude_pids: set = field(default_factory=set)
    _snap: dict = field(default_factory=dict)

    def on_event(self, e: dict) -> None:
        now = time.perf_counter()
        kind = e.get("type")
        if kind == "start":
            self.t_start = now
            self.workers = e.get("workers", [])
            self.worker_nice = actor_niceness(self.workers)
            self._snap = cpu_snapshot(self.exclude_pids)
        elif kind == "chunk":
            self.chunk_samples[e["round"]] = self.chunk_samples.get(e["round"], 0) + int(e["samples"])
            self.chunk_clients[e["round"]] = self.chunk_clients.get(e["round"], 0) + int(e["clients"])
        elif kind == "round":
            r = int(e["round"])
            snap = cpu_snapshot(self.exclude_pids)
            rec = {"round": r, "seconds": float(e["seconds"]), "t_end": now,
                   "samples": self.chunk_samples.get(r, 0), "clients": self.chunk_clients.get(r, 0),
                   "cpu": cpu_delta(self._snap, snap), "paused_s": 0.0}
            self.rounds.append(rec)
            if self.after_round is not None:
                rec["after"] = self.after_round(r)
                rec["paused_s"] = time.perf_counter() - now
                self._snap = cpu_snapshot(self.exclude_pids)
            else:
                self._snap = snap
        elif kind == "eval" and self.t_eval is None:
            self.t_eval = now


def cpu_snapshot(exclude: set | frozenset = frozenset()) -> dict[int, tuple[str, float]]:
    """{pid: (kind, user+system CPU seconds)} of this process and all its descendants but `exclude`."""
    import psutil

    me = psutil.Process()
    out = {}
    try:
        procs = [me] + me.children(recursive=True)
    except psutil.Error:
        procs = [me]
    for p in procs:
        if p.pid in exclude:
            continue
        try:
            t = p.cpu_times()
            out[p.pid] = ("driver" if p.pid == me.pid else MemorySampler._kind(p), t.user + t.system)
        except psutil.Error:
            continue
    return out


def cpu_sum(deltas: list[dict]) -> dict[str, float]:
    out: dict[str, float] = {}
    for d in deltas:
        for k, v in d.items():
            out[k] = out.get(k, 0.0) + v
    return {k: round(v, 3) for k, v in sorted(out.items(), key=lambda kv: -kv[1])}


def cpu_delta(a: dict, b: dict) -> dict[str, float]:
    """CPU seconds per process kind between two snapshots (processes born in between count from 0)."""
    out: dict[str, float] = {}
    for pid, (kind, t1) in b.items():
        t0 = a.get(pid, (kind, 0.0))[1]
        out[kind] = out.get(kind, 0.0) + max(t1 - t0, 0.0)
    return {k: round(v, 3) for k, v in sorted(out.items(), key=lambda kv: -kv[1])}


def run_engine(store: str, *, rounds: int, clients_per_round: int, workers: int, algo_cfg, eval_clients: int,
               seed: int = 0, run_dir: str | None = None, backend: str = "ray", after_round=None,
               exclude_pids: set | None = None, model: dict | None = None) -> EngineRun:
    """One FedAvg run through `run_experiment` (`model`: a [model] table, default LeNet). Ray must
    already be connected for the Ray backend."""
    from simfed.algorithms.kit.models import parse_spec
    from simfed.engine.config import DataConfig, EngineConfig, Experiment, RunConfig
    from simfed.engine.loop import run_experiment

    exp = Experiment(
        algorithm="fedavg", algorithm_config=algo_cfg, data=DataConfig(path=store),
        model=parse_spec(model or {"name": "lenet"}),
        # eval_every = checkpoint_every = 0: evaluate and checkpoint only after the last round,
        # both outside the engine's per-round timing (the "round" event is emitted before them).
        run=RunConfig(rounds=rounds, clients_per_round=clients_per_round, eval_every=0, checkpoint_every=0,
                      seed=seed, eval_clients=eval_clients, name="bench"),
        engine=EngineConfig(backend=backend, workers=workers, cpus_per_worker=1.0))
    tmp = None
    if run_dir is None:
        tmp = tempfile.mkdtemp(prefix="simfed-bench-")
        run_dir = os.path.join(tmp, "run")
    rec = EngineRun(after_round=after_round, exclude_pids=set(exclude_pids or ()))
    rec.t_call = time.perf_counter()
    try:
        rec.result = run_experiment(exp, run_dir, on_event=rec.on_event, backend=backend)
        rec.t_return = time.perf_counter()
        rec.worker_busy = worker_busy(run_dir)
    finally:
        rec.t_return = rec.t_return or time.perf_counter()
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return rec


def worker_busy(run_dir: str) -> dict[int, dict[int, float]]:
    """{round: {worker: summed client seconds}} from the run's own train metric rows."""
    import polars as pl

    files = sorted(Path(run_dir, "metrics").glob("*train*.parquet"))
    if not files:
        return {}
    df = pl.concat([pl.read_parquet(f) for f in files]).group_by(["round", "worker"]).agg(pl.col("seconds").sum())
    out: dict[int, dict[int, float]] = {}
    for r, w, sec in df.iter_rows():
        out.setdefault(int(r), {})[int(w)] = float(sec)
    return out


def cohorts(store: str, seed: int, rounds: int, clients_per_round: int) -> list[list[int]]:
    """The engine's training cohort of every round (same function, same arguments as engine.loop)."""
    from simfed.engine.sampling import sample_cohort
    from simfed.partitions.store import PartitionStore

    seen = [int(c) for c in PartitionStore.open(store).client_ids("seen")]
    return [sample_cohort(seed, r, seen, clients_per_round) for r in range(rounds)]


# --------------------------------------------------------------------------- plain PyTorch


# --------------------------------------------------------------------------- memory


class MemorySampler:
    """Peak of the summed memory of this process and all its descendants (Ray: gcs_server, raylet,
    agents, ray:: workers), every `interval` seconds in a thread.

    Descendants rather than "any process named ray::" so that other users' Ray sessions on the
    same machine are not counted. RSS double-counts pages shared between processes (the memory-
    mapped store, Ray's shared-memory object store, the Python/torch libraries); PSS splits them,
    so `peak_pss_sum` is the better "how much RAM does this take" figure; both are reported.
    """

    def __init__(self, interval: float = 0.5, pss: bool = True, exclude: set | frozenset = frozenset()):
        import psutil

        self.psutil = psutil
        self.interval, self.want_pss = interval, pss
        self.exclude = set(exclude)  # pids not to count (e.g. the plain baseline's processes)
        self.me = psutil.Process()
        self.peak_rss = 0
        self.peak_pss = 0
        self.peak_breakdown: dict[str, int] = {}
        self.peak_procs = 0
        self.samples = 0
        self.cpu_s = 0.0  # CPU seconds the sampling thread itself used (in the driver's figure)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    @staticmethod
    def _kind(p) -> str:
        """worker_actor / server_actor / raylet / gcs_server / ray-agents / ray::<other> / name."""
        try:
            name = p.name()
            cmd = " ".join(p.cmdline()[:3])
        except Exception:
            return "other"
        title = name if name.startswith("ray::") else ("ray::" + cmd.split("ray::", 1)[1].split()[0]
                                                       if "ray::" in cmd else "")
        if title:
            if "Worker" in title and "Agent" not in title:
                return "worker_actor"
            if "Server" in title:
                return "server_actor"
            if "Agent" in title:
                return "ray-agents"
            return title
        for k in ("raylet", "gcs_server"):
            if k in name or k in cmd:
                return k
        if "dashboard" in cmd or "agent" in cmd:
            return "ray-agents"
        if "default_worker" in cmd or "ray/_private/workers" in cmd:
            return "ray::IDLE"
        try:
            args = p.cmdline()
        except Exception:
            args = []
        script = next((os.path.basename(x) for x in args[1:] if x.endswith(".py")), "")
        if script:
            return f"{name}:{script}"
        if "-m" in args[1:-1]:
            return f"{name}:-m {args[args.index('-m') + 1]}"
        return name or "other"

    def sample(self) -> None:
        ps = self.psutil
        try:
            procs = [self.me] + self.me.children(recursive=True)
        except ps.Error:
            return
        rss = pss = 0
        by_kind: dict[str, int] = {}
        for p in procs:
            if p.pid in self.exclude:
                continue
            try:
                if self.want_pss:
                    mi = p.memory_full_info()
                    pss += getattr(mi, "pss", mi.rss)
                else:
                    mi = p.memory_info()
                r = mi.rss
            except ps.Error:
                continue
            rss += r
            k = "driver" if p.pid == self.me.pid else self._kind(p)
            by_kind[k] = by_kind.get(k, 0) + r
        self.samples += 1
        if rss > self.peak_rss:
            self.peak_rss, self.peak_breakdown, self.peak_procs = rss, by_kind, len(procs)
        self.peak_pss = max(self.peak_pss, pss)

    def _loop(self) -> None:
        c0 = time.thread_time()
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)
        self.cpu_s = time.thread_time() - c0

    def __enter__(self) -> "MemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def report(self) -> dict:
        gb = 1 << 30
        return {"peak_rss_sum_bytes": self.peak_rss, "peak_rss_sum_GiB": round(self.peak_rss / gb, 3),
                "peak_pss_sum_GiB": round(self.peak_pss / gb, 3) if self.want_pss else None,
                "processes_at_peak": self.peak_procs, "samples": self.samples, "interval_s": self.interval,
                "sampler_cpu_s": round(self.cpu_s, 3),
                "rss_at_peak_by_process_GiB": {k: round(v / gb, 3) for k, v in
                                               sorted(self.peak_breakdown.items(), key=lambda kv: -kv[1])}}


RAY_INIT = {"how": ""}


def connect_ray(num_cpus: int) -> float:
    """Embedded local Ray with num_cpus = cores, exactly as `simfed launch` does; returns seconds.

    If another Ray instance runs on this machine (`ray start`, a test's cluster), ray.init() without
    an address tries to join it and cluster.connect fails; then start our own with address="local"
    and the same arguments (recorded in RAY_INIT["how"]).
    """
    import ray

    from simfed.engine import cluster
    from simfed.core.errors import SimfedError

    t0 = time.perf_counter()
    try:
        cluster.connect("", num_cpus=num_cpus)
        RAY_INIT["how"] = "simfed.engine.cluster.connect"
    except SimfedError as exc:
        if "existing cluster" not in str(exc):
            raise
        os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
        ray.init(address="local", num_cpus=num_cpus, _node_ip_address="127.0.0.1", include_dashboard=False,
                 log_to_driver=False, configure_logging=True, logging_level="ERROR")
        RAY_INIT["how"] = "ray.init(address='local') (cluster.connect joined another Ray instance on this machine)"
    return time.perf_counter() - t0


def actor_niceness(workers_info: list[dict]) -> list[int]:
    import psutil

    out = []
    for w in workers_info:
        try:
            out.append(psutil.Process(int(w["pid"])).nice())
        except Exception:
            pass
    return sorted(set(out))


def disconnect_ray() -> float:
    from simfed.engine import cluster

    t0 = time.perf_counter()
    cluster.disconnect()
    return time.perf_counter() - t0


def add_bench_dir_to_path() -> None:
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
