"""advguard slo: robustness SLOs as Prometheus rules, and offline metrics export."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from advguard.cli._common import Commands, JsonOpt, console, print_json

commands = Commands("slo", "Robustness SLOs: Prometheus rules, Alertmanager routes, metrics.")

SLOFileArg = Annotated[Path, typer.Argument(help="SLO YAML (see docs/operations.md).")]


def _summary(spec: object) -> list[dict[str, object]]:
    from advguard.observe.slo import RobustAccuracySLO, SLOFile

    assert isinstance(spec, SLOFile)
    rows: list[dict[str, object]] = []
    for s in spec.slos:
        target = (
            f"robust accuracy >= {s.target:g}"
            if isinstance(s, RobustAccuracySLO)
            else f"{s.objective * 100:.6g}% good over {s.period}"
        )
        rows.append(
            {"name": s.name, "kind": s.kind, "model": s.model or "(every model)", "target": target}
        )
    return rows


def _table(rows: list[dict[str, object]], title: str) -> Table:
    table = Table(title=title)
    for h in ("name", "kind", "model", "target"):
        table.add_column(h)
    for r in rows:
        table.add_row(*(str(r[h]) for h in ("name", "kind", "model", "target")))
    return table


@commands.command("check")
def check(slo_file: SLOFileArg, json_out: JsonOpt = False) -> None:
    """Validate an SLO YAML file (exit 2 with a one-line error if it is invalid)."""
    from advguard.observe.slo import compile_alertmanager, compile_rules, load_slo_file

    spec = load_slo_file(slo_file)
    rules = compile_rules(spec)
    compile_alertmanager(spec)
    rows = _summary(spec)
    n_rules = sum(len(g["rules"]) for g in rules["groups"])
    if json_out:
        print_json({"file": str(slo_file), "valid": True, "slos": rows, "rules": n_rules})
        return
    console.print(_table(rows, f"{slo_file}: {len(rows)} SLOs, {n_rules} rules"))
    console.print("[green]valid[/]")


@commands.command("compile")
def compile_(
    slo_file: SLOFileArg,
    out: Annotated[Path, typer.Option(help="Directory for the rule file and alertmanager.yml.")],
    json_out: JsonOpt = False,
) -> None:
    """Compile SLOs to Prometheus recording/alerting rules and an Alertmanager snippet."""
    from advguard.observe.slo import load_slo_file, write_compiled

    spec = load_slo_file(slo_file)
    paths = write_compiled(spec, out)
    if json_out:
        print_json({"files": [str(p) for p in paths], "slos": _summary(spec)})
        return
    console.print(_table(_summary(spec), f"{slo_file}: {len(spec.slos)} SLOs"))
    for p in paths:
        console.print(f"wrote [bold]{p}[/]")
    console.print("Check them with: promtool check rules " + str(paths[0]))


@commands.command("export-metrics")
def export_metrics(
    report: Annotated[
        Path | None, typer.Argument(help="Evaluation report.json (advguard evaluate).")
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Write Prometheus text here (atomic), e.g. for node exporter's textfile collector."
        ),
    ] = None,
    gate: Annotated[
        Path | None, typer.Option(help="Gate result saved from `advguard gate --json`.")
    ] = None,
    certification: Annotated[
        Path | None, typer.Option(help="certify.json from `advguard certify`.")
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="Model label (default: the report's model name).")
    ] = None,
    pushgateway: Annotated[
        str | None, typer.Option(help="Push to this Pushgateway URL (http://host:9091).")
    ] = None,
    job: Annotated[str, typer.Option(help="Pushgateway job name.")] = "advguard_nightly",
    json_out: JsonOpt = False,
) -> None:
    """Export an offline job's headline numbers as Prometheus metrics (file and/or push)."""
    from prometheus_client import generate_latest

    from advguard.errors import InputError
    from advguard.observe import offline

    if out is None and pushgateway is None:
        raise InputError("give --out FILE, --pushgateway URL or both")
    reg, name = offline.build_registry(
        offline.load_evaluation_report(report) if report else None,
        gate=offline.load_gate_result(gate) if gate else None,
        certification=offline.load_certification_report(certification) if certification else None,
        model=model,
    )
    if out is not None:
        offline.write_textfile(reg, out)
    if pushgateway is not None:
        offline.push(reg, pushgateway, job=job, model=name)
    samples = [
        line for line in generate_latest(reg).decode().splitlines() if not line.startswith("#")
    ]
    if json_out:
        print_json(
            {
                "model": name,
                "out": str(out) if out else None,
                "pushgateway": pushgateway,
                "samples": samples,
            }
        )
        return
    for line in samples:
        console.print(line, highlight=False)
    if out is not None:
        console.print(f"wrote [bold]{out}[/]")
    if pushgateway is not None:
        console.print(f"pushed to [bold]{pushgateway}[/] (job {job}, model {name})")
