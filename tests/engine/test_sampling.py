from simfed.engine.sampling import assign, chunk_size, sample_cohort


def test_cohort_depends_only_on_seed_and_round():
    ids = list(range(100))
    a = sample_cohort(7, 3, ids, 10)
    assert a == sample_cohort(7, 3, ids, 10)
    assert a != sample_cohort(7, 4, ids, 10)
    assert a != sample_cohort(8, 3, ids, 10)
    assert len(set(a)) == 10 and a == sorted(a)


def test_assignment_is_size_aware_and_deterministic():
    sizes = {c: s for c, s in enumerate([500, 10, 10, 10, 10, 10, 400, 90, 5, 5])}
    parts = assign(list(sizes), sizes, 2)
    assert parts == assign(list(reversed(list(sizes))), sizes, 2)  # input order does not matter
    loads = [sum(sizes[c] for c in p) for p in parts]
    assert sorted(c for p in parts for c in p) == sorted(sizes)
    # Greedy largest-first keeps the two loads within the largest remaining item of each other.
    assert abs(loads[0] - loads[1]) <= 90
    assert parts[0][0] == 0 and parts[1][0] == 6  # the two largest go to different workers


def test_chunk_size_bounds():
    assert chunk_size(1000, 2, 0) <= 64
    assert chunk_size(3, 2, 0) == 1
    assert chunk_size(100, 2, 7) == 7



def test_equal_cost_clients_split_evenly_whatever_their_size():
    from simfed.algorithms import registry
    from simfed.algorithms.base import config_from_dict

    algo = registry.get("fedavg")
    cfg = config_from_dict(algo.Config, {"local_steps": 20})
    n_train = {c: (600 if c < 10 else 30) for c in range(40)}  # 10 big writers, 30 small ones
    costs = {c: algo.cost(cfg, n) for c, n in n_train.items()}
    parts = assign(list(costs), costs, 2)
    assert [len(p) for p in parts] == [20, 20]  # 20 local steps each: equal work per client
    epochs = config_from_dict(algo.Config, {"local_epochs": 1.0})
    assert algo.cost(epochs, 600) > algo.cost(epochs, 30)  # one epoch: work follows data
