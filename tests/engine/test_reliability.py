"""Round three of reliability (issue 27), engine side: the pool bound from fractional resources, the
Ray floor, `--address` resolution, and Ray's and torch's own output kept off stderr (engine.noise)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from simfed.core.errors import SimfedError
from simfed.engine import resources
from simfed.engine.config import EngineConfig

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("engine, totals, needle", [
    (EngineConfig(cpus_per_worker=0.001), {"CPU": 2.0}, "2000 workers"),
    (EngineConfig(cpus_per_worker=0.01, workers=9), {"CPU": 2.0}, "workers = 9"),
    (EngineConfig(cpus_per_worker=0.25, gpus_per_worker=0.01), {"CPU": 64.0, "GPU": 1.0}, "16 per GPU"),
])
def test_fractional_resources_cannot_multiply_the_pool(engine, totals, needle):
    with pytest.raises(SimfedError, match=needle) as err:
        resources.check(engine, totals, "this machine")
    assert "at most" in str(err.value) and "\n" not in str(err.value)


def test_pools_at_the_bound_pass():
    assert resources.check(EngineConfig(cpus_per_worker=0.25), {"CPU": 2.0}, "x") == 8
    assert resources.check(EngineConfig(cpus_per_worker=0.25, gpus_per_worker=1 / 16), {"CPU": 64.0, "GPU": 1.0},
                           "x") == 16
    assert resources.check(EngineConfig(cpus_per_worker=1, gpus_per_worker=0.25), {"CPU": 8.0, "GPU": 1.0}, "x") == 4


def test_ray_floor_refuses_an_embedded_cluster_and_warns_when_joining(monkeypatch):
    import ray

    from simfed.engine import cluster

    assert cluster.ray_floor(embedded=True) is None  # the installed Ray (>= 2.54)
    monkeypatch.setattr(ray, "__version__", "2.53.1")
    with pytest.raises(SimfedError, match=r"Ray 2\.53\.1 is installed; simfed needs Ray >= 2\.54.*CVE-2026-27482"):
        cluster.ray_floor(embedded=True)
    note = cluster.ray_floor(embedded=False)
    assert note.startswith("Ray 2.53.1 is installed") and "pip install -U 'ray[tune]>=2.54'" in note


def test_ray_floor_is_in_the_package_requirements():
    text = (ROOT / "pyproject.toml").read_text()
    assert '"ray[tune]>=2.54"' in text


def test_address_from_ray_address_is_named_when_nothing_answers(monkeypatch):
    import socket

    from simfed.engine import address

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    with pytest.raises(SimfedError, match="RAY_ADDRESS"):
        address.resolve("auto")
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    with pytest.raises(SimfedError, match="Ray Client"):
        address.resolve("auto")


CAPTURE = """
import os, sys, warnings
from simfed.engine import noise
with noise.captured():
    os.write(2, b"[W gcs_client.cc:210] Failed to get cluster ID\\n")  # as Ray's C++ client writes it
with noise.quiet_warnings():
    warnings.warn("Detected pickle protocol 4 in the checkpoint", UserWarning)
os.makedirs(sys.argv[1], exist_ok=True)
with noise.attach(sys.argv[1]):
    with noise.quiet_warnings():
        warnings.warn("a warning during the run", UserWarning)
try:
    with noise.captured() as out:
        os.write(2, b"failed start\\n")
        raise RuntimeError
except RuntimeError:
    print(out.mention())
"""


def test_library_output_goes_to_the_run_log_not_to_stderr(tmp_path):
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(CAPTURE), str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    log = (tmp_path / "run" / "simfed.log").read_text()
    for text in ("Failed to get cluster ID", "Detected pickle protocol 4", "a warning during the run"):
        assert text in log, log
    mention = proc.stdout.strip()  # a failed start keeps its output for the error line
    assert mention.startswith(" (Ray's own output: ") or mention.startswith("(Ray's own output: ")
    kept = Path(mention.split(": ", 1)[1].rstrip(")"))
    assert kept.read_text() == "failed start\n"
    kept.unlink()
