"""kit.sgd.SGD: torch.optim.SGD's numbers exactly, without importing torch._dynamo."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from simfed.algorithms.kit.sgd import SGD
from tests.imports import modules_loaded_by


def _net(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3), nn.Linear(3, 3)).to(dtype)


def _train(model: nn.Module, make_opt, steps: int = 7, frozen: int | None = None) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    opt = make_opt(model.parameters())
    p0 = next(model.parameters())
    for _ in range(steps):
        x = torch.randn(8, 6, generator=gen).to(p0.device, p0.dtype)
        y = torch.randint(0, 3, (8,), generator=gen).to(p0.device)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if frozen is not None:  # a parameter without a gradient is skipped, its buffer untouched
            model[frozen].weight.grad = None
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("momentum,weight_decay", [(0.0, 0.0), (0.9, 0.0), (0.5, 1e-3), (0.0, 5e-4)])
@pytest.mark.parametrize("frozen", [None, 2])
def test_the_same_parameters_as_torch_optim_sgd_bit_for_bit(dtype, momentum, weight_decay, frozen):
    kw = dict(lr=0.3, momentum=momentum, weight_decay=weight_decay)
    ours = _train(_net(dtype), lambda ps: SGD(ps, **kw), frozen=frozen)
    theirs = _train(_net(dtype), lambda ps: torch.optim.SGD(ps, **kw), frozen=frozen)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    assert not torch.equal(ours[0], _net(dtype)[0].weight)  # it did train


def test_a_saved_momentum_buffer_continues_as_torch_optim_sgd_would():
    kw = dict(lr=0.1, momentum=0.9)
    model, ref = _net(torch.float32), _net(torch.float32)
    first, second = SGD(model.parameters(), **kw), torch.optim.SGD(ref.parameters(), **kw)
    for opt, net in ((first, model), (second, ref)):
        net(torch.ones(2, 6)).sum().backward()
        opt.step()
    resumed = SGD(model.parameters(), **kw)  # a new optimizer, as the next round's, given the buffers
    for p in model.parameters():
        resumed.state[p] = {"momentum_buffer": first.state[p]["momentum_buffer"].clone()}
    for opt, net in ((resumed, model), (second, ref)):
        opt.zero_grad()
        net(torch.full((2, 6), 0.5)).sum().backward()
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters()))
    assert all(torch.equal(resumed.state[p]["momentum_buffer"], second.state[q]["momentum_buffer"])
               for p, q in zip(model.parameters(), ref.parameters()))


def test_client_training_never_imports_torch_dynamo():
    # The point of the class: torch.optim's Optimizer imports torch._dynamo (about 1 s) on first use,
    # in every worker process. Local training, with momentum, weight decay and a clip, must not.
    code = ("import torch; from torch import nn; from simfed.algorithms.kit import training\n"
            "m = nn.Sequential(nn.Flatten(), nn.Linear(4, 3)); x, y = torch.randn(20, 4), torch.randint(0, 3, (20,))\n"
            "training.sgd_train(m, x, y, steps=3, batch_size=8, lr=0.1, gen=torch.Generator(), momentum=0.9,\n"
            "                   weight_decay=1e-3, clip=1.0)")
    assert modules_loaded_by(code, ("torch", "torch._dynamo")) == ["torch"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (GPU machines only; CI has none)")
@pytest.mark.parametrize("momentum,weight_decay", [(0.0, 0.0), (0.9, 1e-3)])
def test_on_cuda_the_same_parameters_as_torch_optim_sgd_bit_for_bit(momentum, weight_decay):
    # On CUDA torch picks its foreach kernels for both: the same choice, the same numbers.
    kw = dict(lr=0.3, momentum=momentum, weight_decay=weight_decay)
    ours = _train(_net(torch.float32).cuda(), lambda ps: SGD(ps, **kw), frozen=2)
    theirs = _train(_net(torch.float32).cuda(), lambda ps: torch.optim.SGD(ps, **kw), frozen=2)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
