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

from simfed.core.errors import SimfedError

app = typer.Typer(
    name="simfed",
    help="Simulation engine for personalized federated (meta-)learning.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

def version() -> str:
    """simfed's installed version (the package metadata; no heavy import)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("simfed")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown (not installed)"


def _print_version(value: bool) -> None:
    if value:
        sys.stdout.write(f"simfed {version()}\n")
        raise typer.Exit()


@app.callback()
def _options(
    show_version: bool = typer.Option(False, "--version", help="Print simfed's version and exit.",
                                      is_eager=True, callback=_print_version),
) -> None:
    """Simulation engine for personalized federated (meta-)learning."""


# Modules that add commands to `app`; each defines register(app).
_COMMAND_MODULES = (
    "simfed.cli.partition_cmd",
    "simfed.cli.run_cmd",
    "simfed.cli.sweep_cmd",
    "simfed.cli.report_cmd",
)

for _name in _COMMAND_MODULES:
    importlib.import_module(_name).register(app)


def fail(message: str, code: int = 2) -> None:
    """Print one line on stderr and exit 2 (the contract for every user error; 1 for a failed run)."""
    sys.stderr.write(f"simfed: error: {' '.join(str(message).split())}\n")
    raise SystemExit(code)


def _is(exc: BaseException, name: str) -> bool:
    """Click's exception classes by name: typer >= 0.16 vendors its own copy of click, older ones
    use click itself, and both must be caught."""
    return any(c.__name__ == name for c in type(exc).__mro__)


def main(argv: list[str] | None = None) -> None:
    """Run the CLI (argv defaults to sys.argv[1:]). Click runs in non-standalone mode so that its
    own usage errors reach us and are printed like ours: one line, exit 2 (not a boxed panel)."""
    try:
        rv = app(args=argv, prog_name="simfed", standalone_mode=False)
    except SimfedError as exc:
        fail(str(exc), getattr(exc, "exit_code", 2))
    except KeyboardInterrupt:
        sys.stderr.write("simfed: interrupted\n")
        raise SystemExit(130)
    except Exception as exc:
        if _is(exc, "NoArgsIsHelpError"):  # `simfed` or `simfed partition` alone: the help
            sys.stdout.write(exc.ctx.get_help() + "\n")
            raise SystemExit(0)
        if _is(exc, "UsageError"):  # unknown option, missing argument, bad value
            ctx = getattr(exc, "ctx", None)
            where = ctx.command_path if ctx is not None else "simfed"
            fail(f"{exc.format_message().replace('Value error, ', '')} (see `{where} --help`)")
        if _is(exc, "ClickException"):
            fail(exc.format_message())
        if _is(exc, "Abort"):
            sys.stderr.write("simfed: aborted\n")
            raise SystemExit(1)
        raise
    if isinstance(rv, int) and not isinstance(rv, bool) and rv != 0:  # typer.Exit(code) from a command
        raise SystemExit(rv)


if __name__ == "__main__":
    main()
