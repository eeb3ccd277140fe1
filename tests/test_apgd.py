"""APGD (Croce & Hein 2020) on the digits CNN: strength, constraints, determinism, errors."""

from __future__ import annotations

import pytest
import torch

from advguard.attacks.base import AttackResult
from advguard.attacks.evasion.apgd import APGD, apgd_targeted_sweep, checkpoints
from advguard.attacks.evasion.pgd import PGD
from advguard.attacks.norms import norm_of
from advguard.errors import InputError

CASES = [("linf", 0.1, 0.8), ("linf", 0.2, 0.2), ("l2", 1.0, 0.2)]
"""(norm, epsilon, robust-accuracy ceiling); clean accuracy on digits_eval is 1.0."""


def robust_acc(res: AttackResult) -> float:
    return 1.0 - res.success.float().mean().item()


def assert_constraints(res: AttackResult, x: torch.Tensor, norm: str, eps: float) -> None:
    assert res.x_adv.shape == x.shape
    assert float(norm_of(res.x_adv - x, norm).max()) <= eps + 1e-5
    assert float(res.x_adv.min()) >= 0.0 and float(res.x_adv.max()) <= 1.0


def test_checkpoints_follow_the_paper():
    # p = 0, .22, .41, .57, .70, .80, .87, .93, .99, (1.05)
    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert checkpoints(1) == []
    w = checkpoints(20)
    assert w == sorted(set(w)) and all(0 < v < 20 for v in w) and w[0] == 5


@pytest.mark.parametrize(("norm", "eps", "ceiling"), CASES)
def test_apgd_ce_beats_pgd(digits_model, digits_eval, norm, eps, ceiling):
    x, y = digits_eval
    x_before = x.clone()
    res = APGD(norm=norm, steps=40, loss="ce")(digits_model, x, y, epsilon=eps)
    assert torch.equal(x, x_before)  # input untouched
    assert_constraints(res, x, norm, eps)
    acc = robust_acc(res)
    assert acc <= ceiling
    pgd = PGD(norm=norm, steps=40)(digits_model, x, y, epsilon=eps)
    assert acc <= robust_acc(pgd) + 0.02
    # one gradient per iteration at most, fooled samples leave the batch
    assert 0 < res.gradient_evals <= len(x) * 40
    assert res.success.all() or res.gradient_evals > len(x)


@pytest.mark.parametrize(("norm", "eps", "ceiling"), CASES)
def test_apgd_dlr_untargeted(digits_model, digits_eval, norm, eps, ceiling):
    x, y = digits_eval
    res = APGD(norm=norm, steps=30, loss="dlr")(digits_model, x, y, epsilon=eps)
    assert_constraints(res, x, norm, eps)
    assert robust_acc(res) <= ceiling
    # success is recomputed by the base class on the returned points
    pred = digits_model.logits(res.x_adv).argmax(1)
    assert torch.equal(res.success, pred != y)


@pytest.mark.parametrize("loss", ["ce", "dlr"])
@pytest.mark.parametrize(("norm", "eps"), [("linf", 0.2), ("l2", 1.0)])
def test_targeted_hits_targets(digits_model, digits_eval, loss, norm, eps):
    x, y = digits_eval
    x, y = x[:100], y[:100]
    t = (y + 1) % 10
    res = APGD(norm=norm, steps=30, loss=loss)(digits_model, x, y, epsilon=eps, targets=t)
    assert_constraints(res, x, norm, eps)
    pred = digits_model.logits(res.x_adv).argmax(1)
    assert torch.equal(res.success, pred == t)
    assert res.success.float().mean().item() >= 0.35


def test_targeted_sweep_at_least_as_strong_as_dlr(digits_model, digits_eval):
    x, y = digits_eval
    x, y = x[:100], y[:100]
    dlr = APGD(norm="linf", steps=20, loss="dlr")(digits_model, x, y, epsilon=0.1)
    before = digits_model.queries.snapshot()
    sweep = apgd_targeted_sweep(digits_model, x, y, epsilon=0.1, steps=20, n_target_classes=3)
    after = digits_model.queries.snapshot()
    assert_constraints(sweep, x, "linf", 0.1)
    assert robust_acc(sweep) <= robust_acc(dlr) + 0.02
    assert robust_acc(sweep) < 0.9
    pred = digits_model.logits(sweep.x_adv).argmax(1)
    assert torch.equal(sweep.success, pred != y)  # untargeted success
    assert sweep.info["target_classes"] == 3
    assert sum(sweep.info["fooled_per_target_rank"]) == int(sweep.success.sum())
    # evals summed over all targeted calls (plus the clean pass)
    assert sweep.forward_evals == after[0] - before[0] > len(x)
    assert sweep.gradient_evals == after[1] - before[1] > 0
    assert sweep.attacked.all()


def test_sweep_method_matches_function_and_caps_targets(digits_model, digits_eval):
    x, y = digits_eval
    x, y = x[:20], y[:20]
    a = APGD(norm="l2", steps=5, loss="dlr", n_target_classes=50)
    r1 = a.targeted_sweep(digits_model, x, y, epsilon=0.5)
    r2 = apgd_targeted_sweep(
        digits_model, x, y, epsilon=0.5, norm="l2", steps=5, n_target_classes=50
    )
    assert r1.info["target_classes"] == 9  # num_classes - 1
    assert torch.equal(r1.x_adv, r2.x_adv) and torch.equal(r1.success, r2.success)


def test_restarts_only_add_successes(digits_model, digits_eval):
    x, y = digits_eval
    x, y = x[:100], y[:100]
    r1 = APGD(norm="linf", steps=20, restarts=1)(digits_model, x, y, epsilon=0.1)
    r2 = APGD(norm="linf", steps=20, restarts=2)(digits_model, x, y, epsilon=0.1)
    assert bool((r2.success | ~r1.success).all())  # same first restart, then more
    assert r2.gradient_evals > r1.gradient_evals


@pytest.mark.parametrize("loss", ["ce", "dlr"])
def test_deterministic_per_seed(digits_model, digits_eval, loss):
    x, y = digits_eval
    x, y = x[:50], y[:50]
    kw = dict(norm="l2", steps=15, loss=loss)
    a = APGD(**kw, seed=3)(digits_model, x, y, epsilon=0.5)
    b = APGD(**kw, seed=3)(digits_model, x, y, epsilon=0.5)
    c = APGD(**kw, seed=4)(digits_model, x, y, epsilon=0.5)
    assert torch.equal(a.x_adv, b.x_adv) and torch.equal(a.success, b.success)
    assert not torch.equal(a.x_adv, c.x_adv)  # the random start depends on the seed


def test_batch_of_one(digits_model, digits_eval):
    x, y = digits_eval
    for i in range(3):
        res = APGD(norm="linf", steps=20)(digits_model, x[i : i + 1], y[i : i + 1], epsilon=0.2)
        assert res.x_adv.shape == (1, 1, 8, 8)
        assert_constraints(res, x[i : i + 1], "linf", 0.2)
    sweep = apgd_targeted_sweep(digits_model, x[:1], y[:1], epsilon=0.2, steps=10)
    assert sweep.x_adv.shape == (1, 1, 8, 8)


def test_name_and_params():
    a = APGD(norm="L2", loss="dlr", steps=50)
    assert a.name == "apgd-dlr" and APGD.name == "apgd"
    assert APGD(loss="ce").name == "apgd-ce"
    p = a.params()
    assert p["loss"] == "dlr" and p["norm"] == "l2" and p["steps"] == 50 and p["rho"] == 0.75
    assert "name" not in p
    assert APGD.supports_targeted and set(APGD.norms) == {"linf", "l2"}
    assert "loss='dlr'" in repr(a)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"norm": "l7"},
        {"norm": "l1"},
        {"steps": 0},
        {"steps": 2.5},
        {"restarts": 0},
        {"rho": 0.0},
        {"rho": 1.0},
        {"rho": 1.5},
        {"rho": "x"},
        {"loss": "hinge"},
        {"n_target_classes": 0},
        {"seed": 1.5},
    ],
)
def test_invalid_constructor_args(kwargs):
    with pytest.raises(InputError):
        APGD(**kwargs)


def test_invalid_call_args(digits_model, digits_eval):
    x, y = digits_eval
    x, y = x[:5], y[:5]
    with pytest.raises(InputError):
        APGD()(digits_model, x, y, epsilon=-0.1)
    with pytest.raises(InputError):
        APGD()(digits_model, x, y)  # epsilon required
    with pytest.raises(InputError):
        APGD()(digits_model, x + 2.0, y, epsilon=0.1)  # outside bounds
    with pytest.raises(InputError):
        apgd_targeted_sweep(digits_model, x, y, epsilon=-1.0)
    with pytest.raises(InputError):
        apgd_targeted_sweep(digits_model, x, y[:3], epsilon=0.1)
