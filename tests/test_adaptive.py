"""Adaptive evaluation of defenses: BPDA for non-differentiable transforms, EOT for random ones.

A defense that masks gradients must look strong only to an evaluation that ignores it; the
runner attacks declared defenses adaptively by default, and the sanity checks call an
evaluation without it untrustworthy.
"""

from __future__ import annotations

import pytest
import torch

from advguard.defenses.transforms import (
    BitDepthReduction,
    GaussianNoise,
    TransformedClassifier,
)
from advguard.evaluate import evaluate, parse_threat_model
from advguard.models.wrappers import EOTClassifier

TM = """
name: adaptive-test
norm: linf
epsilons: [0.2]
samples: 150
sanity_samples: 40
seed: 0
attacks:
  - attack: pgd
    steps: 20
"""


def _check(report, cid):
    return next(c for c in report.sanity_checks if c.id == cid)


def _run(model, split, **over):
    _, _, x, y = split
    tm = parse_threat_model(TM).with_overrides(**over)
    return evaluate(model, x, y, tm)


def test_feature_squeezing_looks_strong_without_bpda_and_falls_with_it(digits_model, digits_split):
    defended = TransformedClassifier(digits_model, [BitDepthReduction(1)])
    naive = _run(defended, digits_split, adaptive=False, escalate=False)
    adaptive = _run(defended, digits_split)
    plain = _run(digits_model, digits_split)

    ra_naive = naive.results[0].robust_accuracy.value
    ra_adaptive = adaptive.results[0].robust_accuracy.value
    ra_plain = plain.results[0].robust_accuracy.value
    # plain PGD sees zero gradients: the squeezed model looks far more robust than it is
    assert ra_naive >= ra_plain + 0.4, (ra_naive, ra_plain)
    assert ra_adaptive <= ra_naive - 0.35, (ra_adaptive, ra_naive)
    # the naive evaluation is flagged, the adaptive one is not
    assert _check(naive, "adaptive-attacks").status == "fail"
    assert not naive.trustworthy
    assert _check(adaptive, "adaptive-attacks").status == "pass"
    assert _check(adaptive, "gradients").status == "pass"
    assert any("BPDA" in u for u in adaptive.model["adaptive_attacks"]["used"])
    assert [t["name"] for t in adaptive.model["defense"]["transforms"]] == ["bit-depth"]
    # the squeezing costs clean accuracy: report it, and keep it in a sane range
    assert adaptive.clean_accuracy.value <= plain.clean_accuracy.value + 1e-9
    assert adaptive.clean_accuracy.value >= plain.clean_accuracy.value - 0.08


def test_random_defense_looks_stronger_without_eot(digits_model, digits_split):
    defended = TransformedClassifier(digits_model, [GaussianNoise(0.5, seed=0)])
    naive = _run(defended, digits_split, adaptive=False, escalate=False)
    adaptive = _run(defended, digits_split)
    ra_naive = naive.results[0].robust_accuracy.value
    ra_adaptive = adaptive.results[0].robust_accuracy.value
    assert ra_adaptive <= ra_naive - 0.05, (ra_adaptive, ra_naive)
    assert _check(naive, "adaptive-attacks").status == "fail"
    assert _check(adaptive, "adaptive-attacks").status == "pass"
    rnd = _check(adaptive, "randomness")
    assert rnd.status == "pass" and "EOT" in rnd.explanation
    assert any("EOT" in u for u in adaptive.model["adaptive_attacks"]["used"])


def test_bpda_keeps_predictions_and_restores_gradients(digits_model, digits_split):
    _, _, x, y = digits_split
    xt, yt = torch.tensor(x[:32]), torch.tensor(y[:32])
    defended = TransformedClassifier(digits_model, [BitDepthReduction(2)])
    loss = lambda z: torch.nn.functional.cross_entropy(z, yt, reduction="none")  # noqa: E731
    _, _, g = defended.value_and_grad(xt, loss)
    assert float(g.abs().max()) == 0.0  # rounding masks the gradient completely
    bpda = defended.with_bpda()
    _, _, g2 = bpda.value_and_grad(xt, loss)
    assert float(g2.abs().amax(dim=(1, 2, 3)).min()) > 0
    assert torch.equal(defended.logits(xt), bpda.logits(xt))
    assert bpda.queries is digits_model.queries


def test_eot_wraps_black_box_models_for_judging(digits_model, digits_split):
    _, _, x, _ = digits_split
    noisy = TransformedClassifier(digits_model, [GaussianNoise(0.3, seed=1)])
    eot = EOTClassifier(noisy, samples=20)
    xt = torch.tensor(x[:16])
    a, b = eot.logits(xt), eot.logits(xt)
    single = noisy.logits(xt)
    # averaging over draws shrinks the spread between two calls
    assert float((a - b).abs().mean()) < float((single - noisy.logits(xt)).abs().mean())


@pytest.mark.parametrize("bad", [0, -1])
def test_eot_samples_validated(bad):
    with pytest.raises(Exception, match="eot_samples"):
        parse_threat_model(TM + f"eot_samples: {bad}\n")


def test_detector_and_classifier_attacked_jointly(digits_model, digits_split):
    """Feature squeezing catches plain PGD; a joint attack (BPDA) evades detector and model."""
    from advguard.attacks import PGD
    from advguard.defenses.detectors import DetectorGuardedClassifier, FeatureSqueezingDetector

    x_tr, _, x_te, y_te = digits_split
    det = FeatureSqueezingDetector(digits_model, [BitDepthReduction(2)])
    det.calibrate(x_tr[1000:1400], fpr=0.05)
    guarded = DetectorGuardedClassifier(digits_model, det)
    x, y = torch.tensor(x_te[:80]), torch.tensor(y_te[:80])
    # non-adaptive: attack the classifier alone, then pass the result through the guard
    res = PGD(norm="linf", steps=20)(digits_model, x, y, epsilon=0.2)
    assert res.success.float().mean() > 0.9
    pred = guarded.logits(res.x_adv).argmax(1)
    assert (pred == guarded.reject_class)[res.success].float().mean() > 0.7  # mostly caught
    clean_ok = guarded.logits(x).argmax(1) == y
    naive_robust = float((clean_ok & ((pred == y) | (pred == guarded.reject_class))).float().mean())

    tm = parse_threat_model(
        """
name: joint
norm: linf
epsilons: [0.2]
samples: 80
sanity_samples: 16
attacks:
  - attack: apgd-t
    steps: 20
    n_target_classes: 3
"""
    )
    report = evaluate(guarded, x_te[:80], y_te[:80], tm.with_overrides(samples=80))
    joint_robust = report.results[0].robust_accuracy.value
    assert joint_robust <= naive_robust - 0.4, (joint_robust, naive_robust)
    # the detector's false positives are a cost: rejected benign inputs count as errors
    assert report.clean_accuracy.value <= float(
        (digits_model.logits(x).argmax(1) == y).float().mean()
    )
    assert report.model["defense"]["reject_class"] == 10
    # every counted adversarial is accepted by the detector and misclassified
    for ex in report.examples:
        assert ex.adversarial_prediction not in (ex.label, 10)


def test_guard_needs_a_calibrated_detector(digits_model):
    from advguard.defenses.detectors import DetectorGuardedClassifier, FeatureSqueezingDetector
    from advguard.errors import InputError

    with pytest.raises(InputError, match="calibrate"):
        DetectorGuardedClassifier(digits_model, FeatureSqueezingDetector(digits_model))
