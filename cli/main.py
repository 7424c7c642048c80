"""Entry point of the `simfed` command.

Each command group lives in its own module with a `register(app)` function; this module only
assembles them and turns user errors (SimfedError, bad files, bad option values) into one stderr
line and exit 2. Help is click's plain layout, in which a boolean flag reads `--json`, not
`--json <bool>` as Typer's rich panels print it.
"""

from __future__ import annotations

import importlib
import sys

import typer

try:  # Typer >= 0.20 ships its own copy of click and raises that copy's exceptions
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover - older Typer uses click itself
    from click import exceptions as click_errors

from simfed.engine.errors import SimfedError

app = typer.Typer(
    name="simfed",
    help="Simulation engine for personalized federated (meta-)learning.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

# Modules that add commands to `app`; each defines register(app).
_COMMAND_MODULES = (
    "simfed.cli.partition_cmd",
    "simfed.cli.run_cmd",
    "simfed.cli.sweep_cmd",
    "simfed.cli.report_cmd",
)

for _name in _COMMAND_MODULES:
    try:
        importlib.import_module(_name).register(app)
    except ModuleNotFoundError as exc:  # a command group not built yet must not break the others
        if exc.name != _name:
            raise


def fail(message: str) -> None:
    """Print one line on stderr and exit 2 (the contract for every user error)."""
    sys.stderr.write(f"simfed: error: {' '.join(str(message).split())}\n")
    raise SystemExit(2)


def _usage_line(exc: click_errors.UsageError) -> str:
    """click's usage error as one line: the message and where to look (`simfed CMD --help`)."""
    ctx = exc.ctx
    where = f" (see {ctx.command_path} --help)" if ctx is not None else ""
    return exc.format_message().replace("Value error, ", "") + where


def main(argv: list[str] | None = None) -> None:
    """The `simfed` command; `argv` (default sys.argv[1:]) lets tests run it in-process."""
    try:
        code = app(args=argv, prog_name="simfed", standalone_mode=False)
        if isinstance(code, int) and code:  # --help / no-args help return their exit code
            raise SystemExit(code)
    except click_errors.NoArgsIsHelpError as exc:  # `simfed`, `simfed partition`: the help, as click does
        print(exc.ctx.get_help() if exc.ctx else str(exc))
        raise SystemExit(2)
    except click_errors.UsageError as exc:
        fail(_usage_line(exc))
    except typer.Abort:
        sys.stderr.write("simfed: interrupted\n")
        raise SystemExit(130)
    except click_errors.ClickException as exc:
        fail(exc.format_message())
    except SimfedError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        sys.stderr.write("simfed: interrupted\n")
        raise SystemExit(130)


if __name__ == "__main__":
    main()
