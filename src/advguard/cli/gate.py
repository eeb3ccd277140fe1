"""advguard gate: the release gate."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
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
