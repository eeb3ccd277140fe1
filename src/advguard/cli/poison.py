"""advguard poison / advguard scan: simulate training-set poisoning; scan a model for a backdoor."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from advguard.cli._common import (
    BoundsOpt,
    Commands,
    DataOpt,
    DeviceOpt,
    FactoryOpt,
    InputShapeOpt,
    JsonOpt,
    NumClassesOpt,
    TorchScriptOpt,
    console,
    model_options,
    parse_floats,
    print_json,
    progress_bar,
    progress_callback,
)
from advguard.errors import InputError

commands = Commands()


def manifest_path_for(out: Path) -> Path:
    """``poisoned.npz`` -> ``poisoned.manifest.json`` (beside it)."""
    return out.with_name(out.stem + ".manifest.json")


@commands.command(name="poison")
def poison_cmd(
    data: DataOpt,
    attack: Annotated[str, typer.Option(help="badnets, blend or label-flip")],
    out: Annotated[Path, typer.Option(help="Poisoned set (.npz); the manifest goes beside it")],
    rate: Annotated[float, typer.Option(help="Share of the training set poisoned, (0, 1)")] = 0.05,
    target: Annotated[
        int | None,
        typer.Option(help="Target class (backdoors; label-flip: relabel to it; -1 = random)"),
    ] = 0,
    source: Annotated[
        int | None, typer.Option(help="Only poison rows of this class (source-specific)")
    ] = None,
    size: Annotated[int, typer.Option(min=1, help="badnets: patch side in pixels")] = 3,
    position: Annotated[
        str,
        typer.Option(help="badnets: bottom-right|bottom-left|top-right|top-left|center|ROW,COL"),
    ] = "bottom-right",
    colour: Annotated[
        str | None, typer.Option(help="badnets: patch colour, one value or one per channel")
    ] = None,
    style: Annotated[str, typer.Option(help="badnets: solid or checkerboard")] = "solid",
    alpha: Annotated[float, typer.Option(help="blend: blend ratio in (0, 1]")] = 0.2,
    seed: Annotated[int, typer.Option()] = 0,
    json_out: JsonOpt = False,
) -> None:
    """Poison a training set (BadNets patch, blended trigger or label flipping).

    Writes the poisoned set to --out (.npz with x, y, and the trigger's pattern and mask) and a
    JSON manifest beside it (which rows changed, their original labels, the trigger).
    """
    import numpy as np

    from advguard.atomic import atomic_path
    from advguard.attacks.poisoning import poison
    from advguard.data import load_dataset

    if out.suffix.lower() != ".npz":
        raise InputError(f"--out must be a .npz path, got {out}")
    ds = load_dataset(data)
    pos: str | tuple[int, int] = position
    if "," in position:
        vals = parse_floats(position, "--position") or []
        if len(vals) != 2:
            raise InputError(f"--position must be a corner name or ROW,COL, got {position!r}")
        pos = (int(vals[0]), int(vals[1]))
    col = parse_floats(colour, "--colour")
    res = poison(
        ds.x, ds.y, attack, rate=rate, target=None if target == -1 else target, source=source,
        bounds=ds.bounds, num_classes=ds.num_classes, seed=seed, size=size, position=pos,
        colour=col, style=style, alpha=alpha,
    )  # fmt: skip
    man = res.manifest
    arrays = {"x": res.x, "y": res.y}
    if man.trigger is not None:
        arrays["trigger_pattern"] = man.trigger.pattern
        arrays["trigger_mask"] = man.trigger.mask
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)  # type: ignore[arg-type]
    mpath = man.save(manifest_path_for(out))
    summary = {
        "attack": man.attack,
        "rate": man.rate,
        "n_total": man.n_total,
        "n_poisoned": man.n_poisoned,
        "target": man.target,
        "source": man.source,
        "seed": man.seed,
        "params": man.params,
        "data": str(out),
        "manifest": str(mpath),
    }
    if json_out:
        print_json(summary)
        return
    console.print(
        f"Poisoned [bold]{man.n_poisoned}[/] of {man.n_total} rows ({man.attack}, "
        f"target {man.target}, seed {man.seed})"
    )
    console.print(f"Data: [bold]{out}[/], manifest: [bold]{mpath}[/]")


@commands.command(name="scan")
def scan_model_cmd(
    model: Annotated[str, typer.Argument(help="Model file (.safetensors, .pt with --factory)")],
    data: DataOpt,
    steps: Annotated[int, typer.Option(min=1, help="Optimiser steps per class")] = 300,
    samples: Annotated[
        int, typer.Option(min=2, help="Clean inputs used (the first ones of --data)")
    ] = 256,
    threshold: Annotated[float, typer.Option(help="Anomaly index above which to flag")] = 2.0,
    seed: Annotated[int, typer.Option()] = 0,
    factory: FactoryOpt = None,
    input_shape: InputShapeOpt = None,
    num_classes: NumClassesOpt = None,
    bounds: BoundsOpt = None,
    torchscript: TorchScriptOpt = False,
    device: DeviceOpt = "cpu",
    json_out: JsonOpt = False,
) -> None:
    """Scan a model for a backdoor with Neural Cleanse on a small clean sample.

    Exit code 1 when a class is flagged as backdoored (the check failed), 0 when none is.
    """
    from advguard.defenses.backdoor import neural_cleanse
    from advguard.evaluate.job import load_model_and_data

    mkw = model_options(factory, input_shape, num_classes, bounds, torchscript, device)
    m, ds, info = load_model_and_data(model, data, model_kwargs=mkw, cli=True)
    if not hasattr(m, "forward") or ds.x.ndim != 4:
        raise InputError("advguard scan needs a white-box torch image model and image data")
    n = min(samples, len(ds))
    with progress_bar() as bar:
        res = neural_cleanse(
            m, ds.x[:n], ds.y[:n], steps=steps, threshold=threshold, seed=seed,
            progress=progress_callback(bar),
        )  # fmt: skip
    summary = {"model": info, **res.summary()}
    if json_out:
        print_json(summary)
    else:
        table = Table(title=f"Neural Cleanse on {n} clean inputs ({steps} steps per class)")
        for col in ("class", "mask L1", "anomaly index", "trigger success", "flagged"):
            table.add_column(col, justify="right")
        for c in summary["classes"]:
            table.add_row(
                str(c["class"]), f"{c['mask_l1']:.2f}", f"{c['anomaly_index']:.2f}",
                f"{c['trigger_success']:.1%}", "[red]BACKDOOR[/]" if c["flagged"] else "",
            )  # fmt: skip
        console.print(table)
        if res.backdoored:
            console.print(
                f"[bold red]Backdoor suspected[/]: class(es) {res.flagged} need an anomalously "
                f"small trigger (anomaly index > {threshold:g})"
            )
        else:
            console.print("[green]No backdoor found[/] (no class's trigger is anomalously small)")
    if res.backdoored:
        raise typer.Exit(1)
