"""advguard train: adversarial training and DP-SGD."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from advguard.cli._common import (
    Commands,
    DataOpt,
    DeviceOpt,
    check_out_dir,
    cli_device,
    console,
    parse_shape,
    progress_bar,
    progress_callback,
)
from advguard.errors import InputError

commands = Commands()


DefenseOpt = Annotated[str, typer.Option(help="pgd-at, trades, fast-at or dp-sgd")]
ModelOpt = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        help="module:factory (e.g. advguard.models.zoo:small_cnn) or an advguard "
        ".safetensors to fine-tune",
    ),
]
OutOpt = Annotated[Path, typer.Option(help="Directory for model.safetensors + manifest.json")]
FactoryOpt = Annotated[
    str | None,
    typer.Option(
        help="module:callable for a .safetensors --model whose factory is not "
        "advguard's zoo (a model file never chooses code to run)"
    ),
]
EpsilonOpt = Annotated[
    float | None, typer.Option(help="Training perturbation budget (default 0.3).")
]
NormOpt = Annotated[str, typer.Option(help="linf or l2")]
EpochsOpt = Annotated[int, typer.Option(min=1)]
BatchOpt = Annotated[
    int, typer.Option(min=1, help="Batch size (dp-sgd: expected Poisson batch size)")
]
LrOpt = Annotated[float | None, typer.Option(help="Learning rate (default 1e-3; dp-sgd 0.5).")]
OptimizerOpt = Annotated[str | None, typer.Option(help="adam or sgd (default adam; dp-sgd sgd)")]
ScheduleOpt = Annotated[str, typer.Option(help="none, cosine, step or cyclic")]
StepsOpt = Annotated[int, typer.Option(min=1, help="Inner attack steps (pgd-at, trades)")]
StepSizeOpt = Annotated[float | None, typer.Option(help="Inner step (default 2.5 eps/steps)")]
BetaOpt = Annotated[float, typer.Option(help="TRADES trade-off.")]
MixOpt = Annotated[float, typer.Option(help="pgd-at: weight of the clean loss [0,1]")]
RampOpt = Annotated[int | None, typer.Option(help="Epsilon warm-up epochs (default: auto)")]
ValFractionOpt = Annotated[float, typer.Option(help="Held-out share of the data.")]
EvalSamplesOpt = Annotated[
    int, typer.Option(min=1, help="Held-out samples for clean/robust accuracy")
]
PatienceOpt = Annotated[int | None, typer.Option(min=1, help="Early-stopping patience.")]
DpEpsilonOpt = Annotated[
    float | None, typer.Option(help="dp-sgd: privacy budget epsilon (default 8).")
]
DpDeltaOpt = Annotated[float | None, typer.Option(help="dp-sgd: delta (default min(1e-5, 0.1/n)).")]
NoiseOpt = Annotated[
    float | None, typer.Option(help="dp-sgd: fixed noise (instead of --dp-epsilon).")
]
ClipOpt = Annotated[float, typer.Option(help="dp-sgd: per-example gradient clipping norm.")]
ShapeOpt = Annotated[
    str | None, typer.Option(help="Factory input shape, e.g. 1,28,28 (default: the data's)")
]
ClassesOpt = Annotated[int | None, typer.Option(min=2, help="Classes (default: the data's)")]
ResumeOpt = Annotated[
    bool, typer.Option(help="Continue an interrupted run from its state in --out.")
]


@commands.command(name="train")
def train_cmd(
    defense: DefenseOpt,
    model: ModelOpt,
    data: DataOpt,
    out: OutOpt,
    factory: FactoryOpt = None,
    epsilon: EpsilonOpt = None,
    norm: NormOpt = "linf",
    epochs: EpochsOpt = 10,
    batch_size: BatchOpt = 128,
    lr: LrOpt = None,
    optimizer: OptimizerOpt = None,
    lr_schedule: ScheduleOpt = "none",
    steps: StepsOpt = 10,
    step_size: StepSizeOpt = None,
    beta: BetaOpt = 6.0,
    mix: MixOpt = 0.0,
    ramp_epochs: RampOpt = None,
    val_fraction: ValFractionOpt = 0.1,
    eval_samples: EvalSamplesOpt = 512,
    patience: PatienceOpt = None,
    dp_epsilon: DpEpsilonOpt = None,
    dp_delta: DpDeltaOpt = None,
    noise_multiplier: NoiseOpt = None,
    max_grad_norm: ClipOpt = 1.0,
    input_shape: ShapeOpt = None,
    num_classes: ClassesOpt = None,
    seed: Annotated[int, typer.Option()] = 0,
    resume: ResumeOpt = False,
    device: DeviceOpt = "cpu",
) -> None:
    """Adversarially train (or fine-tune) a torch model, or train it with DP-SGD.

    Writes model.safetensors + manifest.json to --out. Adversarial training saves its
    state after every epoch; after a crash or Ctrl-C, run the same command again with
    --resume to continue from the last finished epoch.
    """
    check_out_dir(out)
    from advguard.data import load_dataset
    from advguard.defenses.training import METHODS, adversarial_train, dp_train, load_trainable
    from advguard.models.io import CLI_OPTION_NAMES, option_names

    if defense not in (*METHODS, "dp-sgd"):
        raise InputError(
            f"unknown defense {defense!r}; use one of {', '.join((*METHODS, 'dp-sgd'))}"
        )
    dp = defense == "dp-sgd"
    _check_defense_options(dp, epsilon, resume, dp_epsilon, dp_delta, noise_multiplier)
    dev = cli_device(device)
    ds = load_dataset(data)
    shape = parse_shape(input_shape) or tuple(ds.x.shape[1:])
    with option_names(CLI_OPTION_NAMES):
        module, factory, factory_kwargs = load_trainable(
            model, input_shape=shape, num_classes=num_classes or ds.num_classes, factory=factory
        )
    module.to(dev)  # both trainers train where the module is
    labels = {"train": f"{defense} training (batches)", "epoch": "Epochs"}
    with progress_bar() as bar:
        cb = progress_callback(bar)
        common: dict[str, Any] = dict(
            epochs=epochs, batch_size=batch_size, lr_schedule=lr_schedule,
            val_fraction=val_fraction, val_samples=eval_samples, bounds=ds.bounds,
            factory=factory, factory_kwargs=factory_kwargs, seed=seed, out_dir=out,
            progress=lambda s, d, t: cb(labels.get(s) or s, d, t),
        )  # fmt: skip
        if dp:
            res = dp_train(
                module, ds.x, ds.y, target_epsilon=dp_epsilon, delta=dp_delta,
                noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                lr=0.5 if lr is None else lr, optimizer=optimizer or "sgd", **common,
            )  # fmt: skip
        else:
            res = adversarial_train(
                module, ds.x, ds.y, method=defense, epsilon=0.3 if epsilon is None else epsilon,
                norm=norm, lr=1e-3 if lr is None else lr, optimizer=optimizer or "adam",
                steps=steps, step_size=step_size, beta=beta, mix=mix, ramp_epochs=ramp_epochs,
                patience=patience, resume=resume, **common,
            )  # fmt: skip
    _print_summary(res, dp, defense, norm)


def _print_summary(res: Any, dp: bool, defense: str, norm: str) -> None:
    """The epochs table, why training stopped and where the model was written."""
    man = res.manifest
    if dp:
        _print_dp(man)
    else:
        _print_adversarial(man, defense, norm)
    console.print(f"Stopped: {man['stop_reason']} after {man['total_time_s']:.1f} s")
    best_note = "" if dp else f" (best epoch {man['best_epoch']})"
    console.print(
        f"Model: [bold]{res.checkpoint_path}[/]{best_note}, manifest: [bold]{res.manifest_path}[/]"
    )


def _check_defense_options(
    dp: bool,
    epsilon: float | None,
    resume: bool,
    dp_epsilon: float | None,
    dp_delta: float | None,
    noise_multiplier: float | None,
) -> None:
    """Refuse options of adversarial training for dp-sgd and the other way round."""
    if dp:
        given = [f for f, v in (("--epsilon", epsilon), ("--resume", resume or None)) if v]
        if given:
            raise InputError(
                f"{' and '.join(given)} do not apply to dp-sgd (--epsilon is the attack "
                "budget of adversarial training; the privacy budget is --dp-epsilon; a DP "
                "run cannot be resumed)"
            )
    else:
        given = [
            f
            for f, v in (("--dp-epsilon", dp_epsilon), ("--dp-delta", dp_delta),
                         ("--noise-multiplier", noise_multiplier))
            if v is not None
        ]  # fmt: skip
        if given:
            raise InputError(f"{', '.join(given)} only apply to --defense dp-sgd")


def _print_dp(man: dict[str, Any]) -> None:
    """The DP-SGD epochs table and the privacy guarantee."""
    priv = man["privacy"]
    table = Table(
        title=f"DP-SGD: noise multiplier {priv['noise_multiplier']:.3g}, clipping "
        f"{priv['max_grad_norm']:g}, delta {priv['delta']:.2g} "
        f"({man['data']['n_val_evaluated']} held-out samples)"
    )
    for col in ("epoch", "loss", "train acc", "clean acc", "epsilon spent"):
        table.add_column(col, justify="right")
    for r in man["epochs"]:
        table.add_row(
            f"{r['epoch']}", f"{r['loss']:.4f}", f"{r['train_acc']:.1%}",
            f"{r['val_clean_acc']:.1%}", f"{r['epsilon_spent']:.3g}",
        )  # fmt: skip
    console.print(table)
    console.print(
        f"Privacy: ([bold]epsilon {priv['epsilon']:.3g}[/], delta {priv['delta']:.2g})-DP "
        f"for each training example ({priv['accountant']} accountant, {priv['steps']} steps)"
    )


def _print_adversarial(man: dict[str, Any], defense: str, norm: str) -> None:
    """The adversarial-training epochs table, resume and catastrophic-overfitting notes."""
    table = Table(
        title=f"{defense} at {norm} eps {man['config']['epsilon']:g}: held-out accuracy "
        f"({man['data']['n_val_evaluated']} samples, PGD-{man['config']['eval_steps']})"
    )
    for col in ("epoch", "train eps", "loss", "clean acc", "robust acc"):
        table.add_column(col, justify="right")
    for r in man["epochs"]:
        best = r["epoch"] == man["best_epoch"]
        table.add_row(
            f"{r['epoch']}" + (" *" if best else ""),
            f"{r['epsilon']:.3g}",
            f"{r['loss']:.4f}",
            f"{r['val_clean_acc']:.1%}",
            f"{r['val_robust_acc']:.1%}",
            style="bold" if best else None,
        )
    console.print(table)
    if man.get("resumed_from_epoch") is not None:
        console.print(f"Resumed after epoch {man['resumed_from_epoch']} of an interrupted run")
    for ev in man["co_events"]:
        console.print(f"[dark_orange]catastrophic overfitting[/]: {ev['reason']}; rolled back")
