"""``privacy.json`` (schema-versioned) and a self-contained ``privacy.html`` with the ROC curves
of the membership attacks on log-log axes (Carlini et al. 2022 recommend the low-FPR region)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from advguard.atomic import atomic_write_text
from advguard.attacks.inference.membership import MembershipAudit
from advguard.attacks.report_html import img_tag, new_figure, page, pct, table


def roc_figure(attacks: dict[str, dict[str, Any]]) -> Any:
    fig = new_figure()
    ax = fig.add_subplot(1, 1, 1)
    floor = 1e-4
    for name, res in attacks.items():
        fpr = np.maximum(np.asarray(res["roc"]["fpr"]), floor)
        tpr = np.maximum(np.asarray(res["roc"]["tpr"]), floor)
        ax.plot(fpr, tpr, label=f"{name} (AUC {res['auc']:.3f})")
    ax.plot([floor, 1], [floor, 1], "k--", lw=0.8, label="chance")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(floor, 1)
    ax.set_ylim(floor, 1)
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    ax.set_title("Membership inference ROC (log-log)")
    ax.legend(loc="lower right")
    return fig


def render_html(audit: MembershipAudit) -> str:
    rows = []
    for name, res in audit.attacks.items():
        lo_hi = res["auc_ci"]
        auc = f"{res['auc']:.3f}" + (f" [{lo_hi[0]:.3f}, {lo_hi[1]:.3f}]" if lo_hi else "")
        for r in res["at_fpr"]:
            rows.append(
                [name, auc, f"{r['fpr_target']:.1%}", pct(r["tpr"]), pct(r["fpr"]),
                 "yes" if r["resolvable"] else "no (too few non-members)"]
            )  # fmt: skip
    body = (
        table(
            [
                "attack",
                "AUC [95% bootstrap]",
                "target FPR",
                "TPR [95% CP]",
                "achieved FPR",
                "resolvable",
            ],
            rows,
        )
        + img_tag(roc_figure(audit.attacks), "ROC curves")
        + "<h2>Configuration</h2>"
        + table(["key", "value"], sorted((k, v) for k, v in audit.config.items()))
        + "<p class='note'>Scores: LOSS = log p(y|x) (Yeom et al. 2018); lira_offline = "
        "(phi - mu_out) / sigma_out with phi = log(p/(1-p)) against reference models trained "
        "without the targets (Carlini et al. 2022). A TPR well above the FPR at 0.1% or 1% "
        "means some training examples are identifiable with confidence.</p>"
    )
    return page("advguard privacy audit: membership inference", body)


def write_privacy_report(audit: MembershipAudit, out_dir: str | Path) -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jp, hp = out / "privacy.json", out / "privacy.html"
    atomic_write_text(jp, json.dumps(audit.to_dict(), indent=2))
    atomic_write_text(hp, render_html(audit))
    return jp, hp
