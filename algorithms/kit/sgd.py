"""SGD for client training, without torch.optim's Optimizer class.

Every method of torch.optim.Optimizer (the constructor's add_param_group, zero_grad, step) is
wrapped by torch._disable_dynamo, whose first call imports torch._dynamo: about 1 s of CPU in
each worker process before its first step (0.97 s measured here with torch 2.13), paid by every
launch and every sweep trial while the pool starts. Client training uses none of what the class
adds (parameter groups, hooks, state_dict), so `SGD` keeps the momentum buffers itself and calls
`torch.optim.sgd.sgd`, the functional form that `torch.optim.SGD.step` itself calls, with the
arguments `step` would pass: the same kernels (per tensor on the CPU, foreach on CUDA) and the
same numbers, compared with == in tests/algorithms/test_sgd.py.

Ours, not from a paper.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable

import torch
from torch.optim.sgd import sgd as _functional_sgd


class SGD:
    """torch.optim.SGD's update (dampening 0, no Nesterov, no maximize) for `params`.

    `state` maps a parameter to {"momentum_buffer": tensor} as torch.optim's does, so a caller
    can save and restore a buffer (kit.personalhead keeps the head's between rounds)."""

    def __init__(self, params: Iterable[torch.Tensor], lr: float, momentum: float = 0.0,
                 weight_decay: float = 0.0):
        self.params = list(params)
        self.lr, self.momentum, self.weight_decay = float(lr), float(momentum), float(weight_decay)
        self.state: defaultdict[torch.Tensor, dict] = defaultdict(dict)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        # As torch.optim.SGD._init_group: parameters without a gradient are skipped, and the buffer
        # list is filled only under momentum (the foreach path groups it with the parameters).
        params = [p for p in self.params if p.grad is not None]
        grads = [p.grad for p in params]
        buffers = [self.state.get(p, {}).get("momentum_buffer") for p in params] if self.momentum != 0 else []
        _functional_sgd(params, grads, buffers, has_sparse_grad=any(g.is_sparse for g in grads),
                        weight_decay=self.weight_decay, momentum=self.momentum, lr=self.lr, dampening=0.0,
                        nesterov=False, maximize=False)
        if self.momentum != 0:
            for p, buf in zip(params, buffers):
                self.state[p]["momentum_buffer"] = buf
