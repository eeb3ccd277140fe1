"""advguard dashboards: the Grafana dashboards and their provisioning files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from advguard.cli._common import Commands, JsonOpt, console, print_json

commands = Commands("dashboards", "Grafana dashboards (executive, on-call, debug).")


@commands.command("export")
def dashboards_export(
    out: Annotated[Path, typer.Option(help="Directory for dashboards/ and provisioning/.")],
    prometheus_url: Annotated[
        str, typer.Option(help="Prometheus URL as Grafana reaches it (datasource provisioning).")
    ] = "http://prometheus:9090",
    dashboards_path: Annotated[
        str, typer.Option(help="Where Grafana sees the exported dashboards/ directory.")
    ] = "/var/lib/grafana/dashboards/advguard",
    json_out: JsonOpt = False,
) -> None:
    """Write the dashboards (JSON) with Grafana provisioning for them and a Prometheus
    datasource."""
    from advguard.observe.grafana import export

    paths = export(out, prometheus_url=prometheus_url, dashboards_path=dashboards_path)
    if json_out:
        print_json({"files": [str(p) for p in paths]})
        return
    for p in paths:
        console.print(f"wrote [bold]{p}[/]")
    console.print(
        f"Mount {out / 'provisioning'} at /etc/grafana/provisioning and "
        f"{out / 'dashboards'} at {dashboards_path}."
    )
