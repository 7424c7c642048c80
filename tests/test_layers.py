"""The house's layers: every import of every package module (top-level and inside functions, read
with ast) points down.

    cli -> simfed (api/) -> sweeps -> engine -> algorithms, partitions -> core

core imports nothing of simfed; algorithms and partitions import only core (and themselves); the
engine never imports sweeps, the API or the CLI. Within algorithms, no method module imports another
method module, and the kit imports no method: methods share the kit, never each other.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"core": "core", "partitions": "partitions", "algorithms": "algorithms", "engine": "engine",
           "sweeps": "sweeps", "api": "", "cli": "cli"}  # folder -> subpackage of simfed ("" = the root)
MAY_IMPORT = {
    "core": {"core"},
    "partitions": {"core", "partitions"},
    "algorithms": {"core", "algorithms"},
    "engine": {"core", "partitions", "algorithms", "engine"},
    "sweeps": {"core", "partitions", "algorithms", "engine", "sweeps"},
    "api": {"core", "partitions", "algorithms", "engine", "sweeps", "api"},
    "cli": set(FOLDERS),
}
NOT_METHODS = {"__init__", "base", "capabilities", "registry"}


def layer_of(module: str) -> str:
    """The layer a `simfed...` module name belongs to."""
    parts = module.split(".")
    sub = parts[1] if len(parts) > 1 else ""
    for folder, name in FOLDERS.items():
        if name and sub == name:
            return folder
    return "api"  # the root package and its own modules (simfed, simfed.runs)


def imports(path: Path, package: str) -> list[tuple[int, str]]:
    """(line, absolute module) for every simfed import in a file, nested ones included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "simfed"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the importing package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "simfed":
                continue
            # `from simfed.algorithms import registry` imports the submodule simfed.algorithms.registry
            out += [(node.lineno, f"{mod}.{a.name}") for a in node.names]
    return out


def package_files():
    for folder, sub in FOLDERS.items():
        base = ROOT / (folder if folder != "api" else "api")
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(base).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            package = ".".join(["simfed", *([sub] if sub else []), *parts[:-1]] if path.stem != "__init__"
                               else ["simfed", *([sub] if sub else []), *parts])
            yield folder, path, package


FILES = list(package_files())


def test_every_layer_folder_has_modules():
    assert {f for f, _, _ in FILES} == set(FOLDERS)


@pytest.mark.parametrize("folder", sorted(FOLDERS))
def test_imports_point_down(folder):
    bad = []
    for f, path, package in FILES:
        if f != folder:
            continue
        for line, mod in imports(path, package):
            target = layer_of(mod)
            if target not in MAY_IMPORT[folder]:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {mod} ({folder} -> {target})")
    assert not bad, "\n".join(bad)


def method_modules() -> set[str]:
    return {p.stem for p in (ROOT / "algorithms").glob("*.py") if p.stem not in NOT_METHODS}


def test_methods_never_import_each_other_and_the_kit_imports_no_method():
    methods = method_modules()
    assert {"fedavg", "pefll", "pfedacnnl"} <= methods
    bad = []
    for f, path, package in FILES:
        if f != "algorithms" or path.stem in NOT_METHODS and path.parent.name == "algorithms":
            continue
        own = path.stem if path.parent == ROOT / "algorithms" else None
        for line, mod in imports(path, package):
            parts = mod.split(".")
            if len(parts) >= 3 and parts[1] == "algorithms" and parts[2] in methods and parts[2] != own:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports the method module {mod}")
    assert not bad, "\n".join(bad)


def test_layer_of_names():
    assert layer_of("simfed") == "api" and layer_of("simfed.runs") == "api"
    assert layer_of("simfed.core.errors") == "core" and layer_of("simfed.algorithms.kit.models") == "algorithms"
    assert layer_of("simfed.sweeps.sweep") == "sweeps" and layer_of("simfed.cli.main") == "cli"
