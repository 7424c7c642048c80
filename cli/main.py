"""Entry point of the `simfed` command.

Each command group lives in its own module with a `register(app)` function; this module only
assembles them and turns user errors (SimfedError, bad files) into one stderr line and exit 2.
"""

from __future__ import annotations

import importlib
import sys

import typer

from simfed.engine.errors import SimfedError

app = typer.Typer(
    name="simfed",
    help="Simulation engine for personalized federated (meta-)learning.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Modules that add commands to `app`; each defines register(app).
_COMMAND_MODULES = (
    "simfed.cli.partition_cmd",
    "simfed.cli.run_cmd",
    "simfed.cli.sweep_cmd",
)

for _name in _COMMAND_MODULES:
    try:
        importlib.import_module(_name).register(app)
    except ModuleNotFoundError as exc:  # a command group not built yet must not break the others
        if exc.name != _name:
            raise


def fail(message: str, code: int = 2) -> None:
    """Print one line on stderr and exit 2 (the contract for every user error; 1 for a failed run)."""
    sys.stderr.write(f"simfed: error: {' '.join(str(message).split())}\n")
    raise SystemExit(code)


def main() -> None:
    try:
        app()
    except SimfedError as exc:
        fail(str(exc), getattr(exc, "exit_code", 2))
    except KeyboardInterrupt:
        sys.stderr.write("simfed: interrupted\n")
        raise SystemExit(130)


if __name__ == "__main__":
    main()
