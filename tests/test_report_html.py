"""Report schema round trip, HTML rendering and report comparison, on hand-built reports."""

from __future__ import annotations

import json
import re

import jsonschema
import numpy as np
import pytest

from advguard.evaluate.compare import compare_reports, comparison_markdown, comparison_table
from advguard.evaluate.html import render_html, write_html
from advguard.evaluate.report import (
    AttackRow,
    EpsilonResult,
    Example,
    FeatureChange,
    Finding,
    Report,
    SanityCheck,
    SLOResult,
    Stat,
    SuiteEntry,
    Verdict,
    json_schema,
)
from advguard.stats import proportion

N = 200


def make_report(
    *,
    tabular: bool = False,
    model_name: str = "digits-cnn",
    robust: tuple[int, ...] = (150, 96, 31),
    norm: str = "linf",
    clean_k: int = 194,
) -> Report:
    """A realistic report: 3 epsilons, a 2-attack cascade (+ escalation at the largest eps),
    one failed sanity check, and image examples (1, 8, 8) or tabular feature changes."""
    eps_list = [0.05, 0.1, 0.2]
    suite = [
        SuiteEntry(
            order=1,
            attack="pgd",
            description="Projected gradient descent, CE loss.",
            knowledge="white-box",
            params={"steps": 20, "step_size": 0.25, "restarts": 1},
            atlas=["AML.T0043.000"],
        ),
        SuiteEntry(
            order=2,
            attack="apgd-ce",
            description="Auto-PGD with cross-entropy.",
            knowledge="white-box",
            params={"steps": 20, "rho": 0.75},
            atlas=["AML.T0043.000"],
        ),
    ]
    results = []
    for i, (eps, k_final) in enumerate(zip(eps_list, robust, strict=True)):
        k1 = min(clean_k, k_final + 12)
        esc = 3 if i == 2 else 0  # the escalation fools 3 more at the largest epsilon
        rows = [
            AttackRow(
                attack="pgd",
                order=1,
                attacked=clean_k,
                newly_fooled=clean_k - k1,
                attack_success_rate=proportion(clean_k - k1, clean_k),
                robust_accuracy_after=proportion(k1, N),
                forward_evals=clean_k * 21,
                gradient_evals=clean_k * 20,
                seconds=1.2 + i,
                examples_per_second=150.0,
            ),
            AttackRow(
                attack="apgd-ce",
                order=2,
                attacked=k1,
                newly_fooled=k1 - k_final - esc,
                attack_success_rate=proportion(k1 - k_final - esc, k1),
                robust_accuracy_after=proportion(k_final + esc, N),
                forward_evals=k1 * 21,
                gradient_evals=k1 * 20,
                seconds=1.5 + i,
                examples_per_second=120.0,
            ),
        ]
        if i == 2:
            rows.append(
                AttackRow(
                    attack="apgd-ce",
                    order=3,
                    attacked=k_final + 3,
                    newly_fooled=3,
                    attack_success_rate=proportion(3, k_final + 3),
                    robust_accuracy_after=proportion(k_final, N),
                    forward_evals=900,
                    gradient_evals=800,
                    seconds=3.0,
                    examples_per_second=None,
                    stage="escalation",
                )
            )
        fooled = clean_k - k_final
        results.append(
            EpsilonResult(
                epsilon=eps,
                robust_accuracy=proportion(k_final, N),
                fooling_rate=proportion(fooled, clean_k),
                first_robust_accuracy=proportion(k_final + 3, N) if i == 2 else None,
                perturbation={
                    "linf": Stat(median=eps, mean=eps * 0.97),
                    "l2": Stat(median=eps * 5.1, mean=eps * 5.3),
                    "l0": Stat(median=41.0, mean=39.5),
                },
                mean_true_class_confidence_drop=0.2 + 0.2 * i,
                per_attack=rows,
            )
        )
    checks = [
        SanityCheck(
            id="unbounded-attack",
            title="Unbounded attack reaches 0% accuracy",
            status="pass",
            explanation="With a huge epsilon every sample was fooled.",
            reference="Carlini et al. 2019, On Evaluating Adversarial Robustness",
        ),
        SanityCheck(
            id="eps-monotone",
            title="Accuracy decreases with epsilon",
            status="warn",
            explanation="Robust accuracy is flat between two epsilons.",
            suggestion="Check the epsilon scale against the input bounds.",
        ),
        SanityCheck(
            id="random-vs-gradient",
            title="Gradient attack beats random noise",
            status="fail",
            explanation="Random noise fooled more samples than PGD: gradients look masked.",
            suggestion="Try a black-box attack (square) or BPDA.",
            reference="https://arxiv.org/abs/1802.00420",
            details={"random_fooled": 12, "pgd_fooled": 4},
            escalation="re-ran apgd-ce with 100 steps and 5 restarts at eps 0.2",
            status_before_escalation="fail",
        ),
    ]
    slos = [
        SLOResult(
            slo="robust_accuracy >= 0.7 at eps 0.05",
            metric="robust_accuracy",
            epsilon=0.05,
            value=robust[0] / N,
            ci_low=0.68,
            ci_high=0.81,
            holds="point-estimate-only",
        ),
        SLOResult(
            slo="robust_accuracy >= 0.5 at eps 0.1",
            metric="robust_accuracy",
            epsilon=0.1,
            value=robust[1] / N,
            ci_low=0.41,
            ci_high=0.55,
            holds="no",
        ),
        SLOResult(
            slo="clean_accuracy >= 0.9",
            metric="clean_accuracy",
            epsilon=None,
            value=clean_k / N,
            ci_low=0.935,
            ci_high=0.99,
            holds="with-confidence",
        ),
    ]
    examples, feature_changes, data = [], {}, {}
    rng = np.random.default_rng(0)
    if tabular:
        names = ["age", "income", "credit_limit", "num_late_payments", "<b>debt</b>", "tenure"]
        names += [f"f{j}" for j in range(14)]
        data = {
            "name": "credit",
            "modality": "tabular",
            "n_total": 1000,
            "n_evaluated": N,
            "sha256": "b" * 64,
        }
        feature_changes = {
            f"{e:g}": [
                FeatureChange(
                    feature=f,
                    mean_abs_change=float(e * (j + 1) / 3),
                    share_changed=float(min(1.0, 0.05 * (j + 1))),
                )
                for j, f in enumerate(names)
            ]
            for e in eps_list
        }
    else:
        data = {
            "name": "sklearn-digits",
            "modality": "image",
            "n_total": 397,
            "n_evaluated": N,
            "sha256": "a" * 64,
            "class_names": [f"digit-{c}" for c in range(10)],
        }
        for j in range(5):
            x = rng.random((1, 8, 8)) * (rng.random((1, 8, 8)) > 0.4)
            eps = eps_list[j % 3]
            x_adv = np.clip(x + eps * np.sign(rng.standard_normal(x.shape)), 0, 1)
            examples.append(
                Example(
                    epsilon=eps,
                    attack="pgd" if j % 2 else "apgd-ce",
                    index=10 * j + 3,
                    label=j,
                    clean_prediction=j,
                    clean_confidence=0.97,
                    adversarial_prediction=(j + 3) % 10,
                    adversarial_confidence=0.61,
                    x=x.tolist(),
                    x_adv=x_adv.tolist(),
                )
            )
    return Report(
        created="2025-01-31T12:00:00+00:00",
        advguard_version="0.1.0",
        environment={
            "python": "3.12.3",
            "platform": "Linux-x86_64",
            "cpu_count": 2,
            "device": "cpu",
            "gpu": None,
            "packages": {"torch": "2.13.0"},
        },
        model={
            "name": model_name,
            "adapter": "TorchClassifier",
            "num_classes": 10,
            "input_shape": [6] if tabular else [1, 8, 8],
            "bounds": [0.0, 1.0],
            "sha256": "c" * 64,
        },
        data=data,
        threat_model={
            "name": "quick",
            "knowledge": "white-box",
            "goal": "untargeted",
            "norm": norm,
            "epsilons": eps_list,
            "samples": N,
            "seed": 0,
            "attacks": [{"attack": "pgd", "steps": 20}, {"attack": "apgd-ce", "steps": 20}],
        },
        suite=suite,
        sample_indices_sha256="d" * 64,
        clean_accuracy=proportion(clean_k, N),
        results=results,
        sanity_checks=checks,
        trustworthy=False,
        verdict=Verdict(
            status="untrustworthy",
            summary="1 sanity check failed: robust accuracy may be overestimated.",
            slos=slos,
        ),
        findings=[
            Finding(
                atlas_technique="AML.T0043.000",
                atlas_name="Craft Adversarial Data: White-Box Optimization",
                atlas_version="4.7.0",
                epsilon=0.1,
                summary="104 of 194 samples evaded at eps 0.1",
                severity="high",
            )
        ],
        examples=examples,
        feature_changes=feature_changes,
        timing={"suite_seconds": 12.5, "sanity_and_escalation_seconds": 4.2, "total_seconds": 17.0},
    )


@pytest.mark.parametrize("tabular", [False, True])
def test_json_round_trip_and_schema(tabular):
    report = make_report(tabular=tabular)
    data = json.loads(report.model_dump_json())
    assert Report.model_validate(data) == report
    jsonschema.validate(data, json_schema())
    bad = dict(data, clean_accuracy="high")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, json_schema())


def test_html_image_report(tmp_path):
    report = make_report(model_name="<script>alert(1)</script>")
    html = render_html(report)
    assert html.startswith("<!DOCTYPE html>")
    assert "UNTRUSTWORTHY" in html and "badge untrustworthy" in html
    assert report.verdict.summary in html
    assert "These results are not trustworthy" in html
    # curve + one picture per example
    assert html.count('<img src="data:image/png;base64,') >= 1 + len(report.examples)
    for c in report.sanity_checks:
        assert c.title in html
    assert 'class="check fail"' in html
    assert "point estimate only" in html.lower()
    assert "digit-3 (3)" in html  # class names are used
    assert "steps=20" in html and "rho=0.75" in html  # suite shows parameters
    assert "AML.T0043.000" in html and "4.7.0" in html
    assert "c" * 64 in html and "d" * 64 in html
    # escaped: no live script tag anywhere, the escaped form is present
    assert "<script" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert not re.search(r"src=\"(?!data:)", html)  # self-contained: no external sources
    path = write_html(report, tmp_path / "out")
    assert path.name == "report.html" and path.read_text(encoding="utf-8") == html
    assert [p.name for p in path.parent.iterdir()] == ["report.html"]  # no temp file left


def test_html_tabular_report():
    report = make_report(tabular=True)
    html = render_html(report)
    assert 'id="features"' in html and 'id="examples"' not in html
    assert html.count('<img src="data:image/png;base64,') == 1 + len(report.feature_changes)
    assert "<b>debt</b>" not in html  # feature names are drawn in the PNG, never raw HTML


def test_compare_flags_regressions():
    a = make_report(robust=(150, 96, 31))
    b = make_report(robust=(144, 95, 31))  # -3 pts at 0.05, -0.5 pts at 0.1, same at 0.2
    cmp = compare_reports(a, b)
    rows = {r.epsilon: r for r in cmp.rows if r.metric == "robust_accuracy"}
    assert rows[0.05].regression and rows[0.05].delta == pytest.approx(-0.03)
    assert not rows[0.1].regression and rows[0.1].delta == pytest.approx(-0.005)
    assert not rows[0.2].regression
    assert cmp.has_regression and len(cmp.regressions) == 1
    clean = cmp.rows[0]
    assert clean.metric == "clean_accuracy" and clean.delta == 0 and not clean.regression
    assert not any("norm" in w for w in cmp.warnings)
    assert "untrustworthy" in " ".join(cmp.warnings) and cmp.like_for_like
    md = comparison_markdown(cmp)
    assert "▼ -3.0 pts" in md and "REGRESSION" in md and "-0.5 pts" in md
    assert md.count("▼") == 1
    t = comparison_table(cmp)
    assert len(t.rows) == len(t.styles) == 4 and len(t.columns) == len(t.rows[0])
    assert t.styles.count("regression") == 1

    same = compare_reports(a, a)
    assert not same.has_regression


def test_compare_clean_drop_norms_and_missing_eps():
    a = make_report(clean_k=194)
    b = make_report(clean_k=192, norm="l2")  # -1 pt clean: beyond the 0.5 pt tolerance
    b.results = b.results[:2]
    cmp = compare_reports(a, b)
    assert cmp.rows[0].regression
    assert any("norm differs" in w for w in cmp.warnings)
    assert not cmp.like_for_like
    only = [r for r in cmp.rows if r.only_in]
    assert [(r.epsilon, r.only_in) for r in only] == [(0.2, "a")]
    assert "only in A" in comparison_markdown(cmp)
    assert compare_reports(a, b, clean_tolerance=0.02).rows[0].regression is False
    with pytest.raises(ValueError, match="robust_tolerance"):
        compare_reports(a, b, robust_tolerance=5)


def test_documented_schema_is_current():
    from pathlib import Path

    from advguard.evaluate.report import json_schema

    doc = Path(__file__).resolve().parents[1] / "docs" / "report-schema-1.1.json"
    assert json.loads(doc.read_text()) == json.loads(json.dumps(json_schema())), (
        "regenerate docs/report-schema-1.1.json from advguard.evaluate.report.json_schema()"
    )
    # 1.1 only added the optional ``goals`` section to 1.0 (kept as published)
    old = json.loads((doc.parent / "report-schema-1.0.json").read_text())
    new = json_schema()
    assert set(new["properties"]) - set(old["properties"]) == {"goals"}
    assert set(new["required"]) == set(old["required"])


def test_html_survives_extreme_epsilons():
    """An epsilon matplotlib cannot place on a linear axis (1e308: its ticks overflow) must
    not crash the HTML after report.json was written: the curve falls back to labelled,
    evenly spaced epsilons."""
    report = make_report()
    report.results = report.results[:1]
    report.results[0].epsilon = 1e308
    html = render_html(report)
    assert "1e+308" in html
    assert 'alt="robust accuracy against epsilon"' in html
