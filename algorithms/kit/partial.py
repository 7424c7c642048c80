"""Which client parameters a hypernetwork generates, and the shared body when it generates only some.

pFedHN, PeFLL and FMLH generate every parameter of the client model in their papers. The
hypernetwork's output layer then holds hidden x (client parameters) weights: 100 x 90k for the
LeNet, hopeless for ResNet-18 (100 x 11.2M). So every hypernetwork method has a budget,
`max_generated` [2,000,000 parameters per client], checked before any work, and pFedHN and PeFLL
offer, as our extension (not in the papers), `generate`:

- "all" (default): every parameter, as the papers;
- "head": only the model's head (its `head` submodule, else its last Linear layer; its parameters
  must come last). The body is one shared vector on the server, broadcast with the round and moved
  FedAvg-style: each client trains the whole model from (body, h(v_i)), the head's change goes back
  through the hypernetwork as before, and the body's change is summed weighted by the client's train
  samples; the server steps body -= body_lr x (weighted mean change), body_lr [1.0] = the plain
  average, as FedAvg.
- "body" (pFedHN only: the paper's pFedHN-PC): everything but the head; each client keeps its own
  head as client state (kit/personalhead.py), nothing is shared.

The flat client vector is (body, head) in the model's parameter order; `split` gives the generated
tensors' shapes and the length of the shared body ("head" only, else 0).
"""

from __future__ import annotations

import functools

import torch

from simfed.algorithms.base import Task
from simfed.algorithms.kit import models
from simfed.core.errors import SimfedError

def split(task: Task, generate: str) -> tuple[list[tuple[str, tuple[int, ...]]], int]:
    """(names and shapes of the generated tensors, length of the shared body's flat vector: the body
    under "head", 0 under "all" and "body", where the server shares no vector)."""
    model = models.build(task)
    shapes = [(n, tuple(s)) for n, s in models.param_shapes(model)]
    if generate == "all":
        return shapes, 0
    try:
        n_head = sum(1 for m in models.head_modules(model) for _ in m.parameters())
    except ValueError as exc:
        raise SimfedError(f"[algorithm] generate = \"{generate}\": {exc}") from None
    if generate == "body":
        return shapes[:-n_head], 0
    body = sum(p.numel() for p in list(model.parameters())[:-n_head])
    return shapes[-n_head:], body


@functools.lru_cache(maxsize=32)
def generated_values(task: Task, generate: str) -> int:
    """How many values the hypernetwork generates per client."""
    return sum(torch.Size(s).numel() for _, s in split(task, generate)[0])


def check_budget(cfg, task: Task, method: str, alternative: str) -> None:
    """SimfedError in one line when the generated parameters exceed `cfg.max_generated`;
    `alternative` names what would work (an option of the method, or another method)."""
    generate = getattr(cfg, "generate", "all")
    shapes, _ = split(task, generate)
    n = sum(torch.Size(s).numel() for _, s in shapes)
    if n > cfg.max_generated:
        raise SimfedError(
            f"[algorithm] {method}: generate = \"{generate}\" would generate {n:,} parameters per client with "
            f"[model] {task.model.name}, above max_generated = {cfg.max_generated:,} (the hypernetwork's output "
            f"layer alone would hold {cfg.hidden} x {n:,} weights); {alternative}")


def initial_body(task: Task, seed: int, n_body: int) -> torch.Tensor:
    """The shared body's initial flat vector: the body of the run's initial model."""
    return models.flat_params(models.initial(task, seed))[:n_body].clone()


def theta(body: torch.Tensor | None, generated: torch.Tensor) -> torch.Tensor:
    """A client's flat model: the generated vector, after the shared body when there is one."""
    return generated if body is None else torch.cat([body.to(generated.device, generated.dtype), generated])


def body_sums(delta: torch.Tensor, n_body: int, n: float) -> dict[str, torch.Tensor] | None:
    """The summable body reply {delta_body * n, n} (FedAvg's weighting), None without a body."""
    if n_body == 0:
        return None
    return {"delta": delta[:n_body] * n, "n": torch.tensor(n, dtype=torch.float64)}


def body_step(body: torch.Tensor, sums, rate: float) -> tuple[torch.Tensor, dict[str, float]]:
    """body - rate x (weighted mean change), and the step's norm (`body_update_norm`)."""
    if not sums or "n" not in sums or float(sums["n"]) <= 0:
        return body, {}
    step = sums["delta"] / float(sums["n"])
    return body - rate * step.to(body.dtype), {"body_update_norm": float(step.norm())}
