"""The ``advguard`` command line. Each command is a thin call into the library; this
module renders (rich) and maps errors to exit codes: 0 ok, 1 check failed, 2 bad input."""

from __future__ import annotations

import os
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
from advguard.errors import AdvguardError, InputError

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


report_app = typer.Typer(help="Work with robustness reports.", no_args_is_help=True)
tm_app = typer.Typer(help="Threat models: presets and files.", no_args_is_help=True)
app.add_typer(report_app, name="report")
app.add_typer(tm_app, name="threat-model")

STAGE_LABELS = {
    "train": "Training CNN on digits",
    "suite": "Attack suite (batches)",
    "sanity": "Sanity checks",
    "escalation": "Escalation (epsilons)",
    "selection": "Smoothing: selection (noise samples)",
    "estimation": "Smoothing: estimation (noise samples)",
    "ibp": "IBP (epsilons)",
}


def _progress_callback(bar: Progress) -> Callable[[str, int, int], None]:
    tasks: dict[str, Any] = {}

    def on_progress(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = bar.add_task(STAGE_LABELS.get(stage, stage), total=total)
        bar.update(tasks[stage], completed=done, total=total)

    return on_progress


def _summary(report: Any, json_path: Path, html_path: Path | None) -> None:
    colour = {"pass": "green", "fail": "red", "untrustworthy": "dark_orange", "no-slo": "grey50"}
    v = report.verdict
    table = Table(
        title=f"Robustness under {report.threat_model['name']} "
        f"({report.threat_model['norm']}, {report.data['n_evaluated']} samples)"
    )
    table.add_column("epsilon", justify="right")
    table.add_column("robust accuracy [95% CI]", justify="right")
    table.add_column("fooling rate", justify="right")
    table.add_column("median perturbation", justify="right")
    table.add_column("before escalation", justify="right")
    norm = report.threat_model["norm"]
    key = norm if norm in ("linf", "l2", "l0") else "l2"
    for r in report.results:
        med = r.perturbation[key].median
        table.add_row(
            f"{r.epsilon:g}",
            str(r.robust_accuracy),
            f"{r.fooling_rate.value:.1%}" if r.fooling_rate.value is not None else "n/a",
            f"{med:.4g}" if med is not None else "-",
            f"{r.first_robust_accuracy.value:.1%}" if r.first_robust_accuracy else "-",
        )
    console.print(f"Clean accuracy: {report.clean_accuracy}")
    console.print(table)
    for c in report.sanity_checks:
        if c.status in ("warn", "fail"):
            style = "red" if c.status == "fail" else "yellow"
            console.print(f"[{style}]{c.status.upper()}[/] {c.title}: {c.explanation}")
            if c.escalation:
                console.print(f"      escalation: {c.escalation}")
    for s in v.slos:
        console.print(
            f"  SLO {s.slo}: {s.holds}" + (f" (value {s.value:.4g})" if s.value is not None else "")
        )
    console.print(f"Verdict: [bold {colour[v.status]}]{v.status.upper()}[/] - {v.summary}")
    console.print(
        f"Report: [bold]{json_path}[/]" + (f" and [bold]{html_path}[/]" if html_path else "")
    )


def _parse_floats(text: str | None, option: str = "--epsilons") -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise AdvguardError(f"{option} must be numbers separated by commas, got {text!r}") from None


def _kv(pairs: list[str] | None) -> dict[str, Any]:
    import yaml

    out: dict[str, Any] = {}
    for p in pairs or []:
        if "=" not in p:
            raise AdvguardError(f"expected KEY=VALUE, got {p!r}")
        k, v = p.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


ModelOpt = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        help="Model file: .onnx, .skops, .safetensors (with --factory or saved metadata), .pt",
    ),
]
DataOpt = Annotated[
    str,
    typer.Option(
        "--data",
        "-d",
        help="Data: digits|breast_cancer|wine, a "
        ".npz, a .csv/.parquet (?target=COL) or an image folder",
    ),
]


@app.command()
@friendly_errors
def quickstart(
    out: Annotated[Path, typer.Option(help="Directory for the report.")] = Path("advguard-report"),
    threat_model: Annotated[str, typer.Option(help="Preset or YAML file.")] = "linf-standard",
    epochs: Annotated[int, typer.Option(min=1, help="Training epochs.")] = 15,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Train a small CNN on built-in digits, evaluate it under linf-standard, write a report."""
    from advguard.evaluate.job import run_quickstart

    with progress_bar() as bar:
        res = run_quickstart(
            out,
            threat_model=threat_model,
            epochs=epochs,
            seed=seed,
            progress=_progress_callback(bar),
        )
    _summary(res.report, res.json_path, res.html_path)


@app.command(name="evaluate")
@friendly_errors
def evaluate_cmd(
    model: ModelOpt,
    data: DataOpt,
    threat_model: Annotated[
        str,
        typer.Option(
            "--threat-model", "-t", help="Preset (linf-standard, l2-standard, quick) or YAML file"
        ),
    ] = "linf-standard",
    out: Annotated[Path, typer.Option(help="Output directory.")] = Path("advguard-report"),
    factory: Annotated[
        str | None, typer.Option(help="module:callable building the torch model")
    ] = None,
    samples: Annotated[int | None, typer.Option(min=1, help="Override sample count.")] = None,
    epsilons: Annotated[str | None, typer.Option(help="Override epsilons, e.g. 0.1,0.2")] = None,
    seed: Annotated[int | None, typer.Option(help="Override seed.")] = None,
    baseline: Annotated[
        Path | None, typer.Option(help="Baseline report.json for drop SLOs.")
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run in --out.")] = False,
) -> None:
    """Evaluate a model: exit 0 if the SLOs hold, 1 if not (or untrustworthy), 2 on bad input."""
    from advguard.evaluate.job import load_model_and_data, run_evaluation
    from advguard.evaluate.threat_model import load_threat_model

    tm = load_threat_model(threat_model).with_overrides(
        samples=samples, epsilons=_parse_floats(epsilons), seed=seed
    )
    mkw = {"factory": factory} if factory else {}
    m, d, info = load_model_and_data(model, data, model_kwargs=mkw)
    with progress_bar() as bar:
        res = run_evaluation(
            m,
            d,
            tm,
            out,
            model_info=info,
            baseline=baseline,
            progress=_progress_callback(bar),
            resume=resume,
        )
    _summary(res.report, res.json_path, res.html_path)
    if res.report.verdict.status in ("fail", "untrustworthy"):
        raise typer.Exit(1)


@app.command()
@friendly_errors
def attack(
    model: ModelOpt,
    data: DataOpt,
    out: Annotated[Path, typer.Option(help="Output .npz with adversarial examples.")],
    name: Annotated[
        str, typer.Option("--attack", "-a", help="Attack name, e.g. pgd, apgd-ce")
    ] = "pgd",
    norm: Annotated[str, typer.Option(help="linf, l2 or l1")] = "linf",
    epsilon: Annotated[float, typer.Option(help="Perturbation budget.")] = 0.1,
    param: Annotated[
        list[str] | None, typer.Option("--param", "-p", help="Attack parameter KEY=VALUE")
    ] = None,
    factory: Annotated[str | None, typer.Option(help="module:callable for torch weights")] = None,
    samples: Annotated[
        int | None, typer.Option(min=1, help="Attack only the first N samples.")
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 256,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Write adversarial examples (with labels and metadata) to an .npz file."""
    from advguard.attacks.export import attack_dataset
    from advguard.evaluate.job import load_model_and_data

    mkw = {"factory": factory} if factory else {}
    m, d, info = load_model_and_data(model, data, model_kwargs=mkw)
    with progress_bar() as bar:
        cb = _progress_callback(bar)
        summary = attack_dataset(
            m,
            d,
            out,
            attack=name,
            norm=norm,
            epsilon=epsilon,
            params=_kv(param),
            samples=samples,
            batch_size=batch_size,
            seed=seed,
            model_info=info,
            progress=lambda done, total: cb("attack", done, total),
        )
    console.print(
        f"{summary['n']} samples attacked with {name} ({norm}, eps {epsilon:g}): "
        f"success rate {summary['success_rate']:.1%}, robust accuracy "
        f"{summary['robust_accuracy']:.1%}"
    )
    console.print(f"Adversarial examples written to [bold]{out}[/]")


def _parse_shape(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        shape = tuple(int(t) for t in text.replace("x", ",").replace(" ", "").split(",") if t)
    except ValueError:
        raise AdvguardError(f"--input-shape must be integers like 1,28,28, got {text!r}") from None
    if not shape:
        raise AdvguardError(f"--input-shape must be integers like 1,28,28, got {text!r}")
    return shape


def _parse_bounds(text: str | None) -> tuple[float, float] | None:
    vals = _parse_floats(text, "--bounds")
    if vals is None:
        return None
    if len(vals) != 2:
        raise AdvguardError(f"--bounds must be two numbers LOW,HIGH, got {text!r}")
    return vals[0], vals[1]


@app.command()
@friendly_errors
def redteam(
    url: Annotated[
        str, typer.Option(help="http(s) endpoint taking POST JSON (docs/http-contract.md)")
    ],
    data: DataOpt,
    threat_model: Annotated[
        str, typer.Option("--threat-model", "-t", help="Black-box threat-model YAML file")
    ],
    out: Annotated[Path, typer.Option(help="Output directory.")] = Path("advguard-redteam"),
    input_shape: Annotated[
        str | None, typer.Option(help="One input's shape, e.g. 1,28,28 (default: the data's)")
    ] = None,
    num_classes: Annotated[
        int | None, typer.Option(min=2, help="Classes (default: the data's)")
    ] = None,
    bounds: Annotated[
        str | None, typer.Option(help="Input range LOW,HIGH (default: the data's)")
    ] = None,
    api_key_env: Annotated[
        str | None,
        typer.Option(help="Name of the environment variable holding the API key (never the key)"),
    ] = None,
    api_key_header: Annotated[
        str, typer.Option(help="Header carrying the key, e.g. Authorization or X-API-Key")
    ] = "Authorization",
    api_key_prefix: Annotated[
        str | None,
        typer.Option(help="Prefix before the key (default 'Bearer ' for Authorization, else none)"),
    ] = None,
    query_budget: Annotated[
        int | None, typer.Option(min=0, help="Most samples the endpoint may answer in this run")
    ] = None,
    output: Annotated[
        str, typer.Option(help="What the endpoint returns: probabilities or logits")
    ] = "probabilities",
    input_field: Annotated[str, typer.Option(help="JSON field of the inputs")] = "inputs",
    output_field: Annotated[
        str | None, typer.Option(help="JSON field of the scores (default: --output's value)")
    ] = None,
    flatten: Annotated[bool, typer.Option(help="Send each input as a flat list.")] = False,
    batch_size: Annotated[int, typer.Option(min=1, help="Most samples per request.")] = 64,
    timeout: Annotated[float, typer.Option(min=0.001, help="Seconds per request.")] = 30.0,
    retries: Annotated[int, typer.Option(min=0, help="Retries on errors, 5xx and 429.")] = 3,
    samples: Annotated[int | None, typer.Option(min=1, help="Override sample count.")] = None,
    epsilons: Annotated[str | None, typer.Option(help="Override epsilons, e.g. 0.1,0.2")] = None,
    seed: Annotated[int | None, typer.Option(help="Override seed.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run in --out.")] = False,
) -> None:
    """Red-team a live HTTP endpoint with black-box attacks; exit 1 if the SLOs fail."""
    from advguard.evaluate.redteam import run_redteam
    from advguard.evaluate.threat_model import load_threat_model

    api_key = None
    if api_key_env is not None:
        api_key = os.environ.get(api_key_env)
        if not api_key:
            raise AdvguardError(
                f"environment variable {api_key_env} (from --api-key-env) is not set or empty"
            )
    tm = load_threat_model(threat_model).with_overrides(
        samples=samples, epsilons=_parse_floats(epsilons), seed=seed
    )
    with progress_bar() as bar:
        res = run_redteam(
            url,
            data,
            tm,
            out,
            input_shape=_parse_shape(input_shape),
            num_classes=num_classes,
            bounds=_parse_bounds(bounds),
            api_key=api_key,
            api_key_header=api_key_header,
            api_key_prefix=api_key_prefix,
            query_budget=query_budget,
            output=output,  # type: ignore[arg-type]
            input_field=input_field,
            output_field=output_field,
            flatten=flatten,
            batch_size=batch_size,
            timeout=timeout,
            retries=retries,
            progress=_progress_callback(bar),
            resume=resume,
        )
    _summary(res.report, res.json_path, res.html_path)
    q = res.report.model.get("queries", {})
    console.print(
        f"Endpoint answered {q.get('samples_answered')} samples in {q.get('requests_sent')} "
        f"requests ({q.get('retries')} retries)"
        + (f"; budget left {q['budget_left']}" if q.get("budget_left") is not None else "")
    )
    if res.report.model.get("query_budget_exhausted"):
        console.print(
            "[dark_orange]Query budget exhausted[/]: the report covers "
            f"{res.report.data['n_evaluated']} of {res.report.data.get('n_requested')} samples; "
            "re-run with --resume and a larger --query-budget"
        )
    if res.report.verdict.status in ("fail", "untrustworthy"):
        raise typer.Exit(1)


@app.command(name="train")
@friendly_errors
def train_cmd(
    defense: Annotated[str, typer.Option(help="pgd-at, trades, fast-at or dp-sgd")],
    model: Annotated[
        str,
        typer.Option(
            "--model",
            "-m",
            help="module:factory (e.g. advguard.models.zoo:small_cnn) or an advguard "
            ".safetensors to fine-tune",
        ),
    ],
    data: DataOpt,
    out: Annotated[Path, typer.Option(help="Directory for model.safetensors + manifest.json")],
    epsilon: Annotated[
        float | None, typer.Option(help="Training perturbation budget (default 0.3).")
    ] = None,
    norm: Annotated[str, typer.Option(help="linf or l2")] = "linf",
    epochs: Annotated[int, typer.Option(min=1)] = 10,
    batch_size: Annotated[
        int, typer.Option(min=1, help="Batch size (dp-sgd: expected Poisson batch size)")
    ] = 128,
    lr: Annotated[
        float | None, typer.Option(help="Learning rate (default 1e-3; dp-sgd 0.5).")
    ] = None,
    optimizer: Annotated[
        str | None, typer.Option(help="adam or sgd (default adam; dp-sgd sgd)")
    ] = None,
    lr_schedule: Annotated[str, typer.Option(help="none, cosine, step or cyclic")] = "none",
    steps: Annotated[int, typer.Option(min=1, help="Inner attack steps (pgd-at, trades)")] = 10,
    step_size: Annotated[
        float | None, typer.Option(help="Inner step (default 2.5 eps/steps)")
    ] = None,
    beta: Annotated[float, typer.Option(help="TRADES trade-off.")] = 6.0,
    mix: Annotated[float, typer.Option(help="pgd-at: weight of the clean loss [0,1]")] = 0.0,
    ramp_epochs: Annotated[
        int | None, typer.Option(help="Epsilon warm-up epochs (default: auto)")
    ] = None,
    val_fraction: Annotated[float, typer.Option(help="Held-out share of the data.")] = 0.1,
    eval_samples: Annotated[
        int, typer.Option(min=1, help="Held-out samples for clean/robust accuracy")
    ] = 512,
    patience: Annotated[int | None, typer.Option(min=1, help="Early-stopping patience.")] = None,
    dp_epsilon: Annotated[
        float | None, typer.Option(help="dp-sgd: privacy budget epsilon (default 8).")
    ] = None,
    dp_delta: Annotated[
        float | None, typer.Option(help="dp-sgd: delta (default min(1e-5, 0.1/n)).")
    ] = None,
    noise_multiplier: Annotated[
        float | None, typer.Option(help="dp-sgd: fixed noise (instead of --dp-epsilon).")
    ] = None,
    max_grad_norm: Annotated[
        float, typer.Option(help="dp-sgd: per-example gradient clipping norm.")
    ] = 1.0,
    input_shape: Annotated[
        str | None, typer.Option(help="Factory input shape, e.g. 1,28,28 (default: the data's)")
    ] = None,
    num_classes: Annotated[
        int | None, typer.Option(min=2, help="Classes (default: the data's)")
    ] = None,
    seed: Annotated[int, typer.Option()] = 0,
    resume: Annotated[
        bool, typer.Option(help="Continue an interrupted run from its state in --out.")
    ] = False,
) -> None:
    """Adversarially train (or fine-tune) a torch model, or train it with DP-SGD.

    Writes model.safetensors + manifest.json to --out. Adversarial training saves its
    state after every epoch; after a crash or Ctrl-C, run the same command again with
    --resume to continue from the last finished epoch.
    """
    from advguard.data import load_dataset
    from advguard.defenses.training import METHODS, adversarial_train, dp_train, load_trainable

    if defense not in (*METHODS, "dp-sgd"):
        raise InputError(
            f"unknown defense {defense!r}; use one of {', '.join((*METHODS, 'dp-sgd'))}"
        )
    dp = defense == "dp-sgd"
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
    ds = load_dataset(data)
    shape = _parse_shape(input_shape) or tuple(ds.x.shape[1:])
    module, factory, factory_kwargs = load_trainable(
        model, input_shape=shape, num_classes=num_classes or ds.num_classes
    )
    labels = {"train": f"{defense} training (batches)", "epoch": "Epochs"}
    with progress_bar() as bar:
        cb = _progress_callback(bar)
        common: dict[str, Any] = dict(
            epochs=epochs, batch_size=batch_size, lr_schedule=lr_schedule,
            val_fraction=val_fraction, val_samples=eval_samples, bounds=ds.bounds,
            factory=factory, factory_kwargs=factory_kwargs, seed=seed, out_dir=out,
            progress=lambda s, d, t: cb(labels.get(s, s), d, t),
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
    man = res.manifest
    if dp:
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
    else:
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
    console.print(f"Stopped: {man['stop_reason']} after {man['total_time_s']:.1f} s")
    best_note = "" if dp else f" (best epoch {man['best_epoch']})"
    console.print(
        f"Model: [bold]{res.checkpoint_path}[/]{best_note}, manifest: [bold]{res.manifest_path}[/]"
    )


@report_app.command("compare")
@friendly_errors
def report_compare(
    a: Annotated[Path, typer.Argument(help="Reference report.json (e.g. production)")],
    b: Annotated[Path, typer.Argument(help="Candidate report.json")],
    markdown: Annotated[bool, typer.Option(help="Print Markdown (for PR comments).")] = False,
) -> None:
    """Compare two reports side by side; regressions are marked. Exit 1 if B regressed."""
    from advguard.evaluate.compare import compare_reports, comparison_markdown, comparison_table
    from advguard.evaluate.report import load_report

    cmp = compare_reports(load_report(a), load_report(b))
    if markdown:
        console.print(comparison_markdown(cmp), markup=False, highlight=False)
    else:
        tab = comparison_table(cmp)
        table = Table(title=f"{a} vs {b}")
        for h in tab.columns:
            table.add_column(h)
        styles = {"regression": "bold red", "improvement": "green", "only-one": "dim"}
        for row, style in zip(tab.rows, tab.styles, strict=True):
            table.add_row(*[str(c) for c in row], style=styles.get(style))
        console.print(table)
        for w in cmp.warnings:
            console.print(f"[yellow]warning:[/] {w}")
    if cmp.has_regression:
        raise typer.Exit(1)


@tm_app.command("list")
def tm_list() -> None:
    """List the threat-model presets and the attacks a threat model can use."""
    from rich.table import Table

    from advguard.attacks.registry import ATLAS_VERSION, ATTACKS
    from advguard.evaluate.threat_model import PRESETS, load_threat_model

    for name in PRESETS:
        tm = load_threat_model(name)
        console.print(
            f"[bold]{name}[/]: {tm.norm}, eps {tm.epsilons}, "
            f"attacks {', '.join(s.attack for s in tm.attacks)}"
        )
    table = Table(title=f"Attacks (MITRE ATLAS {ATLAS_VERSION} technique IDs)")
    for col in ("attack", "norms", "knowledge", "ATLAS", "what it does"):
        table.add_column(col)
    for a in ATTACKS.values():
        table.add_row(a.name, ", ".join(a.norms), a.knowledge, " ".join(a.atlas), a.description)
    console.print(table)


@tm_app.command("show")
@friendly_errors
def tm_show(name: Annotated[str, typer.Argument(help="Preset name or YAML file")]) -> None:
    """Validate a threat model and print it in full."""
    import yaml

    from advguard.evaluate.threat_model import load_threat_model

    tm = load_threat_model(name)
    console.print(yaml.safe_dump(tm.model_dump(), sort_keys=False), markup=False, highlight=False)


@app.command(name="certify")
@friendly_errors
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
    factory: Annotated[str | None, typer.Option(help="module:callable for torch weights")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Noisy inputs per forward.")] = 1000,
    seed: Annotated[int, typer.Option(help="Random seed (samples and noise).")] = 0,
) -> None:
    """Certify robustness: randomized smoothing (L2) or interval bound propagation (Linf)."""
    from advguard.defenses.certify.report import certify_dataset
    from advguard.evaluate.job import data_info, load_model_and_data

    if method not in ("smoothing", "ibp"):
        raise AdvguardError(f"--method must be 'smoothing' or 'ibp', got {method!r}")
    try:
        grid = [float(t) for t in radii.replace(" ", "").split(",") if t]
        eps_list = [float(t) for t in epsilon.replace(" ", "").split(",") if t]
    except ValueError:
        raise AdvguardError(
            f"--radii/--epsilon need comma-separated numbers, got {radii!r} and {epsilon!r}"
        ) from None
    mkw = {"factory": factory} if factory else {}
    m, d, info = load_model_and_data(model, data, model_kwargs=mkw)
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
            progress=_progress_callback(bar),
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


@app.command()
@friendly_errors
def gate(
    report: Annotated[Path, typer.Option(help="Candidate report.json (from advguard evaluate).")],
    policy: Annotated[Path, typer.Option(help="Gate policy YAML (see docs/gate.md).")],
    baseline: Annotated[
        str | None,
        typer.Option(help="Baseline report.json, or 'production' (needs --registry-model)."),
    ] = None,
    registry_model: Annotated[
        str | None, typer.Option(help="Registered model whose production report is the baseline.")
    ] = None,
    markdown: Annotated[
        Path | None, typer.Option(help="Write a Markdown summary (PR comment) here.")
    ] = None,
    junit: Annotated[Path | None, typer.Option(help="Write JUnit XML here.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Release gate: exit 0 if the report meets the policy, 1 if not, 2 on bad input."""
    from advguard.evaluate.report import load_report
    from advguard.registry.gate import gate_junit, gate_markdown, resolve_baseline, run_gate
    from advguard.registry.policy import load_policy

    pol = load_policy(policy)
    rep = load_report(report)
    base = (
        resolve_baseline(
            baseline, registry_model=registry_model, threat_model=rep.threat_model.get("name")
        )
        if baseline
        else None
    )
    res = run_gate(rep, pol, base)
    if markdown:
        markdown.write_text(gate_markdown(res))
    if junit:
        junit.write_text(gate_junit(res))
    if json_out:
        console.print_json(res.model_dump_json())
    else:
        table = Table(title=f"advguard gate: {res.report} vs policy {res.policy}")
        for h in ("check", "expected", "actual", "status"):
            table.add_column(h)
        colour = {"pass": "green", "fail": "bold red", "skip": "dim"}
        for c in res.checks:
            table.add_row(
                c.name, c.expected, c.actual, f"[{colour[c.status]}]{c.status.upper()}[/]"
            )
        console.print(table)
        for c in res.failures:
            console.print(f"[red]fail:[/] {c.name}: {c.message}", highlight=False)
        for w in res.warnings:
            console.print(f"[yellow]warning:[/] {w}", highlight=False)
        outcome = "[bold green]PASSED[/]" if res.passed else "[bold red]FAILED[/]"
        console.print(f"Gate {outcome}")
    if not res.passed:
        raise typer.Exit(1)


# -- model registry ------------------------------------------------------------------
registry_app = typer.Typer(
    help="Model registry: push, pull, verify, promote and audit model versions.",
    no_args_is_help=True,
)
app.add_typer(registry_app, name="registry")

RootOpt = Annotated[
    Path | None,
    typer.Option(
        "--root", help="Registry root (default $ADVGUARD_REGISTRY or ~/.advguard/registry)"
    ),
]
DbOpt = Annotated[
    str | None,
    typer.Option(
        "--db-url", help="Database URL (default sqlite in the root; or postgresql+psycopg://)"
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


def _registry(root: Path | None, db_url: str | None) -> Any:
    from advguard.registry.store import Registry

    return Registry(root, db_url=db_url)


def _print_json(obj: Any) -> None:
    import json

    console.print_json(json.dumps(obj, default=str))


@registry_app.command("keygen")
@friendly_errors
def registry_keygen(
    out: Annotated[Path, typer.Option(help="Directory for private.pem and public.pem")],
    curve: Annotated[str, typer.Option(help="P-256 or P-384")] = "P-256",
    as_json: JsonOpt = False,
) -> None:
    """Create a signing key pair (private key file mode 0600)."""
    from advguard.registry.signing import generate_keypair

    private, public = generate_keypair(out, curve=curve)
    if as_json:
        _print_json({"private_key": str(private), "public_key": str(public)})
    else:
        console.print(f"private key: {private} (keep secret)\npublic key:  {public}")


@registry_app.command("push")
@friendly_errors
def registry_push(
    name: Annotated[str, typer.Argument(help="Model name")],
    model: Annotated[Path, typer.Option("--model", help="Model file (safetensors, onnx, ...)")],
    factory: Annotated[
        str | None, typer.Option(help="module:callable building the torch model")
    ] = None,
    report: Annotated[
        list[Path] | None, typer.Option("--report", help="report.json to attach (repeatable)")
    ] = None,
    key: Annotated[Path | None, typer.Option("--key", help="Private key: sign the model")] = None,
    data_hash: Annotated[
        str | None, typer.Option(help="sha256 of the training data (provenance)")
    ] = None,
    config: Annotated[
        Path | None, typer.Option(help="Training config (YAML/JSON) recorded as provenance")
    ] = None,
    code_rev: Annotated[
        str | None, typer.Option(help="Code revision (default: git rev-parse HEAD)")
    ] = None,
    allow_pickle: Annotated[
        bool, typer.Option(help="Accept plain tensor pickles after an opcode scan")
    ] = False,
    root: RootOpt = None,
    db_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Scan, store (and sign) a new model version; it starts in stage 'candidate'."""
    training_config = None
    if config is not None:
        import yaml

        if not config.is_file():
            raise FileNotFoundError(f"training config {config} does not exist")
        training_config = yaml.safe_load(config.read_text())
    with _registry(root, db_url) as reg:
        info = reg.push(
            name,
            model,
            factory=factory,
            reports=report or [],
            private_key=key,
            data_hash=data_hash,
            training_config=training_config,
            code_revision=code_rev,
            allow_pickle=allow_pickle,
        )
    if as_json:
        _print_json(info.to_dict())
        return
    console.print(
        f"pushed [bold]{info.ref}[/] ({info.format}, sha256:{info.model_digest[:16]}..., "
        f"{'signed' if info.signature else 'unsigned'}, {len(info.reports)} report(s))"
    )
    for s in info.scan:
        for w in s["warnings"]:
            console.print(f"[yellow]warning:[/] {s['path']}: {w}")


@registry_app.command("list")
@friendly_errors
def registry_list(root: RootOpt = None, db_url: DbOpt = None, as_json: JsonOpt = False) -> None:
    """List models, their latest and production versions."""
    with _registry(root, db_url) as reg:
        models = reg.list_models()
    if as_json:
        _print_json(models)
        return
    table = Table(title="Registry models")
    for col in ("name", "versions", "latest", "production"):
        table.add_column(col)
    for m in models:
        table.add_row(m["name"], str(m["versions"]), str(m["latest"]), str(m["production"] or "-"))
    console.print(table)


@registry_app.command("show")
@friendly_errors
def registry_show(
    ref: Annotated[str, typer.Argument(help="NAME, NAME:VERSION or NAME@STAGE")],
    public_key: Annotated[
        Path | None, typer.Option(help="Verify the signature for the card")
    ] = None,
    root: RootOpt = None,
    db_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show a version's metadata as a Markdown model card (or JSON)."""
    from advguard.registry.card import render_model_card

    with _registry(root, db_url) as reg:
        info = reg.get(ref)
        if as_json:
            data = info.to_dict()
            data["history"] = [e.__dict__ for e in reg.history(info.name)]
            _print_json(data)
            return
        reports = [reg.report(info, i) for i in range(len(info.reports))]
        status = "unsigned" if info.signature is None else "signed (not checked)"
        if public_key is not None:
            status = reg.verify(info.ref, public_key=public_key).signature[info.ref]
    console.print(render_model_card(info, reports, status), markup=False, highlight=False)


@registry_app.command("pull")
@friendly_errors
def registry_pull(
    ref: Annotated[str, typer.Argument(help="NAME, NAME:VERSION or NAME@STAGE")],
    out: Annotated[Path, typer.Option(help="Output directory")],
    public_key: Annotated[
        Path | None, typer.Option(help="Verify the signature and report attestations")
    ] = None,
    root: RootOpt = None,
    db_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Copy a version's files out, verifying every hash (and the signature with a key)."""
    with _registry(root, db_url) as reg:
        res = reg.pull(ref, out, public_key=public_key)
    if as_json:
        _print_json(
            {
                "ref": res.version.ref,
                "signature": res.signature,
                "files": [str(f) for f in res.files],
            }
        )
        return
    console.print(f"pulled [bold]{res.version.ref}[/] into {res.out} (signature: {res.signature})")


@registry_app.command("verify")
@friendly_errors
def registry_verify(
    ref: Annotated[str, typer.Argument(help="NAME (all versions), NAME:VERSION or NAME@STAGE")],
    public_key: Annotated[
        Path | None, typer.Option(help="Also verify signatures and attestations")
    ] = None,
    root: RootOpt = None,
    db_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Re-hash every stored object of the version(s); exit 1 if anything changed."""
    with _registry(root, db_url) as reg:
        res = reg.verify(ref, public_key=public_key)
    if as_json:
        _print_json(res.to_dict())
    else:
        for version, status in res.signature.items():
            console.print(f"{version}: signature {status}")
        for p in res.problems:
            console.print(f"[bold red]FAIL:[/] {p}")
        if res.ok:
            console.print(f"[green]ok[/]: {res.checked} object(s) match their digests")
    if not res.ok:
        raise typer.Exit(1)


@registry_app.command("promote")
@friendly_errors
def registry_promote(
    name: Annotated[str, typer.Argument(help="Model name")],
    version: Annotated[int, typer.Argument(help="Version number")],
    stage: Annotated[str, typer.Option(help="candidate, canary, production or archived")] = (
        "production"
    ),
    root: RootOpt = None,
    db_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Move a version to a stage; the previous production version is archived."""
    with _registry(root, db_url) as reg:
        info = reg.promote(name, version, stage)
    if as_json:
        _print_json(info.to_dict())
    else:
        console.print(f"{info.ref} is now [bold]{info.stage}[/]")


@registry_app.command("rollback")
@friendly_errors
def registry_rollback(
    name: Annotated[str, typer.Argument(help="Model name")],
    root: RootOpt = None,
    db_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Return the previous production version to production (current one is archived)."""
    with _registry(root, db_url) as reg:
        info = reg.rollback(name)
    if as_json:
        _print_json(info.to_dict())
    else:
        console.print(f"rolled back: {info.ref} is [bold]production[/] again")


@registry_app.command("audit")
@friendly_errors
def registry_audit(
    verify: Annotated[
        bool, typer.Option("--verify", help="Recompute the hash chain; exit 1 if broken")
    ] = False,
    subject: Annotated[
        str | None, typer.Option(help="Only entries about this model (or NAME:VERSION)")
    ] = None,
    root: RootOpt = None,
    db_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show the append-only audit log; --verify checks its hash chain."""
    with _registry(root, db_url) as reg:
        check = reg.verify_audit() if verify else None
        entries = reg.audit_log(subject=subject) if not verify else []
    if check is not None:
        if as_json:
            _print_json(check.__dict__)
        elif check.ok:
            console.print(f"[green]audit chain ok[/]: {check.entries} entries, head {check.head}")
        else:
            console.print(f"[bold red]audit chain broken[/] at {check.reason}")
        if not check.ok:
            raise typer.Exit(1)
        return
    if as_json:
        _print_json([e.__dict__ for e in entries])
        return
    table = Table(title="Registry audit log")
    for col in ("seq", "time", "actor", "action", "subject"):
        table.add_column(col)
    for e in entries:
        table.add_row(str(e.seq), e.ts, e.actor, e.action, e.subject)
    console.print(table)


def main() -> None:  # console-script entry point
    try:
        app()
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]")
        sys.exit(130)


if __name__ == "__main__":
    main()
