"""``advguard extract``: steal a model through its prediction API (Knockoff Nets, JBDA)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer

from advguard.cli._common import (
    BoundsOpt,
    Commands,
    DeviceOpt,
    FactoryOpt,
    InputShapeOpt,
    JsonOpt,
    NumClassesOpt,
    console,
    model_options,
    parse_bounds,
    parse_shape,
    print_json,
    progress_bar,
    progress_callback,
)

commands = Commands(None, None)


@commands.command("extract")
def extract(
    target: Annotated[str, typer.Option(help="The model to steal: an http(s) URL or a model file")],
    data: Annotated[
        str, typer.Option("--data", "-d", help="Query pool (.npz x, y; labels only to score)")
    ],
    budget: Annotated[int, typer.Option(min=1, max=10_000_000, help="Most queries to send")],
    out: Annotated[Path, typer.Option(help="Output directory")] = Path("advguard-stolen"),
    method: Annotated[str, typer.Option(help="knockoff or jacobian")] = "knockoff",
    mode: Annotated[str, typer.Option(help="What the API reveals: probabilities or labels")] = (
        "probabilities"
    ),
    arch: Annotated[str, typer.Option(help="Student architecture: mlp or small_cnn")] = "mlp",
    eval_data: Annotated[
        str | None,
        typer.Option(help="Held-out labelled data for fidelity (default: 20% of --data)"),
    ] = None,
    epochs: Annotated[int, typer.Option(min=1, max=10_000, help="Student epochs")] = 40,
    transfer_eps: Annotated[
        float | None, typer.Option(min=0, help="Linf epsilon for the PGD transfer test")
    ] = None,
    seed: Annotated[int, typer.Option(help="Random seed")] = 0,
    api_key_env: Annotated[
        str | None, typer.Option(help="Environment variable holding the API key (URL targets)")
    ] = None,
    output: Annotated[
        str,
        typer.Option(
            help="What a URL target returns: probabilities, logits or labels (label-only API)"
        ),
    ] = "probabilities",
    factory: FactoryOpt = None,
    input_shape: InputShapeOpt = None,
    num_classes: NumClassesOpt = None,
    bounds: BoundsOpt = None,
    device: DeviceOpt = "cpu",
    json_out: JsonOpt = False,
) -> None:
    """Extract a copy of a black-box model within a query budget (Orekondy 2019; Papernot 2017)."""

    from advguard.attacks.extraction import (
        EvalSet,
        jacobian_augmentation,
        knockoff,
        transfer_rate,
    )
    from advguard.attacks.extraction.common import load_query_pool
    from advguard.attacks.extraction.report import write_extraction_report
    from advguard.models.io import save_torch

    _check_choices(method=method, mode=mode, arch=arch)
    x, y = load_query_pool(data)
    mkw = model_options(factory, input_shape, num_classes, bounds, False, device)
    model = _target_model(target, tuple(x.shape[1:]), api_key_env, output, mkw, input_shape,
                          num_classes, bounds)  # fmt: skip
    x, ex, ey = _held_out(x, y, eval_data, seed)
    ev = EvalSet.from_target(model, ex, ey)
    with progress_bar() as bar:
        cb = progress_callback(bar)
        kw = dict(budget=budget, mode=mode, arch=arch, eval_set=ev, epochs=epochs, seed=seed,
                  progress=lambda _s, d, t: cb("Queries answered", d, t))  # fmt: skip
        if method == "knockoff":
            res = knockoff(model, x, **kw)  # type: ignore[arg-type]
        else:
            res = jacobian_augmentation(model, x[: min(len(x), 100)], **kw)  # type: ignore[arg-type]
    if transfer_eps is not None:
        res.transfer = transfer_rate(res.student, model, ev, epsilon=transfer_eps, seed=seed)
    weights = save_torch(
        res.student, out / "model.safetensors", factory=f"advguard.models.zoo:{arch}",
        factory_kwargs={"input_shape": list(model.input_shape), "num_classes": model.num_classes},
    )  # fmt: skip
    jp, hp = write_extraction_report(res, out)
    if json_out:
        print_json(
            res.to_dict() | {"files": {"model": str(weights), "json": str(jp), "html": str(hp)}}
        )
        return
    _print_extraction(res, f"{method} ({mode})", budget)
    console.print(f"Stolen model: [bold]{weights}[/]; report: [bold]{jp}[/] and [bold]{hp}[/]")


_CHOICES = {
    "method": ("knockoff", "jacobian"),
    "mode": ("probabilities", "labels"),
    "arch": ("mlp", "small_cnn"),
}


def _check_choices(**given: str) -> None:
    from advguard.errors import InputError

    for name, value in given.items():
        allowed = _CHOICES[name]
        if value not in allowed:
            raise InputError(f"--{name} must be {' or '.join(allowed)}, got {value!r}")


def _print_extraction(res: Any, what: str, budget: int) -> None:
    """Queries used, fidelity, accuracy and transfer rate of the stolen model."""
    console.print(
        f"{what}: {res.queries_used} of {budget} queries, fidelity "
        f"{res.final['fidelity']['value']:.1%}"
        + (f", accuracy {res.final['accuracy']['value']:.1%}" if "accuracy" in res.final else "")
    )
    if res.transfer is not None:
        console.print(f"PGD transfer to the target: {res.transfer['transfer']['value']:.1%}")


def _target_model(
    target: str,
    pool_shape: tuple[int, ...],
    api_key_env: str | None,
    output: str,
    mkw: dict[str, Any],
    input_shape: str | None,
    num_classes: int | None,
    bounds: str | None,
) -> Any:
    """The model to steal: an HTTP endpoint (URL) or a model file (loaded with the model
    options ``mkw``; ``--device`` places a local torch model)."""
    from advguard.errors import InputError
    from advguard.models import HttpClassifier
    from advguard.models.io import CLI_OPTION_NAMES, load_model, option_names

    if not target.startswith(("http://", "https://")):
        with option_names(CLI_OPTION_NAMES):
            return load_model(target, **mkw)
    key = None
    if api_key_env is not None:
        key = os.environ.get(api_key_env)
        if not key:
            raise InputError(f"environment variable {api_key_env} is not set or empty")
    if num_classes is None:
        raise InputError("--num-classes is required for a URL target")
    shape = parse_shape(input_shape) or pool_shape
    return HttpClassifier(
        target, input_shape=shape, num_classes=num_classes,
        bounds=parse_bounds(bounds) or (0.0, 1.0), output=output,  # type: ignore[arg-type]
        api_key=key,
    )  # fmt: skip


def _held_out(x: Any, y: Any, eval_data: str | None, seed: int) -> tuple[Any, Any, Any]:
    """The query pool and the held-out set (``--eval-data``, or 20% of the pool)."""
    import numpy as np

    from advguard.attacks.extraction.common import load_query_pool

    if eval_data is not None:
        ex, ey = load_query_pool(eval_data)
        return x, ex, ey
    perm = np.random.default_rng(seed).permutation(len(x))
    n_eval = max(1, len(x) // 5)
    ex, ey = x[perm[:n_eval]], (y[perm[:n_eval]] if y is not None else None)
    return x[perm[n_eval:]], ex, ey
