"""Local training loops: what an epoch means."""

import torch
from torch import nn

from simfed.algorithms.kit import training


def test_one_epoch_trains_every_sample_exactly_once_with_a_partial_last_batch():
    idx = list(training.batches(227, 32, steps=99, gen=torch.Generator().manual_seed(0), epochs=1.0))
    assert [len(b) for b in idx] == [32] * 7 + [3]  # ceil(227/32) batches, the last one partial
    seen = torch.cat(idx)
    assert sorted(seen.tolist()) == list(range(227))  # once each, shuffled
    assert seen.tolist() != list(range(227))


def test_epochs_count_passes_and_steps_stay_steps():
    counts = torch.bincount(torch.cat(list(training.batches(50, 8, 0, torch.Generator().manual_seed(1), 2.5))),
                            minlength=50)
    assert int(counts.sum()) == 125 and counts.min() >= 2 and counts.max() <= 3
    steps = list(training.batches(50, 8, 9, torch.Generator().manual_seed(1)))
    assert len(steps) == 9 and all(len(b) == 8 for b in steps)  # local_steps: full batches, as before


def test_sgd_train_reports_samples_seen_per_epoch():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    x, y = torch.randn(45, 4), torch.randint(0, 3, (45,))
    seen, _ = training.sgd_train(model, x, y, steps=1, batch_size=16, lr=0.1, gen=torch.Generator(), epochs=1.0)
    assert seen == 45
