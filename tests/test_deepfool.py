"""DeepFool on the digits CNN: minimum-norm L2 and Linf, bounded, deterministic."""

from __future__ import annotations

import pytest
import torch

from advguard.attacks.evasion.deepfool import DeepFool
from advguard.errors import InputError
from advguard.models import TorchClassifier
from advguard.models.torch_model import Normalize

N = 100


def _subset(digits_eval, n=N):
    x, y = digits_eval
    return x[:n], y[:n]


def test_minimum_norm_l2(digits_model, digits_eval):
    x, y = _subset(digits_eval)
    res = DeepFool()(digits_model, x, y)
    assert res.success.float().mean() >= 0.9
    l2 = res.perturbation(x, "l2")
    # PGD-L2 needs epsilon ~1.0 to fool ~97% of these samples
    assert float(l2[res.success].median()) < 0.8
    pred = digits_model.logits(res.x_adv).argmax(1)
    assert torch.equal(res.success, pred != y)
    assert res.x_adv.min() >= 0.0 and res.x_adv.max() <= 1.0
    # one gradient per (sample, candidate != y) per step, all counted by the adapter
    assert res.gradient_evals > 0 and res.gradient_evals % 9 == 0


def test_minimum_norm_linf(digits_model, digits_eval):
    x, y = _subset(digits_eval)
    res = DeepFool(norm="linf")(digits_model, x, y)
    assert res.success.float().mean() >= 0.9
    linf = res.perturbation(x, "linf")
    # PGD-Linf at 0.15 fools ~80% of these samples; DeepFool's median is below that
    assert float(linf[res.success].median()) < 0.15
    assert res.x_adv.min() >= 0.0 and res.x_adv.max() <= 1.0


@pytest.mark.parametrize("norm,eps", [("l2", 1.0), ("linf", 0.1)])
def test_epsilon_bound_and_robust_accuracy(digits_model, digits_eval, norm, eps):
    x, y = _subset(digits_eval)
    res = DeepFool(norm=norm)(digits_model, x, y, epsilon=eps)
    assert float(res.perturbation(x, norm).max()) <= eps + 1e-5
    pred = digits_model.logits(res.x_adv).argmax(1)
    assert torch.equal(res.success, pred != y)
    assert res.x_adv.min() >= 0.0 and res.x_adv.max() <= 1.0
    if norm == "l2":
        robust_acc = 1.0 - res.success.float().mean().item()
        assert robust_acc < 0.3  # clean accuracy on digits_eval is 1.0


def test_uses_model_bounds(digits_module, digits_eval):
    model = TorchClassifier(
        digits_module,
        input_shape=(1, 8, 8),
        num_classes=10,
        bounds=(-1.0, 1.0),
        preprocess=Normalize(-1.0, 2.0),  # (x + 1) / 2 back to [0, 1]
    )
    x, y = _subset(digits_eval, 40)
    x2 = 2 * x - 1
    res = DeepFool()(model, x2, y)
    assert res.x_adv.min() >= -1.0 and res.x_adv.max() <= 1.0
    assert res.success.float().mean() >= 0.9
    # the same network at twice the input scale: DeepFool is scale-equivariant
    ref = DeepFool()(TorchClassifier(digits_module, input_shape=(1, 8, 8), num_classes=10), x, y)
    both = res.success & ref.success
    ratio = res.perturbation(x2, "l2")[both].median() / ref.perturbation(x, "l2")[both].median()
    assert 1.9 < float(ratio) < 2.1


def test_candidates_capped_and_fewer(digits_model, digits_eval):
    x, y = _subset(digits_eval, 30)
    a = DeepFool(candidates=10)(digits_model, x, y)
    b = DeepFool(candidates=50)(digits_model, x, y)  # capped at num_classes
    assert torch.equal(a.x_adv, b.x_adv)
    two = DeepFool(candidates=2)(digits_model, x, y)  # only the runner-up class
    assert two.success.float().mean() >= 0.8
    assert two.gradient_evals < a.gradient_evals


def test_last_iterate_when_not_fooled(digits_model, digits_eval):
    x, y = _subset(digits_eval, 30)
    res = DeepFool(steps=1, overshoot=0.0)(digits_model, x, y)
    failed = ~res.success
    assert failed.any()
    # one linearised step was taken, and it is returned
    assert (res.perturbation(x, "l2")[failed] > 0).all()


def test_batch_of_one_and_determinism(digits_model, digits_eval):
    x, y = _subset(digits_eval, 30)
    one = DeepFool()(digits_model, x[:1], y[:1])
    assert one.x_adv.shape == (1, 1, 8, 8) and bool(one.success[0])
    a = DeepFool()(digits_model, x, y)
    b = DeepFool()(digits_model, x, y)
    assert torch.equal(a.x_adv, b.x_adv) and torch.equal(a.success, b.success)
    assert torch.allclose(one.x_adv[0], a.x_adv[0], atol=1e-5)


def test_targeted_is_refused(digits_model, digits_eval):
    x, y = _subset(digits_eval, 4)
    with pytest.raises(InputError):
        DeepFool()(digits_model, x, y, targets=(y + 1) % 10)


def test_metadata():
    a = DeepFool()
    assert a.name == "deepfool" and a.norms == ("l2", "linf")
    assert a.minimum_norm and not a.supports_targeted
    assert a.params()["candidates"] == 10 and a.params()["overshoot"] == 0.02
    assert a.params()["steps"] == 50


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(steps=0),
        dict(steps=2.0),
        dict(candidates=1),
        dict(candidates="10"),
        dict(overshoot=-0.1),
        dict(overshoot=float("nan")),
        dict(overshoot=None),
        dict(norm="l1"),
        dict(norm="l0"),
    ],
)
def test_bad_arguments(kwargs):
    with pytest.raises(InputError):
        DeepFool(**kwargs)
