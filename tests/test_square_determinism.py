"""Square Attack: per-sample determinism and equality with the plain reference loop.

* A model whose float results do not depend on the batch (element-wise products and row
  sums, no GEMM kernels) makes every Square result a pure function of (seed, sample id):
  batch size 1, 7 or all, and any order, give bit-identical ``x_adv``, ``success`` and
  ``queries``.
* The Linf loop only touches each iteration's windows (gather/scatter, one RNG pass,
  sign resamples from per-channel tables); it is checked bit for bit against the plain
  formulation (a full-image mask per sample, the reference code's resample loop).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from advguard.attacks.evasion import square as sq
from advguard.attacks.evasion.square import SquareAttack, p_selection
from advguard.attacks.randomness import SampleRandom
from advguard.models import TorchClassifier
from advguard.models.fit import fit


class _RowwiseNet(nn.Module):
    """(c, 8, 8) -> 24 -> 10 from element-wise products and row sums: batch-independent."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(24, c * 64) * 0.15)
        self.b1 = nn.Parameter(torch.zeros(24))
        self.w2 = nn.Parameter(torch.randn(10, 24) * 0.2)
        self.b2 = nn.Parameter(torch.zeros(10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu((x.flatten(1)[:, None, :] * self.w1).sum(-1) + self.b1)
        return (h[:, None, :] * self.w2).sum(-1) + self.b2


def _channels(x: torch.Tensor, c: int) -> torch.Tensor:
    """Digits as c-channel images (c = 3: the image, its negative and its square)."""
    return x if c == 1 else torch.cat([x, 1 - x, x * x], 1)


@pytest.fixture(scope="module", params=[1, 3], ids=["c1", "c3"])
def exact(request, digits_split):
    c = request.param
    x_tr, y_tr, x_te, y_te = digits_split
    torch.manual_seed(0)
    net = fit(_RowwiseNet(c), _channels(torch.tensor(x_tr), c).numpy(), y_tr, epochs=6, seed=0)
    model = TorchClassifier(net, input_shape=(c, 8, 8), num_classes=10)
    x = _channels(torch.tensor(x_te[:30]), c)
    return model, x, torch.tensor(y_te[:30])


def test_bits_cat_equals_separate_draws():
    g = SampleRandom(3, torch.tensor([5, 9, 1, 1000])).fork("x", 2)
    spec = [("row", (1,)), ("signs", (3, 1, 1)), (("resample", 4), (3, 1, 1)), ("z", ())]
    many = g.bits_many(spec)
    assert [tuple(m.shape) for m in many] == [(4, 1), (4, 3, 1, 1), (4, 3, 1, 1), (4,)]
    for got, (key, shape) in zip(many, spec, strict=True):
        assert torch.equal(got, g.bits(key, shape))
    assert torch.equal(g.bits_cat(spec), torch.cat([m.reshape(4, -1) for m in many], 1))


@pytest.mark.parametrize(
    "norm,eps,kw,targeted",
    [
        ("linf", 0.08, {"max_queries": 120}, False),
        ("linf", 0.12, {"max_queries": 60, "restarts": 2, "loss": "ce"}, True),
        ("l2", 0.6, {"max_queries": 40}, False),
    ],
)
def test_results_identical_for_any_batch_size_and_order(exact, norm, eps, kw, targeted):
    model, x, y = exact
    ids = torch.arange(500, 500 + len(x))
    t = (y + 3) % 10 if targeted else None
    atk = SquareAttack(norm=norm, seed=2, **kw)
    whole = atk(model, x, y, epsilon=eps, targets=t, sample_ids=ids)
    assert whole.queries is not None
    attacked = int(whole.attacked.sum())
    assert 0 < int((whole.success & whole.attacked).sum()) < attacked  # a real contest
    assert int(whole.queries.max()) == kw["max_queries"]  # survivors ran the whole budget
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(1))
    # all in shuffled order, batches of 7 in shuffled order, batches of 1 (10 samples)
    splits = [[perm], list(perm.split(7)), list(perm[:10].split(1))]
    for parts in splits:
        for p in parts:
            r = atk(
                model,
                x[p],
                y[p],
                epsilon=eps,
                targets=None if t is None else t[p],
                sample_ids=ids[p],
            )
            assert torch.equal(r.x_adv, whole.x_adv[p])
            assert torch.equal(r.success, whole.success[p])
            assert torch.equal(r.queries, whole.queries[p])
    other = atk(model, x, y, epsilon=eps, targets=t, sample_ids=ids + 1)
    assert not torch.equal(other.x_adv, whole.x_adv)  # the ids key the noise


# -- the plain formulation (full-image masks, resample loop) ------------------------------


def _reference_linf(atk, model, x, goal, targeted, eps, budget, gen):
    """The Linf restart as the reference code writes it: per iteration a full-image window
    mask, ``clamp(x + eps * sign)`` inside it, signs redrawn while the candidate equals the
    iterate; returns (x_best, loss, fooled, queries) like ``SquareAttack._single_run``."""
    lo, hi = model.bounds
    n, c, h, w = x.shape
    x_best = (x + eps * gen.sign("init", (c, 1, w))).clamp(lo, hi)
    loss, fooled = atk._objective(model.logits(x_best), goal, targeted)
    queries = torch.ones(n, dtype=torch.long)
    for i in range(budget - 1):
        a = (~fooled).nonzero().squeeze(1)
        if len(a) == 0:
            break
        g = gen.subset(a).fork("iter", i)
        s = round(math.sqrt(p_selection(atk.p_init, i, budget) * h * w))
        s = min(max(s, 1), min(h, w) - 1)
        vh = g.randint("row", 0, h - s + 1, (1,))[:, :, None]
        vw = g.randint("col", 0, w - s + 1, (1,))[:, None, :]
        r, q = torch.arange(h)[None, :, None], torch.arange(w)[None, None, :]
        mask = ((r >= vh) & (r < vh + s) & (q >= vw) & (q < vw + s))[:, None]
        xb = x_best[a]
        new = torch.where(mask, (x[a] + eps * g.sign("signs", (c, 1, 1))).clamp(lo, hi), xb)
        for k in range(sq._MAX_SIGN_RESAMPLES):
            same = ~(new != xb).flatten(1).any(1)
            if not same.any():
                break
            j = same.nonzero().squeeze(1)
            sign = g.subset(j).sign(("resample", k), (c, 1, 1))
            new[j] = torch.where(mask[j], (x[a][j] + eps * sign).clamp(lo, hi), xb[j])
        loss_new, fool_new = atk._objective(model.logits(new), goal[a], targeted)
        better = (loss_new < loss[a]) | fool_new
        x_best[a[better]] = new[better]
        loss[a[better]] = loss_new[better]
        fooled[a[fool_new]] = True
        queries[a] += 1
    return x_best, loss, fooled, queries


@pytest.mark.parametrize("pre", [12, 0, 1])
def test_linf_loop_equals_plain_formulation(exact, monkeypatch, pre):
    """Bit for bit, also with the sign redraws all (pre 0) or mostly (pre 1) taken by the
    fallback loop instead of the up-front tables."""
    monkeypatch.setattr(sq, "_PRE_RESAMPLES", pre)
    model, x, y = exact
    atk = SquareAttack(norm="linf", max_queries=120, seed=7)
    gen = SampleRandom(7, torch.arange(len(x)) * 3).fork("restart", 0)
    got = atk._single_run(model, x, y, False, 0.1, 120, gen)
    want = _reference_linf(atk, model, x.clone(), y, False, 0.1, 120, gen)
    fooled = int(want[2].sum())
    assert 0 < fooled < len(x)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)
