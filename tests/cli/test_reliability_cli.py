"""Round three of reliability (issue 27) through the real entry point, in this process (inproc):
the Ray floor refuses an embedded cluster before anything is written, and an importer's note about
empty classes is one line on stderr next to a written store."""

from __future__ import annotations

import numpy as np

from tests.cli import hostile_corpus as hc
from tests.cli.inproc import run


def test_an_old_ray_never_starts_an_embedded_cluster(monkeypatch, tmp_path):
    import ray

    monkeypatch.setattr(ray, "__version__", "2.51.0")
    started = ray.is_initialized()
    store = hc.tiny_store(tmp_path / "store")
    exp = hc.experiment(tmp_path, store, engine='backend = "ray"')
    r = run("launch", exp, "--out", tmp_path / "run", "-q")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "Ray 2.51.0 is installed; simfed needs Ray >= 2.54" in r.stderr and "does not start" in r.stderr
    assert not (tmp_path / "run").exists()
    assert ray.is_initialized() == started


def test_compact_labels_writes_the_store_with_one_note(tmp_path):
    labels = np.arange(40) % 4
    labels[::5] = 200
    raw = hc.idx_header(0x08, (40,)) + labels.astype(np.uint8).tobytes()
    src = hc.idx_dir(tmp_path, labels=raw)
    r = run("partition", "idx", src, tmp_path / "out", "--scheme", "iid", "--clients", "2", "--compact-labels")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(tmp_path / "out")
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("simfed: note: ") and "5 of the 201 labels" in lines[0]
    r = run("info", tmp_path / "out", "--json")
    assert '"num_classes": 5' in r.stdout and '"200"' in r.stdout
