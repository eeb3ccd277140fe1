"""advguard detector: calibrate an adversarial-example detector and save it; show a saved one."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from advguard.cli._common import (
    Commands,
    DataOpt,
    DeviceOpt,
    JsonOpt,
    ModelOpt,
    console,
    model_options,
    print_json,
)
from advguard.errors import AdvguardError

commands = Commands(
    "detector", "Calibrate adversarial-example detectors and save them (JSON + safetensors)."
)


@commands.command(name="calibrate")
def calibrate_cmd(
    model: ModelOpt,
    data: DataOpt,
    kind: Annotated[
        str,
        typer.Option(
            help="squeeze | mahalanobis | entropy | max-prob (a text model: entropy or "
            "max-prob; default entropy)"
        ),
    ] = "",
    fpr: Annotated[float, typer.Option(help="Target false-positive rate on benign data.")] = 0.01,
    out: Annotated[Path, typer.Option(help="Output directory for the saved detector.")] = Path(
        "advguard-detector"
    ),
    squeezers: Annotated[
        str | None,
        typer.Option(
            help="squeeze: NAME:INT list, e.g. bit-depth:2,jpeg:75 (default 1 bit + "
            "2x2 median, the paper's MNIST choice)"
        ),
    ] = None,
    layer: Annotated[
        str | None, typer.Option(help="mahalanobis: module name (default penultimate features)")
    ] = None,
    holdout: Annotated[
        float, typer.Option(help="Share of the data kept back to measure the FPR.")
    ] = 0.2,
    samples: Annotated[
        int | None, typer.Option(min=1, help="Use only this many samples (seeded).")
    ] = None,
    factory: Annotated[str | None, typer.Option(help="module:callable for torch weights")] = None,
    seed: Annotated[int, typer.Option(help="Random seed of the data split.")] = 0,
    device: DeviceOpt = "cpu",
    json_out: JsonOpt = False,
) -> None:
    """Fit (where needed) and calibrate a detector on benign data, then save it to --out.

    Use data the model was not trained on: the threshold is the split-conformal quantile of
    benign scores, so the FPR guarantee holds for inputs like the calibration data. A text
    model (*.textmodel.json) with text data (e.g. spamham) takes a confidence detector
    (entropy, max-prob) only.
    """
    from advguard.defenses.detectors import calibrate_detector, model_digest, save_detector
    from advguard.defenses.detectors.persist import parse_squeezers
    from advguard.evaluate.job import load_model_and_data

    mkw = model_options(factory, None, None, None, False, device)
    m, d, info = load_model_and_data(model, data, model_kwargs=mkw)
    text = d.modality == "text"
    kind = kind or ("entropy" if text else "squeeze")
    x, y = _samples(m, d, samples, seed)
    det, summary = calibrate_detector(
        m,
        x,
        y,
        kind,
        fpr=fpr,
        squeezers=parse_squeezers(squeezers) if squeezers else None,
        layer=layer,
        holdout=holdout,
        seed=seed,
    )
    digest = model_digest(m)
    if digest is None and info.get("sha256"):
        digest = "file-sha256:" + str(info["sha256"])
    path = save_detector(det, out, digest=digest)
    summary = {
        **summary,
        "input": "text" if text else "numeric",
        "out": str(path),
        "model_digest": digest,
    }
    if json_out:
        print_json(summary)
        return
    _render(summary, f"Detector {summary['kind']} calibrated at FPR {fpr:g}")
    console.print(f"Saved: [bold]{path}[/]")


def _samples(m: Any, d: Any, samples: int | None, seed: int) -> tuple[Any, Any]:
    """The data's inputs (a 1-D object array of strings for text) and labels, checked against
    the model, at most ``samples`` of them (seeded)."""
    import numpy as np

    if d.modality == "text":
        x = np.empty(len(d.texts), dtype=object)
        x[:] = list(d.texts)
    elif tuple(d.input_shape) != tuple(m.input_shape):
        raise AdvguardError(
            f"data samples have shape {tuple(d.input_shape)} but the model expects "
            f"{tuple(m.input_shape)}"
        )
    else:
        x = d.x
    y = d.y
    if samples is not None and samples < len(x):
        idx = np.sort(np.random.default_rng(seed).permutation(len(x))[:samples])
        x, y = x[idx], y[idx]
    return x, y


@commands.command(name="show")
def show_cmd(
    path: Annotated[Path, typer.Argument(help="Directory written by 'detector calibrate'.")],
    json_out: JsonOpt = False,
) -> None:
    """Show a saved detector's kind, parameters, threshold and calibration."""
    from advguard.defenses.detectors import read_detector_info

    doc = read_detector_info(path)
    if json_out:
        print_json(doc)
        return
    _render(doc, f"Saved detector {path}")


def _render(doc: dict[str, object], title: str) -> None:
    table = Table(title=title, show_header=False)
    table.add_column("field")
    table.add_column("value")
    for k, v in doc.items():
        table.add_row(k, f"{v:.6g}" if isinstance(v, float) else str(v))
    console.print(table)
