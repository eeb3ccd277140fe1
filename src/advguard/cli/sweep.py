"""advguard sweep: hyper-parameter sweeps of a defense on Ray Tune (or locally) with a
clean-vs-robust Pareto front."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from advguard.cli._common import Commands, JsonOpt, check_out_dir, console, print_json, progress_bar
from advguard.errors import InputError

commands = Commands("sweep", help="Sweep a defense's hyper-parameters; plot the Pareto front.")


@commands.command(name="run")
def run_cmd(
    spec: Annotated[
        Path, typer.Argument(help="Sweep spec (YAML), e.g. examples/sweep-trades-digits.yaml")
    ],
    out: Annotated[Path, typer.Option(help="Directory for sweep.json, sweep.html and trials/")],
    backend: Annotated[
        str, typer.Option(help="ray (Ray Tune, trials in parallel) or local (one after another)")
    ] = "ray",
    address: Annotated[
        str | None, typer.Option(help="Ray cluster: auto or ray://host:port (default: a local Ray)")
    ] = None,
    max_concurrent: Annotated[
        int | None, typer.Option(min=1, help="Trials at a time (default: the spec's)")
    ] = None,
    resume: Annotated[
        bool, typer.Option(help="Keep the finished trials of sweep.json in --out; run the rest")
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Train one model per trial, evaluate each under the spec's threat model, and write
    sweep.json and sweep.html (clean vs robust accuracy, the Pareto front highlighted).

    A failing trial is recorded and the sweep goes on; --resume re-runs only the trials
    that did not finish."""
    from advguard.defenses.sweep import import_tune, load_sweep_spec, run_sweep

    check_out_dir(out)
    if backend not in ("ray", "local"):
        raise InputError(f"--backend must be ray or local, got {backend!r}")
    if backend == "local" and (address is not None or max_concurrent is not None):
        raise InputError("--address and --max-concurrent need --backend ray")
    if backend == "ray":
        import_tune()  # without Ray: one line naming the extra, before anything else
    sweep = load_sweep_spec(spec)
    with progress_bar() as bar:
        task: list[Any] = []

        def on_trial(done: int, total: int, rec: dict[str, Any] | None) -> None:
            if not task:
                task.append(bar.add_task(f"Sweep {sweep.name} ({backend}): trials", total=total))
            bar.update(task[0], completed=done, total=total)
            if rec is not None and rec["status"] != "ok":
                bar.console.print(f"[red]trial {rec['id']} failed[/]: {escape(str(rec['error']))}")

        res = run_sweep(
            sweep, out, backend=backend, address=address, max_concurrent=max_concurrent,  # type: ignore[arg-type]
            resume=resume, base_dir=spec.parent, on_trial=on_trial,
        )  # fmt: skip
    if json_out:
        print_json(res.document)
        return
    _summary(res)


def _summary(res: Any) -> None:
    doc = res.document
    eps = doc["headline_epsilon"]
    table = Table(
        title=f"{doc['spec']['defense']} sweep on {doc['spec']['data']}: "
        f"{doc['threat_model']['name']} at eps {eps:g} (* = Pareto front)"
    )
    for col in ("trial", "parameters", "clean", f"robust @ {eps:g}", "train s", "status"):
        table.add_column(
            col, justify="left" if col in ("trial", "parameters", "status") else "right"
        )
    for t in sorted(
        doc["trials"], key=lambda t: (t["status"] != "ok", -(t.get("robust_headline") or 0.0))
    ):
        ok = t["status"] == "ok"
        params = ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in t["params"].items()
        )
        table.add_row(
            t["id"] + (" *" if t["pareto"] else ""), escape(params),
            _pct(t.get("clean_accuracy")), _pct(t.get("robust_headline")),
            f"{t['train_time_s']:.1f}" if ok else "-",
            "ok" if ok else escape(f"error: {t['error']}"),
            style="bold" if t["pareto"] else None,
        )  # fmt: skip
    console.print(table)
    console.print(
        f"Ran {res.ran} trial(s) ({len(doc['trials']) - res.ran} kept from an earlier run). "
        f"Pareto front: [bold]{', '.join(doc['pareto_front']) or 'none'}[/]"
    )
    console.print(f"Sweep: [bold]{res.json_path}[/] and [bold]{res.html_path}[/]")


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1%}"
