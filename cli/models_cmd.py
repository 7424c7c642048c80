"""`simfed models [NAME] [--store DIR] [--json]`: the client networks a [model] table can name.

Lists the built-in models and the `simfed.models` entry points with their keys and defaults;
with --store, each model's parameter count on that store's data (or why it cannot take them).
NAME may also be "package.module:factory". torch is imported inside the command only, so the
rest of the CLI stays light.
"""

from __future__ import annotations

import json
from typing import Optional

import typer


def _toml(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (str, tuple, list)):
        return json.dumps(v)
    return repr(v)


def _entry(name: str, task) -> dict:
    """{summary, keys, parameters, error} of one model; parameters/error only with a task."""
    from simfed.algorithms.kit import models
    from simfed.core.errors import SimfedError

    if name in models.BUILTIN:
        out = models.describe_builtin(name)
    else:
        models.factory(name)  # imports it now: a bad path is this command's one-line error
        kind = "entry point" if name in models.entry_point_names() else "factory"
        out = {"summary": f"{kind} {name} (its keys are the factory's keyword arguments)", "keys": {}}
    if task is not None:
        import dataclasses

        from simfed.algorithms.base import ModelSpec

        try:
            model = models.check_task(dataclasses.replace(task, model=ModelSpec(name)))
            out["parameters"] = models.count(model)
        except SimfedError as exc:
            out["parameters"], out["error"] = None, str(exc)
    return out


def models_cmd(
    name: Optional[str] = typer.Argument(None, help="One model: a built-in, an entry point or package.module:factory."),
    store: Optional[str] = typer.Option(None, "--store", help="A partition store: parameter counts on its data."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """List the models a [model] table can name, with their keys and defaults (and parameter counts
    for a store's data with --store)."""
    from simfed.algorithms.kit import models

    task = None
    if store is not None:
        from simfed.algorithms.base import Task
        from simfed.partitions.store import PartitionStore

        st = PartitionStore.open(store)
        seen, unseen = len(st.client_ids("seen")), len(st.client_ids("unseen"))
        task = Task(**st.task_fields(), num_clients=seen, total_clients=seen + unseen)
    names = [name] if name else [*models.BUILTIN, *models.entry_point_names()]
    info = {n: _entry(n, task) for n in names}
    if as_json:
        typer.echo(json.dumps(info[name] if name else info, indent=2, default=str))
        return
    for n, item in info.items():
        size = ""
        if task is not None:
            size = f"  {item['parameters']:,} parameters" if item["parameters"] is not None else "  (cannot take the store)"
        typer.echo(f"{n:10} {item['summary']}{size}")
        if item["keys"]:
            typer.echo(f"{'':10} keys: " + ", ".join(f"{k} = {_toml(v)}" for k, v in item["keys"].items()))
        if item.get("error"):
            typer.echo(f"{'':10} {item['error']}")
    if not name:
        typer.echo("\n[model] name = NAME plus its keys in an experiment; \"package.module:factory\" loads your own "
                   "(docs/models.md).")


def register(app: typer.Typer) -> None:
    app.command("models")(models_cmd)
