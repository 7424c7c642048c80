"""Every case of the hostile corpus through the real CLI: exit 2, one stderr line, no traceback,
nothing left behind, no Ray started. See hostile_corpus.py for the cases."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cli import hostile_corpus as hc


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under root: kind, and for regular files size and sha256; for dirs the mode."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            st = p.lstat()
            if stat.S_ISREG(st.st_mode):
                out[str(p.relative_to(root))] = ("file", st.st_size, hashlib.sha256(p.read_bytes()).hexdigest())
            else:
                out[str(p.relative_to(root))] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode))
    return out


def run_in_process(argv: list[str], cwd: Path, env: dict) -> tuple[int, str]:
    from simfed.cli.main import main

    err, old = io.StringIO(), os.getcwd()
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    os.chdir(cwd)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                main(argv)
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
    finally:
        os.chdir(old)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return code, err.getvalue()


def run_subprocess(argv: list[str], cwd: Path, env: dict) -> tuple[int, str]:
    root = Path(__file__).resolve().parents[2]
    full_env = {**os.environ, **env, "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "simfed.cli.main", *argv], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    return proc.returncode, proc.stderr


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    base = tmp_path_factory.mktemp("corpus-base")
    store = hc.tiny_store(base / "store")
    exp = hc.experiment(base, store)
    code, err = run_in_process(["launch", str(exp), "--out", str(base / "run"), "-q"], base, {})
    assert code == 0, err
    yield hc.Fixtures(store=store, run=base / "run")
    for lst in hc.LISTENERS.values():
        lst.close()
    hc.LISTENERS.clear()
    hc._round3.close()


def ray_running() -> bool:
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


def test_every_failure_class_has_a_case():
    covered = {c.cls for c in hc.CASES}
    assert covered == hc.CLASSES, (hc.CLASSES - covered, covered - hc.CLASSES)
    assert len({c.id for c in hc.CASES}) == len(hc.CASES)
    assert {c.family for c in hc.CASES} == {"importers", "stores", "configs", "rundirs", "usage"}
    assert 5 <= sum(c.subprocess for c in hc.CASES) <= 13  # a real-process sample, kept fast


@pytest.mark.parametrize("case", hc.CASES, ids=[c.id for c in hc.CASES])
def test_hostile_input(case, fixtures, tmp_path):
    reason = case.skip() if case.skip else None
    if reason:
        pytest.skip(reason)
    work = tmp_path / "work"
    work.mkdir()
    argv = case.build(fixtures, work)
    before = snapshot(work)
    ray_before = ray_running()
    runner = run_subprocess if case.subprocess else run_in_process
    t0 = time.monotonic()
    env = {k: v.format(work=work) for k, v in case.env.items()}  # "{work}": this case's WORK directory
    code, err = runner([str(a) for a in argv], work, env)
    elapsed = time.monotonic() - t0
    lines = err.strip().splitlines()
    assert "Traceback" not in err, err
    assert code == 2, (code, err)
    assert len(lines) == 1, err
    assert lines[0].startswith("simfed: error: "), lines[0]
    assert case.needle in lines[0], lines[0]
    assert snapshot(work) == before, "the failed command created, changed or deleted files"
    for a in argv:  # outputs named outside WORK (a read-only directory) were not created either
        if "simfed-out" in str(a):
            assert not Path(a).exists()
    if not ray_before:
        assert not ray_running(), "Ray was started for input that is rejected"
    # Within seconds, not a hang: generous for a loaded 2-core machine (a subprocess imports torch);
    # the hangs this guards against took 100 s and more.
    assert elapsed < (60 if case.subprocess else 20), f"{case.id} took {elapsed:.1f} s"


@pytest.mark.parametrize("garbage", [b'{"state": ', b"[]", b"\xff\xfe"])
def test_garbage_status_is_said_not_hidden(garbage, fixtures, tmp_path):
    """A damaged status.json is said, never reported beside the metrics as if the run were fine: one
    line naming the file, exit 2; without the file the metrics read again (no state)."""
    import json
    import shutil

    run = Path(shutil.copytree(fixtures.run, tmp_path / "run"))
    (run / "status.json").write_bytes(garbage)
    code, err = run_in_process(["metrics", str(run), "--json"], tmp_path, {})
    assert code == 2 and len(err.strip().splitlines()) == 1 and "status.json" in err, err
    (run / "status.json").unlink()
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()) as err:
        from simfed.cli.main import main

        main(["metrics", str(run), "--json"])
    assert err.getvalue() == "" and "status" not in json.loads(out.getvalue())
