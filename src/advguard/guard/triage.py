"""Incident triage: is the traffic in an incident an attack or drift?

The preserved inputs (:mod:`advguard.guard.preserve`) are replayed against the served model,
the fallback and a *surrogate* (a model file, or a student trained on the model's answers to a
reference sample with the extraction code, :func:`train_surrogate`), and compared with a
reference sample of benign data:

* **Proxy labels.** The inputs carry no labels; each gets the majority label of its 5 nearest
  reference neighbours (labelled by the reference labels, else by the model). A model's
  *error rate* is its disagreement with these labels; the same rate on a held-out half of the
  reference is its baseline.
* **Transfer rate**: of the inputs the surrogate gets wrong, the share the model also gets
  wrong (inputs crafted on a surrogate of the model fool the model too).
* **Brittleness**: the share of inputs whose model label flips under a tiny FGSM step
  (``probe_fraction`` of the input range, 3% by default) computed on the surrogate, against
  the same share on the reference. Adversarial examples sit just across a decision boundary of
  the model family they were crafted for, so a step that small moves most of them back;
  natural inputs, drifted or not, rarely move (Hu et al. 2019, "A new defense against
  adversarial images: turning a weakness into a strength").
* **Uneven damage**: the spread of the error rates of model, fallback and surrogate, minus
  its baseline. Drift makes inputs naturally harder for every model alike; an adversarial
  perturbation is optimised against one model (or a copy of it) and transfers only partly.
* **Detectors**: each guard detector's flag rate (score above its threshold) on the inputs
  and on the reference.
* **Drift**: per-feature population stability index (deciles of the reference; PSI > 0.25 is
  a major shift) and two-sample Kolmogorov-Smirnov tests (Bonferroni at 1%), and the PSI of
  the model's predicted classes.

The verdict is a heuristic with its reasons: ``attack`` when at least two attack signals hold
(detector flags, brittleness, uneven damage, transfer), ``drift`` when the features shifted
and no attack signal holds, ``inconclusive`` otherwise.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from advguard.errors import InputError

PSI_MAJOR = 0.25
KS_ALPHA = 0.01
#: Attack-signal thresholds (see the module docstring and docs/incident.md).
DETECTOR_FLAG_MIN = 0.5
DETECTOR_FLAG_LIFT = 0.3
SPREAD_LIFT = 0.15
BRITTLE_MIN = 0.5
BRITTLE_LIFT = 0.3
TRANSFER_MIN = 0.5
SURROGATE_ERROR_MIN = 0.25
DRIFT_FEATURE_SHARE = 0.1


@dataclass
class Replayed:
    """One model's answers on the inputs and on the held-out reference."""

    name: str
    labels: np.ndarray
    error_rate: float
    baseline_error_rate: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "error_rate": round(self.error_rate, 4),
            "baseline_error_rate": round(self.baseline_error_rate, 4),
        }


@dataclass
class TriageResult:
    verdict: str
    reasons: list[str]
    n_inputs: int
    n_reference: int
    models: dict[str, dict[str, Any]]
    transfer: dict[str, Any]
    brittleness: dict[str, float]
    spread: dict[str, float]
    detectors: dict[str, dict[str, Any]]
    drift: dict[str, Any]
    examples: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "reasons": self.reasons,
            "n_inputs": self.n_inputs,
            "n_reference": self.n_reference,
            "models": self.models,
            "transfer": self.transfer,
            "brittleness": self.brittleness,
            "spread": self.spread,
            "detectors": self.detectors,
            "drift": self.drift,
        }


def train_surrogate(
    model: Any, reference: np.ndarray, *, arch: str = "mlp", epochs: int = 30, seed: int = 0
) -> Any:
    """A student trained on ``model``'s probabilities for ``reference`` (Knockoff-style
    extraction, :func:`advguard.attacks.extraction.train_student`)."""
    from advguard.attacks.extraction.common import as_classifier, build_student, train_student

    x = np.asarray(reference, dtype=np.float32)
    soft = np.asarray(model.predict_proba(x), dtype=np.float32)
    module = build_student(arch, model.input_shape, model.num_classes, seed)
    return as_classifier(train_student(module, x, soft, epochs=epochs, seed=seed), model)


def psi(reference: np.ndarray, current: np.ndarray, bins: int = 10) -> float:
    """Population stability index of one feature: deciles of ``reference`` as bin edges
    (a constant feature gets the edge at its value), proportions floored at 1e-4."""
    edges = np.unique(np.quantile(reference, np.linspace(0, 1, bins + 1)[1:-1]))
    r = np.bincount(np.searchsorted(edges, reference, side="left"), minlength=len(edges) + 1)
    c = np.bincount(np.searchsorted(edges, current, side="left"), minlength=len(edges) + 1)
    p = np.maximum(r / max(1, len(reference)), 1e-4)
    q = np.maximum(c / max(1, len(current)), 1e-4)
    return float(np.sum((q - p) * np.log(q / p)))


def drift_statistics(
    reference: np.ndarray, current: np.ndarray, ref_pred: np.ndarray, cur_pred: np.ndarray
) -> dict[str, Any]:
    """Per-feature PSI and KS tests, and the PSI of the predicted classes."""
    from scipy.stats import ks_2samp

    r = reference.reshape(len(reference), -1).astype(np.float64)
    c = current.reshape(len(current), -1).astype(np.float64)
    d = r.shape[1]
    psis = np.array([psi(r[:, j], c[:, j]) for j in range(d)])
    pvals = np.ones(d)
    for j in range(d):
        if np.ptp(r[:, j]) > 0 or np.ptp(c[:, j]) > 0 or r[0, j] != c[0, j]:
            pvals[j] = float(ks_2samp(r[:, j], c[:, j]).pvalue)
    k = int(max(ref_pred.max(initial=0), cur_pred.max(initial=0))) + 1
    rp = np.maximum(np.bincount(ref_pred, minlength=k) / len(ref_pred), 1e-4)
    cp = np.maximum(np.bincount(cur_pred, minlength=k) / len(cur_pred), 1e-4)
    top = np.argsort(-psis)[:5]
    return {
        "features": d,
        "psi_mean": round(float(psis.mean()), 4),
        "psi_max": round(float(psis.max()), 4),
        "psi_major_share": round(float((psis > PSI_MAJOR).mean()), 4),
        "ks_rejected_share": round(float((pvals < KS_ALPHA / d).mean()), 4),
        "prediction_psi": round(float(np.sum((cp - rp) * np.log(cp / rp))), 4),
        "top_features": [{"feature": int(j), "psi": round(float(psis[j]), 4)} for j in top],
    }


def _replay(
    name: str, clf: Any, x: np.ndarray, proxy: np.ndarray, ref_b: np.ndarray, proxy_b: np.ndarray
) -> Replayed:
    labels = np.asarray(clf.predict(x)).astype(np.int64)
    base = np.asarray(clf.predict(ref_b)).astype(np.int64)
    return Replayed(name, labels, float(np.mean(labels != proxy)), float(np.mean(base != proxy_b)))


def brittleness(model: Any, surrogate: Any, x: np.ndarray, epsilon: float) -> float:
    """Share of ``x`` whose ``model`` label changes under one FGSM step of ``epsilon`` (Linf)
    computed on the differentiable ``surrogate`` against its own labels."""
    import torch

    from advguard.attacks import FGSM

    own = np.asarray(surrogate.predict(x)).astype(np.int64)
    res = FGSM()(surrogate, torch.as_tensor(x), torch.as_tensor(own), epsilon=epsilon)
    probed = res.x_adv.detach().cpu().numpy()
    return float(np.mean(np.asarray(model.predict(probed)) != np.asarray(model.predict(x))))


def _detector_stats(
    detectors: Sequence[tuple[str, Any]], x: np.ndarray, ref: np.ndarray
) -> dict[str, dict[str, Any]]:
    out = {}
    for name, det in detectors:
        s = np.asarray(det.score(x), dtype=np.float64).reshape(-1)
        b = np.asarray(det.score(ref), dtype=np.float64).reshape(-1)
        thr = getattr(det, "threshold", None)
        if thr is None:  # uncalibrated: the reference's 95th percentile
            thr = float(np.quantile(b, 0.95))
        out[name] = {
            "threshold": float(thr),
            "mean_score": round(float(s.mean()), 6),
            "reference_mean_score": round(float(b.mean()), 6),
            "flag_rate": round(float((s > thr).mean()), 4),
            "reference_flag_rate": round(float((b > thr).mean()), 4),
            "scores": s,
        }
    return out


def _signals(res: dict[str, Any]) -> tuple[list[str], list[str]]:
    attack, drift = [], []
    for name, d in res["detectors"].items():
        if d["flag_rate"] >= DETECTOR_FLAG_MIN and (
            d["flag_rate"] >= d["reference_flag_rate"] + DETECTOR_FLAG_LIFT
        ):
            attack.append(
                f"detector {name} flags {d['flag_rate']:.0%} of the inputs "
                f"({d['reference_flag_rate']:.0%} of the reference)"
            )
    sp = res["spread"]
    if sp["inputs"] - sp["reference"] >= SPREAD_LIFT:
        attack.append(
            f"uneven damage: the error rates of model, fallback and surrogate spread by "
            f"{sp['inputs']:.0%} ({sp['reference']:.0%} on the reference); drift hurts models alike"
        )
    br = res["brittleness"]
    if br["inputs"] >= BRITTLE_MIN and br["inputs"] >= br["reference"] + BRITTLE_LIFT:
        attack.append(
            f"brittle inputs: a {br['probe_epsilon']:.3g} FGSM step flips the model on "
            f"{br['inputs']:.0%} of them ({br['reference']:.0%} of the reference)"
        )
    tr = res["transfer"]
    if tr["surrogate_error_rate"] >= SURROGATE_ERROR_MIN and (tr["rate"] or 0) >= TRANSFER_MIN:
        attack.append(
            f"{tr['surrogate_error_rate']:.0%} of the inputs fool the surrogate and "
            f"{tr['rate']:.0%} of those also fool the model (transfer)"
        )
    dr = res["drift"]
    if dr["psi_major_share"] >= DRIFT_FEATURE_SHARE or dr["ks_rejected_share"] >= (
        DRIFT_FEATURE_SHARE
    ):
        drift.append(
            f"{dr['psi_major_share']:.0%} of the features shifted (PSI > {PSI_MAJOR}), "
            f"KS rejects {dr['ks_rejected_share']:.0%} (mean PSI {dr['psi_mean']:.3g})"
        )
    return attack, drift


def triage(
    inputs: np.ndarray,
    *,
    model: Any,
    surrogate: Any,
    reference: np.ndarray,
    reference_labels: np.ndarray | None = None,
    fallback: Any = None,
    detectors: Sequence[tuple[str, Any]] = (),
    n_examples: int = 8,
    probe_fraction: float = 0.03,
    seed: int = 0,
) -> TriageResult:
    """Replay ``inputs`` against ``model``, ``fallback`` and ``surrogate`` and compare them
    with ``reference`` (see the module docstring). Classifiers need ``predict``; detectors
    ``score`` (and ``threshold``)."""
    from sklearn.neighbors import KNeighborsClassifier

    check_surrogate(surrogate)
    x = np.asarray(inputs, dtype=np.float32)
    ref = np.asarray(reference, dtype=np.float32)
    if len(x) < 2 or len(ref) < 20:
        raise InputError("triage needs at least 2 inputs and 20 reference samples")
    if x.shape[1:] != ref.shape[1:]:
        raise InputError(f"the inputs have shape {x.shape[1:]} but the reference {ref.shape[1:]}")
    perm = np.random.default_rng(seed).permutation(len(ref))
    a, b = perm[: len(ref) // 2], perm[len(ref) // 2 :]
    ref_labels = (
        np.asarray(model.predict(ref)).astype(np.int64)
        if reference_labels is None
        else np.asarray(reference_labels).astype(np.int64).reshape(-1)
    )
    if len(ref_labels) != len(ref):
        raise InputError("the reference labels and samples differ in number")
    knn = KNeighborsClassifier(n_neighbors=5).fit(ref[a].reshape(len(a), -1), ref_labels[a])
    proxy = knn.predict(x.reshape(len(x), -1))
    proxy_b = knn.predict(ref[b].reshape(len(b), -1))
    clfs = [("model", model), ("surrogate", surrogate)] + (
        [("fallback", fallback)] if fallback is not None else []
    )
    rep = {n: _replay(n, c, x, proxy, ref[b], proxy_b) for n, c in clfs}
    wrong_s = rep["surrogate"].labels != proxy
    wrong_m = rep["model"].labels != proxy
    res: dict[str, Any] = {
        "models": {n: r.to_dict() for n, r in rep.items()},
        "transfer": {
            "surrogate_error_rate": round(float(wrong_s.mean()), 4),
            "rate": round(float((wrong_m & wrong_s).sum() / wrong_s.sum()), 4)
            if wrong_s.any()
            else None,
            "n": int(wrong_s.sum()),
        },
        "spread": {
            "inputs": round(float(np.ptp([r.error_rate for r in rep.values()])), 4),
            "reference": round(float(np.ptp([r.baseline_error_rate for r in rep.values()])), 4),
        },
        "brittleness": _brittleness(model, surrogate, x, ref[b], probe_fraction),
        "detectors": _detector_stats(detectors, x, ref[b]),
        "drift": drift_statistics(
            ref, x, np.asarray(model.predict(ref)).astype(np.int64), rep["model"].labels
        ),
    }
    attack, drift = _signals(res)
    verdict = "attack" if len(attack) >= 2 else "drift" if drift and not attack else "inconclusive"
    reasons = attack + drift
    if verdict == "inconclusive":
        reasons.append(
            f"{len(attack)} attack signal(s) (2 needed) and "
            + ("a feature shift" if drift else "no feature shift")
        )
    examples = _examples(x, rep, proxy, res["detectors"], n_examples)
    for d in res["detectors"].values():
        d.pop("scores")
    return TriageResult(verdict, reasons, len(x), len(ref), examples=examples, **res)


def _brittleness(
    model: Any, surrogate: Any, x: np.ndarray, ref: np.ndarray, fraction: float
) -> dict[str, float]:
    from advguard import _validate as check

    fraction = check.number("probe_fraction", fraction, low=0.0, high=0.5, low_open=True)
    lo, hi = (float(v) for v in getattr(surrogate, "bounds", (0.0, 1.0)))
    eps = fraction * (hi - lo)
    return {
        "probe_epsilon": round(eps, 6),
        "inputs": round(brittleness(model, surrogate, x, eps), 4),
        "reference": round(brittleness(model, surrogate, ref, eps), 4),
    }


def _examples(
    x: np.ndarray, rep: dict[str, Replayed], proxy: np.ndarray, dets: dict[str, Any], n: int
) -> list[dict[str, Any]]:
    """The inputs the model gets wrong first (then the rest), with every model's label."""
    wrong = np.flatnonzero(rep["model"].labels != proxy)
    order = list(wrong) + [i for i in range(len(x)) if i not in set(wrong)]
    out = []
    for i in order[:n]:
        out.append(
            {
                "index": int(i),
                "input": x[i],
                "proxy_label": int(proxy[i]),
                "labels": {k: int(r.labels[i]) for k, r in rep.items()},
                "scores": {k: round(float(d["scores"][i]), 4) for k, d in dets.items()},
            }
        )
    return out


def _example_cell(x: np.ndarray) -> str:
    """An image input as an embedded PNG; anything else as (escaped) numbers."""
    from advguard.attacks.report_html import img_tag, new_figure

    if (x.ndim == 3 and x.shape[0] in (1, 3)) or x.ndim == 2:
        img = x if x.ndim == 2 else (x[0] if x.shape[0] == 1 else np.moveaxis(x, 0, -1))
        fig = new_figure(1.2, 1.2)
        ax = fig.add_subplot(1, 1, 1)
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None)
        ax.axis("off")
        return img_tag(fig, "input")
    flat = x.reshape(-1)
    text = ", ".join(f"{v:.4g}" for v in flat[:16]) + (" ..." if flat.size > 16 else "")
    return f"<code>{html.escape(text)}</code>"


def render_html(res: TriageResult, title: str = "Incident triage") -> str:
    """A self-contained page (no scripts, no external assets; every string escaped)."""
    from advguard.attacks.report_html import page, table

    e = html.escape
    body = [
        f"<p><b>Verdict: {e(res.verdict.upper())}</b> ({res.n_inputs} inputs, "
        f"{res.n_reference} reference samples)</p>",
        "<ul>" + "".join(f"<li>{e(r)}</li>" for r in res.reasons) + "</ul>",
        "<h2>Replay</h2>",
        table(
            ["model", "error rate (vs proxy labels)", "baseline (reference)"],
            [
                [k, f"{v['error_rate']:.1%}", f"{v['baseline_error_rate']:.1%}"]
                for k, v in res.models.items()
            ],
        ),
        f"<p>Transfer surrogate to model: {e(str(res.transfer['rate']))} "
        f"({res.transfer['n']} inputs fool the surrogate); error-rate spread "
        f"{res.spread['inputs']:.1%} (reference {res.spread['reference']:.1%}); brittleness "
        f"{res.brittleness['inputs']:.1%} (reference {res.brittleness['reference']:.1%}, FGSM "
        f"step {res.brittleness['probe_epsilon']:.3g}).</p>",
        "<h2>Detectors</h2>",
        table(
            ["detector", "flag rate", "reference flag rate", "mean score", "threshold"],
            [
                [
                    k,
                    f"{d['flag_rate']:.1%}",
                    f"{d['reference_flag_rate']:.1%}",
                    f"{d['mean_score']:.4g}",
                    f"{d['threshold']:.4g}",
                ]
                for k, d in res.detectors.items()
            ],
        ),
        "<h2>Drift</h2>",
        table(
            ["statistic", "value"], [[k, v] for k, v in res.drift.items() if k != "top_features"]
        ),
        table(["feature", "PSI"], [[f["feature"], f["psi"]] for f in res.drift["top_features"]]),
        "<h2>Examples</h2>",
    ]
    rows = []
    for ex in res.examples:
        labels = ", ".join(f"{e(k)} {v}" for k, v in ex["labels"].items())
        scores = ", ".join(f"{e(k)} {v}" for k, v in ex["scores"].items()) or "-"
        rows.append(
            f"<tr><td>{ex['index']}</td><td>{_example_cell(ex['input'])}</td>"
            f"<td>{ex['proxy_label']}</td><td>{labels}</td><td>{scores}</td></tr>"
        )
    body.append(
        "<table><tr><th>input</th><th>example</th><th>proxy label</th><th>labels</th>"
        "<th>detector scores</th></tr>" + "".join(rows) + "</table>"
    )
    body.append(
        "<p class='note'>Proxy labels: majority of the 5 nearest reference samples. "
        "The verdict is a heuristic: read the reasons.</p>"
    )
    return page(title, "".join(body))


def write_report(res: TriageResult, out_dir: Path, title: str = "Incident triage") -> list[Path]:
    """``triage.json`` and the self-contained ``triage.html`` in ``out_dir``."""
    import json

    from advguard.atomic import atomic_write_text

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} is a file; give a folder for the triage report")
    out.mkdir(parents=True, exist_ok=True)
    j = atomic_write_text(out / "triage.json", json.dumps(res.to_dict(), indent=1) + "\n")
    h = atomic_write_text(out / "triage.html", render_html(res, title))
    return [j, h]


def check_surrogate(surrogate: Any) -> Any:
    """A surrogate must be differentiable (the brittleness probe takes its gradients)."""
    from advguard.models.base import is_white_box

    if not is_white_box(surrogate):
        raise InputError(
            f"the surrogate must be a differentiable torch model, got {type(surrogate).__name__}; "
            "omit --surrogate to train one on the model's answers"
        )
    return surrogate
