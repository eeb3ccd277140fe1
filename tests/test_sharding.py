"""Deterministic sharding: a sample's results depend on its index, never on its batch.

Every random draw is keyed by (seed, attack, epsilon, restart/step, sample index)
(``advguard.attacks.randomness``), so batch size, shard count and shard order change
nothing. Two models:

* ``exact_model``: a small MLP written with element-wise products and per-row sums, whose
  float results are the same for a sample whatever the batch. With it the whole report
  is bit-identical, which shows the attacks and the runner add no batch dependence.
* the digits CNN of ``conftest.py``: CPU GEMM/conv kernels round differently for different
  batch sizes (measured: a one-row linear layer differs from the same row in a batch of
  256 by ~1e-7; input gradients too), so the float fields (perturbation sizes of L2
  attacks, confidences) agree to ~1e-6 while every discrete outcome (robust set, which
  epsilon and attack fooled each sample, every count in the report) is identical.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from advguard.attacks.randomness import SampleRandom
from advguard.attacks.registry import build_attack
from advguard.errors import InputError
from advguard.evaluate.report import report_fields
from advguard.evaluate.runner import Evaluator
from advguard.evaluate.state import Records, merge_shards
from advguard.evaluate.threat_model import ThreatModel
from advguard.models import TorchClassifier
from batch_exact import train_exact_net

# -- the counter-based generator ---------------------------------------------------------


def test_draws_depend_on_sample_id_not_batch_position():
    ids = torch.tensor([5, 17, 3, 40, 2])
    rng = SampleRandom(7, ids).fork("pgd", 0.1)
    for draw in ("uniform", "normal", "sign"):
        whole = getattr(rng, draw)(("step", 3), (4, 6))
        assert whole.shape == (5, 4, 6)
        for i, sid in enumerate(ids.tolist()):
            alone = getattr(SampleRandom(7, [sid]).fork("pgd", 0.1), draw)(("step", 3), (4, 6))
            assert torch.equal(alone[0], whole[i])
        sub = rng.subset(torch.tensor([3, 0]))
        assert torch.equal(getattr(sub, draw)(("step", 3), (4, 6)), whole[[3, 0]])
    # other key, seed or stream: other numbers
    base = rng.uniform("a", (64,))
    assert not torch.equal(base, rng.uniform("b", (64,)))
    assert not torch.equal(base, SampleRandom(8, ids).fork("pgd", 0.1).uniform("a", (64,)))
    assert not torch.equal(base, rng.fork("restart", 1).uniform("a", (64,)))
    assert not torch.equal(base[0], base[1])


def test_draw_distributions():
    rng = SampleRandom(0, torch.arange(2000))
    u = rng.uniform("u", (50,))
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.005 and abs(float(u.std()) - 12**-0.5) < 0.005
    n = rng.normal("n", (50,), dtype=torch.float64)
    assert abs(float(n.mean())) < 0.01 and abs(float(n.std()) - 1.0) < 0.01
    assert abs(float((n.abs() < 1.96).double().mean()) - 0.95) < 0.005
    s = rng.sign("s", (50,))
    assert set(s.unique().tolist()) == {-1.0, 1.0} and abs(float(s.mean())) < 0.01
    r = rng.randint("r", 2, 9, (50,))
    assert int(r.min()) == 2 and int(r.max()) == 8
    counts = torch.bincount(r.flatten() - 2, minlength=7).double() / r.numel()
    assert float((counts - 1 / 7).abs().max()) < 0.005
    per = rng.randint("p", 0, torch.arange(1, 2001))  # per-sample upper bounds
    assert bool((per < torch.arange(1, 2001)).all()) and bool((per >= 0).all())
    with pytest.raises(ValueError):
        rng.randint("bad", 3, 3)


# -- a model whose float results do not depend on the batch --------------------------------


@pytest.fixture(scope="module")
def exact_net(digits_split) -> nn.Module:
    x_tr, y_tr, _, _ = digits_split
    return train_exact_net(x_tr, y_tr)


def _model(net: nn.Module) -> TorchClassifier:
    return TorchClassifier(net, input_shape=(1, 8, 8), num_classes=10)


def _tm(norm: str, batch_size: int, **kw: Any) -> ThreatModel:
    eps = [0.03, 0.08, 0.15] if norm == "linf" else [0.3, 0.8, 1.5]
    base: dict[str, Any] = dict(
        name="shards",
        norm=norm,
        epsilons=eps,
        samples=21,
        seed=3,
        batch_size=batch_size,
        attacks=[
            {"attack": "pgd", "steps": 4, "restarts": 2},
            {"attack": "square", "max_queries": 40},
        ],
        sanity_checks=False,
    )
    base.update(kw)
    return ThreatModel.model_validate(base)


def _sharded(net, x, y, tm: ThreatModel, n_shards: int, reverse: bool):
    """(records, report) of a run split into ``n_shards`` shards, run in some order."""
    ev = Evaluator(_model(net), x, y, tm)
    parts = ev.shard_indices(n_shards)
    order = parts[::-1] if reverse else parts
    if n_shards == 3 and not reverse:
        order = [parts[1], parts[2], parts[0]]
    shards = [ev.run_shard(p) for p in order]
    report = ev.finish(shards)
    state = ev.new_state(ev.samples())
    merge_shards(state, shards, ev.keep_examples)
    return state.records, report


def _report_numbers(report) -> dict[str, Any]:
    """The report as flat path -> value, without timings, dates and the batch size."""
    return report_fields(report, ignore=("batch_size",))


_SETUPS = [(1, 1, False), (7, 2, True), (7, 3, False), (256, 1, False), (256, 3, True)]


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_report_bit_identical_across_batch_sizes_and_shards(exact_net, digits_split, norm):
    _, _, x_te, y_te = digits_split
    runs = [_sharded(exact_net, x_te, y_te, _tm(norm, bs), k, rev) for bs, k, rev in _SETUPS]
    ref_rec, ref_rep = runs[-1]
    assert 0 < int((ref_rec.fooled_eps >= 0).sum()) < len(ref_rec.index)  # a real contest
    ref_numbers = _report_numbers(ref_rep)
    for rec, rep in runs[:-1]:
        for k, v in ref_rec.as_dict().items():
            assert np.array_equal(getattr(rec, k), v, equal_nan=True), k
        assert _report_numbers(rep) == ref_numbers


def test_run_equals_merged_shards(exact_net, digits_split):
    _, _, x_te, y_te = digits_split
    tm = _tm("linf", 7, sanity_checks=True, sanity_samples=8)
    whole = Evaluator(_model(exact_net), x_te, y_te, tm).run()
    _, merged = _sharded(exact_net, x_te, y_te, tm, 3, True)
    assert _report_numbers(merged) == _report_numbers(whole)
    assert merged.sanity_checks  # the checks ran once, on the merged samples


@pytest.mark.parametrize(
    "name,params,norm",
    [
        ("apgd-ce", {"steps": 4}, "linf"),
        ("spsa", {"steps": 3, "samples": 4}, "linf"),
        ("hopskipjump", {"max_queries": 120, "max_iter": 3}, "l2"),
        ("square", {"max_queries": 30}, "l2"),
    ],
)
def test_attack_results_follow_sample_ids(exact_net, digits_split, name, params, norm):
    _, _, x_te, y_te = digits_split
    x, y = torch.tensor(x_te[:9]), torch.tensor(y_te[:9])
    ids = torch.arange(100, 109)
    eps = 0.1 if norm == "linf" else 1.0
    attack = build_attack(name, norm=norm, seed=1, **params).attack
    whole = attack(_model(exact_net), x, y, epsilon=eps, sample_ids=ids)
    perm = torch.tensor([4, 8, 0, 2, 7, 1, 6, 3, 5])
    parts = [perm[:1], perm[1:5], perm[5:]]
    for p in parts:
        res = attack(_model(exact_net), x[p], y[p], epsilon=eps, sample_ids=ids[p])
        assert torch.equal(res.x_adv, whole.x_adv[p])
        assert torch.equal(res.success, whole.success[p])
    other = attack(_model(exact_net), x, y, epsilon=eps, sample_ids=ids + 1000)
    assert not torch.equal(other.x_adv, whole.x_adv)  # the ids key the noise


# -- a real CNN: discrete outcomes exact, floats to the kernels' rounding ----------------------


def test_cnn_discrete_results_identical_floats_close(digits_module, digits_split):
    _, _, x_te, y_te = digits_split
    runs = [
        _sharded(digits_module, x_te, y_te, _tm("l2", bs, samples=15), k, rev)
        for bs, k, rev in [(1, 1, False), (7, 3, True), (256, 2, False)]
    ]
    (ref_rec, ref_rep), others = runs[-1], runs[:-1]
    exact = ("index", "label", "clean_pred", "fooled_eps", "fooled_by", "row_at", "l0")
    ref_numbers = _report_numbers(ref_rep)
    for rec, rep in others:
        for k in exact:
            assert np.array_equal(getattr(rec, k), getattr(ref_rec, k)), k
        for k in ("linf", "l2", "clean_conf", "adv_conf"):
            np.testing.assert_allclose(getattr(rec, k), getattr(ref_rec, k), rtol=1e-5, atol=1e-6)
        numbers = _report_numbers(rep)
        assert numbers.keys() == ref_numbers.keys()
        for k, v in ref_numbers.items():
            if isinstance(v, float) and not isinstance(numbers[k], bool):
                assert numbers[k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
            else:
                assert numbers[k] == v, k


# -- bad shards ------------------------------------------------------------------------------


def test_bad_shards_are_input_errors(exact_net, digits_split):
    _, _, x_te, y_te = digits_split
    ev = Evaluator(_model(exact_net), x_te, y_te, _tm("linf", 64, samples=10))
    idx = ev.samples()
    a, b = ev.run_shard(idx[:4]), ev.run_shard(idx[4:])
    with pytest.raises(InputError, match="missing"):
        ev.finish([a])
    with pytest.raises(InputError, match="repeated"):
        ev.finish([a, b, a])
    missing = int(np.setdiff1d(np.arange(len(x_te)), idx)[0])
    with pytest.raises(InputError, match="not among"):
        ev.run_shard([missing])
    with pytest.raises(InputError):
        ev.run_shard(np.array([0.5]))
    with pytest.raises(InputError):
        ev.shard_indices(0)
    other = Evaluator(_model(exact_net), x_te, y_te, _tm("linf", 64, samples=10, seed=9))
    with pytest.raises(InputError, match="not this run"):
        other.finish([a, b])
    assert isinstance(a.records, Records) and len(a.records.index) == 4
