"""Scale-out on a real (local) 2-node Ray cluster, and fractional GPUs packing workers."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_two_nodes_and_four_workers_per_gpu_and_state_on_s3(engine_store, s3_store, s3_server, tmp_path):
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("cluster_script.py")), engine_store,
                           str(tmp_path), s3_store, s3_server("storage")], capture_output=True, text=True,
                          timeout=900, cwd=ROOT, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["cluster_nodes"] == 2
    assert len(out["nodes"]) == 2  # train rows name both nodes: clients ran on each
    workers = out["gpu_workers"]
    assert out["gpu_pool"] == 4 and len(workers) == 4
    assert {tuple(w["gpu_ids"]) for w in workers} == {("0",)}  # all four share the one GPU
    assert len({w["node_id"] for w in workers}) == 1
    assert len({w["pid"] for w in workers}) == 4
    # Without a real GPU the worker falls back to the CPU; with one it would say cuda.
    import torch

    assert {w["device"] for w in workers} == {"cuda" if torch.cuda.is_available() else "cpu"}
    # A stateful method on two nodes: the run directory (one node's disk) is refused with what to set;
    # store and client state on S3 give the numbers of the shared-disk run, on both nodes.
    assert "engine.storage" in out["refused"] and "s3://" in out["refused"] and "\n" not in out["refused"]
    assert out["s3_equals_disk"] and out["s3_rows"] > 0
    assert len(out["s3_nodes"]) == 2 and out["s3_revisited"] == 2  # some client trained in both rounds
    import pyarrow.fs as pafs

    fs, inner = pafs.FileSystem.from_uri(s3_server("storage"))
    objects = fs.get_file_info(pafs.FileSelector(inner, recursive=True))
    assert any(i.path.endswith("p00.pt") for i in objects)  # client state really went to S3


LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}
GCS_PROBE = """
import sys
from ray._raylet import GcsClient
try:
    GcsClient(address=sys.argv[1]).internal_kv_get(b"probe", None)
    print("OK")
except Exception as exc:
    print("ERR", type(exc).__name__, str(exc).splitlines()[0])
"""


def _alive(procs) -> list:
    import psutil

    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.Error:
            pass
    return out


def test_embedded_ray_is_loopback_only_authenticated_ends_with_the_driver_and_resumes_exactly(
        engine_store, tmp_path, undisturbed):
    """The whole life of a `simfed launch` on the embedded Ray, through the real CLI: while it runs no
    socket of its processes listens beyond loopback and a client without the token is refused;
    kill -9 of the driver takes Ray's processes with it and leaves a run that reads "interrupted";
    `--resume` then ends with the per-client numbers of an undisturbed run."""
    import os
    import signal
    import socket
    import time

    import psutil

    from simfed.engine import rundir
    from tests.cli.test_launch_cli import simfed
    from tests.engine.conftest import FAULT_KW, FAULT_WORKERS, numbers

    exp = tmp_path / "exp.toml"
    exp.write_text(f"""
[data]
path = "{engine_store}"
[run]
rounds = {FAULT_KW['rounds']}
clients_per_round = {FAULT_KW['clients_per_round']}
eval_every = {FAULT_KW['eval_every']}
checkpoint_every = {FAULT_KW['checkpoint_every']}
[algorithm]
name = "fedavg"
local_steps = {FAULT_KW['local_steps']}
[engine]
backend = "ray"
workers = {FAULT_WORKERS}
""")
    out = tmp_path / "run"
    log = (tmp_path / "driver.log").open("w")
    driver = subprocess.Popen([sys.executable, "-m", "simfed.cli.main", "launch", str(exp), "--out", str(out), "-q"],
                              stdout=subprocess.DEVNULL, stderr=log, cwd=ROOT)
    try:
        deadline = time.time() + 300
        while (rundir.read_status(out) or {}).get("checkpoint_round", 0) < 2:
            assert driver.poll() is None and time.time() < deadline, (tmp_path / "driver.log").read_text()
            time.sleep(0.05)
        os.kill(driver.pid, signal.SIGSTOP)  # held mid-run: Ray's processes keep serving
        assert rundir.read_status(out)["completed_rounds"] < FAULT_KW["rounds"]
        procs = [psutil.Process(driver.pid), *psutil.Process(driver.pid).children(recursive=True)]
        pids = {p.pid for p in procs}
        listening = [(c.laddr.ip, c.laddr.port, c.pid) for c in psutil.net_connections("inet")
                     if c.status == psutil.CONN_LISTEN and c.pid in pids]
        names = {psutil.Process(pid).name() for _, _, pid in listening}
        assert {"gcs_server", "raylet"} <= names, listening
        assert {ip for ip, _, _ in listening} <= LOOPBACK, listening

        gcs_port = next(port for _, port, pid in listening if psutil.Process(pid).name() == "gcs_server")
        external = [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
                    if a.family == socket.AF_INET and not a.address.startswith("127.")]
        for ip in external:  # nothing answers on the machine's other addresses
            with pytest.raises(OSError):
                socket.create_connection((ip, gcs_port), timeout=5).close()
        # Ray's own GCS client in a fresh process: without the token, with a wrong one, with the right one.
        token = os.environ.get("RAY_AUTH_TOKEN") or (Path.home() / ".ray" / "auth_token").read_text().strip()
        clean = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
        for auth, expect in (({"RAY_AUTH_MODE": "disabled", "HOME": str(tmp_path)}, "ERR AuthenticationError"),
                             ({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}, "ERR AuthenticationError"),
                             ({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}, "OK")):
            probe = subprocess.run([sys.executable, "-c", GCS_PROBE, f"127.0.0.1:{gcs_port}"], env={**clean, **auth},
                                   capture_output=True, text=True, timeout=120)
            assert probe.stdout.startswith(expect), (auth, probe.stdout, probe.stderr[-2000:])
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(timeout=60)
        deadline = time.time() + 30
        while _alive(procs[1:]) and time.time() < deadline:
            time.sleep(0.5)
        assert not _alive(procs[1:]), [p.name() for p in _alive(procs[1:])]
    finally:
        if driver.poll() is None:
            os.kill(driver.pid, signal.SIGCONT)
            driver.kill()
    assert rundir.read_status(out)["state"] == "interrupted"
    resumed = simfed("launch", "--resume", str(out), "-q", timeout=900)
    assert resumed.returncode == 0, resumed.stderr
    assert rundir.read_status(out)["state"] == "finished"
    assert numbers(out).equals(undisturbed)
