"""Carlini-Wagner L2 on the digits CNN: minimum-norm, targeted, bounded, deterministic."""

from __future__ import annotations

import pytest
import torch

from advguard.attacks import losses
from advguard.attacks.evasion.cw import CarliniWagnerL2
from advguard.errors import InputError
from advguard.models import TorchClassifier
from advguard.models.torch_model import Normalize

# A reduced budget that keeps the file fast: 60 Adam steps x 4 values of c. With inputs
# exactly on the bounds (digits' black background), tanh-space needs a larger learning
# rate than the reference 0.01 to move those pixels within so few steps.
FAST = dict(steps=60, binary_search_steps=4, learning_rate=0.2, initial_const=1.0)
N = 40


def _subset(digits_eval, n=N):
    x, y = digits_eval
    return x[:n], y[:n]


def test_minimum_norm_untargeted(digits_model, digits_eval):
    x, y = _subset(digits_eval)
    res = CarliniWagnerL2(**FAST)(digits_model, x, y)
    assert res.success.float().mean() >= 0.9
    l2 = res.perturbation(x, "l2")
    # PGD-L2 needs epsilon ~1.0 to fool ~97% of these samples; CW finds much smaller ones
    assert float(l2[res.success].median()) < 0.9
    # success is exactly "misclassified"
    pred = digits_model.logits(res.x_adv).argmax(1)
    assert torch.equal(res.success, pred != y)
    # inside the box, queries counted
    assert res.x_adv.min() >= 0.0 and res.x_adv.max() <= 1.0
    assert res.gradient_evals > 0 and res.forward_evals >= res.gradient_evals
    assert res.attacked.all()


def test_epsilon_bounds_and_robust_accuracy(digits_model, digits_eval):
    x, y = _subset(digits_eval)
    eps = 1.0
    res = CarliniWagnerL2(**FAST)(digits_model, x, y, epsilon=eps)
    assert float(res.perturbation(x, "l2").max()) <= eps + 1e-5
    pred = digits_model.logits(res.x_adv).argmax(1)
    assert torch.equal(res.success, pred != y)
    robust_acc = 1.0 - res.success.float().mean().item()
    assert robust_acc < 0.5  # clean accuracy on digits_eval is 1.0
    assert res.x_adv.min() >= 0.0 and res.x_adv.max() <= 1.0


def test_targeted_hits_targets(digits_model, digits_eval):
    x, y = _subset(digits_eval)
    t = (y + 1) % 10
    res = CarliniWagnerL2(**FAST)(digits_model, x, y, targets=t)
    assert res.success.float().mean() >= 0.9
    pred = digits_model.logits(res.x_adv).argmax(1)
    assert torch.equal(res.success, pred == t)


def test_confidence_margin(digits_model, digits_eval):
    x, y = _subset(digits_eval, 12)
    kappa = 3.0
    res = CarliniWagnerL2(confidence=kappa, **FAST)(digits_model, x, y)
    assert res.success.float().mean() >= 0.9
    z = digits_model.logits(res.x_adv)
    gain = losses.margin(z, y)
    assert (gain[res.success] >= kappa - 1e-3).all()
    # a confident adversarial is further away than a just-misclassified one
    plain = CarliniWagnerL2(**FAST)(digits_model, x, y)
    both = res.success & plain.success
    assert res.perturbation(x, "l2")[both].median() > plain.perturbation(x, "l2")[both].median()


def test_uses_model_bounds_not_unit_box(digits_module, digits_eval):
    """Inputs in [-1, 1]: the tanh box follows model.bounds; background pixels at -1 stay put."""
    model = TorchClassifier(
        digits_module,
        input_shape=(1, 8, 8),
        num_classes=10,
        bounds=(-1.0, 1.0),
        preprocess=Normalize(-1.0, 2.0),  # (x + 1) / 2 back to [0, 1]
    )
    x, y = _subset(digits_eval, 16)
    x2 = 2 * x - 1
    res = CarliniWagnerL2(**FAST)(model, x2, y)
    assert res.x_adv.min() >= -1.0 and res.x_adv.max() <= 1.0
    assert res.success.float().mean() >= 0.9
    # twice the scale, so about twice the digits-space norm (< 0.9), not a jump to the centre
    assert float(res.perturbation(x2, "l2")[res.success].median()) < 2.0


def test_failures_return_original_input(digits_model, digits_eval):
    x, y = _subset(digits_eval, 20)
    res = CarliniWagnerL2(steps=2, binary_search_steps=1, initial_const=1e-4)(digits_model, x, y)
    assert (~res.success).any()
    assert torch.equal(res.raw[~res.success], x[~res.success])
    assert torch.equal(res.x_adv[~res.success], x[~res.success])


def test_batch_of_one_and_determinism(digits_model, digits_eval):
    x, y = _subset(digits_eval, 12)
    one = CarliniWagnerL2(**FAST)(digits_model, x[:1], y[:1])
    assert one.x_adv.shape == (1, 1, 8, 8) and one.success.shape == (1,)
    assert bool(one.success[0])
    a = CarliniWagnerL2(**FAST)(digits_model, x, y)
    b = CarliniWagnerL2(**FAST)(digits_model, x, y)
    assert torch.equal(a.x_adv, b.x_adv) and torch.equal(a.success, b.success)
    # per-sample binary search: a sample's result does not depend on the rest of the batch
    assert torch.allclose(one.x_adv[0], a.x_adv[0], atol=1e-6)


def test_metadata():
    a = CarliniWagnerL2()
    assert a.name == "cw-l2" and a.norms == ("l2",)
    assert a.minimum_norm and a.supports_targeted
    p = a.params()
    assert p["steps"] == 100 and p["binary_search_steps"] == 9 and p["learning_rate"] == 0.05
    assert p["confidence"] == 0.0 and p["abort_early"] is True


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(steps=0),
        dict(steps=1.5),
        dict(steps="10"),
        dict(binary_search_steps=0),
        dict(initial_const=0.0),
        dict(initial_const=float("nan")),
        dict(learning_rate=-0.1),
        dict(learning_rate=True),
        dict(confidence=-1.0),
        dict(confidence=float("inf")),
        dict(abort_early="yes"),
        dict(norm="linf"),
        dict(seed=1.5),
    ],
)
def test_bad_arguments(kwargs):
    with pytest.raises(InputError):
        CarliniWagnerL2(**kwargs)


def test_bad_epsilon(digits_model, digits_eval):
    x, y = _subset(digits_eval, 2)
    with pytest.raises(InputError):
        CarliniWagnerL2(**FAST)(digits_model, x, y, epsilon=-1.0)
