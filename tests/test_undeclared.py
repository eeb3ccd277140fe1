"""Undeclared randomized, non-differentiable defenses: SPSA, surrogate BPDA, and the escalation.

The defended models hide a random *and* non-differentiable preprocessing inside an ordinary
``nn.Module`` and declare nothing. The escalation must bring their robust accuracy within two
points of a BPDA + EOT attack that knows the preprocessing (written here, in the test).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from advguard.attacks import PGD, SPSA
from advguard.attacks.registry import build_attack
from advguard.errors import InputError
from advguard.evaluate.runner import evaluate
from advguard.evaluate.threat_model import ThreatModel
from advguard.models import TorchClassifier
from advguard.models.wrappers import EOTClassifier, SurrogateGradientClassifier


class DitherQuantize(nn.Module):
    """Stochastic quantization with random dithering: zero gradient, a new draw per call."""

    def __init__(self, levels: int = 4) -> None:
        super().__init__()
        self.levels = levels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = (torch.rand_like(x) - 0.5) / self.levels
        return torch.round((x + u).clamp(0, 1) * self.levels) / self.levels


class RandomResizePad(nn.Module):
    """Xie et al. 2018 on 8x8 digits: resize to a random size, pad at a random offset, then
    store as 8-bit pixels (the rounding cuts the gradient)."""

    def __init__(self, sizes: tuple[int, ...] = (6, 7, 8)) -> None:
        super().__init__()
        self.sizes = sizes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        r = self.sizes[int(torch.randint(len(self.sizes), ()))]
        small = F.interpolate(x, size=(r, r), mode="bilinear", align_corners=False)
        i, j = (int(v) for v in torch.randint(h - r + 1, (2,)))
        return torch.round(F.pad(small, (j, w - r - j, i, h - r - i)) * 255) / 255


class Quantize(nn.Module):
    """Deterministic rounding: zero gradient everywhere."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x * 4) / 4


def bpda_eot(
    module: nn.Module,
    pre: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    steps: int = 40,
    draws: int = 8,
) -> torch.Tensor:
    """BPDA (identity on the backward pass through ``pre``) + EOT over ``draws``, signed-gradient
    PGD on the mean-logit margin, every step run (Athalye, Carlini & Wagner 2018)."""
    xa = x.clone()
    alpha = 2.5 * eps / steps
    for _ in range(steps):
        xa.requires_grad_(True)
        xr = xa.repeat(draws, 1, 1, 1)
        with torch.no_grad():
            out = pre(xr)
        z = module(xr + (out - xr).detach()).view(draws, len(x), -1).mean(0)
        zy = z.gather(1, y[:, None]).squeeze(1)
        zo = z.masked_fill(F.one_hot(y, z.shape[1]).bool(), -1e9)
        (g,) = torch.autograd.grad((zo.max(1).values - zy).sum(), xa)
        xa = torch.min(torch.max(xa.detach() + alpha * g.sign(), x - eps), x + eps).clamp(0, 1)
    return xa.detach()


def _tm(**kw) -> ThreatModel:
    base = dict(
        name="undeclared",
        norm="linf",
        epsilons=[0.2],
        samples=40,
        seed=0,
        batch_size=64,
        attacks=[{"attack": "pgd", "steps": 10}],
        sanity_samples=16,
        eot_samples=8,
    )
    base.update(kw)
    return ThreatModel.model_validate(base)


def _check(report, cid):
    return next((c for c in report.sanity_checks if c.id == cid), None)


class FakeClock:
    """Injected clock: every call advances one second, so timings are exact call counts."""

    def __init__(self) -> None:
        self._t = itertools.count()

    def __call__(self) -> float:
        return float(next(self._t))


# -- SPSA ------------------------------------------------------------------------------------
def test_spsa_fools_a_model_with_masked_gradients(digits_module, digits_eval):
    x, y = digits_eval[0][:40], digits_eval[1][:40]
    masked = TorchClassifier(
        digits_module, input_shape=(1, 8, 8), num_classes=10, preprocess=Quantize()
    )
    pgd = PGD(norm="linf", steps=10, random_start=False)(masked, x, y, epsilon=0.2)
    # a piecewise-constant model needs a finite-difference step wider than its plateaus
    spsa = SPSA(norm="linf", steps=20, samples=8, lr=0.05, delta=0.1, seed=0)
    res = spsa(masked, x, y, epsilon=0.2)
    assert float(res.perturbation(x, "linf").max()) <= 0.2 + 1e-6
    assert float(res.x_adv.min()) >= 0 and float(res.x_adv.max()) <= 1
    # zero gradients stop PGD without a random start; SPSA estimates from scores and wins
    assert float(res.success.float().mean()) >= float(pgd.success.float().mean()) + 0.3
    # per-sample queries: the initial loss, then 2 * samples + 1 per iteration, never more
    att = res.attacked
    assert int(res.queries[att].max()) <= 1 + 20 * (2 * 8 + 1)
    assert int(res.queries[att].min()) >= 1 + (2 * 8 + 1)
    assert int(res.queries[~att].sum()) == 0


def test_spsa_l2_targeted_deterministic_and_checked(digits_model, digits_eval):
    x, y = digits_eval[0][:16], digits_eval[1][:16]
    a = SPSA(norm="l2", steps=10, samples=8, lr=0.05, seed=3)
    r1 = a(digits_model, x, y, epsilon=1.5)
    r2 = a(digits_model, x, y, epsilon=1.5)
    assert torch.equal(r1.x_adv, r2.x_adv)
    assert float(r1.perturbation(x, "l2").max()) <= 1.5 + 1e-5
    t = (y + 1) % 10
    rt = SPSA(norm="linf", steps=15, samples=8, lr=0.03)(digits_model, x, y, epsilon=0.3, targets=t)
    hit = digits_model.logits(rt.x_adv).argmax(1) == t
    assert torch.equal(hit, rt.success)
    assert bool(hit.any())
    r0 = a(digits_model, x, y, epsilon=0.0)
    assert not bool(r0.attacked.any()) and torch.equal(r0.x_adv, x)
    for bad in (dict(steps=0), dict(samples=0), dict(delta=0.0), dict(lr=-1.0), dict(steps=1.5)):
        with pytest.raises(InputError):
            SPSA(**bad)
    assert build_attack("spsa", norm="linf", seed=0, steps=5).entry.knowledge == "black-box"


def test_surrogate_gradient_classifier_keeps_values_and_uses_surrogate_gradients(
    digits_module, digits_model, digits_eval
):
    x, y = digits_eval[0][:8], digits_eval[1][:8]
    masked = TorchClassifier(
        digits_module, input_shape=(1, 8, 8), num_classes=10, preprocess=Quantize()
    )
    sg = SurrogateGradientClassifier(masked, digits_model)
    loss = lambda z: F.cross_entropy(z, y, reduction="none")  # noqa: E731
    z, _, g = sg.value_and_grad(x, loss)
    assert torch.equal(z, masked.logits(x))  # forward values of the real model
    _, _, g_masked = masked.value_and_grad(x, loss)
    assert float(g_masked.abs().max()) == 0.0 and float(g.abs().amax((1, 2, 3)).min()) > 0
    assert sg.queries is masked.queries
    with pytest.raises(InputError):
        SurrogateGradientClassifier(
            masked, TorchClassifier(digits_module, input_shape=(1, 4, 16), num_classes=10)
        )


# -- the escalation --------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("pre", [DitherQuantize(4), RandomResizePad()], ids=["dither", "resize"])
def test_escalation_matches_bpda_eot_on_undeclared_defense(pre, digits_module, digits_split):
    _, _, x_te, y_te = digits_split
    model = TorchClassifier(digits_module, input_shape=(1, 8, 8), num_classes=10, preprocess=pre)
    tm = _tm(samples=60)
    rep = evaluate(model, x_te, y_te, tm, clock=FakeClock())
    ra = rep.results[0].robust_accuracy.value
    first = rep.results[0].first_robust_accuracy
    c = _check(rep, "undeclared-defense")
    assert c is not None, [(k.id, k.status, k.explanation) for k in rep.sanity_checks]
    assert c.status_before_escalation == "fail"
    assert _check(rep, "randomness").status_before_escalation == "fail"

    # BPDA + EOT that knows the preprocessing, judged on logits averaged over as many draws
    from advguard.evaluate.runner import select_samples

    idx = select_samples(len(x_te), tm.samples, tm.seed)
    x, y = torch.tensor(x_te[idx]), torch.tensor(y_te[idx])
    judge = EOTClassifier(model, samples=tm.eot_samples)
    torch.manual_seed(1)
    clean_ok = judge.logits(x).argmax(1) == y
    xa = bpda_eot(digits_module, pre, x, y, 0.2)
    bpda_ra = float((clean_ok & (judge.logits(xa).argmax(1) == y)).float().mean())

    assert first is not None and first.value > ra  # the escalation, not the suite, got there
    assert ra <= bpda_ra + 0.02, (ra, bpda_ra)
    # which escalation found the examples, with its budget and its time (injected clock)
    found = c.details["found_by"]
    assert found and sum(found.values()) >= 1
    rows = {a.attack for a in rep.results[0].per_attack if a.stage == "escalation"}
    assert set(found) <= rows
    r1 = c.details["round_1x"]["budget_per_sample_and_epsilon"]
    assert r1["draws"] == tm.eot_samples and r1["square_queries"] > 0
    assert c.details["model_evaluations"] > 0
    assert c.details["seconds"] > 0 and float(c.details["seconds"]).is_integer()
    assert rep.timing["undeclared_defense_escalation_seconds"] == c.details["seconds"]
    for ex in rep.examples:  # (verified on averaged logits; a later draw may differ)
        d = np.abs(np.array(ex.x_adv) - np.array(ex.x)).max()
        assert d <= 0.2 + 1e-5
    # the verdict follows the convergence criterion
    if c.details["converged"]:
        assert c.status == "warn"
        assert all(_check(rep, k).status != "fail" for k in ("randomness", "gradients"))
    else:
        assert c.status == "fail" and not rep.trustworthy


def test_honest_model_triggers_no_undeclared_escalation(digits_model, digits_split):
    _, _, x_te, y_te = digits_split
    rep = evaluate(digits_model, x_te, y_te, _tm(samples=60))
    assert _check(rep, "undeclared-defense") is None
    assert all(c.status in ("pass", "skip") for c in rep.sanity_checks)
    assert "undeclared_defense_escalation_seconds" not in rep.timing


def test_declared_random_defense_is_not_escalated_blind(digits_model, digits_split):
    from advguard.defenses.transforms import GaussianNoise, TransformedClassifier

    _, _, x_te, y_te = digits_split
    defended = TransformedClassifier(digits_model, [GaussianNoise(0.3, seed=0)])
    rep = evaluate(defended, x_te, y_te, _tm(samples=40))
    assert _check(rep, "undeclared-defense") is None
