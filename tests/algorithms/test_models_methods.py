"""What the methods do with a model other than the LeNet: the analytic methods' layers derived from a
chain (and every disagreement refused), pFedHN's shared body under generate = "head" stepped as
FedAvg steps its model, and PeFLL's embedding network for token input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from simfed.algorithms.base import ClientContext, ClientData, RoundInfo, Task
from simfed.algorithms.fedacnnl import FedACnnL, FedACnnLConfig
from simfed.algorithms.kit import acnnl, embednet, models, partial
from simfed.algorithms.pfedhn import PFedHN, PFedHNConfig
from simfed.core.config import config_from_dict
from simfed.core.errors import SimfedError

USER = "tests.engine.user_models"


def task(name, shape=(3, 12, 12), classes=4, **keys):
    return Task(shape, classes, model=models.parse_spec({"name": name, **keys}))


def test_analytic_layers_come_from_the_models_chain():
    user = task(f"{USER}:small_cnn", channels=5, hidden=7)
    cfg = FedACnnLConfig()
    assert acnnl.tokens(cfg, user) == ("conv3x5", "fc7", "fc")
    FedACnnL().validate(cfg, user)
    # the same geometry as the default model with those layers written out
    same = config_from_dict(FedACnnLConfig, {"layers": ["conv3x5", "fc7", "fc"]})
    assert acnnl.geometry(cfg, user) == acnnl.geometry(same, Task((3, 12, 12), 4))
    assert acnnl.tokens(same, Task((1, 28, 28), 62)) == ("conv3x5", "fc7", "fc")  # no [model]: layers rule


@pytest.mark.parametrize("keys, model, needle", [
    ({"layers": ["conv5x16", "fc"]}, f"{USER}:small_cnn", "remove layers"),
    ({"pool": 3}, f"{USER}:small_cnn", "max-pools 2x2 after its convolutions; set pool = 2"),
    ({"activation": "tanh"}, f"{USER}:small_cnn", 'uses ReLU; set activation = "relu"'),
    ({}, f"{USER}:Shuffled", "does not run its layers in registration order"),
])
def test_analytic_methods_refuse_a_model_that_disagrees(keys, model, needle):
    with pytest.raises(SimfedError) as exc:
        FedACnnL().validate(config_from_dict(FedACnnLConfig, keys), task(model))
    assert needle in str(exc.value) and "\n" not in str(exc.value)


def client(cid: int, t: Task, n: int = 12):
    rng = np.random.default_rng(cid)
    x = rng.normal(size=(n, *t.input_shape)).astype(np.float32)
    y = rng.integers(0, t.num_classes, n)
    data = ClientData(cid, "seen", reader=lambda c, split: (x, y) if split == "train" else (x[:0], y[:0]),
                      counts={"train": n, "val": 0, "test": 0}, input="raw")
    ctx = ClientContext(client_id=cid, cohort="seen", round=0, seed=1, phase="train", mode="train", task=t)
    return data, ctx


def test_generated_head_shares_a_body_moved_as_fedavg_moves_its_model():
    t = Task((10,), 3, input="raw", model=models.parse_spec({"name": "mlp", "hidden": [6]}))
    algo, cfg = PFedHN(), PFedHNConfig(generate="head", hidden=8, embed_dim=2, local_steps=3, batch_size=4,
                                       body_lr=0.5)
    state = algo.init(cfg, t, seed=2)
    _, n_body = partial.split(t, "head")
    assert state.body.shape == (n_body,) == (10 * 6 + 6,) and not hasattr(algo.init(PFedHNConfig(), t, 2), "body")
    info = RoundInfo(round=0, seed=2)
    body0, bcast = state.body.clone(), algo.broadcast("train", cfg, state, info)
    per = algo.payloads("train", cfg, state, [0, 1, 2], info)
    assert all(p.shape == (6 * 3 + 3,) for p in per.values())  # only the head is generated
    sums, deltas, weights = {}, [], []
    for cid in (0, 1, 2):
        data, ctx = client(cid, t, n=8 + 4 * cid)
        r = algo.client("train", cfg, bcast, per[cid], data, None, ctx)
        algo.absorb("train", cfg, state, cid, r.item, info)
        deltas.append(r.sums["delta"] / r.sums["n"])
        weights.append(float(r.sums["n"]))
        sums = {k: sums.get(k, 0) + v for k, v in r.sums.items()}
    algo.finish("train", cfg, state, sums, 3, info)
    mean = sum(w * d for w, d in zip(weights, deltas)) / sum(weights)
    assert torch.allclose(state.body, body0 - 0.5 * mean, atol=1e-6)


def test_pefll_embedding_net_for_tokens_and_images():
    text = Task((20,), 5, input="tokens", vocab=tuple("abcdefgh"))
    net = embednet.embed_net(text, dim=3, use_labels=True)
    assert isinstance(net, embednet.DescriptorMLP) and net.embed.weight.shape == (8, embednet.TOKEN_DIM)
    x, y = torch.randint(0, 8, (6, 20)), torch.randint(0, 5, (6,))
    assert embednet.phi(net, x, y, 5).shape == (6, 3)
    # mean-pooled over positions: the same tokens in another order give the same descriptor
    assert torch.allclose(embednet.phi(net, x.flip(1), y, 5), embednet.phi(net, x, y, 5), atol=1e-6)
    image = embednet.embed_net(Task((3, 32, 32), 10), dim=4, use_labels=True)
    assert isinstance(image, models.LeNet) and image.features[0].in_channels == 3 + 10


def test_pefll_refuses_privacy_when_it_shares_a_body():
    from simfed.algorithms.pefll import PeFLL, PeFLLConfig

    PeFLL().validate_privacy(PeFLLConfig(descriptor_norm="public"))  # generate = "all": the paper's release
    with pytest.raises(SimfedError) as exc:
        PeFLL().validate_privacy(PeFLLConfig(descriptor_norm="public", generate="head"))
    assert "\n" not in str(exc.value) and 'generate = "head" shares a body' in str(exc.value)


def test_pefll_public_norm_takes_token_ids():
    from simfed.algorithms.pefll import PeFLLConfig, public_norm

    t = Task((80,), 80, input="tokens", vocab=tuple(chr(32 + i) for i in range(80)), model=models.parse_spec(
        {"name": "charlstm", "hidden": 8}))
    embed = embednet.embed_net(t, 4, True)
    m, s = public_norm(embed, PeFLLConfig(descriptor_batch=8), t, 0)
    assert torch.isfinite(m).all() and torch.isfinite(s).all()  # float noise would not index an embedding
