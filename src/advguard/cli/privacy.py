"""``advguard privacy audit``: membership-inference audit (LOSS and offline LiRA)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from advguard.cli._common import (
    BoundsOpt,
    Commands,
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

commands = Commands("privacy", "Privacy audits: membership inference against a trained model.")


@commands.command("audit")
def audit(
    model: ModelOpt,
    members: Annotated[str, typer.Option(help="Training examples of the model (.npz x, y)")],
    non_members: Annotated[
        str, typer.Option("--non-members", help="Examples NOT used in training (.npz x, y)")
    ],
    out: Annotated[Path, typer.Option(help="Output directory")] = Path("advguard-privacy"),
    population: Annotated[
        str | None,
        typer.Option(help="Population data without the targets (.npz) for offline LiRA"),
    ] = None,
    shadows: Annotated[int, typer.Option(min=2, max=256, help="Reference models")] = 8,
    arch: Annotated[str, typer.Option(help="Reference architecture: mlp or small_cnn")] = "mlp",
    shadow_epochs: Annotated[
        int, typer.Option(min=1, max=10_000, help="Epochs per reference model (match target)")
    ] = 100,
    shadow_lr: Annotated[float, typer.Option(min=0, help="Adam learning rate")] = 1e-3,
    bootstrap: Annotated[int, typer.Option(min=0, max=100_000, help="AUC resamples")] = 1000,
    seed: Annotated[int, typer.Option(help="Random seed")] = 0,
    factory: FactoryOpt = None,
    input_shape: InputShapeOpt = None,
    num_classes: NumClassesOpt = None,
    bounds: BoundsOpt = None,
    torchscript: TorchScriptOpt = False,
    device: DeviceOpt = "cpu",
    json_out: JsonOpt = False,
) -> None:
    """Audit how much a model leaks about its training set (Yeom 2018; Carlini et al. 2022)."""
    from advguard.attacks.inference import audit_membership
    from advguard.attacks.inference.report import write_privacy_report
    from advguard.data import load_dataset
    from advguard.errors import InputError
    from advguard.models.io import CLI_OPTION_NAMES, load_model, option_names

    if arch not in ("mlp", "small_cnn"):
        raise InputError(f"--arch must be mlp or small_cnn, got {arch!r}")
    mkw = model_options(factory, input_shape, num_classes, bounds, torchscript, device)
    with option_names(CLI_OPTION_NAMES):
        m = load_model(model, **mkw)
    sets = {}
    for name, spec in (
        ("members", members),
        ("non-members", non_members),
        ("population", population),
    ):
        if spec is not None:
            ds = load_dataset(spec)
            sets[name] = (ds.x, ds.y)
    with progress_bar() as bar:
        cb = progress_callback(bar)
        res = audit_membership(
            m, sets["members"], sets["non-members"], population=sets.get("population"),
            arch=arch, n_shadows=shadows, shadow_epochs=shadow_epochs, shadow_lr=shadow_lr,
            bootstrap=bootstrap, seed=seed,
            progress=(lambda _s, d, t: cb("Reference models trained", d, t)),
        )  # fmt: skip
    jp, hp = write_privacy_report(res, out)
    if json_out:
        print_json(res.to_dict() | {"files": {"json": str(jp), "html": str(hp)}})
        return
    for name, r in res.attacks.items():
        tprs = ", ".join(
            f"TPR@{row['fpr_target']:.1%} FPR {row['tpr']['value']:.2%}" for row in r["at_fpr"]
        )
        console.print(f"{name}: AUC {r['auc']:.3f}; {tprs}")
    console.print(f"Report: [bold]{jp}[/] and [bold]{hp}[/]")
