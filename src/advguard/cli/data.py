"""advguard data: scan a training set for poisoned, mislabelled and duplicated rows, and
compare the per-class training loss of two runs (loss drift)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

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
    ModelOpt,
    NumClassesOpt,
    TorchScriptOpt,
    console,
    model_options,
    print_json,
    progress_bar,
    progress_callback,
)
from advguard.errors import InputError

commands = Commands("data", "Scan training data for poisoning, label noise and duplicates.")


def _split(text: str, option: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise InputError(f"{option} needs at least one method")
    return items


def _pr(d: dict[str, Any]) -> str:
    p, r, f = d["precision"], d["recall"], d["false_positive_rate"]
    return f"precision {_pct(p)}, recall {_pct(r)}, FPR {_pct(f)}"


def _pct(v: dict[str, Any]) -> str:
    return "n/a" if v["value"] is None else f"{v['value']:.1%}"


@commands.command(name="scan")
def scan_cmd(
    model: ModelOpt,
    data: DataOpt,
    out: Annotated[Path | None, typer.Option(help="Write the cleaned set here (.npz)")] = None,
    manifest: Annotated[
        Path | None,
        typer.Option(help="Poisoning manifest (advguard poison) to score the scan against"),
    ] = None,
    methods: Annotated[
        str,
        typer.Option(
            help="Comma list of activation-clustering, spectral-signatures, label-noise, "
            "near-duplicates"
        ),
    ] = "activation-clustering,spectral-signatures,label-noise,near-duplicates",
    remove: Annotated[
        str, typer.Option(help="Methods whose flagged rows are dropped from the cleaned set")
    ] = "activation-clustering",
    rate: Annotated[
        float, typer.Option(help="spectral-signatures: assumed poisoned share of a class")
    ] = 0.05,
    top: Annotated[int, typer.Option(min=0, help="Suspicious rows to list")] = 20,
    seed: Annotated[int, typer.Option()] = 0,
    factory: FactoryOpt = None,
    input_shape: InputShapeOpt = None,
    num_classes: NumClassesOpt = None,
    bounds: BoundsOpt = None,
    torchscript: TorchScriptOpt = False,
    device: DeviceOpt = "cpu",
    json_out: JsonOpt = False,
) -> None:
    """Find suspicious training rows (activation clustering, spectral signatures, label noise,
    near-duplicates) with a model trained on them; optionally write a cleaned set."""
    import numpy as np

    from advguard.atomic import atomic_path
    from advguard.attacks.poisoning import PoisonManifest
    from advguard.defenses.backdoor.data_scan import scan_training_set
    from advguard.evaluate.job import load_model_and_data

    if out is not None and out.suffix.lower() != ".npz":
        raise InputError(f"--out must be a .npz path, got {out}")
    mkw = model_options(factory, input_shape, num_classes, bounds, torchscript, device)
    m, ds, _ = load_model_and_data(model, data, model_kwargs=mkw, cli=True)
    if not hasattr(m, "module"):
        raise InputError("data scan needs a torch model (.safetensors/.pt) for its features")
    truth = None
    if manifest is not None:
        man = PoisonManifest.load(manifest)
        if man.n_total != len(ds):
            raise InputError(f"--manifest describes {man.n_total} rows, the data has {len(ds)}")
        truth = man.poisoned_mask()
    meths, rem = _split(methods, "--methods"), _split(remove, "--remove")
    with progress_bar() as bar:
        res = scan_training_set(
            m, ds.x, ds.y, bounds=ds.bounds, methods=meths, remove=rem, rate=rate,
            truth=truth, seed=seed, progress=progress_callback(bar),
        )  # fmt: skip
    removed = res["removed"]
    rows = _suspicious_rows(res, rem, ds.y, top)
    if out is not None:
        keep = ~removed
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out) as tmp, open(tmp, "wb") as f:
            np.savez_compressed(f, x=ds.x[keep], y=ds.y[keep], kept_rows=np.flatnonzero(keep))
    summary = {
        "n_rows": len(ds),
        "n_removed": int(removed.sum()),
        "methods": res["methods"],
        "removed_against_manifest": res.get("removed_against_manifest"),
        "suspicious_rows": rows,
        "removed_rows": np.flatnonzero(removed).tolist(),
        "near_duplicate_pairs": res.get("near_duplicate_pairs"),
        "cleaned": None if out is None else str(out),
    }
    if json_out:
        print_json(summary)
        return
    _print_scan(res, rows, rem, len(ds), out)


def _suspicious_rows(res: dict[str, Any], rem: list[str], y: Any, top: int) -> list[dict[str, Any]]:
    """The ``top`` flagged rows, by how many methods flag them, then the removal scores."""
    import numpy as np

    removed = res["removed"]
    votes = sum(f.astype(int) for f in res["flagged"].values())
    key = sum(res["scores"][k] for k in rem)
    order = np.lexsort((-key, -votes))
    rows: list[dict[str, Any]] = [
        {"row": int(i), "label": int(y[i]),
         "flagged_by": [k for k, f in res["flagged"].items() if f[i]],
         "scores": {k: float(s[i]) for k, s in res["scores"].items()},
         "removed": bool(removed[i])}
        for i in order[:top] if votes[i] > 0
    ]  # fmt: skip
    return rows


def _print_scan(
    res: dict[str, Any], rows: list[dict[str, Any]], rem: list[str], n: int, out: Path | None
) -> None:
    """Per-method counts, suspicious classes and rows, and what was removed."""
    removed = res["removed"]
    table = Table(title=f"Data scan of {n} rows")
    for col in ("method", "flagged", "against manifest"):
        table.add_column(col)
    for k, v in res["methods"].items():
        am = v.get("against_manifest")
        table.add_row(k, str(v["n_flagged"]), _pr(am) if am else "-")
    console.print(table)
    ac = res["methods"].get("activation-clustering")
    if ac:
        bad: list[str] = [c for c, v in ac["per_class"].items() if v["poisoned"]]
        console.print(f"Activation clustering: suspicious classes {', '.join(bad) or 'none'}")
    if rows:
        t2 = Table(title="Most suspicious rows")
        for col in ("row", "label", "flagged by", "removed"):
            t2.add_column(col)
        for r in rows:
            t2.add_row(str(r["row"]), str(r["label"]), ", ".join(r["flagged_by"]),
                       "yes" if r["removed"] else "")  # fmt: skip
        console.print(t2)
    if res.get("removed_against_manifest"):
        console.print(f"Removed rows vs manifest: {_pr(res['removed_against_manifest'])}")
    console.print(f"Removed {int(removed.sum())} rows ({', '.join(rem)})")
    if out is not None:
        console.print(f"Cleaned set: [bold]{out}[/]")


@commands.command(name="loss-drift")
def loss_drift_cmd(
    previous: Annotated[
        Path, typer.Argument(help="Previous version's training manifest.json (or its folder)")
    ],
    current: Annotated[Path, typer.Argument(help="New training manifest.json (or its folder)")],
    z: Annotated[
        float,
        typer.Option(help="Flag a class whose loss change is this many spreads from the median"),
    ] = 5.0,
    min_delta: Annotated[
        float, typer.Option(help="...and differs from the median change by this much (nats)")
    ] = 0.1,
    window: Annotated[int, typer.Option(min=1, help="Last epochs averaged per run")] = 3,
    json_out: JsonOpt = False,
) -> None:
    """Per-class training-loss drift between two training manifests (advguard train); exit 1
    when a class is flagged (a poisoned target class stands out), 0 otherwise."""
    from advguard.defenses.training import compare_manifests, load_manifest

    res = compare_manifests(
        load_manifest(previous), load_manifest(current), z=z, min_delta=min_delta, window=window
    )
    if json_out:
        print_json(res)
    else:
        table = Table(title=f"Per-class loss drift ({current} vs {previous})")
        for col in ("class", "previous loss", "current loss", "change", "vs median", "z", "flag"):
            table.add_column(col)
        for r in res["loss"]:
            cells = [
                "-" if r[k] is None else f"{r[k]:.4g}"
                for k in ("previous", "current", "change", "excess", "z")
            ]
            flag = f"[bold red]{r['direction']}[/]" if r["flagged"] else ""
            table.add_row(str(r["class"]), *cells, flag)
        console.print(table)
        flagged = res["flagged_classes"]
        console.print(
            f"Flagged classes: {', '.join(map(str, flagged))} (scan their rows: advguard data scan)"
            if flagged
            else "No class drifted beyond the threshold."
        )
    if res["flagged_classes"]:
        raise typer.Exit(1)
