"""docs/claims.md stays a complete ledger (fast, no Ray).

Every row of every table that has a `command` and a `verdict` column names a command (a `simfed`
or `python bench/...` line in backticks) and starts its verdict with one of the ledger's words;
every file a command names exists; row ids are unique; the README links the page; every sweep
file under examples/sweeps/ (the ledger's tuning and gain sweeps) parses into its trials.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLAIMS = ROOT / "docs" / "claims.md"
VERDICTS = ("holds", "direction only", "does not hold", "not testable here", "not run here", "open",
            "learns", "does not learn")
COMMAND = re.compile(r"`((?:simfed|python) [^`]+)`")
REPO_FILE = re.compile(r"\b((?:examples|bench)/[\w./-]+\.(?:toml|py))\b")


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def ledger_rows() -> list[dict[str, str]]:
    """Every row of the tables whose header has `command` and `verdict`, as {column: cell}."""
    rows, header = [], None
    for line in CLAIMS.read_text().splitlines():
        if not line.startswith("|"):
            header = None
            continue
        row = cells(line)
        if header is None:
            header = row if {"command", "verdict"} <= set(row) else []
        elif header and not set(line) <= set("|- "):
            rows.append(dict(zip(header, row)))
    return rows


def test_the_ledger_has_rows():
    rows = ledger_rows()
    assert len(rows) >= 20
    ids = [r["id"] for r in rows if "id" in r]
    assert len(ids) == len(set(ids)), "duplicate row ids"


def test_every_row_has_a_command_and_a_verdict():
    bad = []
    for row in ledger_rows():
        name = row.get("id") or row.get("example") or str(row)
        if not COMMAND.search(row["command"]):
            bad.append(f"{name}: no `simfed ...` or `python ...` command")
        verdict = row["verdict"].replace("*", "").strip().lower()
        if not verdict.startswith(VERDICTS):
            bad.append(f"{name}: verdict {row['verdict']!r} starts with none of {VERDICTS}")
    assert not bad, "; ".join(bad)


def test_commands_name_files_that_exist():
    missing = sorted({f for row in ledger_rows() for cmd in COMMAND.findall(row["command"])
                      for f in REPO_FILE.findall(cmd) if not (ROOT / f).is_file()})
    assert not missing, f"commands in docs/claims.md name missing files: {missing}"


def test_readme_links_the_ledger():
    assert "(docs/claims.md)" in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("path", sorted((ROOT / "examples" / "sweeps").glob("*.toml")), ids=lambda p: p.name)
def test_sweep_files_parse(path):
    from simfed.core.config import load_toml
    from simfed.sweeps.config import parse_sweep

    trials = parse_sweep(load_toml(str(path)), str(path)).trials
    assert len(trials) >= 2
    assert all(t.experiment.data.path == trials[0].experiment.data.path for t in trials)
