"""Render a :class:`~advguard.evaluate.report.Report` as one self-contained HTML page.

No external assets and no JavaScript: plots are PNGs drawn with matplotlib's Agg canvas and
inlined as base64; every string from the report is escaped by Jinja2's autoescape. The page
template is ``templates/report.html.j2`` (package data).
"""

from __future__ import annotations

import base64
import io
import math
from pathlib import Path
from typing import Any

import numpy as np
from jinja2 import Environment, PackageLoader, StrictUndefined
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from advguard.atomic import atomic_write_text
from advguard.evaluate.report import EpsilonResult, Example, Report, Stage
from advguard.stats import Proportion

MAX_EXAMPLES = 48
_STATUS_ORDER = {"fail": 0, "warn": 1, "pass": 2, "skip": 3}
_PERTURBATION_NORMS = ("linf", "l2", "l0")


# ----------------------------------------------------------------------------- formatting
def pct(v: float | None, digits: int = 1) -> str:
    return "—" if v is None or not math.isfinite(v) else f"{v * 100:.{digits}f}%"


def num(v: Any, digits: int = 4) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool) or not isinstance(v, int | float):
        return str(v)
    return f"{v:,}" if isinstance(v, int) else ("—" if not math.isfinite(v) else f"{v:.{digits}g}")


def prop(p: Proportion | None) -> str:
    if p is None or p.value is None:
        return "n/a"
    return f"{pct(p.value)} [{pct(p.ci_low)}, {pct(p.ci_high)}]"


def _mpl(s: str) -> str:
    """Matplotlib reads ``$...$`` as math: keep user strings literal."""
    return str(s).replace("$", r"\$")


def _val(p: Proportion | None) -> float:
    return np.nan if p is None or p.value is None else p.value


def png(fig: Figure) -> str:
    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf, metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# ----------------------------------------------------------------------------- plots
_PLOT_ERRORS = (ValueError, OverflowError, FloatingPointError, ZeroDivisionError)


def _curve_png(report: Report) -> str | None:
    """The robustness curve; with epsilons matplotlib cannot place on a linear axis (e.g.
    1e308, whose ticks overflow) it falls back to evenly spaced, labelled epsilons."""
    try:
        return _draw_curve(report, categorical=False)
    except _PLOT_ERRORS:
        pass
    try:
        return _draw_curve(report, categorical=True)
    except _PLOT_ERRORS:
        return None


def _draw_curve(report: Report, *, categorical: bool) -> str | None:
    res: list[EpsilonResult] = sorted(report.results, key=lambda r: r.epsilon)
    if not res:
        return None
    eps = np.array([r.epsilon for r in res])
    if categorical:
        eps = np.arange(len(res), dtype=np.float64)
    fig = Figure(figsize=(9.6, 4.4), dpi=110, layout="constrained")
    ax = fig.add_subplot()
    if report.clean_accuracy.value is not None:
        ax.axhline(
            report.clean_accuracy.value,
            color="#888",
            ls=":",
            lw=1.2,
            label=f"clean accuracy {pct(report.clean_accuracy.value)}",
        )
    steps: dict[tuple[int, str, Stage], list[float]] = {}
    for i, r in enumerate(res):
        for row in r.per_attack:
            key = (row.order, row.attack, row.stage)
            steps.setdefault(key, [np.nan] * len(res))[i] = _val(row.robust_accuracy_after)
    keys = sorted(steps, key=lambda k: ({"suite": 0, "escalation": 1}.get(k[2], 2), k[0]))
    for j, key in enumerate(keys):
        color = colormaps["viridis"](0.1 + 0.75 * j / max(1, len(keys) - 1))
        stage = "" if key[2] == "suite" else f" ({key[2]})"
        ax.plot(
            eps,
            steps[key],
            marker="o",
            ms=4,
            lw=1.2,
            color=color,
            alpha=0.9,
            label=_mpl(f"after {key[0]}. {key[1]}{stage}"),
        )
    if any(r.first_robust_accuracy is not None for r in res):  # no escalation: before == final
        ax.plot(
            eps,
            [_val(r.first_robust_accuracy or r.robust_accuracy) for r in res],
            ls="--",
            lw=1.6,
            color="#e67e22",
            marker="s",
            ms=4,
            label="before escalation",
        )
    ax.fill_between(
        eps,
        [r.robust_accuracy.ci_low for r in res],
        [r.robust_accuracy.ci_high for r in res],
        color="#c0392b",
        alpha=0.15,
        lw=0,
        label="95% CI (worst case)",
    )
    ax.plot(
        eps,
        [_val(r.robust_accuracy) for r in res],
        color="#c0392b",
        lw=3,
        marker="o",
        ms=6,
        label="worst case (all attacks)",
        zorder=5,
    )
    if categorical:
        ax.set_xticks(eps, [f"{r.epsilon:g}" for r in res])
    ax.set_ylim(-0.02, 1.02)
    ax.yaxis.set_major_formatter(lambda v, _: f"{v:.0%}")
    ax.set_xlabel(_mpl(f"epsilon ({report.threat_model.get('norm', '?')})"))
    ax.set_ylabel("robust accuracy")
    ax.grid(alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return png(fig)


def _as_image(a: np.ndarray) -> np.ndarray | None:
    """(C,H,W) / (H,W,C) / (H,W) -> (H,W) gray or (H,W,3) RGB; None when not an image."""
    if a.ndim == 2:
        return a
    if a.ndim != 3:
        return None
    if a.shape[-1] in (1, 3) and a.shape[0] not in (1, 3):  # (H, W, C)
        a = np.moveaxis(a, -1, 0)
    return a[0] if a.shape[0] == 1 else np.moveaxis(a, 0, -1) if a.shape[0] == 3 else a.mean(0)


def _is_image_report(report: Report) -> bool:
    if report.data.get("modality") == "image":
        return True
    if report.data.get("modality") in ("tabular", "text") or not report.examples:
        return False
    return np.asarray(report.examples[0].x, dtype=float).ndim in (2, 3)


def _visible(text: str) -> str:
    """``text`` with every non-ASCII character spelled ``⟨U+XXXX⟩`` (homoglyphs, invisibles)."""
    return "".join(c if c.isascii() else f"⟨U+{ord(c):04X}⟩" for c in text)


def _text_examples(report: Report, names: list[str] | None) -> list[dict[str, Any]]:
    if report.data.get("modality") != "text":
        return []
    out = []
    for ex in sorted(report.examples, key=lambda e: (e.epsilon, e.index))[:MAX_EXAMPLES]:
        orig, adv = (str(v[0]) if v else "" for v in (ex.x, ex.x_adv))
        out.append(
            {
                "ex": ex,
                "original": orig,
                "adversarial": adv,
                "visible": _visible(adv),
                "label": _class(names, ex.label),
                "adv": _class(names, ex.adversarial_prediction),
            }
        )
    return out


def _example_png(ex: Example, bounds: tuple[float, float] | None) -> str | None:
    x, xa = (_as_image(np.asarray(v, dtype=np.float64)) for v in (ex.x, ex.x_adv))
    if x is None or xa is None or x.shape != xa.shape:
        return None
    lo, hi = bounds or (float(min(x.min(), xa.min())), float(max(x.max(), xa.max())))
    hi = hi if hi > lo else lo + 1.0
    d = xa - x
    m = float(np.abs(d).max()) or 1.0
    fig = Figure(figsize=(3.6, 1.35), dpi=150, layout="constrained")
    axes = fig.subplots(1, 3)
    rgb = x.ndim == 3
    for ax, img, title in ((axes[0], x, "original"), (axes[1], xa, "adversarial")):
        if rgb:
            ax.imshow(np.clip((img - lo) / (hi - lo), 0, 1), interpolation="nearest")
        else:
            ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
        ax.set_title(title, fontsize=8)
    if rgb:
        axes[2].imshow(np.clip(0.5 + d / (2 * m), 0, 1), interpolation="nearest")
    else:
        axes[2].imshow(d, cmap="RdBu_r", vmin=-m, vmax=m, interpolation="nearest")
    axes[2].set_title(f"δ (±{m:.3g})", fontsize=8)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    return png(fig)


def _feature_png(eps: str, changes: list[Any]) -> str | None:
    try:
        return _draw_features(eps, changes)
    except _PLOT_ERRORS:
        return None


def _draw_features(eps: str, changes: list[Any]) -> str | None:
    top = sorted(changes, key=lambda c: -c.mean_abs_change)[:15][::-1]
    if not top:
        return None
    fig = Figure(figsize=(5.6, 0.8 + 0.27 * len(top)), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    names = [_mpl(c.feature if len(c.feature) <= 28 else c.feature[:27] + "…") for c in top]
    bars = ax.barh(names, [c.mean_abs_change for c in top], color="#2e86c1")
    ax.bar_label(bars, [f" {c.share_changed:.0%} changed" for c in top], fontsize=7, color="#555")
    ax.set_xlabel("mean |change| per adversarial example (raw units)", fontsize=8)
    ax.set_title(_mpl(f"epsilon {eps}"), fontsize=9)
    ax.tick_params(labelsize=8)
    ax.margins(x=0.3)
    ax.spines[["top", "right"]].set_visible(False)
    return png(fig)


# ----------------------------------------------------------------------------- page
def _name(d: dict[str, Any], *keys: str) -> str:
    return next((str(d[k]) for k in keys if d.get(k) not in (None, "")), "—")


def _class(names: list[str] | None, i: int) -> str:
    return f"{names[i]} ({i})" if names and 0 <= i < len(names) else str(i)


def _context(report: Report) -> dict[str, Any]:
    tm, data = report.threat_model, report.data
    names = data.get("class_names")
    names = [str(n) for n in names] if isinstance(names, list) else None
    bounds = report.model.get("bounds") or data.get("bounds")
    bounds = (float(bounds[0]), float(bounds[1])) if isinstance(bounds, list | tuple) else None
    examples = []
    if _is_image_report(report):
        for ex in sorted(report.examples, key=lambda e: (e.epsilon, e.index))[:MAX_EXAMPLES]:
            try:
                png = _example_png(ex, bounds)
            except _PLOT_ERRORS:
                png = None
            if png:
                examples.append(
                    {
                        "png": png,
                        "ex": ex,
                        "label": _class(names, ex.label),
                        "clean": _class(names, ex.clean_prediction),
                        "adv": _class(names, ex.adversarial_prediction),
                        "fooled": ex.adversarial_prediction != ex.label,
                    }
                )
    features = [
        {"eps": e, "png": p}
        for e, ch in report.feature_changes.items()
        if (p := _feature_png(e, ch))
    ]
    checks = sorted(report.sanity_checks, key=lambda c: _STATUS_ORDER.get(c.status, 9))
    counts = {s: sum(c.status == s for c in checks) for s in _STATUS_ORDER}
    env = dict(report.environment)
    packages = env.pop("packages", None) or {}
    return {
        "r": report,
        "tm": tm,
        "model_name": _name(report.model, "name", "path", "source", "adapter"),
        "data_name": _name(data, "name", "source", "path"),
        "tm_name": _name(tm, "name"),
        "failed": [c for c in checks if c.status == "fail"],
        "checks": checks,
        "counts": counts,
        "curve": _curve_png(report),
        "results": sorted(report.results, key=lambda r: r.epsilon),
        "norms": [
            k for k in _PERTURBATION_NORMS if any(k in r.perturbation for r in report.results)
        ]
        + sorted({k for r in report.results for k in r.perturbation} - set(_PERTURBATION_NORMS)),
        "examples": examples,
        "text_examples": _text_examples(report, names),
        "n_examples": len(report.examples),
        "features": features,
        "env": env,
        "packages": packages,
        "model_info": {k: v for k, v in report.model.items() if k not in ("sha256",)},
        "data_info": {k: v for k, v in data.items() if k not in ("sha256", "class_names")},
    }


_ENV = Environment(
    loader=PackageLoader("advguard.evaluate", "templates"),
    autoescape=True,
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
_ENV.filters.update(pct=pct, num=num, prop=prop)


def render_html(report: Report) -> str:
    """The report as one self-contained HTML document (a string)."""
    return _ENV.get_template("report.html.j2").render(**_context(report))


def write_html(report: Report, out_dir: str | Path) -> Path:
    """Write ``report.html`` into ``out_dir`` atomically (temp file + rename); return its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "report.html"
    return atomic_write_text(path, render_html(report))
