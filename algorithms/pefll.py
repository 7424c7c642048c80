"""PeFLL: personalized federated learning by learning to learn (Scott, Zakerinia, Lampert;
ICLR 2024, arXiv 2306.05515), Algorithms 1 and 2 of the paper, checked against the authors' code
(github.com/jonnyascott/PeFLL, train.py and models.py).

Server: hypernetwork h (eta_h; Table 5) and embedding network phi (eta_v; Table 4: the client
LeNet with C + num_classes input channels, the one-hot label as constant planes, output l).
A training round is the three exchanges of Algorithm 2, one phase each:
  describe: broadcast eta_v; the client draws a seeded batch B of `descriptor_batch` samples and
            returns the raw descriptor u_i = mean_{(x,y) in B} phi(x, y) (item). finish(describe)
            fixes the normalization once (below).
  model:    the server sends theta_i = h(v_i) with v_i = (u_i - m) / s (one batched forward pass per
            chunk); the client runs k SGD steps and returns delta_i = theta_i - theta_i' (item); on
            arrival the server accumulates J_h(v_i)^T g_i into eta_h's gradient (g_i = delta_i +
            2 lambda_theta theta_i) and keeps du_i = J_h(v_i)^T g_i / s (chain rule through the
            normalization; m and s are constants, as in the authors' code).
  embed:    the server sends du_i; the client recomputes u on the SAME batch B (the batch seed
            depends on run seed, round and client, not on the phase) and returns the eta_v
            gradient d<u(B), du_i>/d eta_v as a summable message.
finish(embed): average eta_h's and eta_v's gradients over the clients that replied, clip them
jointly (one vector, as the authors' clip_grad_norm_ over joint.parameters()) at server_clip,
one Adam step (no weight decay inside Adam), then the decoupled decay of `decay`. Because delta_i
is a descent step (old - new), the server descends along it: Algorithm 2's eta += mean(Delta eta)
with Delta theta = new - old.

Vectorized client step (ours; `engine.vectorize`): in the model phase `chunk_replies` trains a
whole chunk of clients in one `vectorized.sgd_train_chunk` run, each from its own theta_i (stacked
[C, P], rows differ), with the same seeded batches, momentum, weight decay and clip; the reply
(delta_i as item, samples, mean train loss) equals `client`'s to rounding (float64 tests: 1e-10).
The describe and embed phases are one forward (and backward) pass of phi on one batch per client
and stay per client.

Descriptor normalization (`descriptor_norm` ["first"]; [code]): the authors standardize every
descriptor by the mean m and the (unbiased, torch.std) standard deviation s over the components
of the FIRST descriptor computed in training, fixed afterwards and reused at evaluation. Without it
the raw descriptors of different clients differ by ~1% of their norm, h's input barely varies and
h hands every client the same model (PeFLL then degenerates to FedAvg). Here m and s come
from the descriptor of the lowest client id that replied in the first training round (the authors
take their first sampled client; ours is the same rule on serial and Ray), are server state
(checkpointed) and are applied before h in training and evaluation. "none" feeds u to h as is.
"public" (ours) takes m and s at initialization from phi's descriptor of a seeded batch of
uniform-noise inputs with uniform labels: no client's data enters it. An evaluation before any
training round (m unset) feeds u as is.

Differential privacy ([privacy], docs/privacy.md; ours): the released update is eta_h's and
eta_v's gradients, each a sum over clients of per-client terms. A client's eta_v term is its
embed-phase reply (clipped by the worker); its eta_h term J_h(v_i)^T g_i is computed here, so
under `info.private` `absorb` returns it (`hypernet.vjp_flat`) instead of accumulating it, and
the engine clips it per client and adds it to the model phase's sums. Each term is clipped to
clip / sqrt(2), so a client's round stays within `clip`; the engine noises both sums, and
finish divides them by the fixed denominator (the expected cohort). What is protected: h and
phi. Descriptors and generated models are computed from a client's own data when it needs
them. Local DP is refused (clients send descriptors and updates un-noised: the server computes
eta_h's terms from them). descriptor_norm = "first" is refused with [privacy] (one client's descriptor would set
m and s, a release no noise covers); use "public" or "none".

Weight decay (`decay` ["decoupled"]): the L2 terms lambda_h ||eta_h||^2 + lambda_v ||eta_v||^2 of
objective (1) act as eta <- (1 - 2 server_lr lambda) eta after the Adam step, as the paper's
Algorithm 2 writes the step; "none" is the authors' default run (their Adam has no weight decay;
their `--wd` only reaches the SGD optimizer). Never added to the gradient before Adam: Adam
rescales per coordinate, so a coupled 2 lambda eta pulls every weight whose data gradient is
smaller to zero at one learning-rate step per round.

Evaluation (seen and unseen alike, zero-shot, Algorithm 1): describe then evaluate with
theta = h((u(S_train) - m) / s). Options: `label_free` (phi sees x only; paper Table 2),
`label_mask` (classes absent from the client's train split cannot be predicted).

Differences from the authors' code, and why:
- Cohort: they sample `clients_per_step` (default 5) clients with Python's global RNG and divide
  the summed gradient by clients_per_step; we use the engine's seeded cohort and divide by the
  clients that replied (a dropped client does not shrink the step).
- Descriptor scale: they divide the summed phi by 2 x number of batches (len() of an (x, y)
  tuple), not by the sample count; the normalization cancels any constant factor, so we take the
  plain mean.
- Which client fixes m and s: their first sampled client; ours the lowest id of round 0's replies.
- Local training: they draw each of the k batches from a fresh shuffled DataLoader iterator; we
  draw seeded batches (`training.sgd_train`). Same SGD (lr 2e-3, momentum 0.9, wd 5e-5, clip 50).
- Label masking: their default evaluation masks absent classes (`--mask-absent true`, multiplying
  the logits by the 0/1 class indicator, i.e. absent logits become 0); ours is off by default
  (the paper's Table 1 is unmasked) and, when on, sets absent logits to -1e4.
- lambda_theta [0] (a penalty on the generated weights) and the `decay` option are ours/the
  paper's; their code has neither.
- eval_descriptor ["train"]: the whole train split, as their evaluate(); "batch" uses one
  seeded batch as in Algorithm 1.
- embed_dim [0 = int(1 + n/4)], with n ALL clients (seen and unseen), as their code (num_nodes).
- short_clients ["all"]: a client with fewer train samples than descriptor_batch uses all of
  them (v is a mean; their DataLoader also yields a short batch); "error" raises a SimfedError.
  A client with no train samples is always an error.
- Seeds: h from the run seed, phi from derive_seed(run seed, "pefll-embed"); the descriptor batch
  B from derive_seed(run seed, round, mode, client id, "pefll-batch"), not from
  `ClientContext.generator`, which would add the phase: describe and embed must draw the same B;
  local batches from `ClientContext.generator("sgd")`.

[system] clock (ours): a client's round is its three exchanges back to back (describe, model,
embed; only the model phase's SGD samples count as training). A straggler is dropped under
stragglers = "partial" too: its exchanges are all-or-nothing (a descriptor without its model
step, or a model step without the embed exchange, leaves the server's gradient half made).
Not asynchronous: the three exchanges of a round share one h and one phi; `fedbuff` is refused.

Models other than the paper's (ours; docs/models.md):
- `generate` ["all"] (kit/partial.py): "all" generates every client parameter, as the paper;
  "head" generates only the model's head, the body is shared and moved FedAvg-style in the model
  phase (its change summed, weighted by train samples, `body_lr` [1.0]); `max_generated`
  [2,000,000] refuses, before any work, a model whose generated part is larger (ResNet-18: use
  "head").
- The embedding network phi is Table 4's LeNet for images LeNet can take; for any other input an
  MLP over the flattened input (token ids: an embedding, mean-pooled) with the one-hot label
  appended (kit/embednet.py).

Collapse gauge (every round, in the round's stats, persisted in RUN_DIR/metrics/rounds/):
`model.descriptor_spread` (spread of the normalized descriptors of the cohort) and
`model.model_spread` (spread of the generated models h(v_i)), see `hypernet.spread`; 0 = collapse.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from simfed.algorithms.base import Capabilities, PrivacySupport, Reply, ServerState, Task, Work
from simfed.algorithms.kit import embednet, models, partial, training
from simfed.algorithms.kit.embednet import (descriptor, descriptor_batch, embed_module, embed_values,  # noqa: F401
                                           norm_of, public_norm)
from simfed.algorithms.kit import hypernet as hn
from simfed.algorithms.kit.globalmodel import client_model
from simfed.algorithms.kit.models import flat_params, init_model, load_flat
from simfed.algorithms.kit.workload import FLOAT64, SCALAR, default_steps, model_bytes, tensor_bytes
from simfed.algorithms.registry import register
from simfed.core.errors import SimfedError
from simfed.core.seeds import derive_seed


PRIVACY_COVERS = ("the hypernetwork and the embedding network (every round's noised gradients); a client's "
                  "descriptor and generated model are computed from its own data when it needs them")


NO_LOCAL = ("its clients send descriptors and model updates un-noised, from which the server computes the "
            "hypernetwork's gradient; use mode = \"central\"")


@dataclass(frozen=True)
class PeFLLConfig(hn.GeneratedSGDFields):
    # PeFLL's code trains clients with pFedHN's local SGD settings but for these two
    batch_size: int = 32
    lr: float = 2e-3
    descriptor_batch: int = 32
    server_lr: float = 2e-4
    lambda_h: float = 1e-3
    lambda_v: float = 1e-3
    lambda_theta: float = 0.0
    server_clip: float = 50.0
    label_free: bool = False
    label_mask: bool = False
    eval_descriptor: str = "train"
    short_clients: str = "all"
    descriptor_norm: str = "first"
    decay: str = "decoupled"

    def __post_init__(self):
        super().__post_init__()
        if self.descriptor_batch < 1:
            raise ValueError("descriptor_batch must be >= 1")
        if self.server_lr <= 0 or min(self.lambda_h, self.lambda_v, self.lambda_theta) < 0:
            raise ValueError("server_lr must be > 0, lambda_h, lambda_v, lambda_theta >= 0")
        if self.eval_descriptor not in ("train", "batch"):
            raise ValueError(f"eval_descriptor must be 'train' or 'batch', got {self.eval_descriptor!r}")
        if self.short_clients not in ("all", "error"):
            raise ValueError(f"short_clients must be 'all' or 'error', got {self.short_clients!r}")
        if self.descriptor_norm not in ("first", "public", "none"):
            raise ValueError(f"descriptor_norm must be 'first', 'public' or 'none', got {self.descriptor_norm!r}")
        if self.decay not in ("decoupled", "none"):
            raise ValueError(f"decay must be 'decoupled' or 'none', got {self.decay!r}")


class PeFLLState(ServerState):
    def __init__(self, hnet, embed, opt):
        self.hnet, self.embed, self.opt = hnet, embed, opt
        self.norm = None      # (m, s) of the descriptor normalization once fixed (checkpointed)
        self._v: dict = {}    # round scratch: client id -> raw descriptor u_i
        self._dv: dict = {}   # client id -> d<h((u_i - m)/s), g_i>/du_i
        self._n_h = 0         # replies absorbed into eta_h's gradient this round
        self._v_eval: dict = {}


def normalized(state, u: torch.Tensor) -> torch.Tensor:
    """h's input: (u - m) / s once the normalization is fixed, else u."""
    if state.norm is None:
        return u
    m, s = state.norm
    return (u - m) / s


def fix_norm_(cfg, state) -> None:
    """Set (m, s) from the lowest client id's descriptor of the first training round that had one."""
    if cfg.descriptor_norm != "first" or state.norm is not None or not state._v:
        return
    state.norm = norm_of(state._v[min(state._v)])


@register
class PeFLL(hn.HyperNetMethod):
    name = "pefll"
    Config = PeFLLConfig
    summary = "PeFLL: embedding net + hypernetwork learn to produce client models (Scott et al. 2024)"
    # k SGD steps from h(v_i)
    capabilities = Capabilities(payloads=True, chunk_replies=frozenset({"model"}), partial="drop",
                                privacy=PrivacySupport(released=(("model", ("grad_h",)), ("embed", ("grad_v",))),
                                                       covers=PRIVACY_COVERS, no_local=NO_LOCAL))

    def work(self, phase, cfg, task, n_train) -> Work:
        """describe: phi down, u_i up; model: theta_i down, delta_i up (the SGD steps); embed: phi and
        du_i down, phi's gradient and a count up."""
        dim = hn.default_embed_dim(task, cfg.embed_dim)
        phi = tensor_bytes(embed_values(task, dim, not cfg.label_free))
        if phase == "describe":
            return Work(bytes_down=phi + SCALAR, bytes_up=tensor_bytes(dim))
        if phase == "embed":
            return Work(bytes_down=phi + SCALAR + tensor_bytes(dim), bytes_up=phi + FLOAT64)
        steps, samples = default_steps(cfg, n_train)
        model = model_bytes(task)
        return Work(samples=samples, steps=steps, bytes_down=model, bytes_up=model)

    def init(self, cfg, task: Task, seed: int) -> PeFLLState:
        hnet, dim = hn.build(cfg, task, seed, self.name)
        eseed = derive_seed(seed, "pefll-embed")
        embed = init_model(models.constructed(lambda: embednet.embed_net(task, dim, not cfg.label_free), eseed), eseed)
        opt = torch.optim.Adam(list(hnet.parameters()) + list(embed.parameters()), lr=cfg.server_lr)
        state = PeFLLState(hnet, embed, opt)
        if cfg.generate == "head":  # only then: "all" keeps the state (and checkpoints) of the paper's PeFLL
            state.body = partial.initial_body(task, seed, partial.split(task, "head")[1])
        if cfg.descriptor_norm == "public":
            state.norm = public_norm(embed, cfg, task, seed)
        return state

    def validate_privacy(self, cfg) -> None:
        if cfg.descriptor_norm == "first":
            raise SimfedError("[privacy] with pefll: descriptor_norm = \"first\" standardizes every descriptor by one "
                              "client's descriptor, a release no noise covers; set descriptor_norm = \"public\" (from "
                              "a seeded data-free batch) or \"none\"")
        if cfg.generate != "all":
            raise SimfedError(f"[privacy] with pefll: generate = \"{cfg.generate}\" shares a body whose summed "
                              "changes are released without clipping or noise; use generate = \"all\" (and a model "
                              "within max_generated) for a guarantee")

    def privacy_zeros(self, phase, cfg, state):
        if phase == "model":
            return {"grad_h": torch.zeros(sum(p.numel() for p in state.hnet.parameters()))}
        return {"grad_v": torch.zeros(sum(p.numel() for p in state.embed.parameters()))}

    def train_phases(self, cfg, state, round):
        return ("describe", "model", "embed")

    def eval_phases(self, cfg, state, cohort):
        return ("describe", "evaluate")

    # --- server --------------------------------------------------------------------------
    def broadcast(self, phase, cfg, state, info):
        if phase in ("describe", "embed"):
            return {"eta_v": flat_params(state.embed), "dim": state.hnet.mlp[0].in_features}
        return getattr(state, "body", None)  # model, evaluate: the shared body (generate = "head")

    def payloads(self, phase, cfg, state, client_ids, info):
        if phase in ("model", "evaluate"):
            store = state._v if info.mode == "train" else state._v_eval
            ids = [int(c) for c in client_ids if int(c) in store]
            if not ids:
                return {}
            return hn.generate(state.hnet, ids, [normalized(state, store[c]) for c in ids])
        if phase == "embed":
            return {int(c): state._dv[int(c)] for c in client_ids if int(c) in state._dv}
        return None

    def absorb(self, phase, cfg, state, client_id, item, info):
        if item is None:
            return
        cid = int(client_id)
        if phase == "describe":
            (state._v if info.mode == "train" else state._v_eval)[cid] = item.detach().float()
        elif phase == "model":
            lam = cfg.lambda_theta
            grad = (lambda out: item[None] + 2 * lam * out) if lam > 0 else item[None]
            x, terms = normalized(state, state._v[cid])[None], None
            if info.private:  # this client's term of eta_h's gradient, for the engine to clip and sum
                dv, flat = hn.vjp_flat(state.hnet, x, grad)
                dv, terms = dv[0], {"grad_h": flat}
            else:
                dv = hn.vjp_(state.hnet, x, grad)[0]
            # chain rule through v = (u - m) / s, m and s constants: du = dv / s
            state._dv[cid] = dv / state.norm[1] if state.norm is not None else dv
            state._n_h += 1
            return terms
        return None

    def finish(self, phase, cfg, state, sums, n_clients, info):
        if info.mode == "eval":
            if phase == "evaluate":
                state._v_eval = {}
            return None
        if phase == "describe":
            fix_norm_(cfg, state)
            return None
        if phase == "model":
            if info.private:  # the clipped terms' noised sum, over the fixed denominator in finish(embed)
                hn.load_grads_(list(state.hnet.parameters()), sums["grad_h"])
                state._n_h = int(float(sums["n"]))
            ids = sorted(state._v)  # sorted: the same float64 sums on serial and Ray
            inputs = [normalized(state, state._v[c]) for c in ids]
            out = {"descriptor_spread": hn.spread(inputs), "model_spread": hn.model_spread(state.hnet, inputs)}
            if hasattr(state, "body"):
                state.body, step = partial.body_step(state.body, sums, cfg.body_lr)
                out.update(step)
            return out
        n_h, n_v = state._n_h, int(float(sums.get("n", 0.0))) if sums else 0
        hparams, vparams = list(state.hnet.parameters()), list(state.embed.parameters())
        out = {"clients_h": float(n_h), "clients_v": float(n_v)}
        if n_h > 0:
            for p in hparams:
                p.grad = p.grad / n_h
            out["eta_h_grad_norm"] = hn.grad_norm_clip_(hparams, 0.0)
        else:
            for p in hparams:
                p.grad = None
        if n_v > 0:
            hn.load_grads_(vparams, sums["grad_v"].to(torch.float32) / n_v)
            out["eta_v_grad_norm"] = hn.grad_norm_clip_(vparams, 0.0)
        else:
            for p in vparams:
                p.grad = None
        if n_h or n_v:
            # one clip over eta_h and eta_v together, as the authors' clip_grad_norm_(joint.parameters(), 50)
            out["grad_norm"] = hn.grad_norm_clip_(hparams + vparams, cfg.server_clip)
            stepped = [(p, cfg.lambda_h if j < len(hparams) else cfg.lambda_v)
                       for j, p in enumerate(hparams + vparams) if p.grad is not None]
            state.opt.step()  # Adam skips parameters whose grad is None
            if cfg.decay == "decoupled":
                with torch.no_grad():
                    for p, lam in stepped:
                        if lam > 0:
                            p.mul_(1.0 - 2.0 * cfg.server_lr * lam)
        state.opt.zero_grad(set_to_none=True)
        state._v, state._dv, state._n_h = {}, {}, 0
        return out

    # --- client --------------------------------------------------------------------------
    def client(self, phase, cfg, bcast, payload, data, cstate, ctx) -> Reply:
        K = ctx.task.num_classes
        if phase == "describe":
            net = embed_module(ctx, cfg, bcast["dim"])
            load_flat(net, bcast["eta_v"])
            net.eval()
            with torch.no_grad():
                x, y = data.split("train")
                if ctx.mode == "eval" and cfg.eval_descriptor == "train":
                    if len(y) < 1:
                        raise SimfedError(f"pefll: client {ctx.client_id} has no training samples")
                    parts = [descriptor(net, cfg, x[s:s + 256], y[s:s + 256], K) * len(y[s:s + 256])
                             for s in range(0, len(y), 256)]
                    v = torch.stack(parts).sum(0) / len(y)
                else:
                    idx = descriptor_batch(cfg, data, ctx)
                    v = descriptor(net, cfg, x[idx], y[idx], K)
            return Reply(item=v)
        if payload is None:  # this client's earlier message was dropped: nothing to do
            return Reply()
        if phase == "embed":
            net = embed_module(ctx, cfg, bcast["dim"])
            load_flat(net, bcast["eta_v"])
            net.eval()
            x, y = data.split("train")
            idx = descriptor_batch(cfg, data, ctx)
            v = descriptor(net, cfg, x[idx], y[idx], K)
            grads = torch.autograd.grad(v, list(net.parameters()), grad_outputs=payload.to(v.dtype))
            flat = torch.cat([g.reshape(-1) for g in grads])
            return Reply(sums={"grad_v": flat, "n": torch.tensor(1.0, dtype=torch.float64)})
        model = client_model(ctx)
        if phase == "evaluate":
            load_flat(model, partial.theta(bcast, payload))
            mask = None
            if cfg.label_mask:
                mask = torch.bincount(data.split("train")[1], minlength=K)[:K] > 0
            return Reply(evals=training.evaluate_splits(model, data, class_mask=mask))
        n_body = 0 if bcast is None else bcast.numel()
        delta, seen, loss = hn.train_payload(model, cfg, partial.theta(bcast, payload), data, ctx)
        return Reply(item=delta[n_body:], sums=partial.body_sums(delta, n_body, float(data.n("train"))), n_train=seen,
                     train_loss=loss)

    def chunk_replies(self, phase, cfg, bcast, payloads, datas, cstates, ctxs) -> list[Reply]:
        """The model phase for a chunk of clients in one vectorized SGD run (hypernet.train_delta_chunk),
        each from its own theta_i = h(v_i); the replies equal `client`'s to rounding."""
        if phase != "model":
            return super().chunk_replies(phase, cfg, bcast, payloads, datas, cstates, ctxs)
        replies = [Reply() for _ in payloads]  # no payload: its descriptor was dropped
        model = client_model(ctxs[0])
        n_body = 0 if bcast is None else bcast.numel()
        thetas = [None if p is None else partial.theta(bcast, p) for p in payloads]
        for j, (delta, s, loss) in hn.train_payload_clients(model, cfg, thetas, datas, ctxs).items():
            replies[j] = Reply(item=delta[n_body:], sums=partial.body_sums(delta, n_body, float(datas[j].n("train"))),
                               n_train=s, train_loss=loss)
        return replies
