"""Threat-model goals beyond evasion (poisoning, backdoor, membership inference, extraction):
the schema, `advguard evaluate` running them into a strict report, the gate and the registry
accepting it. One small digits MLP, evaluated once per module (about 10 s on one thread)."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from advguard.cli import app
from advguard.errors import InputError
from advguard.evaluate.goals import GOAL_ATLAS
from advguard.evaluate.report import InconsistentReportError, load_report, parse_report
from advguard.evaluate.threat_model import load_threat_model, parse_threat_model
from advguard.models import TorchClassifier
from advguard.models.io import save_torch
from advguard.models.zoo import mlp

GOALS_YAML = """
name: digits-training-and-privacy
samples: 397
goals:
  - kind: backdoor
    params: {train_data: train.npz, rate: 0.05, target: 0, epochs: 8, size: 2}
    slos: [attack_success_rate <= 0.05, clean_accuracy >= 0.8]
  - kind: poisoning
    name: flip-to-0
    params: {train_data: train.npz, rate: 0.1, target: 0, epochs: 8}
    slos: [clean_accuracy_drop <= 0.1]
  - kind: membership-inference
    params: {members: train.npz, fpr: 0.001, bootstrap: 100}
    slos: [auc <= 0.75, tpr_at_fpr <= 0.2]
  - kind: extraction
    params: {queries: 150, epochs: 20, checkpoints: 2}
    slos: [fidelity <= 0.99]
"""


@dataclass
class Run:
    dir: Path
    model: Path
    report_path: Path
    data: dict[str, Any]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    from advguard.data import load_builtin
    from advguard.models.fit import fit

    d = tmp_path_factory.mktemp("goals")
    train, test = load_builtin("digits").split(test_size=397, seed=0)
    np.savez(d / "train.npz", x=train.x, y=train.y)
    np.savez(d / "test.npz", x=test.x, y=test.y)
    torch.manual_seed(0)
    module = fit(mlp((1, 8, 8), 10, hidden=(32,)), train.x, train.y, epochs=20, seed=0)
    clf = TorchClassifier(module, input_shape=(1, 8, 8), num_classes=10, bounds=(0.0, 1.0))
    kwargs = {"input_shape": [1, 8, 8], "num_classes": 10, "hidden": [32]}
    model = save_torch(
        clf, d / "digits.safetensors", factory="advguard.models.zoo:mlp", factory_kwargs=kwargs,
        input_shape=(1, 8, 8), num_classes=10, bounds=(0.0, 1.0),
    )  # fmt: skip
    (d / "goals.yaml").write_text(GOALS_YAML)
    args = ["evaluate", "--model", str(model), "--data", str(d / "test.npz")]
    res = CliRunner().invoke(app, [*args, "-t", str(d / "goals.yaml"), "--out", str(d / "rep")])
    # the backdoor SLO fails (5% poisoned rows plant a working backdoor): exit 1, not 2
    assert res.exit_code == 1, res.output
    assert "Training-time and privacy goals" in res.output
    path = d / "rep" / "report.json"
    return Run(d, model, path, json.loads(path.read_text()))


def _goal(report: Any, name: str) -> Any:
    return next(g for g in report.goals if g.name == name)


# -- schema ------------------------------------------------------------------------------
def test_goal_schema_defaults_paths_and_errors(tmp_path: Path) -> None:
    (tmp_path / "train.npz").write_bytes(b"")
    (tmp_path / "tm.yaml").write_text(GOALS_YAML)
    tm = load_threat_model(tmp_path / "tm.yaml")
    assert not tm.has_evasion and tm.epsilons == [] and [g.name for g in tm.goals] == [
        "backdoor", "flip-to-0", "membership-inference", "extraction",
    ]  # fmt: skip
    # relative data paths are read from the threat model's folder; defaults are filled in
    assert tm.goals[0].params["train_data"] == str(tmp_path / "train.npz")
    assert tm.goals[0].params["trigger"] == "badnets" and tm.goals[2].params["shadows"] == 4
    assert str(tm.goals[2].slos[1]) == "tpr_at_fpr <= 0.2"

    def bad(text: str, match: str) -> None:
        with pytest.raises(InputError, match=match):
            parse_threat_model(text, "tm.yaml")

    bad("goals: [{kind: evasion}]", "line 1, field 'goals.0.kind'")
    bad("goals:\n  - kind: backdoor\n    params: {rate: 0.1}", "train_data.*Field required")
    bad("goals:\n  - kind: extraction\n    params: {queries: 0}", "queries")
    bad("goals:\n  - kind: extraction\n    params: {budget: 5}", "budget.*Extra inputs")
    bad("goals:\n  - kind: extraction\n    slos: [auc <= 0.6]", "measures fidelity, accuracy")
    bad("goals:\n  - kind: extraction\n    slos: [fidelity <= 0.9 at eps 0.1]", "cannot read")
    bad("goals: [{kind: extraction}, {kind: extraction}]", "same name")
    bad("goals: []\nattacks: [{attack: pgd}]", "epsilons: give at least one")
    bad("epsilons: [0.1]", "attacks: give at least one")
    bad("goals: [{kind: extraction}]\nslos: [robust_accuracy >= 0.5 at eps 0.1]", "not in eps")


# -- evaluate: real numbers --------------------------------------------------------------
def test_goals_measure_real_attacks(run: Run) -> None:
    report = load_report(run.report_path)  # strict schema + consistency
    assert report.schema_version == "1.1" and report.results == [] and report.suite == []
    assert report.clean_accuracy.n == 397 and report.clean_accuracy.value > 0.9

    bd = _goal(report, "backdoor")
    asr, ref_asr = bd.metric("attack_success_rate"), bd.metric("reference_attack_success_rate")
    # 5% BadNets rows: the trigger works on the poisoned model, not on the clean-trained one
    assert asr.n == ref_asr.n == 397 - int((np.load(run.dir / "test.npz")["y"] == 0).sum())
    assert asr.value > 0.3 and ref_asr.value < 0.05 and asr.ci_low > ref_asr.ci_high
    assert bd.metric("clean_accuracy").value > 0.85
    drop = bd.metric("clean_accuracy_drop")
    assert drop.interval == "baseline-fixed" and abs(drop.value) < 0.05
    assert bd.details["poisoned_rows"] == round(0.05 * 1400)

    flip = _goal(report, "flip-to-0")
    assert flip.details["poisoned_rows"] == 140
    # the trainer's per-class loss drift singles out the class the rows were flipped into
    assert flip.details["loss_drift"]["flagged_classes"] == [0]
    z = flip.details["loss_drift"]["loss_z"]
    assert z[0] > 5 and max(abs(v) for v in z[1:]) < 4

    mi = _goal(report, "membership-inference")
    auc, tpr = mi.metric("auc"), mi.metric("tpr_at_fpr")
    assert mi.details["n_members"] == 1400 and mi.details["n_non_members"] == 397
    assert 0.45 < auc.value < 0.75 and auc.interval == "bootstrap"
    assert auc.ci_low < auc.value < auc.ci_high
    assert tpr.n == 1400 and tpr.interval == "clopper-pearson"
    # 397 non-members cannot resolve FPR 0.001: the threshold lets none of them through
    assert mi.details["attacks"]["loss"]["fpr"]["k"] == 0
    assert not mi.details["attacks"]["loss"]["resolvable"]

    ex = _goal(report, "extraction")
    fid = ex.metric("fidelity")
    assert ex.details["queries_used"] == 150 and fid.n == 397 - 397 // 2
    assert fid.value > 0.5  # 150 probability answers copy most of a 10-class MLP

    for g in report.goals:
        assert g.atlas == list(GOAL_ATLAS[g.kind])


def test_verdict_findings_and_html(run: Run) -> None:
    report = load_report(run.report_path)
    v = report.verdict
    assert v.status == "fail"
    held = {s.slo: s.holds for s in v.slos}
    assert held["backdoor: attack_success_rate <= 0.05"] == "no"
    assert held["backdoor: clean_accuracy >= 0.8"] == "with-confidence"
    assert held["extraction: fidelity <= 0.99"] == "with-confidence"
    assert len(v.slos) == 6 and v.summary.startswith("1 of 6 SLOs not met")
    by_tid = {(f.atlas_technique, f.summary.split(":")[0]): f for f in report.findings}
    assert by_tid[("AML.T0018.000", "backdoor")].severity in ("medium", "high")
    assert by_tid[("AML.T0043.004", "backdoor")].atlas_name.endswith("Insert Backdoor Trigger")
    assert ("AML.T0024.000", "membership-inference") in by_tid
    assert ("AML.T0024.002", "extraction") in by_tid
    assert ("AML.T0020", "flip-to-0") in by_tid
    html = (run.report_path.parent / "report.html").read_text()
    assert 'id="goals"' in html and "AML.T0024.002" in html


# -- strict loading ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda r: r["goals"][0]["metrics"][0].update(k=1), "not k/n"),
        (lambda r: r["goals"][0]["metrics"][4].update(value=0.0), "drop and interval"),
        (lambda r: r["goals"][2]["metrics"][0].update(ci_low=0.9, ci_high=0.1), "ci_low <="),
        (lambda r: r["goals"][3].update(atlas=["AML.T0015"]), "ATLAS techniques"),
        (lambda r: r["goals"][1].update(name="renamed"), "no poisoning goal of that name"),
        (lambda r: r["verdict"]["slos"][0].update(holds="with-confidence"), "goal SLO"),
        (lambda r: r["verdict"]["slos"].pop(), "goal SLOs"),
        (lambda r: r["goals"].pop(0), "goal SLO 'backdoor"),
        (lambda r: r["goals"][0]["metrics"][0].update(value="0.5"), "does not match schema"),
    ],
)
def test_tampered_goal_reports_are_refused(run: Run, edit: Any, match: str) -> None:
    data = copy.deepcopy(run.data)
    parse_report(copy.deepcopy(data))  # as written: accepted
    edit(data)
    with pytest.raises(InputError, match=match):
        parse_report(data)


def test_reports_without_goals_still_read(run: Run) -> None:
    old = copy.deepcopy(run.data)
    old["schema_version"] = "1.0"
    del old["goals"]
    old["threat_model"]["goals"] = []
    n_goal_slos = 6
    old["verdict"]["slos"] = old["verdict"]["slos"][:-n_goal_slos]
    old["verdict"]["status"] = "no-slo"
    old["findings"] = []
    report = parse_report(old)
    assert report.goals == [] and report.verdict.status == "no-slo"
    # but goal SLOs in the verdict without goal results are an inconsistency
    old["verdict"]["slos"] = run.data["verdict"]["slos"]
    with pytest.raises(InconsistentReportError):
        parse_report(old)


# -- gate and registry -------------------------------------------------------------------
def test_gate_enforces_goal_slos(run: Run, tmp_path: Path) -> None:
    from advguard.registry.gate import run_gate
    from advguard.registry.policy import parse_policy

    report = load_report(run.report_path)
    res = run_gate(report, parse_policy("name: t\n"))
    checks = {c.name: c for c in res.checks}
    bd = checks["report goal SLO: backdoor: attack_success_rate <= 0.05"]
    assert bd.status == "fail" and bd.message == "SLO not met" and bd.expected.startswith("<= 0.05")
    assert checks["report goal SLO: extraction: fidelity <= 0.99"].status == "pass"
    assert res.status == "fail"
    # the CLI gate reads the file and exits 1 on the failed goal SLO
    (tmp_path / "p.yaml").write_text("name: t\n")
    args = ["gate", "--report", str(run.report_path), "--policy", str(tmp_path / "p.yaml")]
    out = CliRunner().invoke(app, [*args, "--json"])
    assert out.exit_code == 1, out.output
    assert "backdoor: attack_success_rate" in out.output
    # policy report_slos: false ignores the report's own SLOs, goals included
    res2 = run_gate(report, parse_policy("name: t\nreport_slos: false\n"))
    assert not any(c.name.startswith("report goal SLO") for c in res2.checks)


def test_registry_accepts_a_goal_report(run: Run, tmp_path: Path) -> None:
    from advguard.registry.store import Registry

    reg = Registry(tmp_path / "reg")
    info = reg.push("digits-goals", run.model, reports=[run.report_path])
    assert info.version == 1
    bad = copy.deepcopy(run.data)
    bad["goals"][0]["metrics"][0]["k"] += 1
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(InputError, match="inconsistent"):
        reg.push("digits-goals", run.model, reports=[tmp_path / "bad.json"])


def test_evasion_and_goals_in_one_report(run: Run, tmp_path: Path) -> None:
    from advguard.data import load_dataset
    from advguard.defenses.goals import run_threat_model
    from advguard.models.io import load_model

    tm = parse_threat_model(
        "name: both\nepsilons: [0.1]\nsamples: 40\nattacks: [{attack: fgsm}]\n"
        "sanity_checks: false\nslos: [clean_accuracy >= 0.5]\n"
        "goals: [{kind: extraction, params: {queries: 60, epochs: 5, checkpoints: 1},"
        " slos: [fidelity <= 1.0]}]\n"
    )
    model = load_model(run.model)
    res = run_threat_model(model, load_dataset(run.dir / "test.npz"), tm, tmp_path / "o")
    report = load_report(res.json_path)
    assert [r.epsilon for r in report.results] == [0.1] and report.clean_accuracy.n == 40
    assert [s.slo for s in report.verdict.slos] == [
        "clean_accuracy >= 0.5", "extraction: fidelity <= 1",
    ]  # fmt: skip
    assert report.verdict.slos[1].holds == "with-confidence"  # an interval never passes 1
    assert report.goals[0].details["queries_used"] == 60
    techniques = {f.atlas_technique for f in report.findings}
    assert {"AML.T0024", "AML.T0024.002"} <= techniques
    assert set(report.timing) >= {"goals"}
