"""What the engine and the methods check of a model before any work, each refusal one line.

- `check_task`: the model builds for the task, maps a batch of the task's input to
  (batch, num_classes), has no buffers (simfed exchanges parameters only, so BatchNorm running
  statistics would be neither averaged nor kept; GroupNorm/LayerNorm, or BatchNorm with
  track_running_stats=False, have none) and no dropout (it draws from torch's global generator,
  which simfed never uses: runs would stop being reproducible).
- `needs_problem`: a method's declared `ModelNeeds` (a head, a chain of solvable layers).
- `head_modules` / `head_size`: the head (the model's `head` submodule, else its last Linear
  layers) whose parameters end the model's parameter order.
- `chain_tokens`: a Conv2d/ReLU/MaxPool2d/Flatten/Linear chain as the analytic methods' layer
  tokens ("conv5x16", "fc120", "fc").
- `vmap_problem`: why `torch.func.vmap` cannot train the model (nn.LSTM and the other RNN
  modules have no batching rule; a trial vmap(grad) on two one-sample clients catches the rest).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F
from torch.nn.modules.dropout import _DropoutNd

from simfed.algorithms.base import ModelNeeds, Task
from simfed.algorithms.kit.models.catalog import build
from simfed.core.errors import SimfedError


def dummy_input(task: Task, batch: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """A batch of zeros as `ClientData` hands the model the task's input (token ids are int64)."""
    dtype = torch.long if task.input == "tokens" else torch.float32
    return torch.zeros((batch, *task.input_shape), dtype=dtype, device=device)


def check_task(task: Task) -> nn.Module:
    """The task's model, built and checked (module docstring); SimfedError in one line otherwise."""
    name = task.model.name
    model = build(task)
    buffers = [n for n, _ in model.named_buffers()]
    if buffers:
        raise SimfedError(f"[model] {name} has buffers ({', '.join(buffers[:3])}{', ...' if len(buffers) > 3 else ''}); "
                          "simfed exchanges parameters only, so running statistics would be neither averaged nor "
                          "kept: use GroupNorm or LayerNorm, or BatchNorm with track_running_stats=False")
    drop = [n for n, m in model.named_modules() if isinstance(m, _DropoutNd)]
    if drop:
        raise SimfedError(f"[model] {name} has dropout ({drop[0]}), which draws from torch's global generator and "
                          "would make runs irreproducible; remove it")
    model.eval()
    try:
        with torch.no_grad():
            out = model(dummy_input(task, 2))
    except Exception as exc:
        raise SimfedError(f"[model] {name} fails on the store's input (a batch of shape "
                          f"{(2, *task.input_shape)}, {task.input}): {type(exc).__name__}: "
                          f"{' '.join(str(exc).split())}") from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, task.num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise SimfedError(f"[model] {name}: output {shape} for a batch of 2, but the store has {task.num_classes} "
                          f"classes, so it must be (2, {task.num_classes}); make the last layer's size the number "
                          "of classes (the factory gets the task: task.num_classes)")
    return model


def head_modules(model: nn.Module, layers: int = 1) -> list[nn.Module]:
    """The head: the model's `head` submodule (layers must be 1), else its last `layers` Linear
    layers; ValueError unless its parameters are the last of the model's and the body is non-empty."""
    named = getattr(model, "head", None)
    if isinstance(named, nn.Module):
        if layers != 1:
            raise ValueError(f"the model names its head (`head`); head_layers = {layers} applies only to models "
                             "without one, set it to 1")
        head = [named]
    else:
        with_params = [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]
        head = with_params[-layers:]
        if len(with_params) <= layers or not all(isinstance(m, nn.Linear) for m in head):
            kinds = ", ".join(type(m).__name__ for m in with_params[-4:])
            raise ValueError(f"the model (last layers: {kinds}) has no separable head of {layers} linear layer(s) "
                             "after a non-empty body; lower head_layers, name a `head` submodule or end the model with Linear layers")
    own = [p for m in head for p in m.parameters()]
    params = list(model.parameters())
    if not own or len(own) >= len(params) or any(p is not q for p, q in zip(own, params[-len(own):])):
        raise ValueError("the model's head parameters are not the last in its parameter order after a non-empty "
                         "body; register the head last")
    return head


def head_size(model: nn.Module, layers: int = 1) -> int:
    """Number of trailing flat values that form the head."""
    return sum(p.numel() for m in head_modules(model, layers) for p in m.parameters())


CHAIN_TYPES = (nn.Conv2d, nn.Linear, nn.ReLU, nn.MaxPool2d, nn.Flatten)


def _conv_token(m: nn.Conv2d) -> str:
    k = m.kernel_size
    if k[0] != k[1] or m.stride != (1, 1) or m.padding not in ((0, 0), "valid") or m.dilation != (1, 1) \
            or m.groups != 1:
        raise ValueError(f"Conv2d {tuple(k)} stride {m.stride} padding {m.padding}: the analytic layers are square "
                         "convolutions with stride 1, no padding, no dilation, one group")
    return f"conv{k[0]}x{m.out_channels}"


def chain_tokens(model: nn.Module) -> tuple[tuple[str, ...], int]:
    """(layer tokens, max-pool size after every convolution: 1 = none, 0 = no convolution) of a
    Conv2d/ReLU/MaxPool2d/Flatten/Linear chain, its leaf modules taken in registration order;
    ValueError naming the first layer that does not fit."""
    leaves = [m for m in model.modules() if not any(True for _ in m.children())]
    bad = [type(m).__name__ for m in leaves if not isinstance(m, CHAIN_TYPES)]
    if bad:
        raise ValueError(f"it has {bad[0]} layers; the analytic methods need a chain of Conv2d, ReLU, MaxPool2d, "
                         "Flatten and Linear layers")
    tokens, pools, i = [], set(), 0
    while i < len(leaves):
        m = leaves[i]
        i += 1
        if isinstance(m, nn.Flatten):
            continue
        if not isinstance(m, (nn.Conv2d, nn.Linear)):
            raise ValueError(f"{type(m).__name__} at position {i - 1} does not follow a Conv2d or Linear layer")
        last = i == len(leaves)
        if isinstance(m, nn.Linear) and last:
            tokens.append("fc")
            break
        if i >= len(leaves) or not isinstance(leaves[i], nn.ReLU):
            raise ValueError(f"every hidden Conv2d/Linear layer must be followed by ReLU (layer {len(tokens)})")
        i += 1
        if isinstance(m, nn.Conv2d):
            tokens.append(_conv_token(m))
            pool = leaves[i] if i < len(leaves) and isinstance(leaves[i], nn.MaxPool2d) else None
            pools.add(_pool_size(pool))
            i += pool is not None
        else:
            tokens.append(f"fc{m.out_features}")
    if not tokens or tokens[-1] != "fc":
        raise ValueError("the chain must end with a Linear layer (the head)")
    if len(pools) > 1:
        raise ValueError(f"every convolution must be followed by the same max-pooling, got sizes {sorted(pools)}")
    return tuple(tokens), (pools.pop() if pools else 0)


def _pool_size(pool: nn.MaxPool2d | None) -> int:
    if pool is None:
        return 1
    k, s = pool.kernel_size, pool.stride
    if not isinstance(k, int) or k != s or pool.padding != 0 or pool.dilation != 1 or pool.ceil_mode:
        raise ValueError(f"MaxPool2d({k}, stride {s}): the analytic layers pool k x k with stride k, no padding")
    return k


def needs_problem(needs: ModelNeeds, model: nn.Module) -> str | None:
    """Why the model does not meet a method's declared needs (None: it does)."""
    try:
        if needs.chain:
            chain_tokens(model)
        if needs.head:
            head_modules(model)
    except ValueError as exc:
        return str(exc)
    return None


def vmap_problem(model: nn.Module, task: Task) -> str | None:
    """Why `torch.func.vmap(grad(...))` cannot train this model (None: it can)."""
    rnn = [n for n, m in model.named_modules() if isinstance(m, nn.RNNBase)]
    if rnn:
        return f"{type(model.get_submodule(rnn[0])).__name__} ({rnn[0]}) has no vmap batching rule"
    if any(True for _ in model.buffers()):
        return "it has buffers (running statistics), which vmap cannot update per client"
    params = {k: torch.stack([v.detach()] * 2) for k, v in model.named_parameters()}
    x, y = dummy_input(task, 2)[:, None], torch.zeros((2, 1), dtype=torch.long)

    def loss(p, xb, yb):
        return F.cross_entropy(functional_call(model, p, (xb,)), yb)

    try:
        vmap(grad(loss))(params, x, y)
    except Exception as exc:
        return f"vmap(grad) fails on it: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
    return None
