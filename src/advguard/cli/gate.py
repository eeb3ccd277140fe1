"""advguard gate: the release gate."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from advguard.cli._common import (
    Commands,
    console,
)

commands = Commands()


@commands.command()
def gate(
    report: Annotated[Path, typer.Option(help="Candidate report.json (from advguard evaluate).")],
    policy: Annotated[Path, typer.Option(help="Gate policy YAML (see docs/gate.md).")],
    baseline: Annotated[
        str | None,
        typer.Option(
            help="Baseline report.json, or 'production' (needs --registry-model and --public-key)."
        ),
    ] = None,
    registry_model: Annotated[
        str | None, typer.Option(help="Registered model whose production report is the baseline.")
    ] = None,
    model: Annotated[
        Path | None,
        typer.Option(help="The model file being released: the report must be about its sha256."),
    ] = None,
    public_key: Annotated[
        Path | None,
        typer.Option(
            help="Verify the report's signed attestation with this PEM public key (needs "
            "--model). Without it the gate checks the report's consistency only."
        ),
    ] = None,
    attestation: Annotated[
        Path | None,
        typer.Option(help="The report's DSSE attestation (default: REPORT.intoto.json beside it)."),
    ] = None,
    require_attestation: Annotated[
        bool,
        typer.Option(help="Refuse to run without --public-key (= policy require_attestation)."),
    ] = False,
    markdown: Annotated[
        Path | None, typer.Option(help="Write a Markdown summary (PR comment) here.")
    ] = None,
    junit: Annotated[Path | None, typer.Option(help="Write JUnit XML here.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Release gate: exit 0 if the report meets the policy, 1 if not, 2 on bad input."""
    from advguard.atomic import atomic_write_text
    from advguard.evaluate.report import load_report
    from advguard.registry.baseline import resolve_baseline
    from advguard.registry.gate import gate_junit, gate_markdown, provenance_checks, run_gate
    from advguard.registry.policy import load_policy

    pol = load_policy(policy)
    rep = load_report(report)
    prov = provenance_checks(
        report,
        rep,
        model=model,
        public_key=public_key,
        attestation=attestation,
        require_attestation=require_attestation or pol.require_attestation,
    )
    base = None
    if baseline:
        name = rep.threat_model.get("name")
        base = resolve_baseline(
            baseline, registry_model=registry_model, threat_model=name, public_key=public_key
        )
    res = run_gate(rep, pol, base, provenance=prov)
    if markdown:
        atomic_write_text(markdown, gate_markdown(res))
    if junit:
        atomic_write_text(junit, gate_junit(res))
    if json_out:
        console.print_json(res.model_dump_json())
    else:
        render_gate(res)
    if not res.passed:
        raise typer.Exit(1)


def render_gate(res: Any) -> None:
    """The gate's checks as a table, then its failures, warnings and outcome."""
    table = Table(title=escape(f"advguard gate: {res.report} vs policy {res.policy}"))
    for h in ("check", "expected", "actual", "status"):
        table.add_column(h)
    colour = {"pass": "green", "fail": "bold red", "skip": "dim"}
    for c in res.checks:
        table.add_row(
            escape(c.name),
            escape(c.expected),
            escape(c.actual),
            f"[{colour[c.status]}]{c.status.upper()}[/]",
        )
    console.print(table)
    for c in res.failures:
        console.print(f"[red]fail:[/] {escape(c.name)}: {escape(c.message)}", highlight=False)
    for w in res.warnings:
        console.print(f"[yellow]warning:[/] {escape(w)}", highlight=False)
    outcome = "[bold green]PASSED[/]" if res.passed else "[bold red]FAILED[/]"
    console.print(f"Gate {outcome}")
