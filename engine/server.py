"""The server: holds a method's state and reduces client messages as they stream in.

Plain Python; the serial backend calls it directly, the Ray backend wraps it in a pooled actor
with the same typed methods (engine.raybackend.ServerActor). Summable messages are added into one
accumulator per phase (O(model) memory whatever the cohort size); per-client items go to
`Algorithm.absorb`.

Float addition is not associative, so the fold order is fixed: chunk results are folded strictly
in chunk index order (the order `sampling.plan_chunks` gives), and one that arrives early waits
in `_held` until its predecessors are in. The backend never runs more than a fixed window of
chunks ahead of the fold, so `_held` stays at a few chunk results (O(window x model) memory).

In an asynchronous (FedBuff) round (`RoundInfo.starts`) each client trains from the model version
it started from: the server records the broadcast of each version when it is current, hands a
client its version's broadcast as its payload (no common broadcast), and forgets a version once
no later round needs it (`RoundInfo.keep_from`). The history is checkpointed with the state.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import psutil
import torch

from simfed.algorithms import registry
from simfed.algorithms.base import RoundInfo, Task
from simfed.engine import fedbuff
from simfed.engine.mechanism import STATE_KEY, ServerPrivacy


@dataclass
class ChunkResult:
    """What a worker sends the server for one chunk of clients."""

    sums: dict[str, Any] | None = None
    n_clients: int = 0  # clients whose replies are in `sums`/`items` (dropped ones excluded)
    items: list[tuple[int, Any]] = field(default_factory=list)


def compact(obj: Any) -> Any:
    """Copy tensor views that share a larger storage: pickling a view ships its whole base tensor
    (one row of a batched hypernetwork output would carry the whole chunk's models)."""
    if isinstance(obj, torch.Tensor):
        if obj.untyped_storage().nbytes() > obj.numel() * obj.element_size():
            return obj.clone()
        return obj
    if isinstance(obj, dict):
        return {k: compact(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(compact(v) for v in obj)
    return obj


def add_into(acc: dict[str, Any] | None, sums: dict[str, Any] | None) -> dict[str, Any] | None:
    """acc += sums, key by key; the first contribution is copied so callers' tensors stay untouched."""
    if not sums:
        return acc
    if acc is None:
        acc = {}
    for k, v in sums.items():
        if k in acc:
            acc[k] += v
        else:
            acc[k] = v.clone() if hasattr(v, "clone") else (v.copy() if hasattr(v, "copy") else v)
    return acc


class Server:
    def __init__(self, algorithm: str, cfg: Any, task: Task, seed: int, state_dict: dict | None = None,
                 threads: int = 0, privacy: Any = None):
        if threads > 0:
            import torch

            torch.set_num_threads(threads)
        self.algo = registry.get(algorithm)
        self.cfg = cfg
        self.state = self.algo.init(cfg, task, seed)
        # [privacy] (engine.privacy's plan): the server noises the released sums (engine.mechanism)
        self.privacy = ServerPrivacy(privacy) if privacy is not None else None
        self.versions: dict[int, Any] = {}  # asynchronous rounds: broadcast of each model version in use
        if state_dict is not None:
            self.load_state_dict(state_dict)
        self._acc: dict[str, Any] | None = None
        self._n_clients = 0
        self._next = 0  # index of the next chunk to fold
        self._held: dict[int, ChunkResult] = {}

    def phases(self, mode: str, key: Any) -> list[str]:
        if mode == "train":
            return list(self.algo.train_phases(self.cfg, self.state, key))
        return list(self.algo.eval_phases(self.cfg, self.state, key))

    def begin(self, phase: str, info: RoundInfo) -> Any:
        self._acc, self._n_clients, self._next, self._held = None, 0, 0, {}
        bcast = self.algo.broadcast(phase, self.cfg, self.state, info)
        bcast = self.privacy.wrap(phase, bcast, info) if self.privacy else bcast
        if not info.starts:
            return bcast
        if info.round not in self.versions:  # the state now is version `round`: clients starting later need it
            self.versions[info.round] = fedbuff.snapshot(bcast)
        return None  # each client gets its own version's broadcast as its payload

    def payloads(self, phase: str, info: RoundInfo, client_ids: list[int]) -> Any:
        if info.starts:
            start = dict(info.starts)
            return {int(c): self.versions[start[int(c)]] for c in client_ids}
        return compact(self.algo.payloads(phase, self.cfg, self.state, client_ids, info))

    def receive(self, result: ChunkResult, phase: str, info: RoundInfo, index: int | None = None) -> int:
        """Take chunk `index`'s result (None: the next one); fold every chunk now in order."""
        index = self._next if index is None else int(index)
        if index < self._next or index in self._held:
            return 0  # a retried chunk already folded: its result is the same, count it once
        self._held[index] = result
        while self._next in self._held:
            self._fold(self._held.pop(self._next), phase, info)
            self._next += 1
        return result.n_clients

    def _fold(self, result: ChunkResult, phase: str, info: RoundInfo) -> None:
        self._acc = add_into(self._acc, result.sums)
        self._n_clients += result.n_clients
        for cid, item in result.items:
            terms = self.algo.absorb(phase, self.cfg, self.state, cid, item, info)
            if terms and self.privacy:  # per-client terms of the released update, computed here
                self._acc = add_into(self._acc, self.privacy.clip_terms(terms))

    def end(self, phase: str, info: RoundInfo) -> dict[str, float]:
        if self._held:
            raise RuntimeError(f"phase {phase}: chunk {self._next} never arrived, {sorted(self._held)} are waiting")
        sums, extra = self._acc or {}, {}
        if self.privacy and info.private and self.privacy.plan.keys(phase):
            sums, extra = self.privacy.release(phase, sums, lambda: self.algo.privacy_zeros(phase, self.cfg,
                                                                                            self.state), info)
        stats = self.algo.finish(phase, self.cfg, self.state, sums, self._n_clients, info)
        self._acc = None
        if info.starts:
            self.versions = {v: b for v, b in self.versions.items() if v >= info.keep_from}
        return {**(stats or {}), **extra}

    def state_dict(self, final: bool = False) -> dict:
        """The state to checkpoint. A finished run is never resumed, so its `final` checkpoint keeps the
        model and drops optimizer state (Adam's two moments are twice a hypernetwork's size)."""
        sd = self.state.state_dict()
        if final:
            sd = {k: v for k, v in sd.items() if not isinstance(getattr(self.state, k, None), torch.optim.Optimizer)}
        elif self.versions:
            sd = {**sd, fedbuff.VERSIONS: dict(self.versions)}
        if self.privacy and self.privacy.state_dict():  # adaptive clipping's clip
            sd = {**sd, STATE_KEY: self.privacy.state_dict()}
        return sd

    def load_state_dict(self, sd: dict) -> None:
        """A checkpoint's server state (the method's, FedBuff's model versions, and the adaptive clip
        where [privacy] keeps one)."""
        sd, self.versions = fedbuff.split_state(sd)
        sd = dict(sd)
        privacy = sd.pop(STATE_KEY, None)
        self.state.load_state_dict(sd)
        if self.privacy:
            self.privacy.load_state_dict(privacy)

    def memory_bytes(self) -> int:
        return psutil.Process(os.getpid()).memory_info().rss

    def private_memory_bytes(self) -> int:
        """RSS less the shared object-store pages Ray maps into the process: what the state costs."""
        proc = psutil.Process(os.getpid())
        shared = sum(m.rss for m in proc.memory_maps(grouped=True)
                     if "plasma" in m.path or m.path.startswith("/dev/shm") or "memfd" in m.path)
        return proc.memory_info().rss - shared

    def pid(self) -> int:
        return os.getpid()
