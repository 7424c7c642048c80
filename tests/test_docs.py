"""The README and docs/ stay true to the repository: commands, links, examples (fast, no Ray).

- the README's test command is the command CI runs (.ci/run), and both set-up commands are on its
  first screen;
- every relative link in README.md and docs/*.md reaches a file of the repository (and, with an
  anchor, a heading of that file);
- no page points outside the repository or reads as a development log;
- the README's TOML example parses into a typed experiment, and its Python example uses only the
  public API (`from simfed import launch, load_run`).
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
LAUNCH = "pip install torch==2.13.0 && pip install . && simfed launch"
FIRST_SCREEN = 50


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(info string, body) of every fenced code block, in order."""
    return [(m.group(1).strip(), m.group(2)) for m in re.finditer(r"^```([^\n]*)\n(.*?)^```", text, re.M | re.S)]


def prose(text: str) -> str:
    """The text outside fenced blocks and inline code spans (where links are links)."""
    text = re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def ci_command() -> str:
    """The last command line of .ci/run (what CI runs)."""
    lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    return lines[-1]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"^```[^\n]*\n.*?^```", "", path.read_text(), flags=re.M | re.S)
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M)}


def links(path: Path) -> list[str]:
    return re.findall(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", prose(path.read_text()))


def test_docs_exist():
    names = {p.name for p in DOCS}
    assert {"cli.md", "sweeps.md", "methods.md", "architecture.md", "clusters.md", "benchmarks.md",
            "python-api.md", "development.md"} <= names


def test_readme_test_command_is_what_ci_runs():
    cmd = ci_command()
    assert "python -m pytest -q" in cmd
    fenced = [ln.strip() for _, body in fenced_blocks(README.read_text()) for ln in body.splitlines()]
    tests = [ln for ln in fenced if "python -m pytest -q" in ln]
    assert tests, "README has no fenced `python -m pytest -q` line"
    assert tests[0] == cmd, f"README runs {tests[0]!r}, .ci/run runs {cmd!r}"


def test_setup_commands_on_first_screen():
    head = README.read_text().splitlines()[:FIRST_SCREEN]
    stripped = [ln.strip() for ln in head]
    for cmd in (LAUNCH, ci_command()):
        assert cmd in stripped, f"{cmd!r} is not a line of the README's first {FIRST_SCREEN} lines"


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_relative_links_resolve(page):
    bad = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if path.startswith("/") or not dest.is_relative_to(ROOT):
            bad.append(f"{target}: leaves the repository")
        elif not dest.is_file():
            bad.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target}: no heading #{anchor} in {_rel(dest)}")
    assert not bad, f"{_rel(page)}: " + "; ".join(bad)


FORBIDDEN = [
    (re.compile(r"shared/"), "a path outside the repository (shared/)"),
    (re.compile(r"ALGORITHMS\.md"), "ALGORITHMS.md (outside the repository)"),
    (re.compile(r"\bissue \d+", re.I), "an issue reference"),
    (re.compile(r"this session", re.I), "'this session'"),
]


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_no_outside_references_or_log_language(page):
    text = page.read_text()
    found = [f"line {text.count(chr(10), 0, m.start()) + 1}: {why} ({m.group(0)!r})"
             for rx, why in FORBIDDEN for m in rx.finditer(text)]
    assert not found, f"{_rel(page)}: " + "; ".join(found)


def test_readme_toml_example_parses():
    from simfed.engine.config import parse

    tomls = [body for info, body in fenced_blocks(README.read_text()) if info == "toml"]
    assert tomls, "README has no ```toml example"
    exp = parse(tomllib.loads(tomls[0]), "README example")
    assert exp.algorithm
    assert exp.data.path  # a path string; parse never opens the store


def test_readme_python_example_uses_the_public_api():
    pys = [body for info, body in fenced_blocks(README.read_text()) if info == "python"]
    assert pys, "README has no ```python example"
    imports = [ln.strip() for ln in pys[0].splitlines() if re.match(r"\s*(from|import)\s+simfed\b", ln)]
    assert imports == ["from simfed import launch, load_run"], imports
