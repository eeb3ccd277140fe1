"""advguard certify: randomized smoothing and IBP."""

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
    ModelOpt,
    NumClassesOpt,
    TorchScriptOpt,
    check_out_dir,
    console,
    model_options,
    parse_floats,
    progress_bar,
    progress_callback,
)
from advguard.errors import AdvguardError

commands = Commands()


@commands.command(name="certify")
def certify_cmd(
    model: ModelOpt,
    data: DataOpt,
    method: Annotated[str, typer.Option(help="smoothing (L2) or ibp (Linf)")] = "smoothing",
    sigma: Annotated[float, typer.Option(help="Smoothing noise std (raw units).")] = 0.25,
    n: Annotated[int, typer.Option("--n", min=1, help="Estimation noise samples.")] = 10000,
    n0: Annotated[int, typer.Option("--n0", min=1, help="Selection noise samples.")] = 100,
    alpha: Annotated[float, typer.Option(help="Failure probability per sample.")] = 0.001,
    samples: Annotated[int, typer.Option(min=1, help="Number of samples to certify.")] = 500,
    epsilon: Annotated[str, typer.Option(help="IBP: Linf epsilon(s), comma-separated.")] = "0.01",
    radii: Annotated[
        str, typer.Option(help="Smoothing: L2 radii to report, comma-separated.")
    ] = "0,0.25,0.5,0.75,1.0",
    out: Annotated[Path, typer.Option(help="Output directory.")] = Path("advguard-certify"),
    factory: FactoryOpt = None,
    input_shape: InputShapeOpt = None,
    num_classes: NumClassesOpt = None,
    bounds: BoundsOpt = None,
    torchscript: TorchScriptOpt = False,
    device: DeviceOpt = "cpu",
    batch_size: Annotated[int, typer.Option(min=1, help="Noisy inputs per forward.")] = 1000,
    seed: Annotated[int, typer.Option(help="Random seed (samples and noise).")] = 0,
) -> None:
    """Certify robustness: randomized smoothing (L2) or interval bound propagation (Linf)."""
    check_out_dir(out)
    from advguard.defenses.certify.report import certify_dataset
    from advguard.evaluate.job import data_info, load_model_and_data

    if method not in ("smoothing", "ibp"):
        raise AdvguardError(f"--method must be 'smoothing' or 'ibp', got {method!r}")
    grid = parse_floats(radii, "--radii") or []
    eps_list = parse_floats(epsilon, "--epsilon") or []
    mkw = model_options(factory, input_shape, num_classes, bounds, torchscript, device)
    m, d, info = load_model_and_data(model, data, model_kwargs=mkw, cli=True)
    if tuple(d.input_shape) != tuple(m.input_shape):
        raise AdvguardError(
            f"data samples have shape {tuple(d.input_shape)} but the model expects "
            f"{tuple(m.input_shape)}"
        )
    with progress_bar() as bar:
        run = certify_dataset(
            m,
            d.x,
            d.y,
            out,
            method=method,
            sigma=sigma,
            n0=n0,
            n=n,
            alpha=alpha,
            radii=grid,
            epsilons=eps_list,
            samples=samples,
            seed=seed,
            batch_size=batch_size,
            model_info=info,
            data_info=data_info(d),
            progress=progress_callback(bar),
        )
    rep = run.report
    unit = "L2 radius" if rep.norm == "l2" else "Linf epsilon"
    params = (
        f"sigma {rep.sigma:g}, n0 {rep.n0}, n {rep.n}, alpha {rep.alpha:g}"
        if rep.method == "smoothing"
        else "IBP"
    )
    table = Table(title=f"Certified accuracy ({params}, {rep.n_samples} samples)")
    table.add_column(unit, justify="right")
    table.add_column("certified accuracy [95% CI]", justify="right")
    for p in rep.results:
        table.add_row(f"{p.radius:g}", str(p.certified_accuracy))
    console.print(f"Clean accuracy (base model): {rep.clean_accuracy}")
    if rep.abstain_rate is not None:
        console.print(f"Abstain rate: {rep.abstain_rate}")
    console.print(table)
    console.print(f"Report: [bold]{run.json_path}[/] and [bold]{run.html_path}[/]")
