"""``extraction.json`` (schema-versioned) and a self-contained ``extraction.html`` with the
stolen model's fidelity and accuracy against the queries used."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from matplotlib.ticker import NullFormatter, ScalarFormatter

from advguard.atomic import atomic_write_text
from advguard.attacks.extraction.common import ExtractionResult
from advguard.attacks.report_html import img_tag, new_figure, page, pct, table


def curve_figure(curve: list[dict[str, Any]]) -> Any:
    fig = new_figure()
    ax = fig.add_subplot(1, 1, 1)
    q = [c["queries"] for c in curve]
    ax.plot(q, [c["fidelity"]["value"] for c in curve], "o-", label="fidelity (agrees with target)")
    if curve and "accuracy" in curve[0]:
        ax.plot(q, [c["accuracy"]["value"] for c in curve], "s--", label="accuracy (true labels)")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.xaxis.set_major_formatter(ScalarFormatter())
    if q:
        ax.set_xticks(q, [str(v) for v in q])
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("queries to the target")
    ax.set_ylabel("share of held-out examples")
    ax.set_title("Stolen model quality against queries")
    ax.legend(loc="lower right")
    return fig


def render_html(res: ExtractionResult) -> str:
    rows = [[c["queries"], pct(c["fidelity"]), pct(c.get("accuracy"))] for c in res.curve]
    body = (
        table(
            ["method", "mode", "budget", "queries used", "fidelity", "accuracy"],
            [
                [
                    res.method,
                    res.mode,
                    res.budget,
                    res.queries_used,
                    pct(res.final.get("fidelity")),
                    pct(res.final.get("accuracy")),
                ]
            ],
        )
        + "<h2>Quality against queries</h2>"
        + (img_tag(curve_figure(res.curve), "fidelity curve") if res.curve else "")
        + table(["queries", "fidelity [95% CP]", "accuracy [95% CP]"], rows)
    )
    if res.transfer is not None:
        t = res.transfer
        body += "<h2>Adversarial transfer</h2>" + table(
            ["attack", "epsilon (Linf)", "fools the stolen model", "transfers to the target"],
            [[t["attack"], t["epsilon"], pct(t["student_success"]), pct(t["transfer"])]],
        )
    body += "<h2>Configuration</h2>" + table(
        ["key", "value"], sorted((k, v) for k, v in res.config.items())
    )
    return page("advguard model extraction", body)


def write_extraction_report(res: ExtractionResult, out_dir: str | Path) -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jp, hp = out / "extraction.json", out / "extraction.html"
    atomic_write_text(jp, json.dumps(res.to_dict(), indent=2))
    atomic_write_text(hp, render_html(res))
    return jp, hp
