"""advguard quickstart / evaluate / attack / redteam, and the report and threat-model groups."""

from __future__ import annotations

import os
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
    ModelOpt,
    NumClassesOpt,
    TorchScriptOpt,
    check_out_dir,
    check_out_file,
    cli_device,
    console,
    model_options,
    parse_bounds,
    parse_floats,
    parse_kv,
    parse_shape,
    progress_bar,
    progress_callback,
    render_summary,
)
from advguard.errors import AdvguardError, InputError

commands = Commands()
report_commands = Commands("report", "Work with robustness reports.")
threat_model_commands = Commands("threat-model", "Threat models: presets and files.")


@commands.command()
def quickstart(
    out: Annotated[Path, typer.Option(help="Directory for the report.")] = Path("advguard-report"),
    threat_model: Annotated[str, typer.Option(help="Preset or YAML file.")] = "linf-standard",
    epochs: Annotated[int, typer.Option(min=1, help="Training epochs.")] = 15,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    device: DeviceOpt = "cpu",
    samples: Annotated[int | None, typer.Option(min=1, help="Override sample count.")] = None,
    epsilons: Annotated[str | None, typer.Option(help="Override epsilons, e.g. 0.1,0.2")] = None,
    full: Annotated[
        bool,
        typer.Option(help="linf-standard as is: all 397 test images, epsilons 0.05-0.3 (slow)."),
    ] = False,
) -> None:
    """Train a small CNN on built-in digits, evaluate it under linf-standard, write a report.

    By default linf-standard runs on 150 test images at epsilons 0.1, 0.2 and 0.3 (same
    attacks, steps, queries and sanity checks; about a minute on 2 cores); --full runs
    the preset as it is."""
    check_out_dir(out)
    dev = cli_device(device)
    from advguard.evaluate.job import quickstart_threat_model, run_quickstart

    eps = parse_floats(epsilons)
    quickstart_threat_model(threat_model, samples=samples, epsilons=eps, full=full)  # check
    with progress_bar() as bar:
        res = run_quickstart(
            out,
            threat_model=threat_model,
            epochs=epochs,
            seed=seed,
            device=dev,
            progress=progress_callback(bar),
            samples=samples,
            epsilons=eps,
            full=full,
        )
    render_summary(res.report, res.json_path, res.html_path)


def _backend(name: str, address: str | None, workers: int) -> Any:
    """The distributed backend the options ask for (None: run locally)."""
    if name == "local":
        if address is not None:
            raise InputError("--address needs --backend ray")
        return None
    if name != "ray":
        raise InputError(f"--backend must be local or ray, got {name!r}")
    from advguard.evaluate.distributed import RayBackend, import_ray

    import_ray()  # without Ray: say which extra to install, before loading anything
    return RayBackend(address, workers=workers)


@commands.command(name="evaluate")
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
    factory: FactoryOpt = None,
    input_shape: InputShapeOpt = None,
    num_classes: NumClassesOpt = None,
    bounds: BoundsOpt = None,
    torchscript: TorchScriptOpt = False,
    device: DeviceOpt = "cpu",
    samples: Annotated[int | None, typer.Option(min=1, help="Override sample count.")] = None,
    epsilons: Annotated[str | None, typer.Option(help="Override epsilons, e.g. 0.1,0.2")] = None,
    seed: Annotated[int | None, typer.Option(help="Override seed.")] = None,
    baseline: Annotated[
        Path | None, typer.Option(help="Baseline report.json for drop SLOs.")
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(help="Continue an interrupted run in --out (written by either backend)."),
    ] = False,
    allow_large: Annotated[
        bool, typer.Option(help="Lift the limits on steps, restarts, queries and samples.")
    ] = False,
    backend: Annotated[
        str, typer.Option(help="Where the attack suite runs: local, or ray (sample shards).")
    ] = "local",
    address: Annotated[
        str | None,
        typer.Option(
            help="Ray cluster: auto (the cluster this machine runs, from `ray start`) or "
            "ray://host:port (a head node's client server). Default: a private local Ray."
        ),
    ] = None,
    workers: Annotated[int, typer.Option(min=1, help="Ray workers (one model each).")] = 2,
) -> None:
    """Evaluate a model: exit 0 if the SLOs hold, 1 if not (or untrustworthy), 2 on bad input.

    A threat model with ``goals`` (poisoning, backdoor, membership-inference, extraction)
    runs them too, into the same report (docs/threat-models.md)."""
    check_out_dir(out)
    runner = _backend(backend, address, workers)
    from advguard.defenses.goals import run_threat_model
    from advguard.evaluate.job import load_model_and_data
    from advguard.evaluate.threat_model import load_threat_model

    tm = load_threat_model(threat_model, allow_large=allow_large).with_overrides(
        samples=samples, epsilons=parse_floats(epsilons), seed=seed
    )
    mkw = model_options(factory, input_shape, num_classes, bounds, torchscript, device)
    m, d, info = load_model_and_data(model, data, model_kwargs=mkw, cli=True)
    work = None
    if runner is not None:
        from advguard.evaluate.distributed import WorkSpec

        work = WorkSpec.of(model, data, tm, model_kwargs=mkw)
    with progress_bar() as bar:
        res = run_threat_model(
            m,
            d,
            tm,
            out,
            model_info=info,
            baseline=baseline,
            progress=progress_callback(bar),
            resume=resume,
            backend=runner,
            work=work,
        )
    render_summary(res.report, res.json_path, res.html_path)
    if res.report.goals:
        render_goals(res.report)
    if res.report.verdict.status in ("fail", "untrustworthy"):
        raise typer.Exit(1)


def render_goals(report: Any) -> None:
    """A table of the goal metrics (value, 95% interval, k/n) with their ATLAS IDs."""
    table = Table(title="Training-time and privacy goals")
    for col in ("goal", "metric", "value [95% CI]", "k/n", "ATLAS"):
        table.add_column(col)
    for g in report.goals:
        for i, m in enumerate(g.metrics):
            ci = f" [{m.ci_low:.3f}, {m.ci_high:.3f}]" if m.ci_low is not None else ""
            value = "n/a" if m.value is None else f"{m.value:.3f}{ci}"
            kn = f"{m.k}/{m.n}" if m.k is not None else "-"
            table.add_row(
                g.name if i == 0 else "", m.name, value, kn, " ".join(g.atlas) if i == 0 else ""
            )
    console.print(table)


@commands.command()
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
    factory: FactoryOpt = None,
    input_shape: InputShapeOpt = None,
    num_classes: NumClassesOpt = None,
    bounds: BoundsOpt = None,
    torchscript: TorchScriptOpt = False,
    device: DeviceOpt = "cpu",
    samples: Annotated[
        int | None, typer.Option(min=1, help="Attack only the first N samples.")
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 256,
    seed: Annotated[int, typer.Option()] = 0,
    allow_large: Annotated[
        bool, typer.Option(help="Lift the limits on steps, restarts, queries and samples.")
    ] = False,
) -> None:
    """Write adversarial examples (with labels and metadata) to an .npz file."""
    check_out_file(out)
    from advguard.attacks.export import attack_dataset
    from advguard.attacks.registry import build_attack
    from advguard.evaluate.job import load_model_and_data

    params = parse_kv(param)
    if allow_large:
        params["allow_large"] = True
    build_attack(name, norm=norm, seed=seed, **params)  # bad parameters: exit 2 before loading
    mkw = model_options(factory, input_shape, num_classes, bounds, torchscript, device)
    m, d, info = load_model_and_data(model, data, model_kwargs=mkw, cli=True)
    with progress_bar() as bar:
        cb = progress_callback(bar)
        summary = attack_dataset(
            m,
            d,
            out,
            attack=name,
            norm=norm,
            epsilon=epsilon,
            params=params,
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


UrlOpt = Annotated[
    str, typer.Option(help="http(s) endpoint taking POST JSON (docs/http-contract.md)")
]
BlackBoxThreatOpt = Annotated[
    str,
    typer.Option(
        "--threat-model",
        "-t",
        help="Black-box threat model: preset or YAML (text: text-standard)",
    ),
]
DataShapeOpt = Annotated[
    str | None, typer.Option(help="One input's shape, e.g. 1,28,28 (default: the data's)")
]
DataClassesOpt = Annotated[int | None, typer.Option(min=2, help="Classes (default: the data's)")]
DataBoundsOpt = Annotated[
    str | None, typer.Option(help="Input range LOW,HIGH (default: the data's)")
]
ApiKeyEnvOpt = Annotated[
    str | None,
    typer.Option(help="Name of the environment variable holding the API key (never the key)"),
]
ApiKeyHeaderOpt = Annotated[
    str, typer.Option(help="Header carrying the key, e.g. Authorization or X-API-Key")
]
ApiKeyPrefixOpt = Annotated[
    str | None,
    typer.Option(help="Prefix before the key (default 'Bearer ' for Authorization, else none)"),
]
QueryBudgetOpt = Annotated[
    int | None, typer.Option(min=0, help="Most samples the endpoint may answer in this run")
]
OutputKindOpt = Annotated[
    str, typer.Option(help="What the endpoint returns: probabilities or logits")
]
InputFieldOpt = Annotated[str, typer.Option(help="JSON field of the inputs")]
OutputFieldOpt = Annotated[
    str | None, typer.Option(help="JSON field of the scores (default: --output's value)")
]
FlattenOpt = Annotated[bool, typer.Option(help="Send each input as a flat list.")]
RequestBatchOpt = Annotated[int, typer.Option(min=1, help="Most samples per request.")]
TimeoutOpt = Annotated[
    float,
    typer.Option(min=0.001, help="Seconds per request in total (connect, headers and body)."),
]
MaxResponseOpt = Annotated[
    int | None, typer.Option(min=1, help="Most bytes of one response body [default: 16 MiB]")
]
RetriesOpt = Annotated[int, typer.Option(min=0, help="Retries on errors, 5xx and 429.")]
SamplesOverrideOpt = Annotated[int | None, typer.Option(min=1, help="Override sample count.")]
EpsilonsOverrideOpt = Annotated[str | None, typer.Option(help="Override epsilons, e.g. 0.1,0.2")]
SeedOverrideOpt = Annotated[int | None, typer.Option(help="Override seed.")]
ResumeRunOpt = Annotated[bool, typer.Option(help="Continue an interrupted run in --out.")]
AllowLargeOpt = Annotated[
    bool, typer.Option(help="Lift the limits on steps, restarts, queries and samples.")
]


@commands.command()
def redteam(
    url: UrlOpt,
    data: DataOpt,
    threat_model: BlackBoxThreatOpt,
    out: Annotated[Path, typer.Option(help="Output directory.")] = Path("advguard-redteam"),
    input_shape: DataShapeOpt = None,
    num_classes: DataClassesOpt = None,
    bounds: DataBoundsOpt = None,
    api_key_env: ApiKeyEnvOpt = None,
    api_key_header: ApiKeyHeaderOpt = "Authorization",
    api_key_prefix: ApiKeyPrefixOpt = None,
    query_budget: QueryBudgetOpt = None,
    output: OutputKindOpt = "probabilities",
    input_field: InputFieldOpt = "inputs",
    output_field: OutputFieldOpt = None,
    flatten: FlattenOpt = False,
    batch_size: RequestBatchOpt = 64,
    timeout: TimeoutOpt = 30.0,
    max_response_bytes: MaxResponseOpt = None,
    retries: RetriesOpt = 3,
    samples: SamplesOverrideOpt = None,
    epsilons: EpsilonsOverrideOpt = None,
    seed: SeedOverrideOpt = None,
    resume: ResumeRunOpt = False,
    allow_large: AllowLargeOpt = False,
) -> None:
    """Red-team a live HTTP endpoint (numeric or text data); exit 1 if the SLOs fail."""
    check_out_dir(out)
    from advguard.evaluate.redteam import run_redteam
    from advguard.evaluate.threat_model import load_threat_model
    from advguard.models.http_model import DEFAULT_MAX_RESPONSE_BYTES, parse_output

    api_key = _api_key_from_env(api_key_env)
    tm = load_threat_model(threat_model, allow_large=allow_large).with_overrides(
        samples=samples, epsilons=parse_floats(epsilons), seed=seed
    )
    with progress_bar() as bar:
        res = run_redteam(
            url,
            data,
            tm,
            out,
            input_shape=parse_shape(input_shape),
            num_classes=num_classes,
            bounds=parse_bounds(bounds),
            api_key=api_key,
            api_key_header=api_key_header,
            api_key_prefix=api_key_prefix,
            query_budget=query_budget,
            output=parse_output(output),
            input_field=input_field,
            output_field=output_field,
            flatten=flatten,
            batch_size=batch_size,
            timeout=timeout,
            retries=retries,
            max_response_bytes=max_response_bytes or DEFAULT_MAX_RESPONSE_BYTES,
            progress=progress_callback(bar),
            resume=resume,
        )
    render_summary(res.report, res.json_path, res.html_path)
    _print_endpoint_queries(res.report)
    if res.report.verdict.status in ("fail", "untrustworthy"):
        raise typer.Exit(1)


def _api_key_from_env(api_key_env: str | None) -> str | None:
    """The API key held by the named environment variable (None when no name is given)."""
    if api_key_env is None:
        return None
    api_key = os.environ.get(api_key_env)
    if not api_key:
        raise AdvguardError(
            f"environment variable {api_key_env} (from --api-key-env) is not set or empty"
        )
    return api_key


def _print_endpoint_queries(report: Any) -> None:
    """How many samples and requests the endpoint answered, and whether the budget ran out."""
    q = report.model.get("queries", {})
    console.print(
        f"Endpoint answered {q.get('samples_answered')} samples in {q.get('requests_sent')} "
        f"requests ({q.get('retries')} retries)"
        + (f"; budget left {q['budget_left']}" if q.get("budget_left") is not None else "")
    )
    if report.model.get("query_budget_exhausted"):
        console.print(
            "[dark_orange]Query budget exhausted[/]: the report covers "
            f"{report.data['n_evaluated']} of {report.data.get('n_requested')} samples; "
            "re-run with --resume and a larger --query-budget"
        )


@report_commands.command("compare")
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


@threat_model_commands.command("list")
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


@threat_model_commands.command("show")
def tm_show(name: Annotated[str, typer.Argument(help="Preset name or YAML file")]) -> None:
    """Validate a threat model and print it in full."""
    import yaml

    from advguard.evaluate.threat_model import load_threat_model

    tm = load_threat_model(name)
    console.print(yaml.safe_dump(tm.model_dump(), sort_keys=False), markup=False, highlight=False)
