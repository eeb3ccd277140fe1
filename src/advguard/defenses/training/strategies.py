"""Training methods as strategy objects: how to perturb a batch and what loss to minimise.

A strategy has ``perturb(net, x, y, epsilon, generator)`` (the inner maximisation, on the
shared gradient engine :func:`advguard.attacks.evasion.gradient_descent`) and
``loss(net, x, y, x_adv)`` (the outer objective, returning the loss and the logits used for
training accuracy). To add a training method, add a class here and register it in
:data:`STRATEGIES`; :func:`advguard.defenses.training.adversarial_train` then accepts its
name as ``method``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from torch import nn
from torch.nn import functional as F

from advguard.attacks.evasion import gradient_descent
from advguard.attacks.norms import Norm, normalize, random_in_ball
from advguard.defenses.training._common import NetOracle, clip_to_ball

if TYPE_CHECKING:
    from advguard.defenses.training.trainer import TrainConfig


# -- inner maximisations ----------------------------------------------------------------
def perturb_steps(
    net: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss: Callable[[torch.Tensor], torch.Tensor],
    start: Callable[[dict[str, Any], torch.Generator], torch.Tensor],
    *,
    epsilon: float,
    norm: Norm,
    steps: int,
    step_size: float,
    bounds: tuple[float, float],
    generator: torch.Generator,
) -> torch.Tensor:
    """``steps`` steepest-ascent steps of ``loss`` (a batch loss) from ``start``, projected
    onto the ball and the bounds, on the shared gradient engine; the last iterate."""
    lo, hi = bounds

    def step(g: torch.Tensor, x_adv: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
        return clip_to_ball(x_adv + step_size * normalize(g, norm), s["x0"], norm, epsilon, lo, hi)

    out = gradient_descent(
        NetOracle(net),
        x,
        y,
        None,
        generator,
        steps=steps,
        loss=lambda _y, _t: loss,
        start=start,
        step=step,
        early_stop=False,
        final_eval=False,
    )
    return out.detach()


def pgd_perturb(
    net: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epsilon: float,
    norm: Norm,
    steps: int,
    step_size: float,
    bounds: tuple[float, float],
    generator: torch.Generator,
    random_start: bool = True,
) -> torch.Tensor:
    """Batched PGD maximising cross-entropy (Madry et al.) on ``net``; returns ``x_adv``."""
    lo, hi = bounds
    if epsilon <= 0:
        return x.detach().clone()
    x = x.detach()

    def start(s: dict[str, Any], gen: torch.Generator) -> torch.Tensor:
        if not random_start:
            return x.clone()
        return (x + random_in_ball(x, norm, epsilon, gen)).clamp(lo, hi)

    return perturb_steps(
        net,
        x,
        y,
        lambda logits: F.cross_entropy(logits, y),
        start,
        epsilon=epsilon,
        norm=norm,
        steps=steps,
        step_size=step_size,
        bounds=bounds,
        generator=generator,
    )


def trades_perturb(
    net: nn.Module,
    x: torch.Tensor,
    *,
    epsilon: float,
    norm: Norm,
    steps: int,
    step_size: float,
    bounds: tuple[float, float],
    generator: torch.Generator,
) -> torch.Tensor:
    """TRADES inner maximisation: ``x_adv`` maximising KL(f(x) || f(x_adv)).

    Starts from ``x + 0.001 * N(0, 1)`` as in Zhang et al.'s reference code.
    """
    lo, hi = bounds
    x = x.detach()
    if epsilon <= 0:
        return x.clone()
    with torch.no_grad():
        p_clean = F.softmax(net(x), dim=1)

    def start(s: dict[str, Any], gen: torch.Generator) -> torch.Tensor:
        noise = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
        return (x + 0.001 * noise).clamp(lo, hi)

    return perturb_steps(
        net,
        x,
        torch.zeros(len(x), dtype=torch.long, device=x.device),  # unused: the loss is the KL
        lambda logits: F.kl_div(F.log_softmax(logits, dim=1), p_clean, reduction="sum"),
        start,
        epsilon=epsilon,
        norm=norm,
        steps=steps,
        step_size=step_size,
        bounds=bounds,
        generator=generator,
    )


def fgsm_perturb(
    net: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epsilon: float,
    norm: Norm,
    alpha: float,
    bounds: tuple[float, float],
    generator: torch.Generator,
    random_init: bool = True,
) -> torch.Tensor:
    """Fast-AT step (Wong et al.): uniform random init in the ball, one step of ``alpha``."""
    lo, hi = bounds
    x = x.detach()
    if epsilon <= 0:
        return x.clone()
    x0 = (x + random_in_ball(x, norm, epsilon, generator)).clamp(lo, hi) if random_init else x
    x0 = x0.clone().requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(net(x0), y)
        (g,) = torch.autograd.grad(loss, x0)
    return clip_to_ball(x0.detach() + alpha * normalize(g, norm), x, norm, epsilon, lo, hi).detach()


# -- strategies -------------------------------------------------------------------------
Losses = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]


class Strategy(Protocol):
    """One adversarial-training method."""

    name: ClassVar[str]

    def perturb(
        self, net: nn.Module, x: torch.Tensor, y: torch.Tensor, epsilon: float, gen: torch.Generator
    ) -> torch.Tensor:
        """The training examples for batch ``(x, y)`` at the current ``epsilon``."""
        ...

    def loss(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor) -> Losses:
        """``(loss to minimise, clean logits or None, adversarial logits)``."""
        ...


def mixed_ce(
    net: nn.Module, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor, mix: float
) -> Losses:
    """``mix * CE(x) + (1 - mix) * CE(x_adv)`` (only the adversarial CE when ``mix`` is 0)."""
    if mix > 0:
        logits_clean = net(x)
        logits_adv = net(x_adv)
        loss = mix * F.cross_entropy(logits_clean, y) + (1 - mix) * F.cross_entropy(logits_adv, y)
        return loss, logits_clean, logits_adv
    logits_adv = net(x_adv)
    return F.cross_entropy(logits_adv, y), None, logits_adv


def _scaled_step(cfg: TrainConfig, epsilon: float) -> float:
    """The inner step size at the current (ramped) ``epsilon``."""
    return (cfg.step_size or 0.0) * epsilon / cfg.epsilon if cfg.epsilon > 0 else 0.0


@dataclass(frozen=True)
class PGDAT:
    """Madry et al. 2018: CE on PGD examples; ``mix`` weights in the clean CE."""

    cfg: TrainConfig
    name: ClassVar[str] = "pgd-at"

    def perturb(
        self, net: nn.Module, x: torch.Tensor, y: torch.Tensor, epsilon: float, gen: torch.Generator
    ) -> torch.Tensor:
        c = self.cfg
        return pgd_perturb(
            net, x, y, epsilon=epsilon, norm=c.norm, steps=c.steps,  # type: ignore[arg-type]
            step_size=_scaled_step(c, epsilon), bounds=c.bounds, generator=gen, random_start=True,
        )  # fmt: skip

    def loss(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor) -> Losses:
        return mixed_ce(net, x, y, x_adv, self.cfg.mix)


@dataclass(frozen=True)
class TRADES:
    """Zhang et al. 2019: ``CE(f(x), y) + beta * KL(f(x) || f(x_adv))``."""

    cfg: TrainConfig
    name: ClassVar[str] = "trades"

    def perturb(
        self, net: nn.Module, x: torch.Tensor, y: torch.Tensor, epsilon: float, gen: torch.Generator
    ) -> torch.Tensor:
        c = self.cfg
        return trades_perturb(
            net, x, epsilon=epsilon, norm=c.norm, steps=c.steps,  # type: ignore[arg-type]
            step_size=_scaled_step(c, epsilon), bounds=c.bounds, generator=gen,
        )  # fmt: skip

    def loss(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor) -> Losses:
        logits_clean = net(x)
        logits_adv = net(x_adv)
        kl = F.kl_div(
            F.log_softmax(logits_adv, dim=1), F.softmax(logits_clean, dim=1), reduction="batchmean"
        )
        return F.cross_entropy(logits_clean, y) + self.cfg.beta * kl, logits_clean, logits_adv


@dataclass(frozen=True)
class FastAT:
    """Wong et al. 2020: CE on one FGSM step of ``fast_alpha * epsilon`` from a random start
    (``mix`` weights in the clean CE as for PGD-AT)."""

    cfg: TrainConfig
    name: ClassVar[str] = "fast-at"

    def perturb(
        self, net: nn.Module, x: torch.Tensor, y: torch.Tensor, epsilon: float, gen: torch.Generator
    ) -> torch.Tensor:
        c = self.cfg
        return fgsm_perturb(
            net, x, y, epsilon=epsilon, norm=c.norm, alpha=c.fast_alpha * epsilon,  # type: ignore[arg-type]
            bounds=c.bounds, generator=gen, random_init=c.random_init,
        )  # fmt: skip

    def loss(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor) -> Losses:
        return mixed_ce(net, x, y, x_adv, self.cfg.mix)


@dataclass(frozen=True)
class Standard:
    """Standard training (no adversarial examples): CE on the clean batch. With ``epsilon``
    0 the held-out robust accuracy is the clean accuracy (no attack is run); used for the
    poisoning goals and as the reference of loss-drift monitoring."""

    cfg: TrainConfig
    name: ClassVar[str] = "standard"

    def perturb(
        self, net: nn.Module, x: torch.Tensor, y: torch.Tensor, epsilon: float, gen: torch.Generator
    ) -> torch.Tensor:
        return x

    def loss(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor) -> Losses:
        logits = net(x)
        return F.cross_entropy(logits, y), logits, logits


STRATEGIES: dict[str, Callable[[TrainConfig], Strategy]] = {
    PGDAT.name: PGDAT,
    TRADES.name: TRADES,
    FastAT.name: FastAT,
    Standard.name: Standard,
}
METHODS: tuple[str, ...] = tuple(STRATEGIES)

__all__ = [
    "METHODS",
    "PGDAT",
    "STRATEGIES",
    "TRADES",
    "FastAT",
    "Standard",
    "Strategy",
    "fgsm_perturb",
    "mixed_ce",
    "perturb_steps",
    "pgd_perturb",
    "trades_perturb",
]
