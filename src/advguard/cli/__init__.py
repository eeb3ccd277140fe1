"""The ``advguard`` command line.

Each command module (``evaluate``, ``train``, ``sweep``, ``certify``, ``detector``, ``gate``,
``registry``, ``guard``, ``slo``) declares its commands in a ``Commands`` table
(``Commands("guard keys")`` nests under ``guard``); this module attaches them to one Typer
app and owns the one mapping from errors to exit codes: 0 ok, 1 a check failed (SLO, gate,
verification), 2 bad input or usage (a one-line message, never a traceback), 130
interrupted.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from types import ModuleType
from typing import Any

import typer
from rich.markup import escape

from advguard import __version__
from advguard.cli import (
    certify,
    dashboards,
    data,
    detector,
    evaluate,
    extract,
    gameday,
    gate,
    guard,
    guard_rollout,
    incident,
    poison,
    privacy,
    registry,
    slo,
    sweep,
    train,
    watermark,
)
from advguard.cli._common import Commands, console, err_console
from advguard.errors import AdvguardError

#: Command modules, in the order their commands appear in ``advguard --help``.
MODULES: tuple[ModuleType, ...] = (
    evaluate,
    train,
    sweep,
    certify,
    detector,
    gate,
    registry,
    guard,
    guard_rollout,
    incident,
    slo,
    dashboards,
    poison,
    data,
    privacy,
    extract,
    watermark,
    gameday,
)

app = typer.Typer(
    name="advguard",
    help="Red-team, harden, gate and guard machine-learning models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def one_line(message: object) -> str:
    """A message on one line: multi-line details are joined with '; '."""
    parts = [p.strip() for p in str(message).splitlines() if p.strip()]
    return "; ".join(parts) if len(parts) > 1 else (parts[0] if parts else "")


def _fail(e: BaseException) -> typer.Exit:
    err_console.print(f"[bold red]error:[/] {escape(one_line(e))}", highlight=False, soft_wrap=True)
    return typer.Exit(2)


def friendly_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn advguard and file-system errors into a one-line message and exit code 2."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except AdvguardError as e:
            raise _fail(e) from None
        except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as e:
            raise _fail(e) from None

    return wrapper


@app.command()
def version() -> None:
    """Print the advguard version."""
    console.print(__version__)


_groups: dict[str, typer.Typer] = {}


def _attach(module: ModuleType) -> None:
    for table in vars(module).values():
        if not isinstance(table, Commands):
            continue
        target = app
        if table.group is not None:
            # "guard keys" nests under "guard" (declared first in the same module)
            *parents, leaf = table.group.split()
            parent = _groups[" ".join(parents)] if parents else app
            target = typer.Typer(help=table.help, no_args_is_help=True)
            parent.add_typer(target, name=leaf)
            _groups[table.group] = target
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
