"""LocalForward (models/local.py): logits of one-window changes from cached feature maps equal
the full forward pass's up to float rounding, for supported networks, at image borders and
across accept/reject sequences; unsupported networks get None; Square Attack gives the same
results with and without it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from advguard.attacks import SquareAttack
from advguard.models import TorchClassifier
from advguard.models.local import LocalForward
from advguard.models.torch_model import Normalize
from advguard.models.zoo import small_cnn, trades_cnn


def _bn_net() -> nn.Module:
    torch.manual_seed(3)
    body = nn.Sequential(
        nn.Conv2d(3, 8, 5, padding=2),
        nn.BatchNorm2d(8),
        nn.LeakyReLU(0.1),
        nn.AvgPool2d(2),
        nn.Sequential(nn.Conv2d(8, 8, 3, padding=(1, 0)), nn.Tanh()),  # nested, uneven padding
        nn.MaxPool2d(3),  # 16x14 -> 5x4: a pool that drops trailing rows
    )
    net = nn.Sequential(body, nn.Flatten(), nn.Linear(8 * 5 * 4, 16), nn.GELU(), nn.Linear(16, 5))
    with torch.no_grad():  # non-trivial running statistics
        bn = body[1]
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 2.0)
    return net.train()  # the adapter's eval mode must apply (batch norm, dropout)


CASES = {
    "small_cnn": (lambda: small_cnn((1, 28, 28), 10), (1, 28, 28)),
    "trades_cnn": (lambda: trades_cnn((1, 28, 28), 10), (1, 28, 28)),  # convs without padding
    "bn_avgpool": (_bn_net, (3, 32, 28)),  # colour, non-square
}


def _paste(x: torch.Tensor, r, c, win: torch.Tensor) -> torch.Tensor:
    out = x.clone()
    s_h, s_w = win.shape[2:]
    for b in range(len(x)):
        out[b, :, r[b] : r[b] + s_h, c[b] : c[b] + s_w] = win[b]
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_local_logits_equal_the_full_pass(case):
    make, shape = CASES[case]
    torch.manual_seed(0)
    clf = TorchClassifier(make(), input_shape=shape, num_classes=5 if case == "bn_avgpool" else 10)
    lf = LocalForward.build(clf, shape)
    assert lf is not None
    c, h, w = shape
    n = 24
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(n, *shape, generator=gen)
    lf.reset(x)
    worst = 0.0
    q0 = clf.queries.forward
    for it in range(40):
        s = (1, 2, 3, 4, 6, 7)[it % 6]
        r = torch.randint(0, h - s + 1, (n,), generator=gen)
        col = torch.randint(0, w - s + 1, (n,), generator=gen)
        r[:3] = torch.tensor([0, h - s, 0])  # corners: the zero padding at the borders
        col[:3] = torch.tensor([0, w - s, w - s])
        win = torch.rand(n, c, s, s, generator=gen)
        z = lf.propose(r, col, win)
        cand = _paste(x, r, col, win)
        worst = max(worst, float((z - clf.logits(cand)).abs().max()))
        accept = torch.rand(n, generator=gen) < 0.3
        lf.settle(accept)
        x = torch.where(accept[:, None, None, None], cand, x)
    assert worst < 1e-5, worst
    # every proposal counted as n forward queries (the checks' own forwards too)
    assert clf.queries.forward - q0 == 2 * 40 * n
    # subset keeps the right samples' maps
    keep = torch.arange(n) % 3 != 0
    lf.subset(keep)
    x = x[keep]
    r = torch.zeros(len(x), dtype=torch.long)
    z = lf.propose(r, r, x[:, :, :2, :2].clone())
    np.testing.assert_allclose(z.numpy(), clf.logits(x).numpy(), atol=1e-5)
    lf.settle(torch.ones(len(x), dtype=torch.bool))


def test_propose_twice_without_settle_is_refused():
    clf = TorchClassifier(small_cnn((1, 28, 28), 10), input_shape=(1, 28, 28), num_classes=10)
    lf = LocalForward.build(clf, (1, 28, 28))
    assert lf is not None
    lf.reset(torch.rand(2, 1, 28, 28))
    zeros = torch.zeros(2, dtype=torch.long)
    lf.propose(zeros, zeros, torch.rand(2, 1, 2, 2))
    with pytest.raises(RuntimeError, match="settle"):
        lf.propose(zeros, zeros, torch.rand(2, 1, 2, 2))


class _Wrapped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = small_cnn((1, 28, 28), 10)

    def forward(self, x):
        return self.net(x)


@pytest.mark.parametrize(
    "make",
    [
        lambda: TorchClassifier(_Wrapped(), input_shape=(1, 28, 28), num_classes=10),
        lambda: TorchClassifier(
            small_cnn((1, 28, 28), 10),
            input_shape=(1, 28, 28),
            num_classes=10,
            preprocess=Normalize(0.5, 0.5),
        ),
        lambda: TorchClassifier(
            nn.Sequential(nn.Conv2d(1, 4, 3, stride=2), nn.Flatten(), nn.Linear(4 * 13 * 13, 10)),
            input_shape=(1, 28, 28),
            num_classes=10,
        ),
        lambda: TorchClassifier(
            nn.Sequential(nn.Flatten(), nn.Linear(784, 10)), input_shape=(1, 28, 28), num_classes=10
        ),
    ],
    ids=["not-sequential", "preprocess", "strided-conv", "no-conv"],
)
def test_unsupported_networks_get_none(make):
    assert LocalForward.build(make(), (1, 28, 28)) is None


def test_square_gives_the_same_result_with_and_without_local_logits(digits_split):
    """On a small digits CNN: same fooled samples, same query counts and the same
    adversarial examples (the logits differ at most by float rounding)."""
    x, y = torch.tensor(digits_split[2][:24]), torch.tensor(digits_split[3][:24])
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * 16, 10),
    )
    xt, yt = torch.tensor(digits_split[0]), torch.tensor(digits_split[1])
    opt = torch.optim.Adam(net.parameters(), lr=0.02)
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(net(xt), yt).backward()
        opt.step()
    clf = TorchClassifier(net.eval(), input_shape=(1, 8, 8), num_classes=10)
    runs = {}
    for incremental in (True, False):
        atk = SquareAttack(max_queries=300, seed=5, incremental=incremental, p_init=0.3)
        clf.queries.reset()
        res = atk(clf, x, y, epsilon=0.1)
        runs[incremental] = (res, clf.queries.forward)
    (a, qa), (b, qb) = runs[True], runs[False]
    assert torch.equal(a.success, b.success) and torch.equal(a.queries, b.queries)
    assert qa == qb
    assert 0 < int(a.success.sum()) < len(x)  # some fooled, some not: both paths exercised
    torch.testing.assert_close(a.x_adv, b.x_adv, atol=0, rtol=0)


def test_square_incremental_must_be_a_bool():
    from advguard.errors import InputError

    with pytest.raises(InputError, match="incremental"):
        SquareAttack(incremental="yes")  # type: ignore[arg-type]
