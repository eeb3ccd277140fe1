"""Certification runs and their report (``certify.json`` + self-contained ``certify.html``)."""

from __future__ import annotations

import html
import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
from matplotlib.figure import Figure
from pydantic import BaseModel, ConfigDict
from scipy.stats import norm as gaussian

from advguard import __version__
from advguard.errors import InputError
from advguard.evaluate.html import png, prop
from advguard.evaluate.runner import environment, select_samples, sha256_array
from advguard.models.base import Classifier
from advguard.stats import Proportion, proportion

SCHEMA_VERSION = "1.0"
KIND: Literal["certification"] = "certification"
DEFAULT_RADII = (0.0, 0.25, 0.5, 0.75, 1.0)
Progress = Any  # Callable[[str, int, int], None]


class CertifiedPoint(BaseModel):
    model_config = ConfigDict(extra="forbid")
    radius: float
    """L2 radius (smoothing) or Linf epsilon (IBP), in raw input units."""
    certified_accuracy: Proportion
    """Correct, non-abstaining and certified at this radius (95% Clopper-Pearson CI)."""


class CertificationReport(BaseModel):
    model_config = ConfigDict(extra="forbid")
    schema_version: str = SCHEMA_VERSION
    kind: Literal["certification"] = KIND
    created: str
    advguard_version: str
    method: Literal["smoothing", "ibp"]
    norm: Literal["l2", "linf"]
    sigma: float | None = None
    n0: int | None = None
    n: int | None = None
    alpha: float | None = None
    seed: int
    n_samples: int
    clean_accuracy: Proportion
    """Base model accuracy on the certified samples."""
    abstain_rate: Proportion | None = None
    """Smoothing: fraction of samples where CERTIFY abstained."""
    results: list[CertifiedPoint]
    radius_median: float | None = None
    """Smoothing: median certified radius over correct, non-abstaining samples."""
    radius_cap: float | None = None
    """Smoothing: largest radius n and alpha allow, ``sigma * Phi^{-1}(alpha ** (1 / n))``."""
    timing: dict[str, float]
    model: dict[str, Any]
    data: dict[str, Any]
    environment: dict[str, Any]
    guarantee: str


@dataclass
class CertificationRun:
    report: CertificationReport
    json_path: Path
    html_path: Path
    labels: np.ndarray
    radii: np.ndarray


def _guarantee(method: str, alpha: float | None) -> str:
    if method == "smoothing":
        return (
            "Each certified sample: with probability >= 1 - alpha over the noise, the Gaussian-"
            "smoothed classifier (not the base model) predicts the same class for every input "
            "within the L2 radius (raw input units)."
        )
    return (
        "Each certified sample: proof (interval bound propagation) that the model predicts "
        "the true class for every input within the Linf epsilon that stays inside the bounds."
    )


def certify_dataset(
    model: Any,
    x: np.ndarray,
    y: np.ndarray,
    out_dir: str | Path,
    *,
    method: str = "smoothing",
    sigma: float = 0.25,
    n0: int = 100,
    n: int = 10000,
    alpha: float = 0.001,
    radii: list[float] | None = None,
    epsilons: list[float] | None = None,
    samples: int | None = 500,
    seed: int = 0,
    batch_size: int = 1000,
    model_info: dict[str, Any] | None = None,
    data_info: dict[str, Any] | None = None,
    progress: Progress | None = None,
) -> CertificationRun:
    """Certify (a deterministic random subset of) ``x, y``; write certify.json/.html."""
    chosen = _method(method)
    x, y = np.asarray(x), np.asarray(y)
    if len(x) != len(y):
        raise InputError(f"need one label per input, got {len(y)} labels for {len(x)} inputs")
    if samples is not None and samples < 1:
        raise InputError(f"samples must be >= 1, got {samples}")
    idx = select_samples(len(x), samples if samples is not None else len(x), seed)
    xs, ys = x[idx].astype(np.float32), y[idx].astype(np.int64)
    t0 = time.perf_counter()
    clean_pred = model.predict(xs)
    clean = proportion(int((clean_pred == ys).sum()), len(ys))
    t_clean = time.perf_counter() - t0
    abstain = None
    r_median = None
    if method == "smoothing":
        t1 = time.perf_counter()
        points, labels, rad = _smoothing_curve(
            model, xs, ys, sigma, n0, n, alpha, radii, seed, batch_size, progress
        )
        t_cert = time.perf_counter() - t1
        abstain = proportion(int((labels == -1).sum()), len(ys))
        ok = (labels == ys) & (labels != -1)
        r_median = float(np.median(rad[ok])) if ok.any() else None
        norm: Literal["l2", "linf"] = "l2"
    else:
        t1 = time.perf_counter()
        points, labels, rad = _ibp_curve(model, xs, ys, epsilons, progress)
        t_cert = time.perf_counter() - t1
        norm = "linf"
    d_info = dict(data_info or {})
    d_info.update(
        {"n_total": len(x), "n_evaluated": len(ys), "sha256_evaluated": sha256_array(xs, ys)}
    )
    report = CertificationReport(
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        advguard_version=__version__,
        method=chosen,
        norm=norm,
        **_smoothing_settings(method, sigma, n0, n, alpha),
        seed=int(seed),
        n_samples=len(ys),
        clean_accuracy=clean,
        abstain_rate=abstain,
        results=points,
        radius_median=r_median,
        timing={
            "clean_s": round(t_clean, 4),
            "certify_s": round(t_cert, 4),
            "per_sample_s": round(t_cert / len(ys), 6),
        },
        model=_model_section(model, model_info),
        data=d_info,
        environment=environment(model),
        guarantee=_guarantee(method, alpha),
    )
    json_path, html_path = _write_report(report, Path(out_dir))
    return CertificationRun(report, json_path, html_path, labels, np.asarray(rad, dtype=float))


def _method(method: str) -> Literal["smoothing", "ibp"]:
    if method == "smoothing":
        return "smoothing"
    if method == "ibp":
        return "ibp"
    raise InputError(f"method must be 'smoothing' or 'ibp', got {method!r}")


def _smoothing_settings(method: str, sigma: float, n0: int, n: int, alpha: float) -> dict[str, Any]:
    """The report's smoothing fields (None for IBP), with the largest certifiable radius."""
    from advguard.defenses.certify.smoothing import lower_confidence_bound

    if method != "smoothing":
        return {"sigma": None, "n0": None, "n": None, "alpha": None, "radius_cap": None}
    return {
        "sigma": float(sigma),
        "n0": int(n0),
        "n": int(n),
        "alpha": float(alpha),
        "radius_cap": float(sigma * gaussian.ppf(lower_confidence_bound(int(n), int(n), alpha))),
    }


def _model_section(model: Classifier, model_info: dict[str, Any] | None) -> dict[str, Any]:
    return {
        **(model_info or {}),
        "class": type(model).__name__,
        "input_shape": list(model.input_shape),
        "num_classes": int(model.num_classes),
        "bounds": list(model.bounds),
    }


def _smoothing_curve(
    model: Any,
    xs: np.ndarray,
    ys: np.ndarray,
    sigma: float,
    n0: int,
    n: int,
    alpha: float,
    radii: list[float] | None,
    seed: int,
    batch_size: int,
    progress: Progress | None,
) -> tuple[list[CertifiedPoint], np.ndarray, np.ndarray]:
    """Randomized smoothing: certified accuracy per L2 radius, labels and radii per sample."""
    from advguard.defenses.certify.smoothing import SmoothedClassifier, certified_accuracy_curve

    grid = sorted(radii if radii is not None else DEFAULT_RADII)
    if any(r < 0 or not np.isfinite(r) for r in grid):
        raise InputError(f"radii must be finite and >= 0, got {grid}")
    smoothed = SmoothedClassifier(model, sigma, batch_size=batch_size, seed=seed)
    res = smoothed.certify(xs, n0=n0, n=n, alpha=alpha, progress=progress)
    labels, rad = res.labels, res.radii
    curve = certified_accuracy_curve(labels, rad, ys, grid)
    n_eval = len(ys)
    points = [
        CertifiedPoint(radius=float(r), certified_accuracy=proportion(round(c * n_eval), n_eval))
        for r, c in zip(grid, curve, strict=True)
    ]
    return points, labels, rad


def _ibp_curve(
    model: Any,
    xs: np.ndarray,
    ys: np.ndarray,
    epsilons: list[float] | None,
    progress: Progress | None,
) -> tuple[list[CertifiedPoint], np.ndarray, np.ndarray]:
    """Interval bound propagation: certified accuracy per Linf epsilon, labels and radii."""
    from advguard.defenses.certify.ibp import ibp_certify

    grid = sorted(epsilons if epsilons else [0.01])
    masks = []
    for i, e in enumerate(grid):
        masks.append(ibp_certify(model, xs, ys, e))
        if progress is not None:
            progress("ibp", i + 1, len(grid))
    points = [
        CertifiedPoint(radius=float(e), certified_accuracy=proportion(int(m.sum()), len(ys)))
        for e, m in zip(grid, masks, strict=True)
    ]
    # radius per sample = largest certified epsilon on the grid (0 if none)
    rad = np.zeros(len(ys))
    for e, m in zip(grid, masks, strict=True):
        rad[m] = e
    return points, np.where(rad > 0, ys, -1), rad


def _write_report(report: CertificationReport, out: Path) -> tuple[Path, Path]:
    """certify.json and certify.html in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "certify.json"
    json_path.write_text(json.dumps(report.model_dump(mode="json"), indent=2), encoding="utf-8")
    html_path = out / "certify.html"
    html_path.write_text(render_html(report), encoding="utf-8")
    return json_path, html_path


def load_certification(path: str | Path) -> CertificationReport:
    p = Path(path)
    data = json.loads(p.read_text(encoding="utf-8"))
    if data.get("kind") != KIND:
        raise InputError(f"{p} is not a certification report (kind {data.get('kind')!r})")
    return CertificationReport.model_validate(data)


def _curve_png(report: CertificationReport) -> str:
    fig = Figure(figsize=(6, 3.6), dpi=100)
    ax = fig.add_subplot()
    r = [p.radius for p in report.results]
    v = [p.certified_accuracy.value or 0.0 for p in report.results]
    lo = [p.certified_accuracy.ci_low for p in report.results]
    hi = [p.certified_accuracy.ci_high for p in report.results]
    ax.fill_between(r, lo, hi, alpha=0.2, color="tab:blue", label="95% CI")
    ax.plot(r, v, marker="o", color="tab:blue", label="certified accuracy")
    unit = "L2 radius" if report.norm == "l2" else "Linf epsilon"
    ax.set_xlabel(f"{unit} (raw input units)")
    ax.set_ylabel("certified accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    fig.tight_layout()
    return png(fig)


def render_html(report: CertificationReport) -> str:
    e = html.escape
    params = (
        f"sigma={report.sigma:g}, n0={report.n0}, n={report.n}, alpha={report.alpha:g}"
        if report.method == "smoothing"
        else "interval bound propagation"
    )
    rows = "".join(
        f"<tr><td>{p.radius:g}</td><td>{e(prop(p.certified_accuracy))}</td></tr>"
        for p in report.results
    )
    extra = ""
    if report.abstain_rate is not None:
        extra = f"<p>Abstain rate: {e(prop(report.abstain_rate))}</p>"
    if report.radius_median is not None:
        extra += f"<p>Median certified radius (correct samples): {report.radius_median:.4g}</p>"
    if report.radius_cap is not None:
        extra += (
            f"<p>Largest radius n={report.n} and alpha={report.alpha:g} can certify: "
            f"{report.radius_cap:.4g}</p>"
        )
    unit = "L2 radius" if report.norm == "l2" else "Linf epsilon"
    model_name = e(str(report.model.get("path", report.model["class"])))
    took = report.timing["certify_s"]
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>advguard certification</title>
<style>body{{font-family:system-ui,sans-serif;max-width:52rem;margin:2rem auto;color:#222}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:.3rem .7rem;text-align:right}}
.note{{color:#555;font-size:.9rem}}</style></head><body>
<h1>Certified robustness ({e(report.method)})</h1>
<p>{e(params)}; {report.n_samples} samples; model {model_name};
data {e(str(report.data.get("name", "")))}</p>
<p>Clean accuracy of the base model: {e(prop(report.clean_accuracy))}</p>{extra}
<img alt="certified accuracy curve" src="{_curve_png(report)}">
<table><tr><th>{unit}</th><th>certified accuracy [95% CI]</th></tr>{rows}</table>
<p class="note">{e(report.guarantee)}</p>
<p class="note">Certification took {took:.2f} s; advguard {e(report.advguard_version)},
created {e(report.created)}.</p>
</body></html>
"""
