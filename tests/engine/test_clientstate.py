import torch

from simfed.engine.clientstate import ClientStateStore


def test_reads_newest_version_before_now_and_truncates(tmp_path):
    s = ClientStateStore(tmp_path)
    assert s.get(5, 0, 0) is None
    s.put(5, 0, 0, torch.tensor([1.0]))
    s.put(5, 2, 0, torch.tensor([2.0]))
    assert s.get(5, 0, 0) is None  # a retry of round 0 must not see its own first attempt
    assert float(s.get(5, 1, 0)) == 1.0
    assert float(s.get(5, 3, 0)) == 2.0
    assert s.truncate_after(2) == 1  # resume from a checkpoint taken after round 2 (rounds 0, 1 done)
    assert float(s.get(5, 3, 0)) == 1.0


def test_old_versions_collected_once_checkpointed(tmp_path):
    s = ClientStateStore(tmp_path)
    for r in range(4):
        s.put(1, r, 0, torch.tensor([float(r)]), checkpointed_round=r)
    files = sorted(p.name for p in (tmp_path / "001" / "1").iterdir())
    # Checkpoint after round 3 covers rounds < 3: only the newest of those (r2) and r3 remain.
    assert files == ["r000002p00.pt", "r000003p00.pt"]
