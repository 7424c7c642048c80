"""pFedHN with generate = "body" (pFedHN-PC): the hypernetwork generates the body, each client keeps
its own seeded head as client state; bad values and an over-budget body are refused in one line."""

from __future__ import annotations

import pytest
import torch

from simfed.algorithms.base import RoundInfo, Task
from simfed.algorithms.kit import hypernet as hn
from simfed.algorithms.kit import models, partial, personalhead
from simfed.algorithms.pfedhn import PFedHN, PFedHNConfig
from simfed.core.config import config_from_dict
from simfed.core.errors import SimfedError

from clients import context_maker, make_clients

TASK = Task(input_shape=(1, 16, 16), num_classes=4)
SEED = 3
CFG = PFedHNConfig(generate="body", embed_dim=5, hidden=16, n_hidden=2, local_steps=3, batch_size=8, lr=0.05,
                   unseen_exchanges=2, unseen_head_steps=3)
N_HEAD = 84 * 4 + 4  # the LeNet's last Linear layer


def maker(clients, round_=0, mode="train", cohort="seen"):
    return context_maker(clients, TASK, SEED, round_, mode, cohort)


def one_line(exc) -> str:
    msg = str(exc.value)
    assert "\n" not in msg, msg
    return msg


@pytest.mark.parametrize("value", ["bodies", "", "Body"])
def test_bad_generate_values_are_refused_in_one_line(value):
    with pytest.raises(SimfedError) as exc:
        config_from_dict(PFedHNConfig, {"generate": value})
    assert "generate must be one of 'all', 'head', 'body'" in one_line(exc)


def test_body_is_pfedhns_only():
    from simfed.algorithms.pefll import PeFLLConfig

    with pytest.raises(SimfedError) as exc:
        config_from_dict(PeFLLConfig, {"generate": "body"})
    assert "generate must be one of 'all', 'head', got 'body'" in one_line(exc)


def test_an_over_budget_body_is_refused_before_any_work():
    task = Task((3, 32, 32), 10, model=models.parse_spec({"name": "resnet18"}))
    with pytest.raises(SimfedError) as exc:
        PFedHN().validate(PFedHNConfig(generate="body"), task)
    msg = one_line(exc)
    assert 'generate = "body" would generate 11,168,832 parameters' in msg and 'set generate = "head"' in msg
    shapes, shared = partial.split(TASK, "body")
    assert shared == 0 and shapes[-1][1] == (84,)  # the body ends with the 84-wide layer's bias
    assert partial.generated_values(TASK, "body") + N_HEAD == models.count(models.build(TASK))


def test_heads_are_seeded_per_client_kept_as_state_and_persist_across_rounds():
    algo, clients = PFedHN(), make_clients([20, 24, 16], two_classes=True, patterns=True)
    state = algo.init(CFG, TASK, SEED)
    model = models.build(TASK)
    seeded = [personalhead.seeded_head(model, SEED, c) for c in range(3)]
    assert torch.equal(seeded[0], personalhead.seeded_head(models.build(TASK), SEED, 0))  # (seed, client) only
    assert not torch.equal(seeded[0], seeded[1]) and seeded[0].shape == (N_HEAD,)
    cst: dict = {}
    per = algo.payloads("train", CFG, state, [0], RoundInfo(round=0, seed=SEED))
    assert per[0].shape == (models.count(model) - N_HEAD,)  # only the body is generated
    hn.serial_phase(algo, "train", CFG, state, [0, 1, 2], RoundInfo(round=0, seed=SEED), maker(clients), cstates=cst)
    assert sorted(cst) == [0, 1, 2] and all(set(s) == {"head", "momentum"} for s in cst.values())
    heads = [cst[c]["head"] for c in range(3)]
    assert not torch.equal(heads[0], heads[1]) and not torch.equal(heads[1], heads[2])
    assert all(not torch.equal(heads[c], seeded[c]) for c in range(3))  # trained in the local steps
    after1 = {c: {k: v.clone() for k, v in s.items()} for c, s in cst.items()}
    # round 2: only client 0; client 1's head is untouched, client 0's continues from its own
    hn.serial_phase(algo, "train", CFG, state, [0], RoundInfo(round=1, seed=SEED), maker(clients, round_=1),
                    cstates=cst)
    assert torch.equal(cst[1]["head"], after1[1]["head"]) and not torch.equal(cst[0]["head"], after1[0]["head"])
    per = algo.payloads("train", CFG, state, [0], RoundInfo(round=1, seed=SEED))
    data, ctx = maker(clients, round_=1)(0, "train")
    fresh = algo.client("train", CFG, None, per[0], data, None, ctx)  # as if client 0 had no head yet
    assert not torch.equal(fresh.state["head"], cst[0]["head"])
    assert fresh.item.shape == per[0].shape  # the body's change goes back; the head never leaves


def test_seen_clients_are_evaluated_with_their_own_head_and_new_clients_get_a_fitted_one():
    algo, clients = PFedHN(), make_clients([20, 24, 16, 12], two_classes=True, patterns=True)
    state = algo.init(CFG, TASK, SEED)
    cst: dict = {}
    hn.serial_phase(algo, "train", CFG, state, [0, 1], RoundInfo(round=0, seed=SEED), maker(clients), cstates=cst)
    info = RoundInfo(round=0, seed=SEED, mode="eval")
    _, own = hn.serial_phase(algo, "evaluate", CFG, state, [0], info, maker(clients, mode="eval"), cstates=cst)
    _, none = hn.serial_phase(algo, "evaluate", CFG, state, [0], info, maker(clients, mode="eval"), cstates={})
    assert own[0]["test"].loss_sum != none[0]["test"].loss_sum
    unseen = RoundInfo(round=0, seed=SEED, mode="eval", cohort="unseen")
    assert tuple(algo.eval_phases(CFG, state, "unseen")) == ("fit0", "fit1", "evaluate")
    runs = []
    for _ in range(2):
        for phase in algo.eval_phases(CFG, state, "unseen"):
            make = maker(clients, mode="eval", cohort="unseen")
            _, evals = hn.serial_phase(algo, phase, CFG, state, [3], unseen, make)
        runs.append(evals[3]["test"])
        assert state._unseen == {}  # evaluation scratch, cleared
    assert runs[0] == runs[1]  # seeded: the same fit twice


def test_only_body_keeps_client_state_so_only_body_needs_shared_storage(monkeypatch):
    from types import SimpleNamespace

    from simfed.algorithms import registry
    from simfed.engine import shared

    pfedhn = registry.get("pfedhn")
    assert [pfedhn.keeps_client_state(PFedHNConfig(generate=g)) for g in ("all", "head", "body")] == [False, False, True]
    assert registry.get("fedrep").keeps_client_state(registry.get("fedrep").Config())
    assert not registry.get("fedavg").keeps_client_state(registry.get("fedavg").Config())
    # A two-node cluster without engine.storage: "body" is refused in one line before any node is asked.
    monkeypatch.setattr(shared, "_live_nodes", lambda: [{"NodeID": "a"}, {"NodeID": "b"}])
    asked = []
    monkeypatch.setattr(shared, "store_digest", lambda path: asked.append(path) or "d")
    monkeypatch.setattr(shared, "_ask_every_node", lambda nodes, *a: [("d", True) for _ in nodes])

    def exp(generate):
        return SimpleNamespace(algorithm="pfedhn", algorithm_config=PFedHNConfig(generate=generate),
                               engine=SimpleNamespace(storage=""))

    with pytest.raises(SimfedError) as err:
        shared.check_nodes(exp("body"), "/store")
    assert "\n" not in str(err.value) and not asked
    shared.check_nodes(exp("all"), "/store")  # no storage needed: the store check alone runs
    assert asked == ["/store"]
