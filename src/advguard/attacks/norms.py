"""Norm arithmetic shared by all attacks: parsing, per-sample norms, projections."""

from __future__ import annotations

import math
from typing import Literal

import torch

from advguard.attacks.randomness import Key, SampleRandom
from advguard.errors import InputError

Norm = Literal["linf", "l2", "l1", "l0"]

_ALIASES: dict[str, Norm] = {
    "linf": "linf",
    "inf": "linf",
    "l_inf": "linf",
    "infinity": "linf",
    "l2": "l2",
    "2": "l2",
    "l_2": "l2",
    "l1": "l1",
    "1": "l1",
    "l_1": "l1",
    "l0": "l0",
    "0": "l0",
    "l_0": "l0",
}


def parse_norm(norm: object, allowed: tuple[str, ...] | None = None) -> Norm:
    """Accept 'Linf'/'inf'/math.inf, 'L2'/2, 'L1'/1, 'L0'/0 and return the canonical name."""
    if isinstance(norm, (int, float)) and not isinstance(norm, bool):
        key = "inf" if math.isinf(norm) else str(int(norm)) if float(norm).is_integer() else "?"
    else:
        key = str(norm).strip().lower()
    canon = _ALIASES.get(key)
    if canon is None:
        raise InputError(f"unknown norm {norm!r}; use one of linf, l2, l1, l0")
    if allowed is not None and canon not in allowed:
        raise InputError(f"norm {canon} is not supported here; supported: {', '.join(allowed)}")
    return canon


def flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(len(x), -1)


def per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-sample vector viewed to broadcast against a batch shaped like ``like``."""
    return v.view(-1, *([1] * (like.ndim - 1)))


_view = per_sample


def norm_of(delta: torch.Tensor, norm: Norm) -> torch.Tensor:
    """Per-sample norm of a batch of perturbations."""
    d = flat(delta)
    if norm == "linf":
        return d.abs().amax(dim=1) if d.shape[1] else d.new_zeros(len(d))
    if norm == "l2":
        return d.norm(p=2, dim=1)
    if norm == "l1":
        return d.abs().sum(dim=1)
    if norm == "l0":
        return (d != 0).sum(dim=1).to(d.dtype)
    raise InputError(f"unknown norm {norm!r}")


def normalize(g: torch.Tensor, norm: Norm, eps_floor: float = 1e-12) -> torch.Tensor:
    """Steepest-ascent direction of unit ``norm`` (sign for Linf, g/|g|_2 for L2)."""
    if norm == "linf":
        return g.sign()
    if norm == "l2":
        n = flat(g).norm(p=2, dim=1).clamp_min(eps_floor)
        return g / _view(n, g)
    if norm == "l1":
        n = flat(g).abs().sum(dim=1).clamp_min(eps_floor)
        return g / _view(n, g)
    raise InputError(f"no steepest-ascent direction for norm {norm}")


def project(delta: torch.Tensor, norm: Norm, eps: float | torch.Tensor) -> torch.Tensor:
    """Euclidean projection of each perturbation onto the ``norm`` ball of radius ``eps``."""
    eps_t = torch.as_tensor(eps, dtype=delta.dtype, device=delta.device)
    if eps_t.ndim == 0:
        eps_t = eps_t.expand(len(delta))
    if norm == "linf":
        e = _view(eps_t, delta)
        return torch.maximum(torch.minimum(delta, e), -e)
    if norm == "l2":
        n = flat(delta).norm(p=2, dim=1)
        factor = torch.where(n > eps_t, eps_t / n.clamp_min(1e-12), torch.ones_like(n))
        return delta * _view(factor, delta)
    if norm == "l1":
        return _project_l1(delta, eps_t)
    raise InputError(f"cannot project onto a {norm} ball")


def _project_l1(delta: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Exact projection onto the L1 ball (Duchi et al. 2008), vectorised over the batch."""
    d = flat(delta)
    a = d.abs()
    outside = a.sum(dim=1) > eps
    if not outside.any():
        return delta
    mu, _ = a.sort(dim=1, descending=True)
    cums = mu.cumsum(dim=1)
    ks = torch.arange(1, d.shape[1] + 1, device=d.device, dtype=d.dtype)
    cond = mu - (cums - eps[:, None]) / ks > 0
    rho = cond.to(torch.int64).cumsum(dim=1).argmax(dim=1)  # last index where cond holds
    theta = (cums.gather(1, rho[:, None]).squeeze(1) - eps) / (rho + 1).to(d.dtype)
    theta = torch.where(outside, theta.clamp_min(0), torch.zeros_like(theta))
    out = d.sign() * (a - theta[:, None]).clamp_min(0)
    return out.view_as(delta)


def random_in_ball(
    like: torch.Tensor,
    norm: Norm,
    eps: float | torch.Tensor,
    rng: SampleRandom | torch.Generator,
    key: Key = "ball",
) -> torch.Tensor:
    """Uniform random perturbation inside the ``norm`` ball (used for random starts).

    With a :class:`~advguard.attacks.randomness.SampleRandom` (attacks), sample ``i`` draws
    from its own stream under ``key``; a ``torch.Generator`` (the adversarial trainer's
    inner maximisation) draws for the batch as a whole.
    """
    eps_t = torch.as_tensor(eps, dtype=like.dtype, device=like.device)
    if eps_t.ndim == 0:
        eps_t = eps_t.expand(len(like))
    e = _view(eps_t, like)
    draw = _Draws(rng, key, like)
    if norm == "linf":
        return (2 * draw.uniform("u", like.shape[1:]) - 1) * e
    n = flat(like).shape[1]
    if norm == "l2":
        g = draw.normal("dir", like.shape[1:])
        g = g / _view(flat(g).norm(dim=1).clamp_min(1e-12), g)
        r = draw.uniform("radius", ()) ** (1.0 / n)
        return g * _view(r, g) * e
    if norm == "l1":
        # uniform in the L1 ball: Laplace direction, radius ~ U^(1/n)
        lap = -torch.log(draw.uniform("lap", like.shape[1:]).clamp_min(1e-12))
        v = lap * draw.sign("sign", like.shape[1:])
        v = v / _view(flat(v).abs().sum(dim=1).clamp_min(1e-12), v)
        r = draw.uniform("radius", ()) ** (1.0 / n)
        return v * _view(r, v) * e
    raise InputError(f"no random start for norm {norm}")


class _Draws:
    """Per-sample draws from a SampleRandom, or batch draws from a torch.Generator."""

    def __init__(self, rng: SampleRandom | torch.Generator, key: Key, like: torch.Tensor):
        self.rng, self.key, self.n = rng, key, len(like)
        self.dev, self.dt = like.device, like.dtype

    def uniform(self, name: str, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
        if isinstance(self.rng, torch.Generator):
            size = (self.n, *shape)
            return torch.rand(size, generator=self.rng, device=self.dev, dtype=self.dt)
        return self.rng.uniform((self.key, name), shape, dtype=self.dt).to(self.dev)

    def normal(self, name: str, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
        if isinstance(self.rng, torch.Generator):
            size = (self.n, *shape)
            return torch.randn(size, generator=self.rng, device=self.dev, dtype=self.dt)
        return self.rng.normal((self.key, name), shape, dtype=self.dt).to(self.dev)

    def sign(self, name: str, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
        if isinstance(self.rng, torch.Generator):
            size = (self.n, *shape)
            bits = torch.randint(0, 2, size, generator=self.rng, device=self.dev)
            return bits.to(self.dt) * 2 - 1
        return self.rng.sign((self.key, name), shape, dtype=self.dt).to(self.dev)
