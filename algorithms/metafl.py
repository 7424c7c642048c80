"""Generalized meta-FL with nu-step fine-tuning (Jamali, Saber, Bae 2025, "A Generalized Meta Federated
Learning Framework with Theoretical Convergence Guarantees", arXiv 2504.21327) and Per-FedAvg.

Objective F(w) = mean_i f_i(phi_i^nu(w)) with phi^0 = w, phi^{k+1} = phi^k - alpha grad f_i(phi^k; D_k),
i.e. the loss of each client after nu plain SGD steps of size alpha from the shared model. The
training loop is the paper's FedAvg variant: each client runs `tau` local meta-steps
w <- w - beta g_i(w) and the server takes the sample-weighted average of the w_i (as a weighted
mean change applied with `server_lr`, which is the plain average at the default 1.0).
`perfedavg` is the nu = 1 case (Fallah, Mokhtari, Ozdaglar, NeurIPS 2020, arXiv 2002.07948).

From the papers: the nu-step meta-objective and the tau local meta-steps with the server average
(Jamali et al.'s FedAvg variant); first-order and Hessian-free approximations and the independent
Hessian batches (Per-FedAvg's Algorithm 1). The global model and the server step are the kit's
(kit/globalmodel.py). Ours, where the papers leave a choice open (config options, defaults in
brackets):
- `gradient` ["exact"]: exact = autograd Hessian-vector products applied right to left over the
  stored iterates, g <- g - alpha H(phi^k; D_k) g for k = nu-1..0 (functional.meta_gradient; memory
  linear in nu, no Hessian formed); "first_order" = grad f(phi^nu; D'); "hessian_free" = the same
  recursion with central finite-difference HVPs of step `hf_delta` [1e-3] (perturbation hf_delta * g).
- `hessian_batch` ["inner"; Per-FedAvg: "fresh"]: the Hessian at phi^k is taken on the batch D_k
  of that inner step (then "exact" is the true derivative of the sampled unrolled steps), or on an
  independent fresh batch D''_k, as in Per-FedAvg's Algorithm 1.
- Batches: every inner step, the outer gradient (and fresh Hessian batches) get their own batch of
  one stream per client and round (`ClientContext.generator("meta")`), drawn without replacement
  and reshuffled after each full pass over the client's train split. A client with fewer samples
  than one meta-step draws (samples_per_meta_step) thus reuses samples across the batches of that
  meta-step, and a batch larger than the client is cut to the client's size; `strict_batches`
  [false] makes such a client a SimfedError instead. A client with no train samples is always a
  SimfedError.
- Evaluation (seen and unseen clients alike): `eval_steps` [-1 = nu] SGD steps of size `eval_lr`
  [0 = alpha] and batch `eval_batch_size` [0 = batch_size] from the global model on the client's
  train split, then val/test (batches from `ClientContext.generator("finetune")`). Separate from
  nu so a nu = 1 model can be evaluated after 5 steps.
- A meta-step whose gradient is not finite ends the client's local loop; the client still returns
  its (non-finite) update, which the engine drops and counts.

[system] clock (ours): a client's local steps are its tau meta-steps. A straggler under
stragglers = "partial" takes the meta-steps it finishes by the deadline (`ClientContext.budget`)
and its update counts; FedBuff weights an update by 1/sqrt(1 + staleness).

Vectorized client step (ours; `engine.vectorize`): `chunk_replies` runs the tau meta-steps of a whole
chunk of clients at once (`vectorized_meta.meta_chunk_step`), for every `gradient` (exact,
first_order, hessian_free) and `hessian_batch`; its replies equal `client`'s to rounding (float64
tests: 1e-10). See that module for how each variant is expressed with torch.func.

[privacy] (docs/privacy.md) protects the global meta-model, the only release (Per-FedAvg too).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from simfed.algorithms.base import Capabilities, ClientContext, Reply, Work
from simfed.algorithms.kit.functional import BatchStream, loss_fn, meta_gradient
from simfed.algorithms.kit.globalmodel import GlobalModelMethod, client_model, finetune_reply, global_privacy, update_sums
from simfed.algorithms.kit.vectorized_meta import meta_chunk_step
from simfed.algorithms.kit.workload import lenet_bytes
from simfed.algorithms.registry import register
from simfed.core.errors import SimfedError

GRADIENTS = ("exact", "first_order", "hessian_free")
HESSIAN_BATCHES = ("inner", "fresh")


@dataclass(frozen=True)
class _MetaCommon:
    alpha: float = 0.05
    beta: float = 0.05
    tau: int = 10
    batch_size: int = 32
    outer_batch_size: int = 32
    gradient: str = "exact"
    hf_delta: float = 1e-3
    hessian_batch: str = "inner"
    eval_steps: int = -1
    eval_lr: float = 0.0
    eval_batch_size: int = 0
    server_lr: float = 1.0
    strict_batches: bool = False

    def __post_init__(self):
        if self.nu < 1:
            raise ValueError(f"nu must be >= 1 (fine-tuning steps in the meta-objective), got {self.nu}")
        if not self.alpha > 0 or not self.beta > 0 or not self.server_lr > 0:
            raise ValueError(f"alpha, beta and server_lr must be > 0, got {self.alpha}, {self.beta}, {self.server_lr}")
        if self.tau < 1 or self.batch_size < 1 or self.outer_batch_size < 1:
            raise ValueError("tau, batch_size and outer_batch_size must be >= 1")
        if self.gradient not in GRADIENTS:
            raise ValueError(f"gradient must be one of {', '.join(GRADIENTS)}, got {self.gradient!r}")
        if self.hessian_batch not in HESSIAN_BATCHES:
            raise ValueError(f"hessian_batch must be one of {', '.join(HESSIAN_BATCHES)}, got {self.hessian_batch!r}")
        if not self.hf_delta > 0:
            raise ValueError(f"hf_delta must be > 0, got {self.hf_delta}")
        if self.eval_steps < -1 or self.eval_lr < 0 or self.eval_batch_size < 0:
            raise ValueError("eval_steps must be >= 0 (or -1 for nu), eval_lr and eval_batch_size >= 0 (0 = default)")

    # Effective evaluation settings (the -1/0 sentinels mean "same as training").
    @property
    def ft_steps(self) -> int:
        return self.nu if self.eval_steps < 0 else self.eval_steps

    @property
    def ft_lr(self) -> float:
        return self.eval_lr or self.alpha

    @property
    def ft_batch_size(self) -> int:
        return self.eval_batch_size or self.batch_size

    def samples_per_meta_step(self, n: int | None = None) -> int:
        """Samples one meta-step draws (from a client of n samples: a batch takes at most n)."""
        def take(b: int) -> int:
            return b if n is None else min(b, n)

        fresh = self.nu * take(self.batch_size) if (self.hessian_batch == "fresh" and self.gradient != "first_order") else 0
        return self.nu * take(self.batch_size) + take(self.outer_batch_size) + fresh


@dataclass(frozen=True)
class MetaFLConfig(_MetaCommon):
    nu: int = 5


@dataclass(frozen=True)
class PerFedAvgConfig(_MetaCommon):
    gradient: str = "hessian_free"
    hessian_batch: str = "fresh"

    @property
    def nu(self) -> int:
        return 1


def meta_client_step(cfg, w: torch.Tensor, f, x: torch.Tensor, y: torch.Tensor,
                     gen: torch.Generator, budget: int | None = None) -> tuple[torch.Tensor, int, float]:
    """tau local meta-steps w <- w - beta g(w) on (x, y) (at most `budget`); returns (w_tau, samples
    used, mean outer loss f(phi^nu(w); D') over the steps taken, i.e. the meta-objective this client
    descends)."""
    stream = BatchStream(int(y.shape[0]), gen)
    second_order = cfg.gradient != "first_order"
    seen, losses = 0, []
    for _ in range(cfg.tau if budget is None else min(cfg.tau, budget)):
        inner = [stream.take(cfg.batch_size) for _ in range(cfg.nu)]
        outer = stream.take(cfg.outer_batch_size)
        hess = None
        if second_order and cfg.hessian_batch == "fresh":
            hess = [stream.take(cfg.batch_size) for _ in range(cfg.nu)]
        used = inner + [outer] + (hess or [])
        seen += sum(int(i.numel()) for i in used)
        g = meta_gradient(f, w, cfg.alpha, [(x[i], y[i]) for i in inner], (x[outer], y[outer]),
                          mode=cfg.gradient, hf_delta=cfg.hf_delta,
                          hessian=None if hess is None else [(x[i], y[i]) for i in hess], losses=losses)
        w = w - cfg.beta * g
        if not bool(torch.isfinite(g).all()):
            break  # further steps cannot recover; the engine drops this client's reply
    return w, seen, sum(losses) / max(len(losses), 1)


@register
class MetaFL(GlobalModelMethod):
    """The kit's global model and server step (weighted mean change); the client runs meta-steps."""

    name = "metafl"
    Config = MetaFLConfig
    summary = "Generalized meta-FL: FedAvg on the loss after nu fine-tuning steps (Jamali et al. 2025)"
    # the tau local meta-steps, every variant
    capabilities = Capabilities(chunk_replies=frozenset({"update"}), asynchronous=True, partial="steps",
                                privacy=global_privacy("the global meta-model (every round's noised mean update)"))

    def cost(self, cfg, n_train: int) -> float:
        return float(cfg.tau)  # tau meta-steps of fixed-size batches, whatever the client's size

    def work(self, phase, cfg, task, n_train) -> Work:
        model = lenet_bytes(task.input_shape, task.num_classes)
        n = int(n_train)
        return Work(samples=cfg.tau * cfg.samples_per_meta_step(n) if n > 0 else 0, steps=cfg.tau,
                    bytes_down=model, bytes_up=model + 8)

    def client(self, phase, cfg, bcast, payload, data, cstate, ctx: ClientContext) -> Reply:
        if ctx.mode == "eval":
            return finetune_reply(bcast, data, ctx, cfg.ft_steps, cfg.ft_lr, cfg.ft_batch_size)
        model = client_model(ctx)
        n = self._check(cfg, data)
        x, y = data.split("train")
        p = next(model.parameters())
        w0 = bcast.to(p.device, p.dtype)
        w, seen, loss = meta_client_step(cfg, w0, loss_fn(model), x.to(p.dtype), y, ctx.generator("meta"), ctx.budget)
        delta = (w0 - w).to(bcast.device, bcast.dtype)
        return Reply(sums=update_sums(delta, float(n), ctx.staleness), n_train=seen, train_loss=loss)

    def _check(self, cfg, data) -> int:
        """The client's train size, or a SimfedError for a client this config cannot train."""
        n = data.n("train")
        if n < 1:
            raise SimfedError(f"client {data.client_id} has no train samples; {self.name} needs at least one "
                              "(re-partition with a minimum client size)")
        need = cfg.samples_per_meta_step()
        if cfg.strict_batches and n < need:
            raise SimfedError(f"client {data.client_id} has {n} train samples but one meta-step of {self.name} "
                              f"uses {need} (nu={cfg.nu}); lower batch sizes or nu, or set strict_batches = false "
                              "to reuse samples across batches")
        return n

    def chunk_replies(self, phase, cfg, bcast, payloads, datas, cstates, ctxs) -> list[Reply]:
        """The training step for a chunk of clients as one vectorized meta-step loop
        (vectorized_meta.meta_chunk_step, every gradient variant); equal to `client` to rounding."""
        if ctxs[0].mode == "eval":  # fine-tuning is not vectorized: the per-client loop
            return super().chunk_replies(phase, cfg, bcast, payloads, datas, cstates, ctxs)
        ns = [self._check(cfg, d) for d in datas]
        model = client_model(ctxs[0])
        p = next(model.parameters())
        w0 = bcast.to(p.device, p.dtype)
        splits = [d.split("train") for d in datas]
        w, seen, losses = meta_chunk_step(cfg, model, w0, [x.to(p.dtype) for x, _ in splits], [y for _, y in splits],
                                          [c.generator("meta") for c in ctxs], [c.budget for c in ctxs])
        return [Reply(sums=update_sums((w0 - row).to(bcast.device, bcast.dtype), float(n), c.staleness), n_train=s,
                      train_loss=loss) for n, c, row, s, loss in zip(ns, ctxs, w, seen, losses)]


@register
class PerFedAvg(MetaFL):
    name = "perfedavg"
    Config = PerFedAvgConfig
    summary = "Per-FedAvg: MAML-style one-step meta-FL, FO/HF/exact (Fallah et al. 2020)"
