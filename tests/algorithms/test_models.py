"""The model catalog (kit/models): the built-ins' shapes, seeded initialization that never touches
global RNG, user factories and entry points, and every check before a run, each one line."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from simfed.algorithms.base import ModelNeeds, ModelSpec, Task
from simfed.algorithms.kit import models, partial
from simfed.algorithms.kit.models import catalog
from simfed.core.errors import SimfedError
from simfed.partitions.shakespeare import ALL_LETTERS

CIFAR = Task((3, 32, 32), 10)
TEXT = Task((80,), 80, dtype="uint8", input="tokens", vocab=tuple(ALL_LETTERS))
FEATURES = Task((16,), 4, dtype="float32", input="raw")
USER = "tests.engine.user_models"


def with_model(task: Task, name: str, **keys) -> Task:
    return Task(task.input_shape, task.num_classes, dtype=task.dtype, input=task.input, vocab=task.vocab,
                model=models.parse_spec({"name": name, **keys}))


def one_line(exc) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


def test_resnet18_is_the_cifar_resnet18_with_groupnorm():
    m = models.build(with_model(CIFAR, "resnet18"))
    assert models.count(m) == 11_173_962  # the CIFAR ResNet-18's size for 10 classes
    convs = [x for x in m.modules() if isinstance(x, nn.Conv2d)]
    first = convs[0]
    assert first.kernel_size == (3, 3) and first.stride == (1, 1) and first.padding == (1, 1)
    assert not any(isinstance(x, (nn.MaxPool2d, nn.modules.batchnorm._BatchNorm)) for x in m.modules())
    assert sum(isinstance(x, nn.GroupNorm) for x in m.modules()) == len(convs)  # one norm per convolution
    assert len(convs) == 1 + 16 + 3  # stem, 8 blocks x 2, 3 projection shortcuts
    assert [x.out_channels for x in convs if x.kernel_size == (1, 1)] == [128, 256, 512]


def test_charlstm_is_leafs_shakespeare_model():
    m = models.build(with_model(TEXT, "charlstm"))
    assert m.embed.weight.shape == (80, 8) and (m.lstm.num_layers, m.lstm.hidden_size) == (2, 256)
    assert m.head.in_features == 256 and m.head.out_features == 80
    x = torch.randint(0, 80, (3, 80))
    assert m(x).shape == (3, 80)
    # the prediction reads the last step: changing the first characters changes it, so it sees the line
    y = x.clone()
    y[:, 0] = (y[:, 0] + 1) % 80
    assert not torch.equal(m(x), m(y))


def test_mlp_flattens_any_input_and_embeds_tokens():
    feats = models.build(with_model(FEATURES, "mlp", hidden=[7]))
    assert [type(x).__name__ for x in feats] == ["Flatten", "Linear", "ReLU", "Linear"]
    tokens = models.build(with_model(Task((12,), 4, input="tokens", vocab=tuple("abcdefghij")), "mlp", embed_dim=3))
    assert isinstance(tokens[0], nn.Embedding) and tokens[0].weight.shape == (10, 3)
    assert tokens[2].in_features == 12 * 3


def test_lenet_default_is_todays_network_and_initial_model():
    task = Task((1, 28, 28), 62)
    assert task.model == ModelSpec() == models.DEFAULT
    ref = models.lenet_for((1, 28, 28), 62)
    gen = torch.Generator().manual_seed(7)  # the initialization as it always was: Linear/Conv2d in order
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                b = 1.0 / math.sqrt(m.weight[0].numel())
                m.weight.copy_(torch.empty_like(m.weight).uniform_(-b, b, generator=gen))
                m.bias.copy_(torch.empty_like(m.bias).uniform_(-b, b, generator=gen))
    assert torch.equal(models.flat_params(models.initial(task, 7)), models.flat_params(ref))


@pytest.mark.parametrize("task", [with_model(CIFAR, "resnet18", width=4), with_model(TEXT, "charlstm", hidden=8),
                                  with_model(CIFAR, f"{USER}:small_cnn")], ids=["resnet18", "charlstm", "user"])
def test_initialization_is_seeded_and_leaves_global_rng_alone(task):
    before = torch.get_rng_state()
    a, b, c = (models.flat_params(models.initial(task, s)) for s in (3, 3, 4))
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_init_rules_per_layer_type():
    model = nn.Sequential(nn.Embedding(5, 3, padding_idx=0), nn.LSTM(3, 4), nn.GroupNorm(2, 4), nn.LayerNorm(4))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(9.0)
    models.init_model(model, 1)
    emb, lstm, gn, ln = model
    assert torch.equal(emb.weight[0], torch.zeros(3)) and emb.weight[1:].abs().max() < 9
    assert all(p.abs().max() <= 0.5 for p in lstm.parameters())  # U(-1/sqrt(4), 1/sqrt(4))
    for norm in (gn, ln):
        assert torch.equal(norm.weight, torch.ones(4)) and torch.equal(norm.bias, torch.zeros(4))


def test_user_factory_gets_the_task_and_its_keys():
    m = models.build(with_model(CIFAR, f"{USER}:small_cnn", channels=3, hidden=5))
    assert m[0].out_channels == 3 and m[4].out_features == 5 and m[-1].out_features == 10
    from tests.engine import user_models

    models.build(with_model(CIFAR, f"{USER}:record_keys", sizes=[3, 4], name_of="x", flag=True))
    assert user_models.SEEN_KEYS == {"sizes": (3, 4), "name_of": "x", "flag": True}  # TOML lists as tuples


def test_a_factory_in_the_current_directory_imports(tmp_path, monkeypatch):
    (tmp_path / "my_nets_here.py").write_text("from torch import nn\n"
                                              "def net(task):\n    return nn.Linear(16, task.num_classes)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p not in ("", ".", str(tmp_path))])
    assert models.check_task(with_model(FEATURES, "my_nets_here:net")).out_features == 4


def test_entry_point_names_a_factory(monkeypatch):
    catalog.factory.cache_clear()
    monkeypatch.setattr(catalog, "_entry_points", lambda: {"tiny": f"{USER}:small_cnn"})
    try:
        spec = models.parse_spec({"name": "tiny", "hidden": 4})
        assert models.build(Task((3, 32, 32), 10, model=spec))[4].out_features == 4
    finally:
        catalog.factory.cache_clear()


@pytest.mark.parametrize("table, needle", [
    ({"name": "resnet18", "depth": 50}, "unknown key(s) depth in [model] (resnet18) (did you mean 'width'?); valid keys: groups, width"),
    ({"name": "vgg"}, "is not a model; built-in: lenet, resnet18, mlp, charlstm"),
    ({"width": 4}, "name is missing"),
    ({"name": "mlp", "hidden": {"a": 1}}, "[model] hidden must be a number, string, boolean or list"),
])
def test_bad_model_tables_are_one_line(table, needle):
    with pytest.raises(SimfedError) as exc:
        models.parse_spec(table)
    assert needle in one_line(exc)


@pytest.mark.parametrize("factory, needle", [
    ("nowhere.at_all:f", "module 'nowhere.at_all' does not import (ModuleNotFoundError"),
    (f"{USER}:missing", "has no attribute 'missing'"),
    (f"{USER}:raises", "failed: RuntimeError: this factory always fails"),
    (f"{USER}:not_a_module", "the factory returned a str, not a torch.nn.Module"),
    (f"{USER}:wrong_classes", "output (2, 11) for a batch of 2, but the store has 10 classes"),
    (f"{USER}:with_batchnorm", "has buffers (1.running_mean, 1.running_var, 1.num_batches_tracked)"),
    (f"{USER}:with_dropout", "has dropout (1)"),
])
def test_model_checks_before_a_run_are_one_line(factory, needle):
    with pytest.raises(SimfedError) as exc:
        models.check_task(with_model(CIFAR, factory))
    assert needle in one_line(exc)


def test_batchnorm_without_running_statistics_is_accepted():
    assert isinstance(models.check_task(with_model(CIFAR, f"{USER}:stateless_batchnorm")), nn.Sequential)


def test_built_ins_refuse_inputs_they_cannot_take():
    with pytest.raises(SimfedError) as exc:
        models.check_task(with_model(TEXT, "resnet18"))
    assert "resnet18 needs (C, H, W) images" in one_line(exc)
    with pytest.raises(SimfedError) as exc:
        models.check_task(with_model(CIFAR, "charlstm"))
    assert "charlstm needs a sequence of token ids" in one_line(exc)


def test_heads_chains_and_vmap_of_the_built_ins():
    lenet, resnet = models.build(Task((1, 28, 28), 62)), models.build(with_model(CIFAR, "resnet18", width=4))
    lstm, mlp = models.build(with_model(TEXT, "charlstm", hidden=8)), models.build(with_model(FEATURES, "mlp"))
    assert models.head_modules(lenet) == [lenet.classifier[-1]] and models.head_modules(resnet) == [resnet.fc]
    assert models.head_modules(lstm) == [lstm.head] and models.head_size(mlp) == 200 * 4 + 4
    assert models.chain_tokens(lenet) == (("conv5x16", "conv5x32", "fc120", "fc84", "fc"), 2)
    assert models.chain_tokens(mlp) == (("fc200", "fc200", "fc"), 0)
    assert "GroupNorm" in models.needs_problem(ModelNeeds(chain=True), resnet)
    assert "Embedding" in models.needs_problem(ModelNeeds(chain=True), lstm)
    assert models.vmap_problem(resnet, with_model(CIFAR, "resnet18")) is None
    assert "LSTM (lstm) has no vmap batching rule" in models.vmap_problem(lstm, TEXT)


def test_hypernetwork_budget_and_generated_head():
    task = with_model(CIFAR, "resnet18")
    shapes, body = partial.split(task, "head")
    assert shapes == [("fc.weight", (10, 512)), ("fc.bias", (10,))] and body == 11_173_962 - 5130
    from simfed.algorithms.pefll import PeFLL, PeFLLConfig

    with pytest.raises(SimfedError) as exc:
        PeFLL().validate(PeFLLConfig(), task)
    msg = one_line(exc)
    assert "would generate 11,173,962 parameters" in msg and 'set generate = "head"' in msg
    PeFLL().validate(PeFLLConfig(generate="head"), task)
