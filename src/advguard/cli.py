"""The ``advguard`` command line. Each command is a thin call into the library; this
module renders (rich) and maps errors to exit codes: 0 ok, 1 check failed, 2 bad input."""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from advguard import __version__
from advguard.errors import AdvguardError

app = typer.Typer(
    name="advguard",
    help="Red-team, harden, gate and guard machine-learning models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])


def friendly_errors(fn: F) -> F:
    """Turn advguard errors into a one-line message and exit code 2 (no traceback)."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except AdvguardError as e:
            err_console.print(f"[bold red]error:[/] {e}")
            raise typer.Exit(2) from None
        except (FileNotFoundError, PermissionError, IsADirectoryError) as e:
            err_console.print(f"[bold red]error:[/] {e}")
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def progress_bar() -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=False,
    )


@app.command()
def version() -> None:
    """Print the advguard version."""
    console.print(__version__)


@app.command()
@friendly_errors
def quickstart(
    out: Annotated[Path, typer.Option(help="Directory for the results.")] = Path("advguard-report"),
    epochs: Annotated[int, typer.Option(min=1, help="Training epochs.")] = 15,
    steps: Annotated[int, typer.Option(min=1, help="PGD steps.")] = 20,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Train a small CNN on the built-in digits set, attack it (FGSM, PGD-Linf), print results."""
    from advguard.evaluate.quickstart import run_quickstart

    with progress_bar() as bar:
        tasks: dict[str, Any] = {}

        def on_progress(stage: str, done: int, total: int) -> None:
            label = {"train": "Training CNN on digits", "attack": "Attacking (FGSM, PGD)"}[stage]
            if stage not in tasks:
                tasks[stage] = bar.add_task(label, total=total)
            bar.update(tasks[stage], completed=done)

        res = run_quickstart(out, epochs=epochs, pgd_steps=steps, seed=seed, progress=on_progress)

    table = Table(title=f"Digits CNN: clean accuracy {res.clean_accuracy:.1%} on {res.n_test} test images")
    table.add_column("epsilon (Linf)", justify="right")
    table.add_column("robust accuracy, FGSM", justify="right")
    table.add_column(f"robust accuracy, PGD-{steps}", justify="right")
    table.add_column("PGD time", justify="right")
    for r in res.rows:
        table.add_row(
            f"{r.epsilon:g}", f"{r.fgsm_robust_accuracy:.1%}", f"{r.pgd_robust_accuracy:.1%}",
            f"{r.pgd_seconds:.2f}s",
        )
    console.print(table)
    console.print(f"Model and results written to [bold]{res.out_dir}/[/]")


def main() -> None:  # console-script entry point
    try:
        app()
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]")
        sys.exit(130)


if __name__ == "__main__":
    main()
