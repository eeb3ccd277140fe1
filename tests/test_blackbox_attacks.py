"""Black-box evasion attacks: Square Attack (score-based) and HopSkipJump (decision-based)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from advguard.attacks.evasion.hopskipjump import HopSkipJump
from advguard.attacks.evasion.square import SquareAttack, meta_pattern, p_selection
from advguard.errors import InputError
from advguard.models import SklearnClassifier


class NoGradients:
    """Wrap an adapter so that only ``logits`` (and the metadata) are reachable."""

    def __init__(self, model) -> None:
        self._m = model
        self.num_classes = model.num_classes
        self.bounds = model.bounds
        self.input_shape = model.input_shape
        self.queries = model.queries
        self.device = model.device

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self._m.logits(x)


def _robust_acc(model, x_adv, y) -> float:
    return float((model.logits(x_adv).argmax(1) == y).float().mean())


def _check_ball(x, result, norm: str, eps: float, bounds=(0.0, 1.0)) -> None:
    assert float(result.perturbation(x, norm).max()) <= eps + 1e-5
    assert float(result.x_adv.min()) >= bounds[0] and float(result.x_adv.max()) <= bounds[1]


@pytest.fixture(scope="module")
def logreg_digits(digits_split):
    x_tr, y_tr, x_te, y_te = digits_split
    est = LogisticRegression(max_iter=2000).fit(x_tr.reshape(len(x_tr), -1), y_tr)
    model = SklearnClassifier(est, input_shape=(1, 8, 8))
    ok = model.predict(x_te) == y_te
    return est, torch.tensor(x_te[ok][:60]), torch.tensor(y_te[ok][:60])


# ---------------------------------------------------------------------------
# Square Attack
# ---------------------------------------------------------------------------
def test_square_linf_lowers_robust_accuracy_within_budget(digits_model, digits_eval):
    x, y = digits_eval
    x_in = x.clone()
    model = NoGradients(digits_model)  # black-box: value_and_grad is not even reachable
    res = SquareAttack(norm="linf", max_queries=300, seed=0)(model, x, y, epsilon=0.2)
    assert torch.equal(x, x_in)  # inputs untouched
    assert _robust_acc(digits_model, x, y) == 1.0
    robust = _robust_acc(digits_model, res.x_adv, y)
    assert robust <= 0.2, robust  # ~3% in practice
    assert res.success.float().mean() >= 0.8
    # success flags are what the model says about the returned points
    assert torch.equal(res.success, digits_model.logits(res.x_adv).argmax(1) != y)
    _check_ball(x, res, "linf", 0.2)
    # per-sample query accounting: never over budget, fooled samples stop early,
    # unfooled ones used exactly the budget
    assert res.queries is not None and res.queries.shape == (len(x),)
    assert int(res.queries.max()) <= 300
    assert int(res.queries.min()) >= 1
    assert bool((res.queries[res.success] < 300).all())
    assert float(res.queries[res.success].float().median()) < 100
    assert bool((res.queries[~res.success] == 300).all())
    # the adapter's count = base class (clean prediction + final check) + the attack's queries
    assert res.forward_evals == 2 * len(x) + int(res.queries.sum())
    assert res.gradient_evals == 0


def test_square_l2(digits_model, digits_eval):
    x, y = digits_eval
    x, y = x[:100], y[:100]
    res = SquareAttack(norm="l2", max_queries=200)(digits_model, x, y, epsilon=1.5)
    _check_ball(x, res, "l2", 1.5)
    assert res.success.float().mean() >= 0.8
    assert int(res.queries.max()) <= 200


def test_square_on_sklearn_blackbox(logreg_digits):
    est, x, y = logreg_digits
    model = SklearnClassifier(est, input_shape=(1, 8, 8))  # flattens for the estimator
    assert model.accuracy(x, y) == 1.0
    before = model.queries.forward
    res = SquareAttack(norm="linf", max_queries=300)(model, x, y, epsilon=0.2)
    assert res.success.float().mean() >= 0.8
    _check_ball(x, res, "linf", 0.2)
    assert int(res.queries.max()) <= 300
    assert model.queries.forward - before == 2 * len(x) + int(res.queries.sum())


def test_square_targeted(digits_model, digits_eval):
    x, y = digits_eval
    x, y = x[:100], y[:100]
    t = (y + 1) % 10
    res = SquareAttack(norm="linf", max_queries=300)(digits_model, x, y, epsilon=0.2, targets=t)
    pred = digits_model.logits(res.x_adv).argmax(1)
    assert res.success.float().mean() >= 0.3
    assert torch.equal(res.success, pred == t)
    _check_ball(x, res, "linf", 0.2)


def test_square_restarts_share_the_budget(digits_model, digits_eval):
    x, y = digits_eval
    x, y = x[:60], y[:60]
    res = SquareAttack(norm="linf", max_queries=31, restarts=3)(digits_model, x, y, epsilon=0.05)
    assert int(res.queries.max()) <= 31
    assert bool((res.queries[~res.success] == 31).all())
    _check_ball(x, res, "linf", 0.05)


def test_square_budget_exhaustion(digits_model, digits_eval):
    x, y = digits_eval
    x, y = x[:60], y[:60]
    res = SquareAttack(norm="linf", max_queries=20)(digits_model, x, y, epsilon=0.02)
    failed = ~res.success
    assert failed.sum() >= 50  # eps far too small to fool most samples
    assert bool((res.queries[failed] == 20).all())
    _check_ball(x, res, "linf", 0.02)
    # one query: the initialisation only
    res1 = SquareAttack(norm="linf", max_queries=1)(digits_model, x, y, epsilon=0.02)
    assert bool((res1.queries == 1).all())


def test_square_deterministic(digits_model, digits_eval):
    x, y = digits_eval
    x, y = x[:40], y[:40]
    for norm, eps in (("linf", 0.1), ("l2", 0.8)):
        a = SquareAttack(norm=norm, max_queries=60, seed=3)(digits_model, x, y, epsilon=eps)
        b = SquareAttack(norm=norm, max_queries=60, seed=3)(digits_model, x, y, epsilon=eps)
        c = SquareAttack(norm=norm, max_queries=60, seed=4)(digits_model, x, y, epsilon=eps)
        assert torch.equal(a.x_adv, b.x_adv) and torch.equal(a.queries, b.queries)
        assert not torch.equal(a.x_adv, c.x_adv)


def test_square_schedule_and_pattern():
    # p halves at 10, 50, 200, ... of a 10k run, rescaled to the budget
    assert p_selection(0.8, 10, 10000) == 0.8
    assert p_selection(0.8, 11, 10000) == 0.4
    assert p_selection(0.8, 500, 10000) == 0.1
    assert p_selection(0.8, 9000, 10000) == pytest.approx(0.8 / 512)
    assert p_selection(0.8, 2, 1000) == 0.4  # it -> int(2 / 1000 * 10000) = 20
    pat = meta_pattern(5)
    assert pat.shape == (5, 5)
    assert np.sqrt((pat**2).sum()) == pytest.approx(1.0)
    assert pat[:2].min() >= 0 and pat[2:].max() <= 0  # two halves of opposite sign


def test_square_bad_arguments(digits_model, digits_eval):
    for kw in (
        {"max_queries": 0},
        {"max_queries": 2.5},
        {"restarts": 0},
        {"restarts": 5, "max_queries": 4},
        {"p_init": 0.0},
        {"p_init": 1.5},
        {"p_init": "big"},
        {"loss": "hinge"},
        {"norm": "l1"},
        {"seed": 1.5},
    ):
        with pytest.raises(InputError):
            SquareAttack(**kw)
    x, y = digits_eval
    with pytest.raises(InputError, match="epsilon"):
        SquareAttack()(digits_model, x[:4], y[:4])
    # flat (tabular) inputs are refused with a clear message
    est = LogisticRegression(max_iter=200).fit(
        np.random.default_rng(0).random((40, 6)), [0, 1] * 20
    )
    flat_model = SklearnClassifier(est)
    with pytest.raises(InputError, match="image-shaped"):
        SquareAttack()(flat_model, np.zeros((2, 6), np.float32), np.zeros(2, np.int64), epsilon=0.1)


# ---------------------------------------------------------------------------
# HopSkipJump
# ---------------------------------------------------------------------------
def test_hsj_l2_minimum_norm_and_epsilon(digits_model, digits_eval):
    x, y = digits_eval
    x, y = x[:30], y[:30]
    x_in = x.clone()
    model = NoGradients(digits_model)
    res = HopSkipJump(norm="l2", max_queries=400)(model, x, y)
    assert torch.equal(x, x_in)
    assert res.success.float().mean() >= 0.9
    d = res.perturbation(x, "l2")[res.success]
    med = float(d.median())
    assert 0.0 < med < 2.5, med
    assert int(res.queries.max()) <= 400
    assert res.forward_evals == 2 * len(x) + int(res.queries.sum())
    assert torch.equal(res.success, digits_model.logits(res.x_adv).argmax(1) != y)

    res_eps = HopSkipJump(norm="l2", max_queries=400)(model, x, y, epsilon=1.5)
    _check_ball(x, res_eps, "l2", 1.5)
    assert res_eps.success.float().mean() >= 0.7
    # with epsilon a sample stops as soon as it is within the ball
    assert res_eps.queries.sum() < res.queries.sum()


def test_hsj_linf_and_more_queries_help(digits_model, digits_eval):
    x, y = digits_eval
    x, y = x[:20], y[:20]
    few = HopSkipJump(norm="linf", max_queries=150)(digits_model, x, y)
    many = HopSkipJump(norm="linf", max_queries=500)(digits_model, x, y)
    assert few.success.all() and many.success.all()
    d_few, d_many = few.perturbation(x, "linf"), many.perturbation(x, "linf")
    assert float(d_many.median()) < float(d_few.median())
    assert int(many.queries.max()) <= 500


def test_hsj_targeted_starts_from_batch(digits_model, digits_eval):
    x, y = digits_eval
    x, y = x[:30], y[:30]
    t = (y + 3) % 10
    res = HopSkipJump(norm="l2", max_queries=300)(digits_model, x, y, targets=t)
    pred = digits_model.logits(res.x_adv).argmax(1)
    assert torch.equal(res.success, pred == t)
    assert res.success.float().mean() >= 0.8
    assert int(res.queries.max()) <= 300


def test_hsj_on_sklearn_blackbox(logreg_digits):
    est, x, y = logreg_digits
    x, y = x[:30], y[:30]
    flat_model = SklearnClassifier(est)  # flat (64,) inputs are fine for HopSkipJump
    xf = x.reshape(len(x), -1)
    res = HopSkipJump(norm="l2", max_queries=300)(flat_model, xf, y)
    assert res.success.float().mean() >= 0.9
    assert float(res.perturbation(xf, "l2")[res.success].median()) < 2.5
    assert int(res.queries.max()) <= 300


def test_hsj_budget_exhaustion(digits_model, digits_eval):
    x, y = digits_eval
    x, y = x[:20], y[:20]
    res = HopSkipJump(norm="l2", max_queries=40)(digits_model, x, y, epsilon=0.05)
    assert not res.success.any()
    assert bool((res.queries == 40).all())
    _check_ball(x, res, "l2", 0.05)
    # no adversarial starting point found within the budget: the input comes back clean
    const = NoGradients(digits_model)
    const.logits = lambda z: torch.eye(10)[torch.zeros(len(z), dtype=torch.long)]  # always 0
    y0 = torch.zeros(len(x), dtype=torch.long)
    res = HopSkipJump(norm="l2", max_queries=25)(const, x, y0)
    assert not res.success.any()
    assert torch.equal(res.x_adv, x)
    assert bool((res.queries == 25).all())


def test_hsj_deterministic_and_eps_zero(digits_model, digits_eval):
    x, y = digits_eval
    x, y = x[:15], y[:15]
    a = HopSkipJump(max_queries=200, seed=1)(digits_model, x, y)
    b = HopSkipJump(max_queries=200, seed=1)(digits_model, x, y)
    assert torch.equal(a.x_adv, b.x_adv) and torch.equal(a.queries, b.queries)
    z = HopSkipJump(max_queries=200)(digits_model, x, y, epsilon=0.0)
    assert torch.equal(z.x_adv, x) and int(z.queries.sum()) == 0 and not z.success.any()


def test_hsj_bad_arguments():
    for kw in (
        {"max_queries": 0},
        {"max_iter": 0},
        {"init_num_evals": 0},
        {"init_num_evals": 100, "max_num_evals": 10},
        {"gamma": 0.0},
        {"gamma": "x"},
        {"init_trials": 0},
        {"query_batch_size": 0},
        {"norm": "l1"},
        {"max_queries": True},
    ):
        with pytest.raises(InputError):
            HopSkipJump(**kw)
