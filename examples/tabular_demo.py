"""Tabular attacks under feature constraints on scikit-learn's breast cancer table.

The 30 features are min-max scaled to [0, 1] (``load_builtin``). We pretend an attacker
controls the measurements except the six size features (radius, perimeter, area: they are
immutable), may only *increase* "worst concave points", and must keep the raw
"mean texture" at or below the raw "worst texture" (a linear relation; the worst value
is the mean of the three largest, so real rows always satisfy it).

- black box: a gradient-boosted ensemble attacked with ``ConstrainedSearch`` (queries only),
- white box: an MLP attacked with ``ConstrainedPGD``,

and, for contrast, plain PGD on the MLP, which ignores the schema. Every adversarial row
of the constrained attacks is checked against the schema. Runs in well under 30 s on CPU::

    python examples/tabular_demo.py
"""

from __future__ import annotations

import time

import numpy as np
import torch
from sklearn.ensemble import GradientBoostingClassifier

from advguard.attacks import PGD
from advguard.attacks.tabular import (
    ConstrainedPGD,
    ConstrainedSearch,
    FeatureSchema,
    tabular_metrics,
)
from advguard.data import load_builtin
from advguard.models import SklearnClassifier, TorchClassifier
from advguard.models.fit import fit
from advguard.models.zoo import mlp

torch.set_num_threads(1)

IMMUTABLE = [
    "mean radius",
    "mean perimeter",
    "mean area",
    "worst radius",
    "worst perimeter",
    "worst area",
]
MONOTONE_UP = ["worst concave points"]


def texture_relation(ds) -> dict:
    """raw(mean texture) <= raw(worst texture), written on the scaled features.

    raw = x * (max - min) + min per feature, so the relation stays linear:
    span_m * x_m - span_w * x_w <= min_w - min_m.
    """
    sc = ds.metadata["scaling"]
    lo, hi = np.array(sc["feature_min"]), np.array(sc["feature_max"])
    m, w = ds.feature_names.index("mean texture"), ds.feature_names.index("worst texture")
    return {
        "name": "mean_texture<=worst_texture",
        "coef": {"mean texture": hi[m] - lo[m], "worst texture": -(hi[w] - lo[w])},
        "op": "<=",
        "rhs": lo[w] - lo[m],
    }


def report(label, schema, x, res, eps, seconds) -> dict:
    ok = schema.validate_rows(x, res.x_adv, epsilon=eps, norm="linf")
    assert ok.all(), schema.violations(x[~ok][:3], res.x_adv[~ok][:3])
    m = tabular_metrics(schema, x, res.x_adv, res.success, attacked=res.attacked)
    line = f"{label:<26} eps {eps:<5g} evasion {m['evasion_rate']:6.1%}  valid {ok.mean():6.1%}"
    if m["n_success"]:
        line += (
            f"  changed/row {m['features_changed_mean']:4.1f} (median "
            f"{m['features_changed_median']:g})  cost {m['cost_mean']:.3f}"
        )
    if res.queries is not None:
        q = res.queries[res.attacked].float()
        line += f"  queries mean {q.mean():.0f} max {int(q.max())}"
    print(line + f"  [{seconds:.1f}s]")
    return m


def main() -> None:
    t_start = time.perf_counter()
    ds = load_builtin("breast_cancer")
    train, test = ds.split(0.3, seed=0)
    schema = FeatureSchema.from_dataset(
        ds,
        immutable=IMMUTABLE,
        monotone_increasing=MONOTONE_UP,
        costs={"worst concave points": 2.0, "worst concavity": 2.0},
        relations=[texture_relation(ds)],
        name="breast-cancer-demo",
    )
    assert not any(schema.check_data(ds.x)), "the data itself must fit the schema"
    print(
        f"schema {schema.name!r}: {schema.n_features} features, {len(IMMUTABLE)} immutable, "
        f"{len(MONOTONE_UP)} monotone, {len(schema.relations)} relation"
    )

    # -- black box: gradient boosting + ConstrainedSearch
    gb = GradientBoostingClassifier(n_estimators=100, max_depth=3, random_state=0)
    gbm = SklearnClassifier(gb.fit(train.x, train.y))
    ok = gbm.predict(test.x) == test.y
    x, y = torch.tensor(test.x[ok]), torch.tensor(test.y[ok])
    print(f"\ngradient boosting: clean accuracy {ok.mean():.1%}, attacking {len(x)} rows")
    for eps in (0.1, 0.2):
        t = time.perf_counter()
        res = ConstrainedSearch(schema, max_queries=300)(gbm, x, y, epsilon=eps)
        m = report("ConstrainedSearch (GB)", schema, x, res, eps, time.perf_counter() - t)
        assert int(res.queries.max()) <= 300
    top = ", ".join(f"{d['feature']} ({d['share_of_rows']:.0%})" for d in m["most_changed"][:3])
    print(f"  most changed at eps 0.2: {top}")

    # -- white box: MLP + ConstrainedPGD (and plain PGD for contrast)
    torch.manual_seed(0)  # the MLP's initial weights
    module = fit(mlp((30,), 2, hidden=(32,)), train.x, train.y, epochs=40, lr=3e-3, seed=0)
    net = TorchClassifier(module, input_shape=(30,), num_classes=2)
    ok = net.predict(test.x) == test.y
    x, y = torch.tensor(test.x[ok]), torch.tensor(test.y[ok])
    print(f"\nMLP: clean accuracy {ok.mean():.1%}, attacking {len(x)} rows")
    for eps in (0.05, 0.1, 0.2):
        t = time.perf_counter()
        res = ConstrainedPGD(schema, steps=50)(net, x, y, epsilon=eps)
        report("ConstrainedPGD (MLP)", schema, x, res, eps, time.perf_counter() - t)
        c = schema.compiled
        assert torch.equal(res.x_adv[:, c.immutable], x[:, c.immutable])
        assert (res.x_adv[:, c.mono > 0] >= x[:, c.mono > 0]).all()
        plain = PGD(steps=50)(net, x, y, epsilon=eps)
        valid = schema.validate_rows(x, plain.x_adv)
        fooled_valid = (plain.success.numpy() & valid).mean()
        rate = plain.success.float().mean()
        print(
            f"{'  plain PGD (no schema)':<26} eps {eps:<5g} evasion {rate:6.1%}"
            f"  valid {valid.mean():6.1%}  valid and evading {fooled_valid:6.1%}"
        )
    print(f"\ndone in {time.perf_counter() - t_start:.1f}s; every constrained row is valid")


if __name__ == "__main__":
    main()
