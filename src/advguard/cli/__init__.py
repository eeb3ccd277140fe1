"""The ``advguard`` command line.

Each command module (``evaluate``, ``train``, ``certify``, ``gate``, ``registry``) declares its
commands in a ``Commands`` table; this module attaches them to one Typer app and owns the one
mapping from errors to exit codes: 0 ok, 1 a check failed (SLO, gate, verification), 2 bad
input or usage (a one-line message, never a traceback), 130 interrupted.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from types import ModuleType
from typing import Any

import typer

from advguard import __version__
from advguard.cli import certify, data, evaluate, gate, poison, registry, train
from advguard.cli._common import Commands, console, err_console
from advguard.errors import AdvguardError

#: Command modules, in the order their commands appear in ``advguard --help``.
MODULES: tuple[ModuleType, ...] = (evaluate, train, certify, gate, registry, poison, data)

app = typer.Typer(
    name="advguard",
    help="Red-team, harden, gate and guard machine-learning models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def friendly_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn advguard and file-system errors into a one-line message and exit code 2."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except AdvguardError as e:
            err_console.print(f"[bold red]error:[/] {e}", highlight=False)
            raise typer.Exit(2) from None
        except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as e:
            err_console.print(f"[bold red]error:[/] {e}", highlight=False)
            raise typer.Exit(2) from None

    return wrapper


@app.command()
def version() -> None:
    """Print the advguard version."""
    console.print(__version__)


def _attach(module: ModuleType) -> None:
    for table in vars(module).values():
        if not isinstance(table, Commands):
            continue
        target = app
        if table.group is not None:
            target = typer.Typer(help=table.help, no_args_is_help=True)
            app.add_typer(target, name=table.group)
        for name, fn in table.items:
            target.command(name=name)(friendly_errors(fn))


for _module in MODULES:
    _attach(_module)


def main() -> None:  # console-script entry point
    try:
        app()
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]")
        sys.exit(130)


__all__ = ["app", "friendly_errors", "main"]
