"""``advguard gameday``: a local guard under a red-team attack, an extraction attempt and benign
load at once; time to detect and to mitigate, judged against the guard's acceptance targets."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from advguard.cli._common import (
    BoundsOpt,
    Commands,
    FactoryOpt,
    InputShapeOpt,
    JsonOpt,
    NumClassesOpt,
    check_out_file,
    console,
    err_console,
    model_options,
    print_json,
    progress_bar,
    progress_callback,
)

commands = Commands(None, None)

LABELS = {
    "train": "Training the demo CNN on digits (epochs)",
    "calibration": "Calibrating the k-NN detector on benign traffic",
    "benign": "Benign clients: rows sent",
    "attack:square": "Square attacker: images attacked",
    "attack:hopskipjump": "HopSkipJump attacker: images attacked",
    "attack:extraction": "Extraction attacker: queries answered",
}


def _ints(text: str, option: str, n: int) -> tuple[int, ...]:
    from advguard.errors import InputError

    try:
        vals = tuple(int(t) for t in text.replace(" ", "").split(",") if t)
    except ValueError:
        raise InputError(f"{option} must be integers separated by commas, got {text!r}") from None
    if len(vals) != n:
        raise InputError(f"{option} must be {n} integers separated by commas, got {text!r}")
    return vals


@commands.command("gameday")
def gameday(
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help="Model file to protect (default: a built-in demo "
            "CNN trained on digits in a few seconds)",
        ),
    ] = None,
    data: Annotated[
        str, typer.Option("--data", "-d", help="Traffic for --model: 70% calibration, 30% replay")
    ] = "digits",
    benign_clients: Annotated[int, typer.Option(min=0, max=1000, help="Benign clients")] = 20,
    benign_queries: Annotated[
        int | None, typer.Option(min=1, help="Rows each benign client replays (default: all)")
    ] = None,
    benign_batch: Annotated[str, typer.Option(help="Benign request sizes MIN,MAX rows")] = "1,32",
    attacks: Annotated[str, typer.Option(help="Evasion attacks: square,hopskipjump")] = (
        "square,hopskipjump"
    ),
    attack_images: Annotated[int, typer.Option(min=1, help="Images each attacker tries")] = 10,
    extraction: Annotated[bool, typer.Option(help="Run the extraction attacker")] = True,
    extraction_budget: Annotated[int, typer.Option(min=1, help="Extraction query budget")] = 5000,
    evasion_within: Annotated[
        int, typer.Option(min=1, help="Evasion must be detected and blocked before N queries")
    ] = 500,
    extraction_within: Annotated[
        int, typer.Option(min=1, help="Extraction must be detected and blocked before N queries")
    ] = 2000,
    epochs: Annotated[int, typer.Option(min=1, max=200, help="Demo model epochs")] = 10,
    seed: Annotated[int, typer.Option(min=0, help="Random seed")] = 0,
    out: Annotated[
        Path | None, typer.Option(help="Write the report: FILE.json, or FILE.html for a page")
    ] = None,
    factory: FactoryOpt = None,
    input_shape: InputShapeOpt = None,
    num_classes: NumClassesOpt = None,
    bounds: BoundsOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Game day: attack a local guard and measure time to detect and to mitigate.

    Exit 0 when every acceptance check passes, 1 when one fails (named on stderr)."""
    import logging

    from advguard.guard.gameday import GamedayConfig, run_gameday

    # the blocks are the point of the drill and are in the report: keep them off the console
    logging.getLogger("advguard.guard").setLevel(logging.ERROR)
    if out is not None:
        check_out_file(out)
    cfg = GamedayConfig(
        benign_clients=benign_clients, benign_queries=benign_queries,
        benign_batch=_ints(benign_batch, "--benign-batch", 2),  # type: ignore[arg-type]
        attacks=tuple(a.strip() for a in attacks.split(",") if a.strip()),
        attack_images=attack_images, extraction=extraction, extraction_budget=extraction_budget,
        evasion_within=evasion_within, extraction_within=extraction_within, seed=seed,
    ).validated()  # fmt: skip
    with progress_bar() as bar:
        cb = progress_callback(bar)

        def on_progress(stage: str, done: int, total: int) -> None:
            cb(LABELS.get(stage, stage), done, total)

        opts = (factory, input_shape, num_classes, bounds)
        setup = _setup(model, data, epochs, seed, opts, on_progress)
        report = run_gameday(setup, cfg, progress=on_progress)
    doc = report.to_dict()
    if out is not None:
        _write(out, report, doc)
    if json_out:
        print_json(doc)
    else:
        _render(doc, out)
    if not report.passed:
        for c in report.failed:
            err_console.print(f"[red]FAILED[/] {c.name}: {c.detail}", highlight=False)
        raise typer.Exit(1)


def _setup(
    model: str | None,
    data: str,
    epochs: int,
    seed: int,
    opts: tuple[Any, Any, Any, Any],
    progress: Any,
) -> Any:
    from advguard.guard.gameday import demo_setup, split_dataset

    if model is None:
        return demo_setup(seed=seed, epochs=epochs, progress=progress)
    from advguard.data import load_dataset
    from advguard.errors import InputError
    from advguard.models.io import CLI_OPTION_NAMES, load_model, option_names

    with option_names(CLI_OPTION_NAMES):
        clf = load_model(model, **model_options(*opts, False))
    ds = load_dataset(data)
    if getattr(ds, "modality", None) == "text":
        raise InputError("gameday needs numeric data; text data sets are not supported")
    if tuple(ds.x.shape[1:]) != tuple(clf.input_shape):
        raise InputError(
            f"--data has inputs of shape {tuple(ds.x.shape[1:])} but the model takes "
            f"{tuple(clf.input_shape)}"
        )
    return split_dataset(clf, ds.x, ds.y, seed=seed, name=Path(model).name)


def _write(out: Path, report: Any, doc: dict[str, Any]) -> None:
    import json

    from advguard.atomic import atomic_write_text
    from advguard.guard.gameday import render_html

    if out.suffix.lower() in (".html", ".htm"):
        atomic_write_text(out, render_html(report))
    else:
        atomic_write_text(out, json.dumps(doc, indent=2) + "\n")


def _fmt(v: object) -> str:
    if v is None:
        return "-"
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def _render(doc: dict[str, Any], out: Path | None) -> None:
    table = Table(title="Game day: attackers against the guard")
    for col in ("attacker", "detected at query", "by", "s to detect", "answered before block",
                "s to mitigate", "block holds"):  # fmt: skip
        if col == "attacker":
            table.add_column(col, no_wrap=True)
        else:
            table.add_column(col, justify="right")
    for a in doc["attackers"]:
        table.add_row(
            a["name"], _fmt(a["queries_to_detect"]), _fmt(a["detector"]),
            _fmt(a["seconds_to_detect"]), _fmt(a["queries_answered_before_block"]),
            _fmt(a["seconds_to_mitigate"]), _fmt(a["block_persists"]),
        )  # fmt: skip
    console.print(table)
    b = doc["benign"]
    console.print(
        f"Benign: {b['clients']} clients, {b['rows_answered']} rows in {b['requests']} requests; "
        f"{b['flagged_clients']} flagged, {b['errors']} refused"
    )
    for c in doc["checks"]:
        mark = "[green]PASS[/]" if c["passed"] else "[red]FAIL[/]"
        console.print(f"{mark} {c['name']}: {c['detail']}", highlight=False)
    verdict = "[bold green]PASSED[/]" if doc["passed"] else "[bold red]FAILED[/]"
    console.print(f"Game day {verdict}" + (f"; report: [bold]{out}[/]" if out else ""))
