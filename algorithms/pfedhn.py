"""pFedHN: personalized federated hypernetworks (Shamsian, Navon, Fetaya, Chechik; ICML 2021,
arXiv 2103.04628), checked against the authors' code (github.com/AvivSham/pFedHN,
experiments/pfedhn/trainer.py and models.py).

The server holds a per-client embedding e_i and a hypernetwork h (Linear(d, 100), 3 x [ReLU,
Linear(100, 100)], one linear head per LeNet tensor). One phase per round: the server produces
theta_i = h(e_i) for a chunk of clients in one batched forward pass; the client runs k SGD steps
and returns delta_i = theta_i - theta_i'; the server accumulates the vector-Jacobian product
J_h(e_i)^T delta_i into h's gradient as each reply arrives (O(model) memory) and keeps the
(small) embedding gradient per client; `finish` averages h's gradient over the clients that
replied, clips h's gradient and the cohort's embedding gradients jointly at server_clip and
takes one SGD step with momentum on both.

As the authors' code (defaults): inner SGD lr 5e-3, momentum 0.9, weight decay 5e-5, clip 50,
k = 50 steps, client batch 64; server SGD lr 1e-2, momentum 0.9, weight decay 1e-3, over the
hypernetwork AND the embeddings (their nn.Embedding sits inside the hypernetwork; its parameter
group takes embed_lr, default = lr); one clip at 50 over all of them; embeddings N(0, 1)
(nn.Embedding's init); embed_dim = int(1 + n/4) with n all the clients (their num_nodes).

Differences from the authors' code, and why:
- Cohort averaging (ours): they take ONE client per server step; we average h's gradient over
  the engine's cohort (clients_per_round), the federated round every other simfed method uses, so
  that methods are compared at equal rounds and communication. With a cohort of 1 the step is
  theirs. Each embedding row gets its own client's gradient, not divided by the cohort size: in
  their step a row's gradient is also its own client's alone.
- Embedding rows are updated lazily (ours): a row's momentum buffer and weight decay act only
  when its client takes part. Their dense nn.Embedding gradient is zero for absent rows, but
  SGD's momentum and weight decay still move every row at every step; the server here does not
  know the client list at init (rows are created, seeded by client id, on first use), and a
  row that drifts while its client is absent is not something the method relies on.
- Seeded batches and cohort (`training.sgd_train`, the engine's sampler) instead of a fresh
  shuffled DataLoader iterator per step and Python's global RNG.
- Unseen clients (the paper's generalization experiment; not in this trainer): h frozen, a fresh
  N(0, 1) embedding (seeded by client id) is fitted by `unseen_exchanges` [10] eval phases of
  the same exchange, each an SGD step of `unseen_lr` [5e-2] on that client's embedding only; a
  final phase evaluates h(e_new). The fitted embeddings are evaluation scratch (`_unseen`).
- embed_dim [0 = int(1 + n/4)]: n is the store's seen + unseen clients when the task says, else
  the seen ones, else 100.
- Seeds: h from the run seed; embedding rows from derive_seed(run seed, "pfedhn-embed", client
  id) ("pfedhn-unseen" for a new client's), by client id so that a row does not depend on when
  its client is first sampled; local batches from `ClientContext.generator("sgd")`.

Vectorized client step (ours; `engine.vectorize`): `chunk_replies` trains a whole chunk of clients
in one `vectorized.sgd_train_chunk` run, each from its own theta_i (stacked [C, P], rows differ),
with the same seeded batches, momentum, weight decay and clip; its replies equal `client`'s to
rounding (float64 tests: 1e-10). Only the "train" phase: the unseen-embedding fits are evaluation,
which the engine never vectorizes.

Models other than the paper's LeNet (ours; docs/models.md): `generate` ["all"] (kit/partial.py)
generates every client parameter, as the paper; "head" generates only the model's head, the body
is one shared vector moved FedAvg-style (its change summed, weighted by train samples, stepped at
`body_lr` [1.0] in `finish`); `max_generated` [2,000,000] refuses, before any work, a model whose
generated part is larger (ResNet-18: use "head").

generate = "body": the paper's pFedHN-PC (personal classifier), checked against the authors'
experiments/pfedhn_pc (trainer.py, node.py, models.py). h generates every parameter but the head
(the model's `head`, else its last Linear layer; `max_generated` counts the body); each client
keeps its own head as client state {"head", "momentum"} (kit/personalhead.py), never sent to the
server. As theirs: the local steps train the generated body and the head together on the same
batches; the body's SGD is fresh each round, the head has its own SGD with the same lr, momentum
and weight decay whose momentum buffer lives on across rounds (their per-node optimizer); only the
body's gradient is clipped (their clip over the target network, which excludes the local layer);
delta_i is the body's change and goes back through h exactly as under "all"; a seen client is
evaluated with h(e_i) and its own head (its seeded head if never trained). Differences:
- The head is the model's own last layer, initialized by PyTorch's default rule from
  derive_seed(run seed, "pfedhn-head", client id); theirs is a separate Linear(84, classes) on a
  target network that ends in ReLU, initialized from the global generator at start-up. With the
  LeNet, the same layer on the same features.
- Server defaults stay pFedHN's (server_lr 1e-2); their pfedhn_pc trainer's default lr is 5e-2.
- New clients (ours: their trainer evaluates seen nodes only): the unseen path above fits e_new,
  and in each of its phases (fit_j, evaluate) the client first fits its seeded head for
  `unseen_head_steps` [50] SGD steps with the body h(e_new) frozen (head settings, no clip); a fit
  phase then trains body and head together as in training and returns the body's change. Eval
  phases keep no state, so the head is fitted afresh in each.
- Client state: capabilities are declared per class (`Capabilities`, read by the engine before
  any config is known), so pfedhn declares client_state for every `generate`; "all" and "head"
  never write any (their replies keep the state), and `keeps_client_state(cfg)` says so: only
  "body" needs engine.storage on a multi-node cluster.
- No vectorized step: `chunk_replies` falls back to the per-client loop under "body" (two
  optimizers and a state per client do not fit vectorized.sgd_train_chunk).

[privacy] is refused (docs/privacy.md), whatever `generate`: a guarantee from noising h's summed
gradient would cover h alone; each embedding e_i is fitted to one client's updates without noise
and is released in that client's model h(e_i).

Collapse gauge (every round, in the round's stats, persisted in RUN_DIR/metrics/rounds/):
`train.embedding_spread` and `train.model_spread` over the cohort (`hypernet.spread`; 0 = every
client gets the same model).

[system] clock (ours): a straggler under stragglers = "partial" takes the SGD steps it finishes by
the deadline and its delta_i counts (the server's VJP does not care how many steps made it).
Not asynchronous: the hypernetwork's step averages the VJPs of one cohort at one h, and a stale
delta_i would be pulled back through an h it was not generated by; `fedbuff` is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from simfed.algorithms.base import Capabilities, NoPrivacy, Reply, ServerState, Task, Work
from simfed.algorithms.kit import hypernet as hn
from simfed.algorithms.kit import partial, personalhead, training
from simfed.algorithms.kit.globalmodel import client_model
from simfed.algorithms.kit.models import load_flat
from simfed.algorithms.kit.workload import default_steps, model_bytes, tensor_bytes
from simfed.algorithms.registry import register
from simfed.core.errors import SimfedError


@dataclass(frozen=True)
class PFedHNConfig(hn.GeneratedSGDFields):
    server_lr: float = 1e-2
    server_momentum: float = 0.9
    server_weight_decay: float = 1e-3
    server_clip: float = 50.0
    embed_lr: float = 1e-2
    embed_momentum: float = 0.9
    embed_weight_decay: float = 1e-3
    unseen_exchanges: int = 10
    unseen_lr: float = 5e-2
    unseen_head_steps: int = 50  # generate = "body": a new client's head, trained with the body frozen
    generate_choices: ClassVar[tuple[str, ...]] = ("all", "head", "body")

    def __post_init__(self):
        super().__post_init__()
        if self.unseen_exchanges < 0 or self.unseen_head_steps < 0:
            raise ValueError("unseen_exchanges and unseen_head_steps must be >= 0")
        if min(self.server_lr, self.embed_lr, self.unseen_lr) <= 0:
            raise ValueError("server_lr, embed_lr and unseen_lr must be > 0")


class PFedHNState(ServerState):
    def __init__(self, hnet, opt, emb: dict, dim: int, seed: int):
        self.hnet, self.opt, self.emb, self.dim, self.seed = hnet, opt, emb, dim, seed
        self.emb_mom: dict = {}  # client id -> momentum buffer of its embedding row (checkpointed)
        self._egrad: dict = {}  # round scratch: client id -> d<h(e_i), delta_i>/de_i
        self._n = 0
        self._unseen: dict = {}  # eval scratch: fitted embeddings of unseen clients


@register
class PFedHN(hn.HyperNetMethod):
    name = "pfedhn"
    Config = PFedHNConfig
    summary = "pFedHN: server hypernetwork maps per-client embeddings to client models (Shamsian et al. 2021)"
    # partial: k SGD steps from h(e_i); client_state: the heads of generate = "body" (capabilities
    # are per class; "all" and "head" never write any, see the docstring)
    capabilities = Capabilities(client_state=True, payloads=True, chunk_replies=frozenset({"train"}), partial="steps",
                                privacy=NoPrivacy(
        "pfedhn keeps a per-client embedding e_i on the server, moved by that client's updates alone and released "
        "in its model h(e_i); noise on h's summed gradient would cover h only, never e_i or h(e_i)"))

    def keeps_client_state(self, cfg) -> bool:
        return cfg.generate == "body"  # the per-client heads; "all" and "head" keep none

    def work(self, phase, cfg, task, n_train) -> Work:
        steps, samples = default_steps(cfg, n_train)
        model = model_bytes(task)  # theta_i = h(e_i) down, delta_i up
        if cfg.generate == "body":  # the head stays on the client
            model = tensor_bytes(partial.generated_values(task, "body"))
        return Work(samples=samples, steps=steps, bytes_down=model, bytes_up=model)

    def init(self, cfg, task: Task, seed: int) -> PFedHNState:
        hnet, dim = hn.build(cfg, task, seed, self.name)
        opt = torch.optim.SGD(hnet.parameters(), lr=cfg.server_lr, momentum=cfg.server_momentum,
                              weight_decay=cfg.server_weight_decay)
        state = PFedHNState(hnet, opt, {}, dim, seed)
        if cfg.generate == "head":  # only then: "all" keeps the state (and checkpoints) of the paper's pFedHN
            state.body = partial.initial_body(task, seed, partial.split(task, "head")[1])
        return state

    def broadcast(self, phase, cfg, state, info):
        return getattr(state, "body", None)  # the shared body (generate = "head")

    def train_phases(self, cfg, state, round):
        return ("train",)

    def eval_phases(self, cfg, state, cohort):
        fits = tuple(f"fit{j}" for j in range(cfg.unseen_exchanges)) if cohort == "unseen" else ()
        return fits + ("evaluate",)

    def _row(self, state, cid, info) -> torch.Tensor:
        if info.mode == "eval" and info.cohort == "unseen":
            if cid not in state._unseen:
                state._unseen[cid] = hn.embedding_row({}, cid, state.dim, state.seed, "pfedhn-unseen")
            return state._unseen[cid]
        return hn.embedding_row(state.emb, cid, state.dim, state.seed, "pfedhn-embed",
                                store=info.mode == "train")

    def payloads(self, phase, cfg, state, client_ids, info):
        if phase == "fit0":  # a new evaluation of the unseen cohort starts from fresh embeddings
            for cid in client_ids:
                state._unseen.pop(int(cid), None)
        ids = [int(c) for c in client_ids]
        return hn.generate(state.hnet, ids, [self._row(state, c, info) for c in ids])

    def client(self, phase, cfg, bcast, payload, data, cstate, ctx) -> Reply:
        if payload is None:
            return Reply()
        if cfg.generate == "body":
            return self._client_body(phase, cfg, payload, data, cstate, ctx)
        model = client_model(ctx)
        if phase == "evaluate":
            load_flat(model, partial.theta(bcast, payload))
            return Reply(evals=training.evaluate_splits(model, data))
        if data.n("train") < 1:
            raise SimfedError(f"pfedhn: client {ctx.client_id} has no training samples; every client needs >= 1")
        delta, seen, loss = hn.train_payload(model, cfg, partial.theta(bcast, payload), data, ctx)
        return self._reply(delta, bcast, seen, loss, data, ctx)

    def _client_body(self, phase, cfg, body, data, cstate, ctx) -> Reply:
        """generate = "body": the generated body with the client's own head (kit/personalhead.py)."""
        model = client_model(ctx)
        x, y = data.split("train")
        if ctx.mode == "eval" and ctx.cohort == "unseen":
            # A new client has no state and evaluation keeps none: each of its phases fits the
            # seeded head afresh on the current h(e_new), the body frozen (ours: see the docstring).
            head = personalhead.fit_head(model, body, personalhead.seeded_head(model, ctx.seed, ctx.client_id),
                                         x, y, cfg, cfg.unseen_head_steps, ctx.generator("head"))
            hstate = {"head": head}
        else:
            hstate = personalhead.head_state(cstate, model, ctx.seed, ctx.client_id)
        if phase == "evaluate":
            load_flat(model, torch.cat([body.to(hstate["head"].dtype), hstate["head"]]))
            return Reply(evals=training.evaluate_splits(model, data))
        if data.n("train") < 1:
            raise SimfedError(f"pfedhn: client {ctx.client_id} has no training samples; every client needs >= 1")
        delta, new, seen, loss = personalhead.train_with_head(model, body, hstate, x, y, cfg, ctx.generator("sgd"),
                                                              ctx.budget)
        if ctx.mode != "train":  # fitting an unseen client's embedding: evaluation, no state
            return Reply(item=delta)
        return Reply(item=delta, state=new, n_train=seen, train_loss=loss)

    def _reply(self, delta, bcast, seen, loss, data, ctx) -> Reply:
        """The generated part's change as the item; in training also the body's summable change."""
        n_body = 0 if bcast is None else bcast.numel()
        if ctx.mode != "train":  # fitting an unseen client's embedding is evaluation, not training
            return Reply(item=delta[n_body:])
        return Reply(item=delta[n_body:], sums=partial.body_sums(delta, n_body, float(data.n("train"))),
                     n_train=seen, train_loss=loss)

    def chunk_replies(self, phase, cfg, bcast, payloads, datas, cstates, ctxs) -> list[Reply]:
        """`client` for a chunk of clients in one vectorized SGD run (hypernet.train_delta_chunk),
        each from its own generated theta_i; the replies equal `client`'s to rounding."""
        if phase == "evaluate" or cfg.generate == "body":  # "body": the per-client loop (docstring)
            return super().chunk_replies(phase, cfg, bcast, payloads, datas, cstates, ctxs)
        todo = [j for j, p in enumerate(payloads) if p is not None]  # None: an earlier reply was dropped
        for j in todo:
            if datas[j].n("train") < 1:
                raise SimfedError(f"pfedhn: client {ctxs[j].client_id} has no training samples; "
                                  "every client needs >= 1")
        replies = [Reply() for _ in payloads]
        model = client_model(ctxs[0])
        thetas = [None if p is None else partial.theta(bcast, p) for p in payloads]
        for j, (delta, s, loss) in hn.train_payload_clients(model, cfg, thetas, datas, ctxs).items():
            replies[j] = self._reply(delta, bcast, s, loss, datas[j], ctxs[j])
        return replies

    def absorb(self, phase, cfg, state, client_id, item, info):
        if item is None:
            return
        cid = int(client_id)
        if phase == "train":
            e = hn.embedding_row(state.emb, cid, state.dim, state.seed, "pfedhn-embed")
            state._egrad[cid] = hn.vjp_(state.hnet, e[None], item[None])[0]
            state._n += 1
        elif phase.startswith("fit"):
            # h is frozen for unseen clients: only the input gradient, no parameter gradients.
            g = hn.vjp_(state.hnet, state._unseen[cid][None], item[None], params=False)[0]
            hn.sgd_rows_(state._unseen, {cid: g}, cfg.unseen_lr, 0.0, cfg.server_clip)

    def finish(self, phase, cfg, state, sums, n_clients, info):
        if phase != "train":
            if phase == "evaluate":
                state._unseen.clear()
            return None
        n, state._n = state._n, 0
        params = list(state.hnet.parameters())
        if n == 0:
            state.opt.zero_grad(set_to_none=True)
            return {"clients": 0.0}
        ids = sorted(state._egrad)  # sorted: the same float sums on serial and Ray
        rows = [state.emb[c] for c in ids]
        out = {"clients": float(n), "embedding_spread": hn.spread(rows),
               "model_spread": hn.model_spread(state.hnet, rows)}
        for p in params:
            if p.grad is not None:
                p.grad.div_(n)
        out["hnet_grad_norm"] = hn.grad_norm_clip_(params, 0.0)
        # one clip over h's gradient and the cohort's embedding gradients, as the authors' clip
        # over hnet.parameters() (their embedding table is one of them)
        egrads = {c: state._egrad[c].clone() for c in ids}
        tensors = [p.grad for p in params if p.grad is not None] + [egrads[c] for c in ids]
        total = float(torch.linalg.vector_norm(torch.stack([t.norm() for t in tensors])))
        if cfg.server_clip > 0 and total > cfg.server_clip:
            scale = cfg.server_clip / (total + 1e-6)  # clip_grad_norm_'s factor
            for t in tensors:
                t.mul_(scale)
        out["grad_norm"] = total
        state.opt.step()
        state.opt.zero_grad(set_to_none=True)
        momentum_rows_(state.emb, state.emb_mom, egrads, cfg.embed_lr, cfg.embed_momentum, cfg.embed_weight_decay)
        state._egrad = {}
        if hasattr(state, "body"):
            state.body, step = partial.body_step(state.body, sums, cfg.body_lr)
            out.update(step)
        return out


def momentum_rows_(table: dict, mom: dict, grads: dict, lr: float, momentum: float, weight_decay: float) -> None:
    """torch.optim.SGD's update (momentum, dampening 0, weight decay) on the rows that took part only."""
    for cid, g in grads.items():
        e = table[cid]
        d = g + weight_decay * e
        buf = d.clone() if cid not in mom else momentum * mom[cid] + d
        if momentum > 0:
            mom[cid] = buf
            d = buf
        table[cid] = e - lr * d
