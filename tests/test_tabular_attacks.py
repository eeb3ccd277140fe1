"""Tabular attacks under feature constraints: schema, ConstrainedPGD, ConstrainedSearch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.ensemble import GradientBoostingClassifier

from advguard.attacks.base import AttackResult
from advguard.attacks.norms import norm_of
from advguard.attacks.tabular import (
    ConstrainedPGD,
    ConstrainedSearch,
    FeatureSchema,
    tabular_metrics,
)
from advguard.attacks.tabular._common import enforce_schema
from advguard.data import load_builtin, load_tabular
from advguard.errors import InputError
from advguard.models import Normalize, SklearnClassifier, TorchClassifier
from advguard.models.fit import fit
from advguard.models.zoo import mlp

BC_IMMUTABLE = ["mean radius", "mean perimeter", "mean area", "worst radius", "worst area"]
BC_MONOTONE = "worst concave points"

CREDIT_YAML = """
name: credit
description: synthetic credit table
features:
  - {name: age, type: integer, low: 0, high: 10, immutable: true}
  - {name: n_accounts, type: integer, low: 0, high: 10}
  - {name: has_card, type: binary}
  - {name: income, low: 0, high: 10, cost: 2}
  - {name: debt, low: 0, high: 10}
  - {name: balance, low: 0, high: 10, monotone: increase}
  - {name: job=a}
  - {name: job=b}
  - {name: job=c}
one_hot_groups:
  - {name: job, features: [job=a, job=b, job=c]}
relations:
  - {name: debt_vs_income, coef: {debt: 1, income: -1}, op: "<=", rhs: 3}
"""


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def bc():
    ds = load_builtin("breast_cancer")
    train, test = ds.split(0.25, seed=0)
    return ds, train, test


@pytest.fixture(scope="module")
def bc_schema(bc):
    ds, _, _ = bc
    return FeatureSchema.from_dataset(ds, immutable=BC_IMMUTABLE, monotone_increasing=[BC_MONOTONE])


@pytest.fixture(scope="module")
def bc_mlp_module(bc):
    _, train, _ = bc
    torch.manual_seed(0)  # the MLP's initial weights
    return fit(mlp((30,), 2, hidden=(32,)), train.x, train.y, epochs=40, lr=3e-3, seed=0)


@pytest.fixture()
def bc_mlp(bc_mlp_module):
    return TorchClassifier(bc_mlp_module, input_shape=(30,), num_classes=2)


@pytest.fixture(scope="module")
def bc_gb(bc):
    _, train, _ = bc
    return GradientBoostingClassifier(n_estimators=50, max_depth=3, random_state=0).fit(
        train.x, train.y
    )


def correct(model, x, y, n):
    ok = model.predict(x) == y
    return torch.tensor(x[ok][:n]), torch.tensor(y[ok][:n])


@pytest.fixture(scope="module")
def credit(tmp_path_factory):
    """A synthetic credit table with integer, binary, one-hot and a linear relation."""
    import pandas as pd

    rng = np.random.default_rng(0)
    n = 1500
    age = rng.integers(0, 11, n)
    n_acc = rng.integers(0, 11, n)
    card = rng.integers(0, 2, n)
    income = rng.uniform(0, 10, n).round(3)
    debt = np.minimum(rng.uniform(0, 10, n), income + 3).round(3)
    balance = rng.uniform(0, 10, n).round(3)
    job = rng.choice(["a", "b", "c"], n)
    score = (
        0.25 * (n_acc - 5)
        + 0.8 * (card - 0.5)
        + 0.35 * (income - 5)
        - 0.35 * (debt - 4)
        + 0.2 * (balance - 5)
        + np.select([job == "a", job == "b"], [-1.0, 0.3], 0.7)
        + 0.1 * (age - 5)
    )
    label = (score + rng.normal(0, 0.3, n) > 0).astype(int)
    df = pd.DataFrame(
        {
            "age": age,
            "n_accounts": n_acc,
            "has_card": card,
            "income": income,
            "debt": debt,
            "balance": balance,
            "job": job,
            "label": label,
        }
    )
    path = tmp_path_factory.mktemp("credit") / "credit.csv"
    df.to_csv(path, index=False)
    ds = load_tabular(path, "label", feature_types={"age": "integer", "n_accounts": "integer"})
    schema = FeatureSchema.from_yaml(CREDIT_YAML)
    assert schema.feature_names == ds.feature_names
    train, test = ds.split(0.25, seed=0)
    x = torch.tensor(train.x)
    torch.manual_seed(0)  # the MLP's initial weights
    module = fit(
        mlp((9,), 2, hidden=(32,)),
        train.x,
        train.y,
        epochs=30,
        lr=3e-3,
        seed=0,
        preprocess=Normalize(x.mean(0), x.std(0)),
    )
    model = TorchClassifier(
        module,
        input_shape=(9,),
        num_classes=2,
        bounds=ds.bounds,
        preprocess=Normalize(x.mean(0), x.std(0)),
    )
    return ds, train, test, schema, model


def assert_valid_everywhere(schema, x, x_adv, eps, norm):
    """The invariants, row by row, without relying on validate_rows alone."""
    c = schema.compiled
    x0, xa = x.numpy().astype(np.float64), x_adv.numpy().astype(np.float64)
    ok = schema.validate_rows(x, x_adv, epsilon=eps, norm=norm)
    bad = np.flatnonzero(~ok)
    assert ok.all(), schema.violations(x[bad[:3]], x_adv[bad[:3]], epsilon=eps, norm=norm)
    assert np.array_equal(xa[:, c.immutable], x0[:, c.immutable])  # exactly
    assert (xa[:, c.mono > 0] >= x0[:, c.mono > 0]).all()
    assert (xa[:, c.mono < 0] <= x0[:, c.mono < 0]).all()
    assert np.array_equal(xa[:, c.integer], np.round(xa[:, c.integer]))
    assert np.isin(xa[:, c.binary], (0.0, 1.0)).all()
    for cols in c.groups:
        assert np.isin(xa[:, cols], (0.0, 1.0)).all() and (xa[:, cols].sum(1) == 1).all()
    changed = xa != x0
    lo, hi = np.minimum(c.low, x0), np.maximum(c.high, x0)
    assert ((xa >= lo - 1e-6) | ~changed).all() and ((xa <= hi + 1e-6) | ~changed).all()
    assert norm_of(x_adv - x, norm).max() <= eps * (1 + 1e-5) + 1e-6


# ------------------------------------------------------------------------------ schema
def test_schema_from_dataset(bc, bc_schema):
    ds, _, _ = bc
    s = bc_schema
    assert s.n_features == 30 and s.feature_names == ds.feature_names
    by = {f.name: f for f in s.features}
    assert all(by[n].immutable for n in BC_IMMUTABLE)
    assert by[BC_MONOTONE].monotone == "increase"
    assert by["mean texture"].low == 0.0 and by["mean texture"].high == 1.0
    assert s.compiled.immutable.sum() == len(BC_IMMUTABLE)
    with pytest.raises(InputError, match="did you mean 'mean radius'"):
        FeatureSchema.from_dataset(ds, immutable=["mean radus"])
    with pytest.raises(InputError, match="both monotone"):
        FeatureSchema.from_dataset(ds, monotone_increasing=[3], monotone_decreasing=[3])


def test_schema_from_tabular_dataset_uses_encoding(credit):
    ds = credit[0]
    s = FeatureSchema.from_dataset(
        ds,
        immutable=["age"],
        monotone_increasing=["balance"],
        relations=[{"coef": {"debt": 1, "income": -1}, "op": "<=", "rhs": 3}],
    )
    c = s.compiled
    assert s.one_hot_groups[0].name == "job"
    assert s.one_hot_groups[0].features == ["job=a", "job=b", "job=c"]
    assert c.categorical.sum() == 3
    assert c.integer[[0, 1]].all() and c.binary[2]
    # the data itself fits the schema
    assert not any(s.check_data(ds.x))


def test_schema_from_yaml_file_and_round_trip(tmp_path):
    p = tmp_path / "credit.yaml"
    p.write_text(CREDIT_YAML)
    s = FeatureSchema.load(p)
    c = s.compiled
    assert s.name == "credit" and s.n_features == 9
    assert c.integer.tolist()[:2] == [True, True] and c.binary[2]
    assert c.immutable[0] and c.mono[5] == 1 and c.cost[3] == 2
    assert c.groups[0].tolist() == [6, 7, 8]
    assert s.relations[0].op == "<=" and s.relations[0].rhs == 3
    assert FeatureSchema.from_yaml(s.to_yaml()) == s
    # features may also be a mapping in column order
    m = FeatureSchema.from_yaml("features:\n  a: {immutable: true}\n  b:\n")
    assert m.feature_names == ["a", "b"] and m.features[0].immutable


VALID0 = [5, 3, 0, 6.0, 4.0, 2.0, 1, 0, 0]


@pytest.mark.parametrize(
    ("kind", "change", "message"),
    [
        ("immutable", {0: 6}, "'age' is immutable"),
        ("monotone", {5: 1.5}, "'balance' may only increase"),
        ("integer", {1: 3.5}, "'n_accounts' must be a whole number"),
        ("binary", {2: 0.5}, "'has_card' must be 0 or 1"),
        ("bounds", {4: -1.0}, "'debt' = -1 is outside its bounds"),
        ("one_hot", {6: 0, 7: 0}, "one-hot group 'job' is not one-hot"),
        ("one_hot_two", {7: 1}, "one-hot group 'job' is not one-hot"),
        ("relation", {4: 9.5}, "relation debt_vs_income"),
        ("nan", {3: float("nan")}, "not a finite number"),
    ],
)
def test_validate_rows_catches_each_violation(kind, change, message):
    s = FeatureSchema.from_yaml(CREDIT_YAML)
    x0 = np.array([VALID0], dtype=np.float32)
    xa = x0.copy()
    for j, v in change.items():
        xa[0, j] = v
    assert not s.validate_rows(x0, xa)[0], kind
    (reasons,) = s.violations(x0, xa)
    assert any(message in r for r in reasons), reasons
    # a valid change of the same row passes
    good = x0.copy()
    good[0, [1, 3, 5]] = [4, 7.0, 2.5]
    good[0, 6:] = [0, 0, 1]
    assert s.validate_rows(x0, good)[0]
    assert s.violations(x0, good) == [[]]


def test_validate_rows_epsilon_and_unchanged_rows():
    s = FeatureSchema.from_yaml(CREDIT_YAML)
    x0 = np.array([VALID0], dtype=np.float32)
    xa = x0.copy()
    xa[0, 3] = 8.0  # income +2
    assert s.validate_rows(x0, xa, epsilon=2.0)[0]
    assert not s.validate_rows(x0, xa, epsilon=1.0)[0]
    assert "exceeds epsilon" in s.violations(x0, xa, epsilon=1.0)[0][-1]
    # an unchanged row is valid even if the original breaks the schema
    odd = x0.copy()
    odd[0, 4] = 12.0  # debt above its bound and the relation
    assert s.validate_rows(odd, odd)[0]
    assert s.check_data(odd)[0]


@pytest.mark.parametrize(("norm", "eps"), [("linf", 2.0), ("l2", 3.0), ("l1", 4.0), ("linf", 0.5)])
def test_repair_returns_valid_rows(credit, norm, eps):
    _, _, test, s, _ = credit
    x0 = test.x[:100]
    rng = np.random.default_rng(1)
    cand = (x0 + rng.normal(0, 2.0, x0.shape)).astype(np.float32)
    rep, ok = s.repair(x0, cand, epsilon=eps, norm=norm, clip=(0.0, 10.0))
    assert rep.dtype == np.float32 and rep.shape == x0.shape
    assert s.validate_rows(x0, rep, epsilon=eps, norm=norm).all()
    assert ok.mean() > 0.9  # the repair fixes, it does not just revert
    assert (rep != x0).any(1).mean() > 0.5
    assert_valid_everywhere(s, torch.tensor(x0), torch.tensor(rep), eps, norm)


def test_repair_moves_continuous_features_to_satisfy_relation():
    s = FeatureSchema.from_yaml(CREDIT_YAML)
    x0 = torch.tensor([VALID0])
    cand = x0.clone()
    cand[0, 4] = 9.5  # debt - income = 3.5 > 3
    rep, ok = s.repair(x0, cand)
    assert isinstance(rep, torch.Tensor) and ok.all()
    assert float(rep[0, 4] - rep[0, 3]) <= 3 + 1e-5
    assert rep[0, 4] > x0[0, 4]  # kept part of the change


BAD_YAML = [
    ("features:\n  - {name: a, monotone: sideways}\n  - {name: b}\n", "features.0.monotone"),
    ("features:\n  - {name: a, colour: red}\n", "features.0.colour"),
    ("features:\n  - {name: a, type: float}\n", "features.0.type"),
    ("features:\n  - {name: a, low: 2, high: 1}\n", "features.0.low"),
    ("features:\n  - {name: a, cost: -1}\n", "features.0.cost"),
    ("features:\n  - {name: a}\n  - {name: a}\n", "features.1.name"),
    ("features:\n  - {name: a}\nrelations:\n  - {coef: {b: 1}, rhs: 0}\n", "relations.0.coef"),
    ("features:\n  - {name: a}\nrelations:\n  - {coef: {a: 1}, op: '<'}\n", "relations.0.op"),
    (
        "features:\n  - {name: a}\n  - {name: b}\n"
        "one_hot_groups:\n  - {name: g, features: [a, c]}\n",
        "one_hot_groups.0.features.1",
    ),
    ("features:\n  - {name: a, type: categorical}\n", "features.0.type"),
    ("features:\n  - {name: a, immutable: true, monotone: up}\n", "features.0.monotone"),
    ("name: x\n", "features"),
    ("- a\n- b\n", "YAML mapping"),
    ("features: [\n", "not valid YAML"),
]


@pytest.mark.parametrize(("text", "field"), BAD_YAML)
def test_bad_schema_yaml_raises_input_error_naming_the_field(text, field):
    with pytest.raises(InputError, match=r"line|YAML") as e:
        FeatureSchema.from_yaml(text, "bad.yaml")
    assert field in str(e.value) and "bad.yaml" in str(e.value)


def test_missing_schema_file(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        FeatureSchema.load(tmp_path / "nope.yaml")
    with pytest.raises(InputError, match="does not exist"):
        ConstrainedPGD(str(tmp_path / "nope.yaml"))


# ----------------------------------------------------------------------- ConstrainedPGD
def test_constrained_pgd_evades_mlp_with_only_valid_rows(bc, bc_schema, bc_mlp):
    _, _, test = bc
    x, y = correct(bc_mlp, test.x, test.y, 120)
    eps = 0.1
    res = ConstrainedPGD(bc_schema, steps=30)(bc_mlp, x, y, epsilon=eps)
    rate = res.success.float().mean().item()
    assert rate >= 0.5, f"constrained PGD evaded only {rate:.2f} at eps {eps}"
    assert_valid_everywhere(bc_schema, x, res.x_adv, eps, "linf")
    assert res.info["schema_valid"] == len(x)
    pred = torch.as_tensor(bc_mlp.predict(res.x_adv))
    assert torch.equal(res.success, pred != y)
    assert res.gradient_evals > 0


def test_constrained_pgd_discrete_features(credit):
    _, _, test, schema, model = credit
    x, y = correct(model, test.x, test.y, 150)
    eps = 2.0
    res = ConstrainedPGD(schema, steps=30, loss="margin")(model, x, y, epsilon=eps)
    rate = res.success.float().mean().item()
    assert rate >= 0.6, rate
    assert_valid_everywhere(schema, x, res.x_adv, eps, "linf")
    c = schema.compiled
    d = (res.x_adv != x).numpy()
    # the attack does use the discrete features (so the invariants above mean something)
    assert d[:, c.integer & ~c.immutable].any()
    assert d[:, c.categorical].any()
    assert d[:, c.binary].any()
    pred = torch.as_tensor(model.predict(res.x_adv))
    assert torch.equal(res.success, pred != y)


def test_constrained_pgd_l2_and_targeted(credit):
    _, _, test, schema, model = credit
    x, y = correct(model, test.x, test.y, 80)
    res = ConstrainedPGD(schema, norm="l2", steps=20)(model, x, y, epsilon=3.0)
    assert res.success.float().mean() > 0.4
    assert_valid_everywhere(schema, x, res.x_adv, 3.0, "l2")
    t = 1 - y
    res_t = ConstrainedPGD(schema, steps=20)(model, x, y, epsilon=2.0, targets=t)
    assert_valid_everywhere(schema, x, res_t.x_adv, 2.0, "linf")
    assert torch.equal(res_t.success, torch.as_tensor(model.predict(res_t.x_adv)) == t)


def test_final_clip_can_never_return_an_invalid_row(credit):
    _, _, test, schema, _ = credit
    x = torch.tensor(test.x[:4])
    bad = x.clone()
    bad[0, 1] += 0.5  # non-integer
    bad[1, 0] += 1  # immutable
    good = x.clone()
    good[2, 3] = min(float(x[2, 3]) + 1, 10.0)
    bad[2] = good[2]
    res = AttackResult(
        x_adv=bad,
        success=torch.tensor([True, True, True, False]),
        raw=bad,
        attacked=torch.tensor([True, True, True, True]),
    )
    out = enforce_schema(schema, x, res, 2.0, "linf")
    assert torch.equal(out.x_adv[:2], x[:2]) and torch.equal(out.x_adv[2], good[2])
    assert out.success.tolist() == [False, False, True, False]
    assert out.info["reverted_after_clip"] == 2


def test_constrained_pgd_input_checks(bc_schema, bc_mlp):
    image_model = TorchClassifier(
        torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)),
        input_shape=(1, 8, 8),
        num_classes=10,
    )
    with pytest.raises(InputError, match="steps"):
        ConstrainedPGD(bc_schema, steps=0)
    with pytest.raises(InputError, match="loss"):
        ConstrainedPGD(bc_schema, loss="dlr")
    with pytest.raises(InputError, match="not supported"):
        ConstrainedPGD(bc_schema, norm="l1")
    with pytest.raises(InputError, match="schema"):
        ConstrainedPGD(42)  # type: ignore[arg-type]
    with pytest.raises(InputError, match=r"input_shape"):
        ConstrainedPGD(bc_schema)(
            image_model, torch.zeros(2, 1, 8, 8), torch.zeros(2).long(), epsilon=0.1
        )
    small = FeatureSchema.from_yaml("features:\n  - {name: a}\n  - {name: b}\n")
    with pytest.raises(InputError, match="describes 2 features"):
        ConstrainedPGD(small)(bc_mlp, torch.zeros(2, 30), torch.zeros(2).long(), epsilon=0.1)


# -------------------------------------------------------------------- ConstrainedSearch
def test_constrained_search_gradient_boosting(bc, bc_schema, bc_gb):
    _, _, test = bc
    model = SklearnClassifier(bc_gb)
    x, y = correct(model, test.x, test.y, 60)
    budget = 150
    # two already-misclassified rows are skipped (queries 0)
    wrong = torch.tensor(test.x[model.predict(test.x) != test.y][:2])
    x = torch.cat([x, wrong])
    y = torch.cat([y, torch.as_tensor(1 - model.predict(wrong))])
    res = ConstrainedSearch(bc_schema, max_queries=budget)(model, x, y, epsilon=0.15)
    assert res.queries is not None and res.queries.dtype == torch.long
    assert int(res.queries.max()) <= budget
    assert (res.queries[res.attacked] >= 1).all() and (res.queries[~res.attacked] == 0).all()
    assert (~res.attacked).sum() == len(wrong)
    rate = res.success[res.attacked].float().mean().item()
    assert rate >= 0.5, rate
    assert_valid_everywhere(bc_schema, x, res.x_adv, 0.15, "linf")
    assert torch.equal(res.success, torch.as_tensor(model.predict(res.x_adv)) != y)
    # the black-box search changes few features
    m = tabular_metrics(bc_schema, x, res.x_adv, res.success)
    assert m["features_changed_median"] <= 12


def test_constrained_search_discrete_and_budget(credit):
    ds, train, test, schema, _ = credit
    gb = GradientBoostingClassifier(n_estimators=30, max_depth=3, random_state=0)
    model = SklearnClassifier(gb.fit(train.x, train.y), bounds=ds.bounds)
    x, y = correct(model, test.x, test.y, 60)
    res = ConstrainedSearch(schema, norm="l2", max_queries=40)(model, x, y, epsilon=3.0)
    assert int(res.queries.max()) <= 40
    assert res.success.float().mean() > 0.4
    assert_valid_everywhere(schema, x, res.x_adv, 3.0, "l2")
    # determinism per seed
    again = ConstrainedSearch(schema, norm="l2", max_queries=40)(model, x, y, epsilon=3.0)
    assert torch.equal(again.x_adv, res.x_adv) and torch.equal(again.queries, res.queries)


def test_constrained_search_input_checks(bc_schema):
    with pytest.raises(InputError, match="max_queries"):
        ConstrainedSearch(bc_schema, max_queries=0)
    with pytest.raises(InputError, match="init_scale"):
        ConstrainedSearch(bc_schema, init_scale=2.0)
    assert ConstrainedSearch.needs_gradients is False
    p = ConstrainedSearch(bc_schema).params()
    assert p["schema"]["name"] == bc_schema.name and p["max_queries"] == 500


# ------------------------------------------------------------------------------ metrics
def test_tabular_metrics_counts_and_cost():
    s = FeatureSchema.from_yaml(CREDIT_YAML)
    x = torch.tensor([VALID0, VALID0, VALID0])
    xa = x.clone()
    xa[0, 3] = 7.0  # income +1, cost 2
    xa[0, 6:] = torch.tensor([0.0, 1.0, 0.0])  # job switch: one change, cost 1
    xa[1, 1] = 5  # n_accounts +2
    m = tabular_metrics(s, x, xa, torch.tensor([True, True, False]))
    assert m["n"] == 3 and m["n_success"] == 2 and m["evasion_rate"] == pytest.approx(2 / 3)
    assert m["valid_rate"] == 1.0
    assert m["features_changed_mean"] == 1.5 and m["features_changed_median"] == 1.5
    assert m["cost_mean"] == pytest.approx((3.0 + 2.0) / 2)
    names = {d["feature"]: d for d in m["most_changed"]}
    assert set(names) == {"income", "job", "n_accounts"}
    assert names["job"]["share_of_rows"] == 0.5
    none = tabular_metrics(s, x, x, torch.zeros(3, dtype=torch.bool))
    assert none["evasion_rate"] == 0 and none["features_changed_mean"] is None


def test_constrained_pgd_in_a_threat_model(tmp_path):
    """The runner accepts a schema file next to the threat model and reports valid rows only."""
    from advguard.data import load_builtin
    from advguard.evaluate import evaluate, load_threat_model
    from advguard.models import TorchClassifier
    from advguard.models.fit import fit
    from advguard.models.zoo import mlp

    d = load_builtin("breast_cancer")
    schema = FeatureSchema.from_dataset(d, immutable=list(d.feature_names[:5]))
    (tmp_path / "schema.yaml").write_text(schema.to_yaml())
    (tmp_path / "tm.yaml").write_text(
        "norm: linf\nepsilons: [0.1]\nsamples: 80\nsanity_checks: false\n"
        "attacks:\n  - attack: constrained-pgd\n    schema: schema.yaml\n    steps: 20\n"
    )
    module = fit(mlp(d.input_shape, 2), d.x, d.y, epochs=30, seed=0)
    model = TorchClassifier(module, input_shape=d.input_shape, num_classes=2)
    rep = evaluate(model, d.x, d.y, load_threat_model(tmp_path / "tm.yaml"))
    r = rep.results[0]
    assert r.robust_accuracy.value < rep.clean_accuracy.value - 0.2
    assert rep.suite[0].attack == "constrained-pgd"
