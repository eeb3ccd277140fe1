"""The sweep's outputs: the clean-vs-robust Pareto front and the self-contained HTML report.

The HTML has no external JavaScript or CSS: an inline SVG scatter (clean accuracy on x,
robust accuracy at the headline epsilon on y; Pareto-optimal trials filled and joined by the
front's line, a ``<title>`` on every point) and a table of every trial. Every string
that comes from a spec, a trial or an error message is escaped.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from typing import Any


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point dominates when both coordinates are maximised.

    ``q`` dominates ``p`` when it is at least as good on both and better on one; equal points
    do not dominate each other (both are on the front). Indices come back in input order.
    """
    front = []
    for i, (a, b) in enumerate(points):
        dominated = any(
            (c >= a and d >= b) and (c > a or d > b) for j, (c, d) in enumerate(points) if j != i
        )
        if not dominated:
            front.append(i)
    return front


def plotted(t: dict[str, Any]) -> bool:
    """A finished trial with both accuracies (a point of the scatter and of the front)."""
    return (
        t.get("status") == "ok"
        and t.get("clean_accuracy") is not None
        and t.get("robust_headline") is not None
    )


def _e(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1%}"


def _params(p: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in p.items())


W, H, PAD = 560, 420, 56


def _xy(clean: float, robust: float, lo: tuple[float, float]) -> tuple[float, float]:
    """SVG coordinates of a point; axes span [lo, 1] each."""
    x = PAD + (clean - lo[0]) / (1 - lo[0]) * (W - 1.5 * PAD)
    y = H - PAD - (robust - lo[1]) / (1 - lo[1]) * (H - 1.5 * PAD)
    return x, y


def _axis_low(values: list[float]) -> float:
    """The lower end of an axis: 0, or a round tenth below the data when it all sits high."""
    return min(0.9, max(0.0, (int(min(values, default=0.0) * 10) / 10) - 0.1))


def _label_spot(x: float, y: float, placed: list[tuple[float, float]]) -> tuple[float, float]:
    """Where a point's label goes: above right, else the first free spot around it."""
    for dx, dy in ((8, -8), (8, 16), (-36, -8), (-36, 16), (8, -20), (8, 28)):
        spot = (x + dx, y + dy)
        if all(abs(spot[0] - a) > 34 or abs(spot[1] - b) > 11 for a, b in placed):
            break
    placed.append(spot)
    return spot


def scatter_svg(trials: list[dict[str, Any]], headline: float) -> str:
    """Inline SVG: every finished trial, the Pareto front highlighted."""
    ok = [t for t in trials if plotted(t)]
    lo = (
        _axis_low([t["clean_accuracy"] for t in ok]),
        _axis_low([t["robust_headline"] for t in ok]),
    )
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" role="img" '
        f'aria-label="clean versus robust accuracy">',
        f'<rect width="{W}" height="{H}" fill="#fff"/>',
    ]
    for k in range(11):
        for axis, low in (("x", lo[0]), ("y", lo[1])):
            v = low + k * (1 - low) / 10
            x, y = _xy(v if axis == "x" else lo[0], v if axis == "y" else lo[1], lo)
            if axis == "x":
                parts.append(
                    f'<line x1="{x:.1f}" y1="{PAD / 2}" x2="{x:.1f}" y2="{H - PAD}" class="g"/>'
                )
                parts.append(
                    f'<text x="{x:.1f}" y="{H - PAD + 16}" text-anchor="middle">{v:.0%}</text>'
                )
            else:
                parts.append(
                    f'<line x1="{PAD}" y1="{y:.1f}" x2="{W - PAD / 2}" y2="{y:.1f}" class="g"/>'
                )
                parts.append(
                    f'<text x="{PAD - 6}" y="{y + 4:.1f}" text-anchor="end">{v:.0%}</text>'
                )
    parts.append(f'<text x="{W / 2}" y="{H - 12}" text-anchor="middle">clean accuracy</text>')
    parts.append(
        f'<text transform="translate(14,{H / 2}) rotate(-90)" text-anchor="middle">'
        f"robust accuracy at eps {headline:g}</text>"
    )
    front = sorted((t for t in ok if t.get("pareto")), key=lambda t: t["clean_accuracy"])
    if front:
        pts = [_xy(t["clean_accuracy"], t["robust_headline"], lo) for t in front]
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
        parts.append(f'<polyline points="{path}" class="front"/>')
    placed: list[tuple[float, float]] = []
    for t in ok:
        x, y = _xy(t["clean_accuracy"], t["robust_headline"], lo)
        tip = (
            f"{t['id']}: {_params(t['params'])}; clean {_pct(t['clean_accuracy'])}, "
            f"robust {_pct(t['robust_headline'])}"
        )
        cls = "p on" if t.get("pareto") else "p"
        parts.append(
            f'<circle cx="{x:.1f}" cy="{y:.1f}" r="6" class="{cls}">'
            f"<title>{_e(tip)}</title></circle>"
        )
        lx, ly = _label_spot(x, y, placed)
        parts.append(f'<text x="{lx:.1f}" y="{ly:.1f}" class="lbl">{_e(t["id"])}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;font-size:14px}td,th{border:1px solid #ccc;padding:4px 8px}
td.n{text-align:right}tr.front{background:#eef6ee;font-weight:600}tr.error{color:#a00}
svg text{font-size:12px;fill:#333}svg .lbl{font-size:10px;fill:#666}
svg .g{stroke:#eee}svg .p{fill:#fff;stroke:#36c;stroke-width:2}svg .p.on{fill:#2a2}
svg .front{fill:none;stroke:#2a2;stroke-width:2;stroke-dasharray:4 3}
"""


def _table(doc: dict[str, Any]) -> str:
    eps = doc["threat_model"]["epsilons"]
    head = ["trial", "parameters", "clean"] + [f"robust @ {e:g}" for e in eps]
    head += ["train s", "eval s", "status", "model sha256"]
    rows = ["<tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>"]
    order = sorted(
        doc["trials"], key=lambda t: (not plotted(t), -(t.get("robust_headline") or 0.0))
    )
    for t in order:
        ok = t["status"] == "ok"
        cls = "front" if t.get("pareto") else ("error" if not ok else "")
        rob = {r["epsilon"]: r["value"] for r in t.get("robust_accuracy", [])}
        cells = [_e(t["id"] + (" *" if t.get("pareto") else "")), _e(_params(t["params"]))]
        nums = [_pct(t.get("clean_accuracy"))] + [_pct(rob.get(e)) for e in eps]
        nums += [
            f"{t['train_time_s']:.1f}" if ok else "-",
            f"{t['eval_time_s']:.1f}" if ok else "-",
        ]
        cells += [f'<span class="n">{_e(v)}</span>' for v in nums]
        cells.append(_e("ok" if ok else f"error: {t.get('error')}"))
        cells.append(f"<code>{_e(t['model']['sha256'][:16])}</code>" if ok else "-")
        rows.append(f'<tr class="{cls}">' + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return "<table>\n" + "\n".join(rows) + "\n</table>"


def sweep_html(doc: dict[str, Any]) -> str:
    """The HTML report of a sweep document (``sweep.json``)."""
    tm, spec = doc["threat_model"], doc["spec"]
    n_ok = sum(t["status"] == "ok" for t in doc["trials"])
    front = [t["id"] for t in doc["trials"] if t.get("pareto")]
    title = f"advguard sweep {spec['name']}: {spec['defense']} on {spec['data']}"
    eps = ", ".join(f"{e:g}" for e in tm["epsilons"])
    headline = f"{doc['headline_epsilon']:g}"
    return "\n".join([
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_e(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f"<p>{n_ok} of {len(doc['trials'])} trials finished; threat model "
        f"<b>{_e(tm['name'])}</b> ({_e(tm['norm'])}, epsilons {_e(eps)}), "
        f"robust accuracy on the y axis at eps <b>{_e(headline)}</b>. "
        f"Pareto front (no trial is better on both): <b>{_e(', '.join(front) or 'none')}</b>.</p>",
        scatter_svg(doc["trials"], doc["headline_epsilon"]),
        "<h2>Trials</h2>", _table(doc),
        "<h2>Spec</h2>", f"<pre>{_e(json.dumps(spec, indent=2))}</pre>",
        "</body></html>",
    ])  # fmt: skip
