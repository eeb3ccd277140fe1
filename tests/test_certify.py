"""Certified robustness: randomized smoothing (L2) and interval bound propagation (Linf)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.stats import norm
from torch import nn
from typer.testing import CliRunner

from advguard.attacks.evasion.pgd import PGD
from advguard.cli import app
from advguard.defenses.certify import (
    ABSTAIN,
    SmoothedClassifier,
    certified_accuracy_curve,
    certify_dataset,
    ibp_bounds,
    ibp_certify,
    ibp_train,
    load_certification,
    lower_confidence_bound,
    margin_lower_bounds,
    train_with_noise,
)
from advguard.errors import InputError
from advguard.models import TorchClassifier
from advguard.models.fit import fit
from advguard.models.io import save_torch
from advguard.models.torch_model import Normalize
from advguard.models.zoo import mlp, small_cnn

SIGMA = 0.25


@pytest.fixture(scope="module")
def noisy_module(digits_split) -> nn.Module:
    x_tr, y_tr, _, _ = digits_split
    torch.manual_seed(0)  # the initial weights too: results must not depend on test order
    return train_with_noise(small_cnn((1, 8, 8), 10), x_tr, y_tr, SIGMA, epochs=8, seed=0)


@pytest.fixture(scope="module")
def clean_model(digits_split) -> TorchClassifier:
    """Same architecture, same budget, trained without noise."""
    x_tr, y_tr, _, _ = digits_split
    torch.manual_seed(0)
    module = fit(small_cnn((1, 8, 8), 10), x_tr, y_tr, epochs=8, seed=0)
    return TorchClassifier(module, input_shape=(1, 8, 8), num_classes=10)


@pytest.fixture()
def noisy_model(noisy_module) -> TorchClassifier:
    return TorchClassifier(noisy_module, input_shape=(1, 8, 8), num_classes=10)


@pytest.fixture(scope="module")
def ibp_mlp(digits_split) -> nn.Module:
    x_tr, y_tr, _, _ = digits_split
    torch.manual_seed(0)
    return ibp_train(mlp((1, 8, 8), 10), x_tr, y_tr, 0.05, epochs=20, seed=0)


@pytest.fixture(scope="module")
def plain_mlp(digits_split) -> nn.Module:
    x_tr, y_tr, _, _ = digits_split
    torch.manual_seed(0)
    return fit(mlp((1, 8, 8), 10), x_tr, y_tr, epochs=20, seed=0)


class _EOTSmoothed(nn.Module):
    """log of the Monte-Carlo soft smoothed classifier: PGD on it is the EOT attack."""

    def __init__(self, base: nn.Module, sigma: float, k: int = 32) -> None:
        super().__init__()
        self.base, self.sigma, self.k = base, sigma, k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rep = x.repeat_interleave(self.k, dim=0)
        probs = torch.softmax(self.base(rep + torch.randn_like(rep) * self.sigma), dim=1)
        return torch.log(probs.view(len(x), self.k, -1).mean(1) + 1e-12)


# ------------------------------------------------------------------ randomized smoothing
def test_certified_radius_survives_eot_pgd_on_the_smoothed_classifier(noisy_model, digits_split):
    _, _, x_te, y_te = digits_split
    smoothed = SmoothedClassifier(noisy_model, SIGMA, seed=1)
    res = smoothed.certify(x_te[:40], n0=100, n=1000, alpha=0.001)
    ok = np.flatnonzero((res.labels == y_te[:40]) & (res.radii > 0.1))[:6]
    assert len(ok) >= 5, res.radii
    eot = TorchClassifier(
        _EOTSmoothed(noisy_model.module, SIGMA), input_shape=(1, 8, 8), num_classes=10
    )
    torch.manual_seed(0)
    inside, outside = [], []
    for i in ok:
        x, y = torch.tensor(x_te[i : i + 1]), torch.tensor(y_te[i : i + 1])
        r = float(res.radii[i])
        adv_in = PGD(norm="l2", steps=20, seed=0)(eot, x, y, epsilon=0.99 * r).x_adv
        adv_out = PGD(norm="l2", steps=20, seed=0)(eot, x, y, epsilon=4.0).x_adv
        assert float((adv_in - x).flatten().norm()) <= 0.99 * r + 1e-4
        inside.append(adv_in)
        outside.append(adv_out)
    # PREDICT with n=2000 returns a wrong class with probability <= alpha per sample.
    pred_in = smoothed.predict(torch.cat(inside), n=2000, alpha=0.001, seed=7)
    pred_out = smoothed.predict(torch.cat(outside), n=2000, alpha=0.001, seed=7)
    labels = res.labels[ok]
    assert np.all((pred_in == labels) | (pred_in == ABSTAIN)), (pred_in, labels)
    # the attack is real: far outside the certified radius it does flip the smoothed classifier
    assert np.sum((pred_out != labels) & (pred_out != ABSTAIN)) >= len(ok) // 2, pred_out


def test_radius_formula_and_clopper_pearson(noisy_model, digits_split):
    _, _, x_te, _ = digits_split
    res = SmoothedClassifier(noisy_model, SIGMA).certify(x_te[:10], n0=50, n=400, alpha=0.01)
    assert (res.labels != ABSTAIN).sum() >= 5
    # all n samples in the top class: the bound is alpha ** (1 / n)
    assert lower_confidence_bound(400, 400, 0.01) == pytest.approx(0.01 ** (1 / 400))
    assert lower_confidence_bound(0, 400, 0.01) == 0.0
    for lab, r, p, k in zip(res.labels, res.radii, res.p_a_lower, res.counts, strict=True):
        assert p == pytest.approx(lower_confidence_bound(int(k), 400, 0.01))
        if lab == ABSTAIN:
            assert r == 0 and p <= 0.5
        else:
            assert r == pytest.approx(SIGMA * norm.ppf(p))
    assert res.radii.max() <= SIGMA * norm.ppf(0.01 ** (1 / 400)) + 1e-9


def _linear_model(dim: int = 16) -> tuple[TorchClassifier, torch.Tensor, torch.Tensor]:
    """Two classes split by a hyperplane through x0 = 0.5: class 1 iff w.(x - x0) > 0."""
    torch.manual_seed(0)
    w = torch.randn(dim)
    w = w / w.norm()
    lin = nn.Linear(dim, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.stack([torch.zeros(dim), w]))
        lin.bias.copy_(torch.tensor([0.0, float(-w @ torch.full((dim,), 0.5))]))
    return TorchClassifier(lin, input_shape=(dim,), num_classes=2), w, torch.full((dim,), 0.5)


def test_linear_model_radius_is_sound_and_tight():
    # smoothing a linear classifier gives the same classifier: the exact robust radius is
    # the distance to the hyperplane, so a certified radius may never exceed it.
    model, w, x0 = _linear_model()
    dist = torch.tensor([0.05, 0.1, 0.2, 0.3, 0.5, -0.1, -0.3])
    x = x0 + dist[:, None] * w
    res = SmoothedClassifier(model, SIGMA, seed=0).certify(x, n0=100, n=4000, alpha=0.001)
    d = dist.abs().numpy()
    assert np.all(res.labels == (dist > 0).long().numpy())
    assert np.all(res.radii < d), (res.radii, d)
    assert np.all(res.radii > 0.6 * d), (res.radii, d)


def test_huge_sigma_abstains(noisy_model, digits_split):
    model, w, x0 = _linear_model()
    x = x0 + torch.tensor([0.1, -0.2, 0.3])[:, None] * w
    huge = SmoothedClassifier(model, 100.0)
    assert np.all(huge.predict(x, n=1000, alpha=0.001) == ABSTAIN)
    res = huge.certify(x, n0=100, n=1000, alpha=0.001)
    assert np.all(res.labels == ABSTAIN) and np.all(res.radii == 0)
    # the same points are decided (and certified) at a small sigma
    small = SmoothedClassifier(model, 0.05)
    np.testing.assert_array_equal(small.predict(x, n=1000, alpha=0.001), [1, 0, 1])
    # on the digits CNN the noisy-trained model is confident at its sigma, not at sigma=100
    _, _, x_te, y_te = digits_split
    at_sigma = SmoothedClassifier(noisy_model, SIGMA).predict(x_te[:30], n=100, alpha=0.001)
    at_huge = SmoothedClassifier(noisy_model, 100.0).predict(x_te[:30], n=100, alpha=0.001)
    assert np.mean(at_sigma == y_te[:30]) >= 0.8
    assert np.mean(at_huge == y_te[:30]) <= 0.3


def test_deterministic_for_a_seed(noisy_model, digits_split):
    _, _, x_te, _ = digits_split
    a = SmoothedClassifier(noisy_model, 0.5, seed=3).certify(x_te[:8], n0=20, n=200)
    b = SmoothedClassifier(noisy_model, 0.5, seed=3).certify(x_te[:8], n0=20, n=200)
    c = SmoothedClassifier(noisy_model, 0.5, seed=4).certify(x_te[:8], n0=20, n=200)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.radii, b.radii)
    assert not np.array_equal(a.counts, c.counts)
    # per-sample noise streams: a sample's result does not depend on the other samples
    d = SmoothedClassifier(noisy_model, 0.5, seed=3).certify(x_te[:1], n0=20, n=200)
    assert d.counts[0] == a.counts[0]


class _BatchSpy:
    """A black-box adapter (logits only) that records its batch sizes."""

    def __init__(self, inner: TorchClassifier) -> None:
        self.inner = inner
        self.num_classes, self.bounds = inner.num_classes, inner.bounds
        self.input_shape, self.queries = inner.input_shape, inner.queries
        self.sizes: list[int] = []

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(len(x))
        return self.inner.logits(x)


def test_certify_n10000_is_batched(noisy_model, digits_split):
    _, _, x_te, _ = digits_split
    spy = _BatchSpy(noisy_model)
    calls: list[tuple[str, int, int]] = []
    res = SmoothedClassifier(spy, SIGMA, batch_size=1000).certify(
        x_te[:2], n0=100, n=10000, progress=lambda s, d, t: calls.append((s, d, t))
    )
    assert max(spy.sizes) <= 1000
    assert sum(spy.sizes) == 2 * (100 + 10000) == spy.queries.forward
    assert calls[-1] == ("estimation", 20000, 20000) and calls[0][0] == "selection"
    assert res.radii.max() > 0.5  # n=10000 allows radii up to sigma * Phi^-1(0.001 ** 1e-4)


def test_noise_training_buys_certified_accuracy(noisy_model, clean_model, digits_split):
    _, _, x_te, y_te = digits_split
    x, y = x_te[:60], y_te[:60]
    grid = [0.0, 0.25, 0.5]
    curves = {}
    for name, m in (("noisy", noisy_model), ("clean", clean_model)):
        r = SmoothedClassifier(m, SIGMA).certify(x, n0=50, n=500, alpha=0.001)
        curves[name] = certified_accuracy_curve(r.labels, r.radii, y, grid)
    # what it buys: certified accuracy at radius 0.5 under sigma=0.25 noise
    assert curves["noisy"][2] >= curves["clean"][2] + 0.2, curves
    # what it costs: the base model's clean accuracy does not rise (and stays usable)
    acc_noisy, acc_clean = noisy_model.accuracy(x_te, y_te), clean_model.accuracy(x_te, y_te)
    assert 0.9 <= acc_noisy <= acc_clean + 0.02


def test_certified_accuracy_curve_by_hand():
    labels = np.array([0, 1, ABSTAIN, 2])
    radii = np.array([0.5, 0.2, 0.0, 1.0])
    y = np.array([0, 1, 2, 1])
    np.testing.assert_allclose(
        certified_accuracy_curve(labels, radii, y, [0.0, 0.2, 0.3, 0.6]), [0.5, 0.5, 0.25, 0.0]
    )
    with pytest.raises(InputError):
        certified_accuracy_curve(labels, radii[:2], y, [0.0])


def test_smoothing_bad_input(noisy_model, digits_split):
    _, _, x_te, _ = digits_split
    with pytest.raises(InputError, match="sigma"):
        SmoothedClassifier(noisy_model, 0.0)
    s = SmoothedClassifier(noisy_model, SIGMA)
    with pytest.raises(InputError, match="alpha"):
        s.certify(x_te[:2], alpha=1.5)
    with pytest.raises(InputError, match="bounds"):
        s.predict(x_te[:2] + 3.0)
    with pytest.raises(InputError, match="shape"):
        s.predict(x_te[:2, 0])


# ------------------------------------------------------------------ IBP
def _odd_net() -> nn.Module:
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4)
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    bn.weight.data.uniform_(-1.5, 1.5)  # negative scales flip the interval
    net = nn.Sequential(
        Normalize([0.3], [0.5]),
        nn.Conv2d(1, 4, 3, padding=1),
        bn,
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, stride=2), nn.ReLU(), nn.AvgPool2d(2)),
        nn.Flatten(),
        nn.Linear(6 * 2 * 2, 16),
        nn.ReLU(),
        nn.Dropout(0.1),
        nn.Linear(16, 5),
    )
    return net.eval()


@pytest.mark.parametrize("which", ["odd", "mlp"])
def test_ibp_bounds_contain_random_points(which):
    torch.manual_seed(1)
    net = _odd_net() if which == "odd" else mlp((1, 16, 16), 5).eval()
    x = torch.rand(6, 1, 16, 16)
    eps = 0.05
    lo, hi = ibp_bounds(net, x, eps, (0.0, 1.0))
    assert torch.all(lo <= hi)
    with torch.no_grad():
        for _ in range(50):
            z = net((x + (torch.rand_like(x) * 2 - 1) * eps).clamp(0, 1))
            assert torch.all(z >= lo - 1e-5) and torch.all(z <= hi + 1e-5)
        # corners of the box too (where ReLU/affine bounds are tightest)
        corner = (x + torch.sign(torch.randn_like(x)) * eps).clamp(0, 1)
        z = net(corner)
        assert torch.all(z >= lo - 1e-5) and torch.all(z <= hi + 1e-5)
    # eps = 0 gives the exact logits
    lo0, hi0 = ibp_bounds(net, x, 0.0)
    torch.testing.assert_close(lo0, net(x).detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(hi0, net(x).detach(), atol=1e-5, rtol=0)


def test_ibp_bounds_contain_pgd_adversarials(digits_model, digits_eval):
    x, y = digits_eval
    x, y = x[:64], y[:64]
    eps = 0.1
    lo, hi = ibp_bounds(digits_model, x, eps, digits_model.bounds)
    res = PGD(norm="linf", steps=20, seed=0)(digits_model, x, y, epsilon=eps)
    assert res.success.float().mean() > 0.2  # the attack moves the logits a lot
    z = digits_model.logits(res.x_adv)
    assert torch.all(z >= lo - 1e-4) and torch.all(z <= hi + 1e-4)


def test_elision_is_tighter_than_logit_bounds(ibp_mlp, digits_split):
    _, _, x_te, y_te = digits_split
    x, y = torch.tensor(x_te[:50]), torch.tensor(y_te[:50])
    m = margin_lower_bounds(ibp_mlp, x, y, 0.05)
    lo, hi = ibp_bounds(ibp_mlp, x, 0.05)
    plain = (lo.gather(1, y[:, None]) - hi).scatter(1, y[:, None], 0.0)
    assert torch.all(m >= plain - 1e-5)
    assert (m > plain + 1e-3).any()


def test_ibp_training_certifies_and_plain_training_does_not(ibp_mlp, plain_mlp, digits_split):
    _, _, x_te, y_te = digits_split
    ibp_clf = TorchClassifier(ibp_mlp, input_shape=(1, 8, 8), num_classes=10)
    plain_clf = TorchClassifier(plain_mlp, input_shape=(1, 8, 8), num_classes=10)
    cert_ibp = ibp_certify(ibp_clf, x_te, y_te, 0.03).mean()
    cert_plain = ibp_certify(plain_clf, x_te, y_te, 0.03).mean()
    assert cert_ibp > 0.6 and cert_plain < 0.05, (cert_ibp, cert_plain)
    # cost: the IBP-trained net keeps a usable clean accuracy, but no better than plain
    assert 0.9 <= ibp_clf.accuracy(x_te, y_te) <= plain_clf.accuracy(x_te, y_te) + 0.02


def test_ibp_certified_samples_survive_pgd(ibp_mlp, digits_split):
    _, _, x_te, y_te = digits_split
    clf = TorchClassifier(ibp_mlp, input_shape=(1, 8, 8), num_classes=10)
    x, y = torch.tensor(x_te), torch.tensor(y_te)
    eps = 0.05
    cert = torch.as_tensor(ibp_certify(clf, x, y, eps))
    res = PGD(norm="linf", steps=30, restarts=2, seed=0)(clf, x, y, epsilon=eps)
    assert cert.sum() > 100
    assert not (res.success & cert).any()
    assert (res.success & ~cert).sum() > 0  # PGD does break some uncertified samples


def test_ibp_unsupported_layer():
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.Tanh(), nn.Linear(10, 3))
    with pytest.raises(InputError, match="Tanh"):
        ibp_bounds(net, torch.rand(2, 1, 8, 8), 0.1)
    with pytest.raises(InputError, match="GELU"):
        ibp_train(nn.Sequential(nn.Flatten(), nn.GELU()), np.zeros((2, 4)), [0, 1], 0.1)
    with pytest.raises(InputError, match="epsilon"):
        ibp_bounds(mlp((4,), 2), torch.rand(2, 4), -1.0)


# ------------------------------------------------------------------ report and CLI
def test_certify_dataset_report(noisy_model, digits_split, tmp_path):
    _, _, x_te, y_te = digits_split
    run = certify_dataset(
        noisy_model, x_te, y_te, tmp_path, sigma=SIGMA, n0=20, n=200, samples=15, seed=0
    )
    rep = load_certification(run.json_path)
    assert rep.kind == "certification" and rep.schema_version == "1.0"
    assert rep.n_samples == 15 and [p.radius for p in rep.results] == [0, 0.25, 0.5, 0.75, 1.0]
    acc = [p.certified_accuracy.value for p in rep.results]
    assert acc == sorted(acc, reverse=True) and acc[0] > 0.5
    # n=200 at alpha=0.001 caps the radius at sigma * Phi^-1(0.001 ** (1/200)) ~ 0.50
    assert rep.radius_cap == pytest.approx(SIGMA * norm.ppf(0.001 ** (1 / 200)))
    assert 0.45 < rep.radius_cap < 0.55 and acc[-1] == 0.0
    p0 = rep.results[0].certified_accuracy
    assert p0.ci_low <= p0.value <= p0.ci_high
    assert rep.data["sha256_evaluated"] and rep.timing["certify_s"] > 0
    assert "data:image/png;base64," in run.html_path.read_text()


runner = CliRunner()


def test_cli_certify_smoothing_and_ibp(noisy_module, ibp_mlp, tmp_path):
    cnn = save_torch(
        noisy_module,
        tmp_path / "cnn.safetensors",
        factory="advguard.models.zoo:small_cnn",
        factory_kwargs={"input_shape": [1, 8, 8], "num_classes": 10},
        input_shape=(1, 8, 8),
        num_classes=10,
    )
    res = runner.invoke(
        app,
        ["certify", "--model", str(cnn), "--data", "digits", "--n", "200", "--n0", "20",
         "--samples", "12", "--radii", "0,0.25", "--out", str(tmp_path / "s")],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "s" / "certify.json").read_text())
    assert data["method"] == "smoothing" and data["n"] == 200 and data["n_samples"] == 12
    assert "Certified accuracy" in res.output
    net = save_torch(
        ibp_mlp,
        tmp_path / "mlp.safetensors",
        factory="advguard.models.zoo:mlp",
        factory_kwargs={"input_shape": [1, 8, 8], "num_classes": 10},
        input_shape=(1, 8, 8),
        num_classes=10,
    )
    res = runner.invoke(
        app,
        ["certify", "--model", str(net), "--data", "digits", "--method", "ibp",
         "--epsilon", "0.01,0.03", "--samples", "100", "--out", str(tmp_path / "i")],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "i" / "certify.json").read_text())
    assert data["norm"] == "linf" and data["results"][1]["certified_accuracy"]["value"] > 0.5
    bad = runner.invoke(
        app, ["certify", "--model", str(cnn), "--data", "digits", "--method", "zonotope"]
    )
    assert bad.exit_code == 2 and "smoothing" in bad.output
    bad = runner.invoke(app, ["certify", "--model", str(cnn), "--data", "digits", "--sigma", "-1"])
    assert bad.exit_code == 2 and "sigma" in bad.output
