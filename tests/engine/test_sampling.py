from simfed.engine.sampling import chunk_size, plan_chunks, sample_cohort


def test_cohort_depends_only_on_seed_and_round():
    ids = list(range(100))
    a = sample_cohort(7, 3, ids, 10)
    assert a == sample_cohort(7, 3, ids, 10)
    assert a != sample_cohort(7, 4, ids, 10)
    assert a != sample_cohort(8, 3, ids, 10)
    assert len(set(a)) == 10 and a == sorted(a)


def test_chunks_cut_the_cohort_in_order_costliest_first():
    sizes = {c: s for c, s in enumerate([500, 10, 10, 10, 10, 10, 400, 90, 5, 5])}
    chunks = plan_chunks(list(sizes), sizes, 3)
    assert chunks == [[0, 1, 2], [6, 7, 8], [3, 4, 5], [9]]
    assert sorted(c for ch in chunks for c in ch) == sorted(sizes)


def test_chunk_size_ignores_the_pool():
    assert chunk_size(1000) <= 64 and chunk_size(64) == 1 and chunk_size(3) == 1
    assert chunk_size(100, 7) == 7
    assert len(plan_chunks(range(3597), {})) <= 64


def test_equal_cost_clients_cost_the_same_whatever_their_size():
    from simfed.algorithms import registry
    from simfed.core.config import config_from_dict

    algo = registry.get("fedavg")
    cfg = config_from_dict(algo.Config, {"local_steps": 20})
    assert algo.cost(cfg, 600) == algo.cost(cfg, 30)  # 20 local steps each: equal work per client
    epochs = config_from_dict(algo.Config, {"local_epochs": 1.0})
    assert algo.cost(epochs, 600) > algo.cost(epochs, 30)  # one epoch: work follows data
