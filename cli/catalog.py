"""What `simfed algorithms` prints about a built-in method, read from its source (ast) without
importing it: importing a method imports torch, seconds on a loaded machine for a listing.

Read: the module docstring, the method class's `summary` and `Config`, and the config dataclass's
fields with their defaults, types and `# comments`, following its base classes through the
module's `from ... import` lines (the kit's field groups). Whatever is not a plain literal (a
`field(...)`, a computed default) makes `describe` return None, and the caller imports the method
instead. tests/cli/test_workflow_cli.py checks that this equals the imported description (less
its privacy declaration, which `simfed algorithms NAME` imports the method for) for
every built-in method.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
from functools import lru_cache


class _Unknown(Exception):
    """Something the source reader cannot resolve without running the code."""


@lru_cache(maxsize=None)
def _module(name: str) -> tuple[ast.Module, str]:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        raise _Unknown(name)
    with open(spec.origin, encoding="utf-8") as f:
        text = f.read()
    return ast.parse(text), text


def _class(module: str, name: str) -> tuple[ast.ClassDef, str, str]:
    """The class `name` as `module` defines or imports it: (node, its module, that module's text)."""
    tree, text = _module(module)
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return node, module, text
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                if (alias.asname or alias.name) == name:
                    return _class(node.module, alias.name)
    raise _Unknown(f"{module}.{name}")


def _imported_module(module: str, alias: str) -> str | None:
    """The module `alias` names in `module` (`from simfed.algorithms.kit import hypernet as hn`)."""
    tree, _ = _module(module)
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                if (a.asname or a.name) == alias and importlib.util.find_spec(f"{node.module}.{a.name}"):
                    return f"{node.module}.{a.name}"
    return None


def _value(expr: ast.expr, module: str):
    """A default's value: a literal, or a module-level constant of a literal (LAMBDAS, analytic.LENET)."""
    try:
        return ast.literal_eval(expr)
    except ValueError:
        pass
    if isinstance(expr, ast.Attribute) and isinstance(expr.value, ast.Name):
        where = _imported_module(module, expr.value.id)
        if where is None:
            raise _Unknown(ast.unparse(expr))
        return _value(ast.Name(expr.attr), where)
    if not isinstance(expr, ast.Name):
        raise _Unknown(ast.unparse(expr))
    tree, _ = _module(module)
    for node in tree.body:
        if isinstance(node, ast.Assign) and [ast.unparse(t) for t in node.targets] == [expr.id]:
            return _value(node.value, module)
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                if (a.asname or a.name) == expr.id:
                    return _value(ast.Name(a.name), node.module)
    raise _Unknown(expr.id)


def key_comments(lines: list[str]) -> dict[str, str]:
    """`key: type = default  # comment` lines: the comment documents the key."""
    out: dict[str, str] = {}
    for line in lines:
        code, hash_, comment = line.partition("#")
        name = code.strip().split(":")[0]
        if hash_ and ":" in code and name.isidentifier():
            out[name] = comment.strip()
    return out


def _fields(module: str, name: str) -> tuple[dict[str, dict], dict[str, str]]:
    """A config dataclass's fields in dataclass order ({name: {default, type}}) and key comments,
    bases first (a subclass's field keeps its base's position, its default and comment win)."""
    node, where, text = _class(module, name)
    fields: dict[str, dict] = {}
    comments: dict[str, str] = {}
    for base in node.bases:
        if isinstance(base, ast.Attribute) and isinstance(base.value, ast.Name):  # hn.HyperNetFields
            base_module, base_name = _imported_module(where, base.value.id), base.attr
        elif isinstance(base, ast.Name):
            base_module, base_name = where, base.id
        else:
            base_module = None
        if base_module is None:
            raise _Unknown(ast.unparse(base))
        more, notes = _fields(base_module, base_name)
        fields.update(more)
        comments.update(notes)
    for item in node.body:
        if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
            kind = ast.unparse(item.annotation)
            if kind.startswith(("ClassVar", "typing.ClassVar")):
                continue
            default = None if item.value is None else _value(item.value, where)
            fields[item.target.id] = {"default": default, "type": kind}
    comments.update(key_comments((ast.get_source_segment(text, node) or "").splitlines()))
    return fields, comments


def _method_class(tree: ast.Module, name: str) -> ast.ClassDef:
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if (isinstance(item, ast.Assign) and [ast.unparse(t) for t in item.targets] == ["name"]
                        and isinstance(item.value, ast.Constant) and item.value.value == name):
                    return node
    raise _Unknown(name)


def _attribute(cls: ast.ClassDef, attr: str) -> ast.expr:
    for item in cls.body:
        if isinstance(item, ast.Assign) and [ast.unparse(t) for t in item.targets] == [attr]:
            return item.value
    raise _Unknown(f"{cls.name}.{attr}")


def describe(name: str, module: str) -> dict | None:
    """The description `simfed algorithms` prints for method `name` of module `module` (as
    report_cmd.describe returns it from the imported method), or None when the source alone does
    not tell."""
    try:
        tree, _ = _module(module)
        cls = _method_class(tree, name)
        summary = ast.literal_eval(_attribute(cls, "summary"))
        config = _attribute(cls, "Config")
        if not isinstance(config, ast.Name):
            raise _Unknown("Config")
        fields, comments = _fields(module, config.id)
    except (_Unknown, ValueError, SyntaxError, OSError):
        return None
    doc = inspect.cleandoc(ast.get_docstring(tree, clean=False) or "")
    keys = {k: {**v, "help": comments.get(k, "")} for k, v in fields.items()}
    return {"summary": summary, "doc": doc.split("\n\n")[0], "module": module,
            "config": {k: v["default"] for k, v in keys.items()}, "keys": keys}
