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
from advguard.errors import AdvguardError

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


def _parse_floats(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise AdvguardError(
            f"--epsilons must be numbers separated by commas, got {text!r}"
        ) from None


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
    vals = _parse_floats(text)
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


def main() -> None:  # console-script entry point
    try:
        app()
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]")
        sys.exit(130)


if __name__ == "__main__":
    main()
