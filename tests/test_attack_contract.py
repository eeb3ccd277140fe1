"""The promises every registered attack keeps, checked once for all of them.

Parametrized over ``advguard.attacks.registry.ATTACKS`` (in the spirit of Foolbox's attack
test table): a new attack registered with one line is checked here without a new test file.
Attack-specific behaviour (strength, schedules, budgets) stays in the per-attack files.

``FAST`` only makes the attacks cheap (few steps or queries) on a tiny MLP trained on
scikit-learn's digits; an attack missing from it runs with its defaults.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from advguard.attacks.base import Attack
from advguard.attacks.norms import norm_of
from advguard.attacks.registry import ATTACKS, SuiteAttack, build_attack
from advguard.errors import InputError
from advguard.models import TorchClassifier
from advguard.models.fit import fit
from advguard.models.zoo import mlp

EPS = {"linf": 0.1, "l2": 1.0, "l1": 5.0}
SCHEMA = {"name": "pixels", "features": [{"name": f"p{i}", "low": 0, "high": 1} for i in range(64)]}
TABULAR = {"constrained-pgd", "constrained-search"}
"""Attacks on flat rows with a feature schema (the same model, input_shape (64,))."""

FAST: dict[str, Callable[[Any], dict[str, Any]]] = {
    "pgd": lambda ctx: {"steps": 5},
    "apgd-ce": lambda ctx: {"steps": 5},
    "apgd-dlr": lambda ctx: {"steps": 5},
    "apgd-t": lambda ctx: {"steps": 5, "n_target_classes": 2},
    "cw-l2": lambda ctx: {"steps": 10, "binary_search_steps": 2},
    "deepfool": lambda ctx: {"steps": 5},
    "transfer": lambda ctx: {"surrogates": [ctx["surrogate"]], "base_params": {"steps": 5}},
    "constrained-pgd": lambda ctx: {"schema": SCHEMA, "steps": 5},
    "constrained-search": lambda ctx: {"schema": SCHEMA, "max_queries": 30},
    "square": lambda ctx: {"max_queries": 30},
    "hopskipjump": lambda ctx: {"max_queries": 100, "max_iter": 3},
}
WORK_PARAMS = ("steps", "restarts", "max_queries", "max_iter")


@pytest.fixture(scope="module")
def ctx() -> dict[str, Any]:
    """A tiny MLP on digits (image and flat views), a surrogate, 8 correctly classified
    test samples."""
    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    y = d.target.astype(np.int64)
    perm = np.random.default_rng(0).permutation(len(x))
    x, y = x[perm], y[perm]
    torch.manual_seed(0)
    module = fit(mlp((1, 8, 8), 10, hidden=(32,)), x[:1000], y[:1000], epochs=8, seed=0)
    torch.manual_seed(1)
    other = fit(mlp((1, 8, 8), 10, hidden=(16,)), x[:500], y[:500], epochs=5, seed=1)
    image = TorchClassifier(module, input_shape=(1, 8, 8), num_classes=10)
    xt, yt = torch.tensor(x[1000:1200]), torch.tensor(y[1000:1200])
    ok = torch.as_tensor(image.predict(xt) == yt.numpy())
    return {
        "module": module,
        "surrogate": TorchClassifier(other, input_shape=(1, 8, 8), num_classes=10),
        "x": xt[ok][:8],
        "y": yt[ok][:8],
    }


def setup(name: str, ctx: dict[str, Any], **extra: Any):
    """(suite attack, fresh model adapter, x, y, norm, epsilon) for registered attack ``name``."""
    entry = ATTACKS[name]
    params = {**FAST.get(name, lambda c: {})(ctx), **extra}
    attack = build_attack(name, norm=entry.norms[0], seed=0, **params)
    if not isinstance(attack.attack, Attack):
        pytest.skip(f"{name} is not a tensor attack ({type(attack.attack).__name__})")
    x = ctx["x"]
    if name in TABULAR:
        model = TorchClassifier(ctx["module"], input_shape=(64,), num_classes=10)
        x = x.reshape(len(x), -1)
    else:
        model = TorchClassifier(ctx["module"], input_shape=(1, 8, 8), num_classes=10)
    norm = entry.norms[0]
    return attack, model, x.clone(), ctx["y"].clone(), norm, EPS[norm]


def run(attack: SuiteAttack, model, x, y, eps):
    return attack.run(model, x, y, eps)


NAMES = sorted(ATTACKS)


@pytest.mark.parametrize("name", NAMES)
def test_inside_bounds_and_ball_and_success_is_the_models_verdict(name, ctx):
    attack, model, x, y, norm, eps = setup(name, ctx)
    x_before = x.clone()
    res = run(attack, model, x, y, eps)
    assert torch.equal(x, x_before), "the attack modified its input"
    assert res.x_adv.shape == x.shape and res.x_adv.dtype == torch.float32
    assert float(res.x_adv.min()) >= 0.0 and float(res.x_adv.max()) <= 1.0
    assert float(norm_of(res.x_adv - x, norm).max()) <= eps * (1 + 1e-5) + 1e-6
    pred = torch.as_tensor(model.predict(res.x_adv))
    assert torch.equal(res.success, pred != y)
    assert res.success.dtype == torch.bool and res.attacked.dtype == torch.bool
    if res.queries is not None:
        assert res.queries.shape == (len(x),) and int(res.queries.min()) >= 0


@pytest.mark.parametrize("name", NAMES)
def test_epsilon_zero_changes_nothing(name, ctx):
    attack, model, x, y, _, _ = setup(name, ctx)
    res = run(attack, model, x, y, 0.0)
    assert torch.equal(res.x_adv, x)
    assert not res.success.any() and not res.attacked.any()
    assert res.gradient_evals == 0
    if type(attack.attack).tracks_queries:
        assert int(res.queries.sum()) == 0


@pytest.mark.parametrize("name", NAMES)
def test_already_misclassified_samples_are_skipped(name, ctx):
    attack, model, x, y, _, eps = setup(name, ctx)
    wrong = y.clone()
    wrong[::2] = (y[::2] + 1) % 10  # every other sample is "already misclassified"
    res = run(attack, model, x, wrong, eps)
    skipped = torch.zeros(len(x), dtype=torch.bool)
    skipped[::2] = True
    assert not res.attacked[skipped].any()
    assert res.success[skipped].all()
    assert torch.equal(res.x_adv[skipped], x[skipped])
    if type(attack.attack).tracks_queries:
        assert int(res.queries[skipped].sum()) == 0
    # nothing left to attack: no gradients, nothing moved
    res = run(attack, model, x, (y + 1) % 10, eps)
    assert res.success.all() and not res.attacked.any()
    assert torch.equal(res.x_adv, x) and res.gradient_evals == 0


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_result_and_numpy_input(name, ctx):
    attack, model, x, y, _, eps = setup(name, ctx)
    a = run(attack, model, x, y, eps)
    b = run(attack, model, x, y, eps)
    assert torch.equal(a.x_adv, b.x_adv) and torch.equal(a.success, b.success)
    again, model2, *_ = setup(name, ctx)  # a fresh object with the same seed
    c = again.run(model2, x.numpy(), y.numpy(), eps)
    assert torch.equal(a.x_adv, c.x_adv) and torch.equal(a.success, c.success)


@pytest.mark.parametrize("name", NAMES)
def test_batch_of_one_and_empty_batch(name, ctx):
    attack, model, x, y, norm, eps = setup(name, ctx)
    one = run(attack, model, x[:1], y[:1], eps)
    assert one.x_adv.shape == x[:1].shape and one.success.shape == (1,)
    assert float(norm_of(one.x_adv - x[:1], norm).max()) <= eps * (1 + 1e-5) + 1e-6
    empty = run(attack, model, x[:0], y[:0], eps)
    assert empty.x_adv.shape == x[:0].shape
    assert empty.success.shape == (0,) and empty.attacked.shape == (0,)


@pytest.mark.parametrize("name", NAMES)
def test_bad_arguments_are_refused(name, ctx):
    entry = ATTACKS[name]
    attack, model, x, y, _, _ = setup(name, ctx)
    base = FAST.get(name, lambda c: {})(ctx)
    for eps in (-0.1, float("nan"), "0.1"):
        with pytest.raises(InputError, match="epsilon"):
            attack.run(model, x, y, eps)  # type: ignore[arg-type]
    with pytest.raises(InputError):
        build_attack(name, norm=entry.norms[0], seed=0, **base, no_such_parameter=1)
    with pytest.raises(InputError, match="norm"):
        build_attack(name, norm="l0", seed=0, **base)
    with pytest.raises(InputError, match="seed"):
        build_attack(name, norm=entry.norms[0], seed=1.5, **base)  # type: ignore[arg-type]
    signature = inspect.signature(type(attack.attack).__init__).parameters
    for p in (p for p in WORK_PARAMS if p in signature):
        for bad in (2.5, True, 0, "3", 10**12):
            with pytest.raises(InputError, match=p):
                build_attack(name, norm=entry.norms[0], seed=0, **{**base, p: bad})
    large = [p for p in WORK_PARAMS if p in signature and p != "restarts"]
    if large:  # the limit is lifted on request (nothing runs: only the constructor)
        built = build_attack(
            name, norm=entry.norms[0], seed=0, **{**base, large[0]: 200_000}, allow_large=True
        )
        assert built.attack.params()["allow_large"] is True


@pytest.mark.parametrize("name", NAMES)
def test_one_attack_object_serves_concurrent_calls(name, ctx):
    """Nothing per call is kept on the attack object (Square and HopSkipJump used to pass
    their query counts through an instance attribute)."""
    from concurrent.futures import ThreadPoolExecutor

    attack, model, x, y, _, eps = setup(name, ctx)
    _, model2, *_ = setup(name, ctx)
    halves = [(model, x[:4], y[:4]), (model2, x[4:], y[4:])]
    alone = [attack.run(m, xs, ys, eps) for m, xs, ys in halves]
    with ThreadPoolExecutor(2) as pool:
        together = list(pool.map(lambda h: attack.run(h[0], h[1], h[2], eps), halves))
    for a, b in zip(alone, together, strict=True):
        assert torch.equal(a.x_adv, b.x_adv) and torch.equal(a.success, b.success)
        if a.queries is not None:
            assert torch.equal(a.queries, b.queries)
