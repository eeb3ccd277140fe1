"""The batched APGD-T sweep equals the sequential one, whatever the batch or sample order.

``APGD.targeted_sweep`` runs every (sample, target rank) pair as one row of a single batch
and drops a sample's higher-rank rows once a lower-rank row fools it. Each row draws from
the random stream its rank's separate call would use (``SampleRandom.concat``), so on a
model whose float results do not depend on the batch (an MLP of element-wise products and
row sums) the sweep is bit-identical to running the ranks one after the other on the
samples not fooled so far (the reference below, the algorithm before batching).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from advguard.attacks.evasion import apgd
from advguard.attacks.evasion.apgd import APGD, next_sweep_rows
from advguard.attacks.randomness import SampleRandom
from advguard.models import TorchClassifier
from advguard.models.base import is_evasion, mask_reject
from batch_exact import train_exact_net


@pytest.fixture(scope="module")
def exact_net(digits_split) -> nn.Module:
    x_tr, y_tr, _, _ = digits_split
    return train_exact_net(x_tr, y_tr)


def _model(net: nn.Module) -> TorchClassifier:
    return TorchClassifier(net, input_shape=(1, 8, 8), num_classes=10)


def sequential_sweep(
    attack: APGD, model: TorchClassifier, x: torch.Tensor, y: torch.Tensor, eps: float, ids
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """The sweep as nine separate calls, each on the samples no earlier rank fooled."""
    logits = model.logits(x)
    success = logits.argmax(1) != y
    ranked = mask_reject(model, logits).argsort(dim=1, descending=True)
    x_adv, per_rank = x.clone(), []
    for r in range(1, attack.n_target_classes + 1):
        idx = (~success).nonzero().squeeze(1)
        if len(idx) == 0:
            break
        res = attack(
            model,
            x[idx],
            y[idx],
            epsilon=eps,
            targets=ranked[idx, r],
            sample_ids=ids[idx],
            stream=("target-rank", r),
        )
        pred = model.logits(res.x_adv).argmax(1)
        ok = res.success | is_evasion(model, pred, y[idx])
        upd = ok if r > 1 else torch.ones_like(ok)
        x_adv[idx[upd]] = res.x_adv[upd]
        success[idx[ok]] = True
        per_rank.append(int(ok.sum()))
    return x_adv, success, per_rank


CASES = [("linf", 0.08, 1), ("linf", 0.12, 2), ("l2", 0.6, 1)]


@pytest.mark.parametrize(("norm", "eps", "restarts"), CASES)
def test_batched_sweep_equals_sequential(exact_net, digits_split, norm, eps, restarts):
    _, _, x_te, y_te = digits_split
    x, y = torch.tensor(x_te[:60]), torch.tensor(y_te[:60])
    ids = torch.arange(500, 560)
    attack = APGD(norm=norm, steps=12, loss="dlr", restarts=restarts, seed=2)
    res = attack.targeted_sweep(_model(exact_net), x, y, epsilon=eps, sample_ids=ids)
    ref_x, ref_ok, ref_ranks = sequential_sweep(attack, _model(exact_net), x, y, eps, ids)
    assert torch.equal(res.success, ref_ok)
    assert torch.equal(res.x_adv, ref_x)
    assert res.info["fooled_per_target_rank"] == ref_ranks
    clean_ok = int((_model(exact_net).logits(x).argmax(1) == y).sum())
    fooled = sum(ref_ranks)
    # a real contest: several ranks fool samples and some samples stay robust
    assert sum(c > 0 for c in ref_ranks) >= 2 and 0 < fooled < clean_ok


def test_batched_sweep_invariant_to_batch_and_order(exact_net, digits_split):
    _, _, x_te, y_te = digits_split
    x, y = torch.tensor(x_te[:40]), torch.tensor(y_te[:40])
    ids = torch.arange(40) * 3 + 7
    attack = APGD(norm="linf", steps=10, loss="dlr", seed=5, n_target_classes=5)
    whole = attack.targeted_sweep(_model(exact_net), x, y, epsilon=0.1, sample_ids=ids)
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(1))
    for part in (perm[:1], perm[1:13], perm[13:]):
        res = attack.targeted_sweep(
            _model(exact_net), x[part], y[part], epsilon=0.1, sample_ids=ids[part]
        )
        assert torch.equal(res.success, whole.success[part])
        assert torch.equal(res.x_adv, whole.x_adv[part])
    assert 0 < int(whole.success.sum()) < 40
    other = attack.targeted_sweep(_model(exact_net), x, y, epsilon=0.1, sample_ids=ids + 1)
    assert not torch.equal(other.x_adv, whole.x_adv)  # the ids key the random starts


def test_concat_rows_draw_what_their_streams_draw():
    a = SampleRandom(3, torch.tensor([4, 9, 11])).fork("target-rank", 1)
    b = SampleRandom(3, torch.tensor([9, 2])).fork("target-rank", 2)
    rows = SampleRandom.concat([a, b, a.subset(torch.tensor([2]))])
    assert len(rows) == 6 and len(rows.streams) == 2
    for key in ("start", ("restart", 0)):
        got = rows.fork("restart", 1).uniform(key, (5,))
        want = torch.cat(
            [
                a.fork("restart", 1).uniform(key, (5,)),
                b.fork("restart", 1).uniform(key, (5,)),
                a.fork("restart", 1).uniform(key, (5,))[2:],
            ]
        )
        assert torch.equal(got, want)
    sub = rows.subset(torch.tensor([4, 0]))
    assert torch.equal(
        sub.sign("s", (7,)), torch.cat([b.sign("s", (7,))[1:], a.sign("s", (7,))[:1]])
    )
    # a single-stream concat stays a plain stream
    assert SampleRandom.concat([a, a]).group is None
    with pytest.raises(ValueError):
        SampleRandom.concat([a, SampleRandom(4, torch.tensor([1]))])


def test_next_rows_rerun_rows_dropped_behind_a_rejected_success():
    # 3 ranks x 4 samples; rows are rank-major
    ok = torch.tensor([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    complete = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 0], [0, 0, 1, 1]], dtype=torch.bool)
    # sample 0: rank 1 failed, rank 2 (was dropped) must run: rows of ranks 2, 3
    # sample 1: rank 1 won; sample 2: all ran, none won; sample 3: rank 2 dropped, run it
    assert next_sweep_rows(ok, complete, 100).tolist() == [4, 7, 8]
    assert next_sweep_rows(ok, complete, 2).tolist() == [4, 7]  # one rank per sample
    start = torch.zeros(3, 4, dtype=torch.bool)
    assert next_sweep_rows(start, start, 8).tolist() == [0, 1, 2, 3, 4, 5, 6, 7]
    assert next_sweep_rows(start, ~start, 8).tolist() == []


@pytest.mark.parametrize("cap", [1, 9, 10**6])
def test_sweep_result_does_not_depend_on_rows_per_batch(exact_net, digits_split, monkeypatch, cap):
    _, _, x_te, y_te = digits_split
    x, y = torch.tensor(x_te[:30]), torch.tensor(y_te[:30])
    attack = APGD(norm="linf", steps=8, loss="dlr", seed=1)
    ref_x, ref_ok, ref_ranks = sequential_sweep(
        attack, _model(exact_net), x, y, 0.1, torch.arange(30)
    )
    monkeypatch.setattr(apgd, "SWEEP_ROWS", cap)
    model = _model(exact_net)
    res = attack.targeted_sweep(model, x, y, epsilon=0.1)
    assert torch.equal(res.x_adv, ref_x) and torch.equal(res.success, ref_ok)
    assert res.info["fooled_per_target_rank"] == ref_ranks
