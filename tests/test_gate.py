"""Release gate: policies, checks against SLOs and a baseline, Markdown/JUnit/JSON, CLI codes."""

from __future__ import annotations

import hashlib
import json
import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from typer.testing import CliRunner

from advguard.cli import app
from advguard.errors import InputError
from advguard.evaluate.report import Report, load_report
from advguard.evaluate.runner import evaluate
from advguard.evaluate.threat_model import ThreatModel
from advguard.models import TorchClassifier
from advguard.registry.baseline import resolve_baseline
from advguard.registry.gate import gate_junit, gate_markdown, run_gate
from advguard.registry.policy import load_policy, parse_policy
from advguard.registry.signing import attest_report, generate_keypair
from advguard.stats import proportion

DOCS = Path(__file__).resolve().parents[1] / "docs" / "ci"


@pytest.fixture(scope="module")
def real_report(digits_split, digits_module) -> Report:
    """A real evaluation of the digits CNN: PGD at eps 0.05 and 0.15 on 150 samples."""
    _, _, x_te, y_te = digits_split
    model = TorchClassifier(digits_module, input_shape=(1, 8, 8), num_classes=10)
    tm = ThreatModel.model_validate(
        dict(
            name="gate-test",
            norm="linf",
            epsilons=[0.05, 0.15],
            samples=150,
            seed=0,
            batch_size=150,
            attacks=[{"attack": "pgd", "steps": 10}],
            sanity_samples=40,
            slos=["clean_accuracy >= 0.8"],
        )
    )
    return evaluate(model, x_te, y_te, tm)


def edit(
    rep: Report, *, robust: dict[float, float] | None = None, fail_check: bool = False, **kw
) -> Report:
    """A copy of ``rep`` with robust accuracies set (as fractions) and fields replaced, with
    every dependent number recomputed so the copy stays internally consistent (a forger can
    do this too: only a signed attestation tells it from the real report)."""
    from advguard.evaluate.threat_model import SLO
    from advguard.evaluate.verdict import judge

    data = rep.model_dump(mode="json")
    data.update(kw)
    clean = data["clean_accuracy"]
    for r in data["results"]:
        if robust and r["epsilon"] in robust:
            n = r["robust_accuracy"]["n"]
            k = round(robust[r["epsilon"]] * n)
            r["robust_accuracy"] = proportion(k, n).model_dump()
            r["fooling_rate"] = proportion(clean["k"] - k, clean["k"]).model_dump()
            r["first_robust_accuracy"] = None
            for row in r["per_attack"]:
                after = min(max(row["robust_accuracy_after"]["k"], k), clean["k"])
                row["robust_accuracy_after"] = proportion(after, n).model_dump()
    if fail_check:
        data["sanity_checks"][0]["status"] = "fail"
    data["trustworthy"] = not any(c["status"] == "fail" for c in data["sanity_checks"])
    out = Report.model_validate(data)

    tm = SimpleNamespace(slos=[SLO.model_validate(x) for x in out.threat_model.get("slos") or []])
    out.verdict = judge(tm, out.clean_accuracy, out.results, out.trustworthy)  # type: ignore[arg-type]
    return Report.model_validate(out.model_dump(mode="json"))


def ra(rep: Report, eps: float) -> float:
    r = rep.result_at(eps)
    assert r is not None and r.robust_accuracy.value is not None
    return r.robust_accuracy.value


def by_name(res, prefix: str):
    return [c for c in res.checks if c.name.startswith(prefix)]


def test_real_report_is_sane(real_report):
    assert real_report.trustworthy
    assert real_report.clean_accuracy.n == 150
    assert real_report.clean_accuracy.value > 0.9
    assert ra(real_report, 0.15) < ra(real_report, 0.05) <= real_report.clean_accuracy.value


def test_pass_case(real_report):
    pol = parse_policy("slos: ['clean_accuracy >= 0.85']\nmin_samples: 100\n")
    res = run_gate(real_report, pol)
    assert res.passed, res.checks
    names = [c.name for c in res.checks]
    assert names == [
        "evaluation trustworthy",
        "samples evaluated",
        "report SLO: clean_accuracy >= 0.8",
        "policy SLO: clean_accuracy >= 0.85",
    ]
    assert "no baseline: regression limits not checked" in res.warnings


def test_slo_fail_and_confidence_mode(real_report):
    r = ra(real_report, 0.05)
    res = run_gate(
        real_report, parse_policy(f"slos: ['robust_accuracy >= {r + 0.05} at eps 0.05']")
    )
    assert not res.passed
    (c,) = by_name(res, "policy SLO")
    assert c.status == "fail" and c.message == "SLO not met"
    # Threshold just under the point estimate but inside the 95% interval (n=150): point-estimate
    # mode passes, confidence mode does not.
    thr = r - 0.02
    text = f"slos: ['robust_accuracy >= {thr} at eps 0.05']\nslo_mode: "
    assert run_gate(real_report, parse_policy(text + "point-estimate")).passed
    strict = run_gate(real_report, parse_policy(text + "confidence"))
    assert not strict.passed
    assert "interval crosses the threshold" in by_name(strict, "policy SLO")[0].message
    # an epsilon that was not evaluated cannot pass
    res = run_gate(real_report, parse_policy("slos: ['robust_accuracy >= 0.0 at eps 0.3']"))
    assert not res.passed
    assert "epsilon 0.3 was not evaluated" in by_name(res, "policy SLO")[0].message


def test_untrustworthy_never_passes(real_report):
    bad = edit(real_report, fail_check=True)
    res = run_gate(bad, parse_policy("slo_mode: point-estimate\nreport_slos: false\n"))
    assert not res.passed
    assert [c.name for c in res.failures] == ["evaluation trustworthy"]
    with pytest.raises(InputError, match=r"line 1, field 'require_trustworthy': cannot be false"):
        parse_policy("require_trustworthy: false\n", "p.yaml")


def test_regression_vs_baseline(real_report):
    r05, r15 = ra(real_report, 0.05), ra(real_report, 0.15)
    baseline = edit(real_report, robust={0.05: r05 + 0.04, 0.15: r15})  # baseline was better
    res = run_gate(real_report, parse_policy("{}"), baseline)
    assert not res.passed
    (c05,) = by_name(res, "robust accuracy drop vs baseline at eps 0.05")
    (c15,) = by_name(res, "robust accuracy drop vs baseline at eps 0.15")
    assert c05.status == "fail" and c05.actual.startswith("+4.00 pts")
    assert c15.status == "pass" and c15.actual.startswith("+0.00 pts")
    # a looser limit accepts the same 4-point drop
    assert run_gate(real_report, parse_policy("max_robust_accuracy_drop: 5"), baseline).passed
    # no limit: the check is skipped, not failed
    res = run_gate(real_report, parse_policy("max_robust_accuracy_drop: null"), baseline)
    assert res.passed and by_name(res, "robust accuracy drop")[0].status == "skip"


def test_improvement_passes(real_report):
    worse_baseline = edit(real_report, robust={0.05: ra(real_report, 0.05) - 0.1})
    res = run_gate(real_report, parse_policy("{}"), worse_baseline)
    assert res.passed
    (c,) = by_name(res, "robust accuracy drop vs baseline at eps 0.05")
    assert c.actual.startswith("-10.00 pts")


def test_clean_regression(real_report):
    data = real_report.model_dump(mode="json")
    ca = real_report.clean_accuracy
    data["clean_accuracy"] = proportion(ca.k - 2, ca.n).model_dump()  # 2 of 150 fewer correct
    worse_clean = Report.model_validate(data)
    res = run_gate(worse_clean, parse_policy("{}"), real_report)
    (c,) = by_name(res, "clean accuracy drop")
    assert c.status == "fail" and c.actual.startswith("+1.33 pts")  # 1.33 points > 0.5
    assert run_gate(worse_clean, parse_policy("max_clean_accuracy_drop: 2"), real_report).passed


def test_mismatched_threat_model_fails_clearly(real_report):
    tm = dict(real_report.threat_model, norm="l2")
    other = edit(real_report, threat_model=tm)
    res = run_gate(real_report, parse_policy("{}"), other)
    (c,) = by_name(res, "same threat model")
    assert c.status == "fail" and "norm 'l2' vs 'linf'" in c.actual
    assert "measure different threats" in c.message
    # different epsilons: the mismatch is named, uncomparable epsilons are skipped
    data = real_report.model_dump(mode="json")
    data["results"][1]["epsilon"] = 0.2
    eps_other = Report.model_validate(data)
    res = run_gate(real_report, parse_policy("{}"), eps_other)
    assert not res.passed
    assert "epsilons [0.05, 0.2] vs [0.05, 0.15]" in by_name(res, "same threat model")[0].actual
    assert {c.status for c in by_name(res, "robust accuracy drop vs baseline at eps 0.2")} == {
        "skip"
    }
    # the policy may allow it, and then only the comparable epsilon is judged
    assert run_gate(real_report, parse_policy("require_same_threat_model: false"), eps_other).passed


def test_require_baseline(real_report):
    res = run_gate(real_report, parse_policy("require_baseline: true"))
    assert not res.passed and res.failures[0].name == "baseline given"


def test_policy_errors_name_the_line(tmp_path):
    with pytest.raises(InputError, match=r"line 3, field 'slos.0'"):
        parse_policy("name: x\nslos:\n  - robust_accuracy >= 0.8\n", "p.yaml")
    with pytest.raises(InputError, match=r"line 2, field 'max_robust_accuracy_drop'"):
        parse_policy("name: x\nmax_robust_accuracy_drop: -1\n")
    with pytest.raises(InputError, match="field 'slo_mod'"):
        parse_policy("slo_mod: confidence\n")
    with pytest.raises(InputError, match="does not exist"):
        load_policy(tmp_path / "nope.yaml")


def test_markdown_and_junit(real_report):
    baseline = edit(real_report, robust={0.05: ra(real_report, 0.05) + 0.04})
    res = run_gate(real_report, parse_policy("name: release\n"), baseline)
    md = gate_markdown(res)
    assert md.startswith("## advguard release gate")
    assert "❌ **FAILED** (1 check)" in md
    assert "| robust accuracy drop vs baseline at eps 0.05 | <= 1 pts | +4.00 pts" in md
    root = ET.fromstring(gate_junit(res))
    assert root.tag == "testsuites"
    (suite,) = root.findall("testsuite")
    cases = suite.findall("testcase")
    assert int(suite.get("tests")) == len(cases) == len(res.checks)
    failed = [c for c in cases if c.find("failure") is not None]
    assert int(suite.get("failures")) == len(failed) == 1
    assert failed[0].get("name") == "robust accuracy drop vs baseline at eps 0.05"
    assert "dropped 4.00 points, limit 1" in failed[0].find("failure").get("message")
    passing = run_gate(real_report, parse_policy("{}"))
    assert "✅ **PASSED**" in gate_markdown(passing)
    assert ET.fromstring(gate_junit(passing)).find("testsuite").get("failures") == "0"


def test_baseline_production_without_registry(real_report, tmp_path):
    with pytest.raises(InputError, match="needs --registry-model"):
        resolve_baseline("production")
    path = real_report.write(tmp_path)
    assert resolve_baseline(str(path)).created == real_report.created


def test_cli_exit_codes(real_report, tmp_path):
    rep = real_report.write(tmp_path / "cand")
    base = edit(real_report, robust={0.05: ra(real_report, 0.05) + 0.04}).write(tmp_path / "base")
    ok_pol, strict_pol = tmp_path / "ok.yaml", tmp_path / "strict.yaml"
    ok_pol.write_text("name: ok\nmax_robust_accuracy_drop: 5\n")
    strict_pol.write_text("name: strict\n")
    run = CliRunner().invoke
    r = run(app, ["gate", "--report", str(rep), "--policy", str(ok_pol), "--baseline", str(base)])
    assert r.exit_code == 0, r.output
    assert "PASSED" in r.output
    md, junit = tmp_path / "gate.md", tmp_path / "junit.xml"
    args = ["gate", "--report", str(rep), "--policy", str(strict_pol), "--baseline", str(base)]
    r = run(app, [*args, "--markdown", str(md), "--junit", str(junit), "--json"])
    assert r.exit_code == 1, r.output
    out = json.loads(r.output)
    assert out["status"] == "fail" and out["policy"] == "strict"
    assert "FAILED" in md.read_text()
    assert ET.parse(junit).getroot().find("testsuite").get("failures") == "1"
    bad_pol = tmp_path / "bad.yaml"
    bad_pol.write_text("slo_mode: maybe\n")
    r = run(app, ["gate", "--report", str(rep), "--policy", str(bad_pol)])
    assert r.exit_code == 2 and "invalid gate policy" in " ".join(r.output.split())
    r = run(app, ["gate", "--report", str(tmp_path / "missing.json"), "--policy", str(ok_pol)])
    assert r.exit_code == 2 and "does not exist" in " ".join(r.output.split())
    r = run(
        app, ["gate", "--report", str(rep), "--policy", str(ok_pol), "--baseline", "production"]
    )
    assert r.exit_code == 2 and "--registry-model" in " ".join(r.output.split())


# ------------------------------------------------------------------------ shipped CI examples
def test_example_policies_validate():
    for name in ("policy.yaml", "policy-strict.yaml"):
        pol = load_policy(DOCS / name)
        assert pol.require_trustworthy
    strict = load_policy(DOCS / "policy-strict.yaml")
    assert strict.slo_mode == "confidence" and strict.require_baseline


def _gate_commands(obj) -> list[str]:
    out = []
    if isinstance(obj, dict):
        for v in obj.values():
            out += _gate_commands(v)
    elif isinstance(obj, list):
        for v in obj:
            out += _gate_commands(v)
    elif isinstance(obj, str) and "advguard gate" in obj:
        out.append(obj)
    return out


def test_example_workflows_call_gate_with_real_flags():
    from typer.main import get_command

    cmd = get_command(app).commands["gate"]  # type: ignore[attr-defined]
    flags = {o for p in cmd.params for o in p.opts}
    for name in ("github-actions.yml", "gitlab-ci.yml"):
        doc = yaml.safe_load((DOCS / name).read_text())
        calls = _gate_commands(doc)
        assert calls, f"{name} never runs advguard gate"
        for script in calls:
            joined = script.replace("\\\n", " ")  # shell line continuations
            for line in joined.splitlines():
                if "advguard gate" not in line:
                    continue
                tail = line.split("advguard gate", 1)[1]
                used = {t.split("=")[0] for t in tail.split() if t.startswith("--")}
                assert used <= flags, (name, used - flags)
                assert {"--report", "--policy"} <= used
        text = json.dumps(doc)
        assert "-c constraints.txt" in text and "advguard evaluate" in text


def test_baseline_production_from_the_registry(real_report, tmp_path, monkeypatch):
    """`--baseline production` reads the production version's report from the registry."""
    from advguard.models.io import save_torch
    from advguard.models.zoo import mlp
    from advguard.registry.store import Registry

    root = tmp_path / "reg"
    monkeypatch.setenv("ADVGUARD_REGISTRY", str(root))
    monkeypatch.delenv("ADVGUARD_REGISTRY_DB", raising=False)
    clf = TorchClassifier(mlp((4,), 3, hidden=(8,)), input_shape=(4,), num_classes=3)
    weights = save_torch(
        clf,
        tmp_path / "m.safetensors",
        factory="advguard.models.zoo:mlp",
        factory_kwargs={"input_shape": [4], "num_classes": 3, "hidden": [8]},
    )
    from advguard.models.io import file_sha256

    # the registry only attaches a report to the model it evaluated (model.sha256)
    prod_report = edit(
        real_report,
        robust={0.05: ra(real_report, 0.05) + 0.04},
        model={**real_report.model, "sha256": file_sha256(weights)},
    )
    keys = tmp_path / "keys"
    priv, pub = generate_keypair(keys)
    with Registry(root) as reg:
        reg.push("digits-cnn", weights, reports=[prod_report.write(tmp_path / "prod")])
        reg.promote("digits-cnn", 1, force=True, reason="unsigned test model")
        reg.push(
            "signed", weights, reports=[prod_report.write(tmp_path / "prod")], private_key=priv
        )
        reg.promote("signed", 1, force=True, reason="test baseline without a gate policy")
    # the production baseline is only trusted once its attestation verifies: no key, no gate
    with pytest.raises(InputError, match="needs --public-key"):
        resolve_baseline("production", registry_model="signed", threat_model="gate-test")
    with pytest.raises(InputError, match="has no attestation"):
        resolve_baseline(
            "production", registry_model="digits-cnn", threat_model="gate-test", public_key=pub
        )
    base = resolve_baseline(
        "production", registry_model="signed", threat_model="gate-test", public_key=pub
    )
    assert ra(base, 0.05) == pytest.approx(ra(prod_report, 0.05))
    with pytest.raises(InputError, match="no report for threat model"):
        resolve_baseline(
            "production", registry_model="signed", threat_model="other", public_key=pub
        )
    _other_priv, other_pub = generate_keypair(tmp_path / "other-keys")
    with pytest.raises(InputError, match="does not verify"):
        resolve_baseline(
            "production", registry_model="signed", threat_model="gate-test", public_key=other_pub
        )
    pol = tmp_path / "strict.yaml"
    pol.write_text("name: strict\n")
    cand = real_report.write(tmp_path / "cand")
    args = ["gate", "--report", str(cand), "--policy", str(pol), "--baseline", "production"]
    r = CliRunner().invoke(app, [*args, "--registry-model", "signed"])
    assert r.exit_code == 2 and "--public-key" in r.stderr
    # with the key, the candidate must be attested too (and tied to --model)
    model_file = Path(weights)
    digest = hashlib.sha256(model_file.read_bytes()).hexdigest()
    signed_cand = edit(real_report, model={**real_report.model, "sha256": digest})
    cand = signed_cand.write(tmp_path / "cand2")
    attest(cand, digest, priv)
    args = ["gate", "--report", str(cand), "--policy", str(pol), "--baseline", "production"]
    keyed = ["--registry-model", "signed", "--public-key", str(pub), "--model", str(model_file)]
    r = CliRunner().invoke(app, [*args, *keyed])
    assert r.exit_code == 1, r.output  # 4 points below production at eps 0.05
    assert "drop" in r.output and "report attestation" in r.output


# ------------------------------------------------------------------------ forged reports
def attest(report_path: Path, digest: str, private_key: Path) -> Path:
    """Sign ``report_path`` for the model with ``digest``, as `registry push --key` does."""
    env = attest_report(digest, json.loads(report_path.read_text()), private_key)
    out = report_path.with_name("report.intoto.json")
    out.write_bytes(env)
    return out


def _gate(*args: str):
    return CliRunner().invoke(app, ["gate", *args])


def _write(tmp_path: Path, name: str, data: dict) -> Path:
    p = tmp_path / name / "report.json"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(data))
    return p


def test_gate_refuses_inconsistent_reports(real_report, tmp_path):
    """Hand edits that leave the report inconsistent fail closed with a one-line error."""
    pol = tmp_path / "p.yaml"
    pol.write_text("report_slos: false\n")
    good = json.loads(real_report.write(tmp_path / "good").read_text())
    r = _gate("--report", str(tmp_path / "good" / "report.json"), "--policy", str(pol))
    assert r.exit_code == 0, r.output

    def variant(fn) -> dict:
        d = json.loads(json.dumps(good))
        fn(d)
        return d

    def set_value(v):
        return lambda d: d["results"][0]["robust_accuracy"].__setitem__("value", v)

    def recompute_k(d):  # k, n and the interval recomputed, the fooling rate left alone
        ra0 = d["results"][0]["robust_accuracy"]
        d["results"][0]["robust_accuracy"] = proportion(ra0["k"] + 10, ra0["n"]).model_dump()

    def rise(d):  # robust accuracy at the larger epsilon above the smaller one
        c, k = d["clean_accuracy"], d["results"][0]["robust_accuracy"]["k"] + 1
        d["results"][1]["robust_accuracy"] = proportion(k, c["n"]).model_dump()
        d["results"][1]["fooling_rate"] = proportion(c["k"] - k, c["k"]).model_dump()
        d["results"][1]["first_robust_accuracy"] = None
        d["results"][1]["per_attack"] = []

    def above_clean(d):
        c = d["clean_accuracy"]
        d["results"][0]["robust_accuracy"] = proportion(c["k"] + 1, c["n"]).model_dump()

    def verdict_flip(d):
        d["verdict"]["status"] = "fail"

    cases = {
        "value 0.99": (set_value(0.99), "is not k/n"),
        "value 5.0": (set_value(5.0), "is not k/n"),
        "value '0.99'": (set_value("0.99"), "does not match schema"),
        "k/n/CI recomputed": (recompute_k, "fooling_rate"),
        "rises with epsilon": (rise, "cannot rise with epsilon"),
        "robust > clean": (above_clean, "does not fit clean accuracy"),
        "verdict edited": (verdict_flip, "verdict is 'fail'"),
        "trustworthy 'true'": (lambda d: d.__setitem__("trustworthy", "true"), "schema"),
        "ci outside [0,1]": (
            lambda d: d["clean_accuracy"].__setitem__("ci_high", 1.5),
            "Clopper-Pearson",
        ),
    }
    for name, (fn, msg) in cases.items():
        path = _write(tmp_path, name.replace(" ", "_").replace("'", ""), variant(fn))
        with pytest.raises(InputError, match=msg):
            load_report(path)
        r = _gate("--report", str(path), "--policy", str(pol))
        assert r.exit_code == 2, (name, r.output)
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, name


def test_trustworthy_flipped_on_an_untrustworthy_report(real_report, tmp_path):
    pol = tmp_path / "p.yaml"
    pol.write_text("report_slos: false\n")
    bad = edit(real_report, fail_check=True)
    assert bad.verdict.status == "untrustworthy"
    path = bad.write(tmp_path / "bad")
    r = _gate("--report", str(path), "--policy", str(pol))
    assert r.exit_code == 1 and "evaluation trustworthy" in r.output
    d = json.loads(path.read_text())
    d["trustworthy"] = True  # verdict still untrustworthy, sanity check still failing
    forged = _write(tmp_path, "forged", d)
    with pytest.raises(InputError, match="trustworthy is true but sanity checks failed"):
        load_report(forged)
    r = _gate("--report", str(forged), "--policy", str(pol))
    assert r.exit_code == 2 and "sanity checks failed" in r.stderr
    # the gate itself also reads every trust signal, not the flag alone
    obj = Report.model_validate(d)
    assert not run_gate(obj, parse_policy("report_slos: false")).passed


def test_attestation_catches_consistent_forgery(real_report, tmp_path):
    """A forgery that recomputes every number passes the consistency checks; only the signed
    attestation (with --public-key and --model) catches it."""
    priv, pub = generate_keypair(tmp_path / "keys")
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"weights v2")
    digest = hashlib.sha256(b"weights v2").hexdigest()
    pol = tmp_path / "p.yaml"
    pol.write_text(
        "report_slos: false\nslo_mode: point-estimate\n"
        "slos: ['robust_accuracy >= 0.9 at eps 0.05']\n"
    )
    honest = edit(real_report, model={**real_report.model, "sha256": digest})
    path = honest.write(tmp_path / "rel")
    att = attest(path, digest, priv)
    keyed = ["--public-key", str(pub), "--model", str(model)]
    r = _gate("--report", str(path), "--policy", str(pol), *keyed, "--json")
    assert r.exit_code == 1, r.output  # honest numbers: the 0.9 SLO fails
    checks = {c["name"]: c for c in json.loads(r.stdout)["checks"]}
    assert checks["report attestation"]["status"] == "pass"
    # forge: robust accuracy 0.96 at eps 0.05, every dependent number recomputed
    forged = edit(honest, robust={0.05: 0.96})
    forged.write(tmp_path / "rel")  # overwrite the signed report, keep the attestation
    assert load_report(path).results[0].robust_accuracy.value == pytest.approx(0.96, abs=0.01)
    r = _gate("--report", str(path), "--policy", str(pol))
    assert r.exit_code == 0  # without a key the gate checks consistency only (documented)
    assert "not verified against a signed attestation" in " ".join(r.output.split())
    r = _gate("--report", str(path), "--policy", str(pol), *keyed, "--json")
    assert r.exit_code == 1
    c = {c["name"]: c for c in json.loads(r.stdout)["checks"]}["report attestation"]
    assert c["status"] == "fail" and "edited after signing" in c["message"]
    # the policy (or --require-attestation) makes the key mandatory
    strict = tmp_path / "strict.yaml"
    strict.write_text("require_attestation: true\n")
    r = _gate("--report", str(path), "--policy", str(strict))
    assert r.exit_code == 2 and "--public-key" in r.stderr
    r = _gate("--report", str(path), "--policy", str(pol), "--require-attestation")
    assert r.exit_code == 2
    r = _gate("--report", str(path), "--policy", str(pol), "--public-key", str(pub))
    assert r.exit_code == 2 and "--model" in r.stderr
    # the attestation is bound to the model: another artifact does not verify
    honest.write(tmp_path / "rel")
    other = tmp_path / "other.safetensors"
    other.write_bytes(b"weights v1")
    r = _gate(
        "--report",
        str(path),
        "--policy",
        str(pol),
        "--public-key",
        str(pub),
        "--model",
        str(other),
        "--json",
    )
    c = {c["name"]: c for c in json.loads(r.stdout)["checks"]}["report attestation"]
    assert (
        r.exit_code == 1
        and c["status"] == "fail"
        and "not " + hashlib.sha256(b"weights v1").hexdigest() in c["message"]
    )
    # no attestation file: fails (closed)
    att.unlink()
    r = _gate("--report", str(path), "--policy", str(pol), *keyed, "--json")
    c = {c["name"]: c for c in json.loads(r.stdout)["checks"]}["report attestation"]
    assert r.exit_code == 1 and "not signed" in c["message"]
    # without a key, --model still compares the report's own model digest
    r = _gate("--report", str(path), "--policy", str(pol), "--model", str(other), "--json")
    assert r.exit_code == 1
    c = {c["name"]: c for c in json.loads(r.stdout)["checks"]}
    assert c["report is about the released model"]["status"] == "fail"
