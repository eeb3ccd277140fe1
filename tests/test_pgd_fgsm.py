"""FGSM and PGD: they work on a trained model, respect every bound, and refuse bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from advguard.attacks import FGSM, PGD
from advguard.attacks.norms import norm_of, project
from advguard.errors import InputError

CASES = [("linf", 0.15), ("l2", 1.0), ("l1", 5.0)]


def robust_acc(result) -> float:
    return 1.0 - result.success.float().mean().item()


@pytest.mark.parametrize(("norm", "eps"), CASES)
def test_pgd_lowers_accuracy_and_respects_bounds(digits_model, digits_eval, norm, eps):
    x, y = digits_eval
    res = PGD(norm=norm, steps=20)(digits_model, x, y, epsilon=eps)
    assert robust_acc(res) < 0.5, f"PGD-{norm} at eps {eps} left {robust_acc(res):.2f} robust"
    assert norm_of(res.x_adv - x, norm).max() <= eps * (1 + 1e-5) + 1e-6
    assert res.x_adv.min() >= 0.0 and res.x_adv.max() <= 1.0
    # success mask agrees with the model
    pred = torch.as_tensor(digits_model.predict(res.x_adv))
    assert torch.equal(res.success, pred != y)
    assert res.gradient_evals > 0 and res.forward_evals >= res.gradient_evals


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_fgsm_lowers_accuracy(digits_model, digits_eval, norm):
    x, y = digits_eval
    eps = 0.2 if norm == "linf" else 1.5
    res = FGSM(norm=norm)(digits_model, x, y, epsilon=eps)
    assert robust_acc(res) < 0.6
    assert norm_of(res.x_adv - x, norm).max() <= eps * (1 + 1e-5)
    assert res.gradient_evals == len(x)


def test_pgd_stronger_than_fgsm(digits_model, digits_eval):
    x, y = digits_eval
    pg = PGD(steps=20)(digits_model, x[:100], y[:100], epsilon=0.1)
    fg = FGSM()(digits_model, x[:100], y[:100], epsilon=0.1)
    assert robust_acc(pg) <= robust_acc(fg)


def test_pgd_targeted_hits_target(digits_model, digits_eval):
    x, y = digits_eval
    t = (y + 1) % 10
    x, y, t = x[:100], y[:100], t[:100]
    res = PGD(steps=20)(digits_model, x, y, epsilon=0.3, targets=t)
    pred = torch.as_tensor(digits_model.predict(res.x_adv))
    assert (pred == t).float().mean() > 0.8
    assert torch.equal(res.success, pred == t)


def test_margin_loss_and_restarts(digits_model, digits_eval):
    x, y = digits_eval
    one = PGD(steps=10, loss="margin")(digits_model, x, y, epsilon=0.1)
    three = PGD(steps=10, loss="margin", restarts=3)(digits_model, x, y, epsilon=0.1)
    assert robust_acc(three) <= robust_acc(one)
    assert robust_acc(one) < 0.9


@pytest.mark.parametrize(
    ("kwargs", "call", "match"),
    [
        ({}, {"epsilon": -0.1}, "epsilon"),
        ({}, {"epsilon": float("nan")}, "epsilon"),
        ({}, {"epsilon": None}, "needs an epsilon"),
        ({"norm": "l7"}, {"epsilon": 0.1}, "unknown norm"),
        ({"steps": 0}, {"epsilon": 0.1}, "steps"),
        ({"loss": "hinge"}, {"epsilon": 0.1}, "unknown loss"),
        ({"restarts": 0}, {"epsilon": 0.1}, "restarts"),
    ],
)
def test_bad_arguments(digits_model, digits_eval, kwargs, call, match):
    x, y = digits_eval
    with pytest.raises(InputError, match=match):
        PGD(**kwargs)(digits_model, x, y, **call)


def test_bad_inputs(digits_model, digits_eval):
    x, y = digits_eval
    pgd = PGD(steps=2)
    with pytest.raises(InputError, match="shape"):
        pgd(digits_model, x[:, :, :4], y, epsilon=0.1)
    bad = x.clone()
    bad[3, 0, 0, 0] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        pgd(digits_model, bad, y, epsilon=0.1)
    with pytest.raises(InputError, match="bounds"):
        pgd(digits_model, x * 3, y, epsilon=0.1)
    with pytest.raises(InputError, match="labels"):
        pgd(digits_model, x, y + 10, epsilon=0.1)
    with pytest.raises(InputError, match="labels"):
        pgd(digits_model, x, y[:-1], epsilon=0.1)
    with pytest.raises(InputError, match="does not support"):
        FGSM.supports_targeted = False
        try:
            FGSM()(digits_model, x, y, epsilon=0.1, targets=y)
        finally:
            FGSM.supports_targeted = True


def test_l1_projection_is_exact():
    g = torch.Generator().manual_seed(0)
    d = torch.randn(64, 30, generator=g) * 3
    p = project(d, "l1", 2.0)
    assert torch.allclose(norm_of(p, "l1"), torch.full((64,), 2.0), atol=1e-4)
    # the projection is the closest point: compare to a random feasible point
    q = project(torch.randn(64, 30, generator=g), "l1", 2.0)
    assert ((p - d).norm(dim=1) <= (q - d).norm(dim=1) + 1e-5).all()
    inside = torch.full((2, 3), 0.1)
    assert torch.equal(project(inside, "l1", 2.0), inside)


def test_parse_norm_aliases():
    from advguard.attacks.norms import parse_norm

    assert parse_norm(np.inf) == "linf" and parse_norm("Linf") == "linf"
    assert parse_norm(2) == "l2" and parse_norm("L1") == "l1"
