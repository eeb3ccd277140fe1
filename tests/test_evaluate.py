"""Evaluation runner: metrics, verdicts, cascade, sanity checks, escalation, resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from advguard.attacks import FGSM, PGD
from advguard.errors import InputError
from advguard.evaluate.report import EpsilonResult, Stat
from advguard.evaluate.runner import Evaluator, evaluate
from advguard.evaluate.threat_model import SLO, ThreatModel, load_threat_model, parse_threat_model
from advguard.evaluate.verdict import judge
from advguard.models import TorchClassifier
from advguard.stats import clopper_pearson, proportion


def tm(**kw) -> ThreatModel:
    base = dict(
        name="t",
        norm="linf",
        epsilons=[0.05, 0.15],
        samples=120,
        seed=0,
        batch_size=64,
        attacks=[{"attack": "pgd", "steps": 10}],
        sanity_samples=40,
    )
    base.update(kw)
    return ThreatModel.model_validate(base)


# -- metrics & verdicts ----------------------------------------------------------------------
def test_clopper_pearson_known_values():
    lo, hi = clopper_pearson(0, 10)
    assert lo == 0 and hi == pytest.approx(0.30849, abs=1e-4)
    lo, hi = clopper_pearson(5, 10)
    assert lo == pytest.approx(0.18709, abs=1e-4) and hi == pytest.approx(0.81291, abs=1e-4)
    assert clopper_pearson(10, 10)[1] == 1.0
    assert clopper_pearson(0, 0) == (0.0, 1.0)
    with pytest.raises(InputError):
        clopper_pearson(11, 10)


def _result(eps: float, k: int, n: int) -> EpsilonResult:
    s = Stat(median=None, mean=None)
    return EpsilonResult(
        epsilon=eps,
        robust_accuracy=proportion(k, n),
        fooling_rate=proportion(n - k, n),
        perturbation={"linf": s},
        mean_true_class_confidence_drop=None,
        per_attack=[],
    )


def test_slo_confidence_depends_on_sample_count():
    t = tm(epsilons=[0.1], slos=["robust_accuracy >= 0.8 at eps 0.1"])
    clean = proportion(95, 100)
    small = judge(t, clean, [_result(0.1, 84, 100)], True)
    large = judge(t, clean, [_result(0.1, 8400, 10000)], True)
    assert small.slos[0].holds == "point-estimate-only"
    assert large.slos[0].holds == "with-confidence"
    assert small.status == large.status == "pass"
    assert "point estimate" in small.summary
    failing = judge(t, clean, [_result(0.1, 70, 100)], True)
    assert failing.status == "fail" and failing.slos[0].holds == "no"
    assert judge(t, clean, [_result(0.1, 99, 100)], False).status == "untrustworthy"


def test_slo_strings_and_errors():
    s = SLO.model_validate("robust_accuracy >= 80% at eps 0.1")
    assert (s.metric, s.op, s.threshold, s.epsilon) == ("robust_accuracy", ">=", 0.8, 0.1)
    assert SLO.model_validate("clean_accuracy_drop <= 0.02").epsilon is None
    with pytest.raises(ValueError, match="needs an epsilon"):
        SLO.model_validate("robust_accuracy >= 0.8")


def test_threat_model_errors_name_line_and_field():
    text = "name: x\nnorm: linf\nepsilons: [0.1]\nattacks:\n  - attack: pgd\n  - attack: nope\n"
    with pytest.raises(
        InputError, match=r"line 6, field 'attacks.1.attack'.*unknown attack 'nope'"
    ):
        parse_threat_model(text, "tm.yaml")
    with pytest.raises(InputError, match=r"line 2, field 'norm'"):
        parse_threat_model("epsilons: [0.1]\nnorm: l7\nattacks: [{attack: pgd}]\n", "tm.yaml")
    with pytest.raises(InputError, match="samples"):
        parse_threat_model("epsilons: [0.1]\nsamples: -3\nattacks: [{attack: pgd}]\n")
    with pytest.raises(InputError, match="not in epsilons"):
        parse_threat_model(
            "epsilons: [0.1]\nattacks: [{attack: pgd}]\nslos: ['robust_accuracy >= 0.5 at eps 0.2']"
        )
    with pytest.raises(InputError, match="does not support norm"):
        parse_threat_model("norm: l1\nepsilons: [1]\nattacks: [{attack: fgsm}]\n")


@pytest.mark.parametrize("name", ["linf-standard", "l2-standard", "quick"])
def test_presets_load(name):
    t = load_threat_model(name)
    assert t.attacks and t.epsilons == sorted(t.epsilons)


# -- cascade ---------------------------------------------------------------------------------
def test_cascade_equals_per_sample_worst_case(digits_model, digits_split):
    _, _, x, y = digits_split
    t = tm(
        attacks=[{"attack": "fgsm"}, {"attack": "pgd", "steps": 10, "random_start": False}],
        sanity_checks=False,
        epsilons=[0.05, 0.1, 0.2],
    )
    rep = evaluate(digits_model, x, y, t)
    idx = np.sort(np.random.default_rng(0).permutation(len(x))[:120])
    xs, ys = torch.tensor(x[idx]), torch.tensor(y[idx])
    correct = torch.as_tensor(digits_model.predict(xs) == y[idx])
    fooled_any = torch.zeros(len(idx), dtype=torch.bool)
    for r, eps in zip(rep.results, t.epsilons, strict=True):
        fg = FGSM()(digits_model, xs, ys, epsilon=eps).success
        pg = PGD(steps=10, random_start=False)(digits_model, xs, ys, epsilon=eps).success
        fooled_any |= (fg | pg) & correct
        expected = int((correct & ~fooled_any).sum())
        assert abs(r.robust_accuracy.k - expected) <= 1, (eps, r.robust_accuracy.k, expected)
        # cumulative after the last suite attack equals the worst case
        assert r.per_attack[-1].robust_accuracy_after.k == r.robust_accuracy.k
    ks = [r.robust_accuracy.k for r in rep.results]
    assert ks == sorted(ks, reverse=True)
    assert rep.clean_accuracy.k == int(correct.sum())


def test_healthy_model_passes_sanity_checks(digits_model, digits_split):
    _, _, x, y = digits_split
    rep = evaluate(digits_model, x, y, tm(slos=["robust_accuracy >= 0.01 at eps 0.05"]))
    status = {c.id: c.status for c in rep.sanity_checks}
    assert "fail" not in status.values(), rep.sanity_checks
    assert status["randomness"] == status["gradients"] == status["large-epsilon"] == "pass"
    assert rep.trustworthy and rep.verdict.status == "pass"
    assert rep.results[1].robust_accuracy.value < rep.clean_accuracy.value
    assert rep.findings and rep.findings[0].atlas_technique == "AML.T0015"


class Quantize(nn.Module):
    """Non-differentiable input quantization: zero gradients everywhere."""

    def forward(self, x):
        return torch.round(x * 4) / 4


class Scale(nn.Module):
    def __init__(self, k: float):
        super().__init__()
        self.k = k

    def forward(self, z):
        return z * self.k


class Noisy(nn.Module):
    def forward(self, x):
        return (x + 0.15 * torch.randn_like(x)).clamp(0, 1)


def test_quantized_model_is_untrustworthy(digits_module, digits_split):
    _, _, x, y = digits_split
    model = TorchClassifier(
        digits_module, input_shape=(1, 8, 8), num_classes=10, preprocess=Quantize()
    )
    rep = evaluate(model, x, y, tm(slos=["robust_accuracy >= 0.01 at eps 0.05"]))
    checks = {c.id: c for c in rep.sanity_checks}
    assert checks["gradients"].status == "fail"
    assert not rep.trustworthy and rep.verdict.status == "untrustworthy"


def test_saturated_softmax_escalates_with_margin_loss(digits_module, digits_split):
    _, _, x, y = digits_split
    saturated = nn.Sequential(digits_module, Scale(1e4))
    model = TorchClassifier(saturated, input_shape=(1, 8, 8), num_classes=10)
    rep = evaluate(model, x, y, tm(epsilons=[0.1, 0.2]))
    g = next(c for c in rep.sanity_checks if c.id == "gradients")
    assert g.status == "warn" and g.escalation
    r = rep.results[1]
    assert r.first_robust_accuracy is not None
    assert r.robust_accuracy.value < r.first_robust_accuracy.value - 0.2
    assert any(a.stage == "escalation" for a in r.per_attack)


def test_random_model_escalates_with_eot(digits_module, digits_split):
    _, _, x, y = digits_split
    model = TorchClassifier(
        digits_module, input_shape=(1, 8, 8), num_classes=10, preprocess=Noisy()
    )
    rep = evaluate(model, x, y, tm(samples=60, epsilons=[0.15], sanity_samples=20))
    c = next(c for c in rep.sanity_checks if c.id == "randomness")
    assert c.status_before_escalation == "fail" and c.status == "warn"
    assert "EOT" in c.escalation
    assert any("+eot" in a.attack for a in rep.results[0].per_attack)


def test_weak_attack_is_caught_and_escalated(digits_model, digits_split):
    _, _, x, y = digits_split
    weak = [{"attack": "pgd", "steps": 1, "step_size": 0.001, "random_start": False}]
    rep = evaluate(digits_model, x, y, tm(attacks=weak, epsilons=[0.1, 0.2]))
    fired = {c.id for c in rep.sanity_checks if c.status_before_escalation or c.status != "pass"}
    assert "iterative-vs-single-step" in fired
    r = rep.results[-1]
    assert r.first_robust_accuracy is not None
    assert r.robust_accuracy.value < r.first_robust_accuracy.value


def test_monotonic_check_fires(monkeypatch, digits_model, digits_split):
    from advguard.evaluate import sanity

    monkeypatch.setattr(sanity, "_independent", lambda *a, **k: [10, 30])
    _, _, x, y = digits_split
    t = tm(sanity_checks=False)
    ev = Evaluator(digits_model, x, y, t)
    rep = ev.run()  # noqa: F841 - builds state
    from advguard.evaluate.runner import Records, RunState

    state = RunState(t.epsilons, ev.attacks, Records.empty(4, 2))
    xs = torch.zeros(4, 1, 8, 8)
    c = sanity._monotonic(ev, state, np.arange(4), xs, torch.zeros(4, dtype=torch.long))
    assert c.status == "fail" and "more samples robust at a larger" in c.explanation


def test_constant_model_fails_large_epsilon(digits_split):
    _, _, x, y = digits_split

    class Constant(nn.Module):
        def __init__(self):
            super().__init__()
            self.b = nn.Parameter(torch.zeros(10))
            with torch.no_grad():
                self.b[3] = 5.0

        def forward(self, x):
            return self.b.expand(len(x), 10) + 0 * x.flatten(1).sum(1, keepdim=True)

    model = TorchClassifier(Constant(), input_shape=(1, 8, 8), num_classes=10)
    rep = evaluate(model, x, y, tm(samples=300))
    c = next(c for c in rep.sanity_checks if c.id == "large-epsilon")
    assert c.status == "fail"
    assert rep.verdict.status == "untrustworthy"


def test_binary_tabular_model():
    from advguard.data import load_builtin
    from advguard.models.fit import fit
    from advguard.models.zoo import mlp

    d = load_builtin("breast_cancer")
    m = fit(mlp(d.input_shape, 2), d.x, d.y, epochs=30, seed=0)
    model = TorchClassifier(m, input_shape=d.input_shape, num_classes=2)
    t = ThreatModel.model_validate(
        dict(
            epsilons=[0.02, 0.1],
            samples=100,
            attacks=[{"attack": "apgd-ce", "steps": 20}, {"attack": "apgd-t", "steps": 20}],
            sanity_samples=30,
        )
    )
    rep = evaluate(model, d.x, d.y, t, feature_names=d.feature_names)
    assert rep.clean_accuracy.value > 0.85
    assert rep.results[-1].robust_accuracy.value < rep.clean_accuracy.value
    assert rep.feature_changes and len(next(iter(rep.feature_changes.values()))) > 0


def test_resume_skips_finished_batches(tmp_path, digits_module, digits_split):
    _, _, x, y = digits_split
    t = tm(sanity_checks=False, samples=192, batch_size=64)

    def fresh():
        return TorchClassifier(digits_module, input_shape=(1, 8, 8), num_classes=10)

    full_model = fresh()
    full = evaluate(full_model, x, y, t)

    class Stop(Exception):
        pass

    def stop_after_two(stage, done, total):
        if stage == "suite" and done == 2:
            raise Stop

    ck = tmp_path / "ck"
    with pytest.raises(Stop):
        evaluate(fresh(), x, y, t, checkpoint_dir=ck, progress=stop_after_two)
    resumed_model = fresh()
    resumed = evaluate(resumed_model, x, y, t, checkpoint_dir=ck, resume=True)
    assert [r.robust_accuracy.k for r in resumed.results] == [
        r.robust_accuracy.k for r in full.results
    ]
    assert resumed_model.queries.forward < full_model.queries.forward / 2
    # a fresh run in the same directory ignores (and removes) the old checkpoint
    again_model = fresh()
    evaluate(again_model, x, y, t, checkpoint_dir=ck)
    assert again_model.queries.forward == full_model.queries.forward
    other = tm(sanity_checks=False, samples=192, batch_size=64, seed=5)
    with pytest.raises(InputError, match="different run"):
        evaluate(fresh(), x, y, other, checkpoint_dir=ck, resume=True)


def test_input_errors(digits_model, digits_split):
    _, _, x, y = digits_split
    with pytest.raises(InputError, match="shape"):
        evaluate(digits_model, x[:, :, :4], y, tm())
    with pytest.raises(InputError, match="labels"):
        evaluate(digits_model, x, y + 10, tm())
    with pytest.raises(InputError, match="bounds"):
        evaluate(digits_model, x * 5, y, tm())
    with pytest.raises(InputError, match="empty"):
        evaluate(digits_model, x[:0], y[:0], tm())


def test_turning_the_sanity_checks_off_makes_the_report_untrustworthy(
    digits_model, digits_split, tmp_path
):
    """``sanity_checks: false`` used to give ``trustworthy: true`` (no check failed because
    none ran), which overstates trust: now the report carries a failed
    ``sanity-checks-disabled`` check, its verdict is untrustworthy and the gate refuses it."""
    from advguard.evaluate.report import load_report
    from advguard.registry.gate import run_gate
    from advguard.registry.policy import Policy

    _, _, x, y = digits_split
    t = tm(sanity_checks=False, slos=["clean_accuracy >= 0.5"])
    rep = Evaluator(digits_model, x, y, t).run()
    assert [c.id for c in rep.sanity_checks] == ["sanity-checks-disabled"]
    assert rep.sanity_checks[0].status == "fail"
    assert rep.trustworthy is False and rep.verdict.status == "untrustworthy"
    path = rep.write(tmp_path)
    again = load_report(path)  # the strict loader accepts it: flag, checks and verdict agree
    assert again.trustworthy is False
    result = run_gate(again, Policy())
    trust = next(c for c in result.checks if c.name == "evaluation trustworthy")
    assert trust.status == "fail" and "sanity-checks-disabled" in trust.message
