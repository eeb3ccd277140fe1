"""Transfer attacks: surrogates trained from the target's answers fool a black-box target."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from sklearn.linear_model import LogisticRegression

from advguard.attacks import PGD
from advguard.attacks.norms import norm_of
from advguard.attacks.transfer import EnsembleClassifier, TransferAttack, train_surrogate
from advguard.errors import InputError
from advguard.models import SklearnClassifier, TorchClassifier

EPS = 0.2


def _in_ball_and_bounds(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> None:
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    assert float(norm_of(x_adv - x, "linf").max()) <= eps * (1 + 1e-5) + 1e-6


@pytest.fixture(scope="module")
def cnn_surrogate(digits_split, digits_module):
    """A small-CNN surrogate of the digits CNN, labelled by the CNN under a 600-query budget."""
    x_tr = digits_split[0]
    target = TorchClassifier(digits_module, input_shape=(1, 8, 8), num_classes=10)
    surrogate, info = train_surrogate(x_tr, target=target, query_budget=600, epochs=10, seed=1)
    return surrogate, info, target.queries.forward


@pytest.fixture(scope="module")
def sk_target(digits_split):
    """Black-box target: logistic regression on flattened pixels, kept as (1, 8, 8) images."""
    x_tr, y_tr, x_te, y_te = digits_split
    lr = LogisticRegression(max_iter=1000).fit(x_tr.reshape(len(x_tr), -1), y_tr)
    model = SklearnClassifier(lr, input_shape=(1, 8, 8), bounds=(0.0, 1.0))
    ok = model.predict(x_te) == y_te
    return model, torch.tensor(x_te[ok][:150]), torch.tensor(y_te[ok][:150])


@pytest.fixture(scope="module")
def train_npz(digits_split, tmp_path_factory):
    """The training split as a file: the attacker's data, disjoint from the evaluation samples."""
    x_tr, y_tr, _, _ = digits_split
    path = tmp_path_factory.mktemp("data") / "public.npz"
    np.savez(path, x=x_tr, y=y_tr)
    return str(path)


def test_train_surrogate_from_target_answers_within_budget(cnn_surrogate, digits_split):
    surrogate, info, spent = cnn_surrogate
    assert spent == 600 == info["target_queries"] == info["samples_used"]
    assert info["labels"] == "target" and info["truncated_to_budget"]
    assert info["architecture"] == "small_cnn"  # auto: (1, 8, 8) images
    assert any("first 600 of 1400" in n for n in info["notes"])
    assert info["train_samples"] + info["holdout_samples"] == 600
    assert info["agreement"] > 0.85
    assert isinstance(surrogate, TorchClassifier) and surrogate.queries.forward == 0

    # a budget larger than the data: every sample is labelled once, never more
    x_tr = digits_split[0][:300]
    target = SklearnClassifier(
        LogisticRegression(max_iter=300).fit(x_tr.reshape(300, -1), digits_split[1][:300]),
        input_shape=(1, 8, 8),
    )
    _, info2 = train_surrogate(x_tr, target=target, query_budget=1000, architecture="mlp", epochs=5)
    assert target.queries.forward == info2["target_queries"] == min(1000, 300)
    assert not info2["truncated_to_budget"] and info2["architecture"] == "mlp"


def test_transfer_fools_cnn_but_less_than_white_box(cnn_surrogate, digits_model, digits_eval):
    surrogate = cnn_surrogate[0]
    x, y = digits_eval
    res = TransferAttack(surrogates=[surrogate], base_params={"steps": 10})(
        digits_model, x, y, epsilon=EPS
    )
    _in_ball_and_bounds(res.x_adv, x, EPS)
    pred = torch.as_tensor(digits_model.predict(res.x_adv))
    assert torch.equal(res.success, pred != y)
    transfer = res.success.float().mean().item()
    white = PGD(steps=10)(digits_model, x, y, epsilon=EPS).success.float().mean().item()
    assert transfer > 0.6, f"transfer fooled only {transfer:.0%} of the CNN"
    assert white >= transfer
    # the target is only queried: clean check + success check, no gradients
    assert res.gradient_evals == 0
    assert res.forward_evals == len(x) + int(res.attacked.sum())
    assert res.queries is not None and int(res.queries.sum()) == res.forward_evals
    assert res.info["surrogate_success"] > 0.9
    assert res.info["target_success"] == pytest.approx(transfer)
    assert 0.6 < res.info["transfer_rate"] <= 1.0


def test_transfer_full_steps_beat_early_stop(cnn_surrogate, digits_model, digits_eval):
    surrogate = cnn_surrogate[0]
    x, y = digits_eval[0][:100], digits_eval[1][:100]
    full = TransferAttack(surrogates=[surrogate], base_params={"steps": 10})
    early = TransferAttack(surrogates=[surrogate], base_params={"steps": 10}, early_stop=True)
    r_full = full(digits_model, x, y, epsilon=EPS)
    r_early = early(digits_model, x, y, epsilon=EPS)
    assert r_early.info["base_early_stop"] and not r_full.info["base_early_stop"]
    assert r_full.success.float().mean() > r_early.success.float().mean()


def test_targeted_transfer(cnn_surrogate, digits_model, digits_eval):
    x, y = digits_eval[0][:100], digits_eval[1][:100]
    t = (y + 1) % 10
    res = TransferAttack(surrogates=cnn_surrogate[0], base_params={"steps": 10})(
        digits_model, x, y, epsilon=0.3, targets=t
    )
    pred = torch.as_tensor(digits_model.predict(res.x_adv))
    assert torch.equal(res.success, pred == t)
    assert res.success.float().mean() > 0.3
    _in_ball_and_bounds(res.x_adv, x, 0.3)


def test_lazy_spec_from_threat_model_params_on_sklearn_target(sk_target, train_npz):
    model, x, y = sk_target
    spec = yaml.safe_load(
        f"""
        surrogate_data: {train_npz}
        labels: target
        query_budget: 500
        architecture: small_cnn
        epochs: 10
        base: pgd
        base_params: {{steps: 10}}
        """
    )
    attack = TransferAttack(norm="linf", seed=0, **spec)
    assert attack.surrogate is None  # trained on first use
    clean = model.accuracy(x, y)
    q0 = model.queries.forward
    res = attack(model, x, y, epsilon=EPS)
    spent = res.info["surrogate_training_queries"]
    assert spent == res.info["surrogate_training_queries_this_call"] == min(500, 1400)
    assert res.forward_evals == model.queries.forward - q0 == spent + len(x) + len(x)
    assert res.info["surrogate_agreement"] > 0.8
    robust = 1.0 - res.success.float().mean().item()
    assert robust < clean - 0.4, f"accuracy only fell from {clean:.2f} to {robust:.2f}"
    _in_ball_and_bounds(res.x_adv, x, EPS)
    assert torch.equal(res.success, torch.as_tensor(model.predict(res.x_adv)) != y)
    # second call (next batch / epsilon): surrogates are cached, no more training queries
    res2 = attack(model, x[:20], y[:20], epsilon=0.1)
    assert res2.info["surrogate_training_queries_this_call"] == 0
    assert res2.forward_evals == 20 + int(res2.attacked.sum())
    assert attack.params()["surrogate_data"] == train_npz
    yaml.safe_dump(attack.params())  # plain data, fit for a report


def test_ensemble_of_two_surrogates(digits_model, digits_eval, train_npz):
    x, y = digits_eval[0][:100], digits_eval[1][:100]
    attack = TransferAttack(
        surrogate_data=train_npz,
        labels="target",
        query_budget=400,
        ensemble=2,
        architecture="mlp",
        epochs=20,
        base_params={"steps": 10},
    )
    res = attack(digits_model, x, y, epsilon=EPS)
    assert res.info["surrogates"] == 2
    # the data is labelled once for the whole ensemble
    assert res.info["surrogate_training_queries"] == 400
    assert len(res.info["surrogate"]["member_agreement"]) == 2
    assert res.success.float().mean() > 0.5
    _in_ball_and_bounds(res.x_adv, x, EPS)

    # the ensemble averages its members (gradients included)
    ens = attack.surrogate
    assert isinstance(ens, EnsembleClassifier)
    a, b = ens.members
    xs = x[:8]
    z = ens.logits(xs)
    assert torch.allclose(z, (a.logits(xs) + b.logits(xs)) / 2, atol=1e-5)

    def loss_fn(logits):
        return torch.nn.functional.cross_entropy(logits, y[:8], reduction="none")

    _, _, g = ens.value_and_grad(xs, loss_fn)
    xg = xs.clone().requires_grad_(True)
    loss = loss_fn((a.forward(xg) + b.forward(xg)) / 2).sum()
    (g_ref,) = torch.autograd.grad(loss, xg)
    assert torch.allclose(g, g_ref, atol=1e-5)


def test_labels_from_data_and_determinism(digits_model, digits_eval, train_npz):
    x, y = digits_eval[0][:60], digits_eval[1][:60]

    def run(seed):
        attack = TransferAttack(
            surrogate_data=train_npz,
            labels="data",
            architecture="mlp",
            epochs=10,
            base_params={"steps": 5},
            seed=seed,
        )
        return attack(digits_model, x, y, epsilon=EPS)

    r1, r2, r3 = run(0), run(0), run(1)
    assert torch.equal(r1.x_adv, r2.x_adv) and torch.equal(r1.success, r2.success)
    assert not torch.equal(r1.x_adv, r3.x_adv)
    info = r1.info["surrogate"]
    # labels from the data: the target answers only the agreement questions on the holdout
    assert info["labels"] == "data" and info["target_queries_labels"] == 0
    assert info["target_queries"] == info["holdout_samples"] == round(0.2 * 1400)


def test_mismatched_surrogate_is_refused(cnn_surrogate, digits_split, digits_model, sk_target):
    surrogate = cnn_surrogate[0]
    x_tr, y_tr = digits_split[0], digits_split[1]
    flat_target = SklearnClassifier(sk_target[0].estimator)  # input_shape (64,)
    x = torch.tensor(x_tr[:5])
    with pytest.raises(InputError, match="does not take the target's inputs"):
        TransferAttack(surrogates=[surrogate])(flat_target, x.reshape(5, 64), y_tr[:5], epsilon=0.1)
    with pytest.raises(InputError, match="input_shape"):
        train_surrogate(x_tr, target=flat_target, query_budget=50)
    with pytest.raises(InputError, match="shape"):
        TransferAttack(surrogate_data="breast_cancer", architecture="mlp")(
            digits_model, x, y_tr[:5], epsilon=0.1
        )
    # an ensemble of surrogates with different input specs
    other = TorchClassifier(torch.nn.Sequential(torch.nn.Linear(64, 10)), input_shape=(64,),
                            num_classes=10)  # fmt: skip
    with pytest.raises(InputError, match="member 1"):
        EnsembleClassifier([surrogate, other])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "either surrogates"),
        ({"surrogate_data": "digits", "surrogates": ["x"]}, "either surrogates"),
        ({"surrogate_data": "digits", "base": "nope"}, "unknown base attack"),
        ({"surrogate_data": "digits", "base": "transfer"}, "base attack"),
        ({"surrogate_data": "digits", "labels": "oracle"}, "labels"),
        ({"surrogate_data": "digits", "query_budget": 5}, "query_budget"),
        ({"surrogate_data": "digits", "query_budget": 100.5}, "query_budget"),
        ({"surrogate_data": "digits", "ensemble": 0}, "ensemble"),
        ({"surrogate_data": "digits", "architecture": "resnet"}, "architecture"),
        ({"surrogate_data": "digits", "epochs": 0}, "epochs"),
        ({"surrogate_data": "digits", "norm": "l1", "base": "apgd-ce"}, "norm"),
        ({"surrogate_data": "digits", "base_params": {"steps": 0}}, "steps"),
        ({"surrogate_data": "digits", "base_params": {"bogus": 1}}, "base_params"),
        ({"surrogate_data": "digits", "base_params": {"norm": "l2"}}, "norm or seed"),
        ({"surrogate_data": "digits", "holdout": 0.9}, "holdout"),
        ({"surrogate_data": 42}, "surrogate_data"),
        ({"surrogates": [object()]}, "not white-box"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(InputError, match=match):
        TransferAttack(**kwargs)


def test_bad_surrogate_training_arguments(digits_split, digits_model):
    x_tr, y_tr = digits_split[0][:100], digits_split[1][:100]
    with pytest.raises(InputError, match="query_budget"):
        train_surrogate(x_tr, target=digits_model, query_budget=9)
    with pytest.raises(InputError, match="labels y or a target"):
        train_surrogate(x_tr, bounds=(0, 1))
    with pytest.raises(InputError, match="bounds"):
        train_surrogate(x_tr, y_tr, num_classes=10)
    with pytest.raises(InputError, match="bounds"):
        train_surrogate(x_tr, target=digits_model, bounds=(0, 255))
    with pytest.raises(InputError, match="at least 10"):
        train_surrogate(x_tr[:5], target=digits_model)
    with pytest.raises(InputError, match="small_cnn"):
        train_surrogate(x_tr.reshape(100, 64), y_tr, bounds=(0, 1), architecture="small_cnn")
    assert digits_model.queries.forward == 0  # every refusal came before any query
    with pytest.raises(InputError, match="needs an epsilon"):
        TransferAttack(surrogate_data="digits")(digits_model, x_tr[:4], y_tr[:4])
