"""HopSkipJump, Chen, Jordan & Wainwright, IEEE S&P 2020.

"HopSkipJumpAttack: A Query-Efficient Decision-Based Attack"
(https://arxiv.org/abs/1904.02144). Decision-based black-box: the attack only reads the
predicted label (``argmax`` of ``model.logits``); scores and gradients are never used.

The algorithm follows the paper and its reference implementation (``hsja.py``,
github.com/Jianbo-Lab/HSJA), batched over samples with per-sample state:

1. **Start.** Untargeted: uniform random noise in the bounds, one draw per sample and
   round, until a draw is misclassified (at most ``init_trials`` draws), then a binary
   search on the blend ``(1 - a) x + a noise`` down to ``a`` tolerance 0.001. Targeted:
   the nearest sample *of the same batch* that the model assigns to the target class
   (one query per sample to read the batch's labels); where the batch has none, the same
   random-noise search as above (now for noise classified as the target).
2. **Binary search to the boundary** (``binary_search_batch``): L2 along the segment to
   ``x`` with threshold ``theta = gamma / d^1.5``; Linf on the radius of an Linf ball
   around ``x`` with threshold ``min(theta * dist, theta)``, ``theta = gamma / d^2``.
3. **Iteration** ``t = 1, 2, ...``: Monte-Carlo estimate of the boundary's normal at the
   current point from ``num_evals = min(init_num_evals * sqrt(t), max_num_evals)`` random
   unit directions (Gaussian for L2, uniform for Linf) at radius ``delta`` (``0.1 *
   (hi - lo)`` at ``t = 1``, then ``sqrt(d) * theta * dist`` (L2) / ``d * theta * dist``
   (Linf)), with the mean of the decisions as baseline; the update direction is the
   estimate (L2) or its sign (Linf); geometric step-size search from ``dist / sqrt(t)``,
   halved until the step lands on the adversarial side; binary search back to the
   boundary.

Budget: ``max_queries`` per sample, counted exactly and never exceeded (random search,
blend and binary searches, gradient samples and step-size trials all count; targeted
attacks also count the one query that reads each sample's label). A sample stops when its
budget is spent (the last Monte-Carlo estimate is truncated to the queries left), after
``max_iter`` iterations, or -- when ``epsilon`` is given -- as soon as its adversarial point
lies within ``epsilon``. Every point the attack keeps is known to be adversarial, so
running out of budget mid-search is safe. The smallest adversarial found is returned
(the reference returns the last iterate; the trajectory is the same). Samples for which
no adversarial starting point was found are returned unchanged (``success`` False).

``AttackResult.queries`` gives the queries spent on each sample (0 for samples the base
class skipped); the base class's clean prediction and final success check are not
included.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from advguard import _validate as check
from advguard.attacks.base import Attack, RunResult
from advguard.attacks.norms import flat
from advguard.attacks.randomness import SampleRandom
from advguard.errors import InputError
from advguard.models.base import Classifier

_MAX_HALVINGS = 30  # reference: unbounded; 2^-30 of the distance is far below float noise
_BLEND_TOL = 0.001  # reference initialize(): blend binary search tolerance


class _Oracle:
    """Decision queries with exact per-sample accounting against the budget."""

    def __init__(self, model, y, targets, budget: int, batch: int) -> None:
        self.model = model
        self.y = y
        self.targets = targets
        self.budget = budget
        self.batch = batch
        self.used = torch.zeros(len(y), dtype=torch.long, device=y.device)

    def left(self, idx: torch.Tensor) -> torch.Tensor:
        return self.budget - self.used[idx]

    def labels(self, xq: torch.Tensor, owners: torch.Tensor) -> torch.Tensor:
        self.used += torch.bincount(owners, minlength=len(self.used))
        if int(self.used.max()) > self.budget:  # pragma: no cover - internal invariant
            raise RuntimeError("HopSkipJump exceeded its query budget")
        out = [
            self.model.logits(xq[i : i + self.batch]).argmax(1)
            for i in range(0, len(xq), self.batch)
        ]
        return torch.cat(out).to(owners.device)

    def decide(self, xq: torch.Tensor, owners: torch.Tensor) -> torch.Tensor:
        """Is ``xq[k]`` adversarial for sample ``owners[k]``?"""
        if len(owners) == 0:
            return torch.zeros(0, dtype=torch.bool, device=owners.device)
        pred = self.labels(xq, owners)
        if self.targets is not None:
            return pred == self.targets[owners]
        return pred != self.y[owners]


class HopSkipJump(Attack):
    """HopSkipJump (decision-based, minimum-norm), L2 and Linf, untargeted or targeted.

    Parameters
    ----------
    norm:
        ``"l2"`` or ``"linf"``.
    max_queries:
        Per-sample query budget, counted exactly (every label read counts).
    max_iter:
        Maximum gradient-estimation iterations per sample.
    init_num_evals, max_num_evals:
        Monte-Carlo samples at iteration ``t``: ``min(init_num_evals * sqrt(t), max_num_evals)``.
    gamma:
        Binary-search threshold parameter (``theta = gamma / d^1.5`` for L2,
        ``gamma / d^2`` for Linf).
    init_trials:
        Random-noise draws per sample when looking for a starting point.
    query_batch_size:
        Largest batch sent to the model at once (memory only; results do not depend on it
        except through the order of random draws).
    seed:
        Seed of the attack's random draws (keyed per sample).

    Without ``epsilon`` it returns the smallest adversarial found (minimum-norm); with
    ``epsilon`` a sample stops once its adversarial lies within ``epsilon`` and the result
    is clipped to the ball.
    """

    name = "hopskipjump"
    norms = ("l2", "linf")
    needs_gradients = False
    minimum_norm = True
    supports_targeted = True
    tracks_queries = True

    def __init__(
        self,
        *,
        norm: str | float = "l2",
        max_queries: int = 5000,
        max_iter: int = 64,
        init_num_evals: int = 100,
        max_num_evals: int = 10000,
        gamma: float = 1.0,
        init_trials: int = 100,
        query_batch_size: int = 8192,
        seed: int = 0,
        allow_large: bool = False,
    ) -> None:
        super().__init__(norm=norm, seed=seed, allow_large=allow_large)
        big = {"allow_large": allow_large}
        check.queries("max_queries", max_queries, **big)
        check.steps("max_iter", max_iter, **big)
        check.queries("init_num_evals", init_num_evals, **big)
        check.queries("max_num_evals", max_num_evals, **big)
        check.queries("init_trials", init_trials, **big)
        check.queries("query_batch_size", query_batch_size, **big)
        if max_num_evals < init_num_evals:
            raise InputError(
                f"max_num_evals ({max_num_evals}) must be >= init_num_evals ({init_num_evals})"
            )
        g = check.positive("gamma", gamma)
        self.max_queries = int(max_queries)
        self.max_iter = int(max_iter)
        self.init_num_evals = int(init_num_evals)
        self.max_num_evals = int(max_num_evals)
        self.gamma = g
        self.init_trials = int(init_trials)
        self.query_batch_size = int(query_batch_size)

    def _setup(self, model: Classifier) -> dict[str, Any]:
        return {"max_queries": self.max_queries}

    # -- geometry -------------------------------------------------------------
    def _dist(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        d = flat(a - b)
        return d.norm(dim=1) if self.norm == "l2" else d.abs().amax(dim=1)

    def _project(self, x: torch.Tensor, p: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        a = alpha.view(-1, *([1] * (x.ndim - 1)))
        if self.norm == "l2":
            return (1 - a) * x + a * p
        return torch.minimum(torch.maximum(p, x - a), x + a)

    # -- the attack ---------------------------------------------------------------
    def _run(
        self,
        model: Classifier,
        x: torch.Tensor,
        y: torch.Tensor,
        epsilon: float | None,
        targets: torch.Tensor | None,
        rng: SampleRandom,
    ) -> RunResult:
        n = len(x)
        dev = x.device
        lo, hi = model.bounds
        d = x[0].numel()
        theta = self.gamma / (d * math.sqrt(d)) if self.norm == "l2" else self.gamma / d**2
        oracle = _Oracle(model, y, targets, self.max_queries, self.query_batch_size)

        adv, have = self._start(x, targets, oracle, rng, lo, hi)
        dist_post = torch.zeros(n, device=dev)
        idx = have.nonzero().squeeze(1)
        if len(idx):
            adv[idx], dist_post[idx] = self._binary_search(x[idx], adv[idx], idx, oracle, theta)
        dist = torch.where(have, self._dist(adv, x), torch.full_like(dist_post, float("inf")))
        best, best_dist = adv.clone(), dist.clone()

        for t in range(1, self.max_iter + 1):
            act = have & (oracle.left(torch.arange(n, device=dev)) > 0)
            if epsilon is not None:
                act &= best_dist > epsilon
            idx = act.nonzero().squeeze(1)
            if len(idx) == 0:
                break
            if t == 1:
                delta = torch.full((len(idx),), 0.1 * (hi - lo), device=dev)
            elif self.norm == "l2":
                delta = math.sqrt(d) * theta * dist_post[idx]
            else:
                delta = d * theta * dist_post[idx]
            delta = delta.clamp_min(1e-12)
            num_evals = int(min(int(self.init_num_evals * math.sqrt(t)), self.max_num_evals))
            grad = self._estimate_gradient(
                adv[idx], idx, num_evals, delta, oracle, rng.subset(idx).fork("iter", t), lo, hi
            )
            update = grad.sign() if self.norm == "linf" else grad

            # geometric progression of the step size
            step = dist[idx] / math.sqrt(t)
            ok = torch.zeros(len(idx), dtype=torch.bool, device=dev)
            for _ in range(_MAX_HALVINGS):
                m = (~ok & (oracle.left(idx) > 0)).nonzero().squeeze(1)
                if len(m) == 0:
                    break
                cand = (adv[idx[m]] + _bc(step[m], adv) * update[m]).clamp(lo, hi)
                dec = oracle.decide(cand, idx[m])
                ok[m[dec]] = True
                step[m[~dec]] /= 2.0
            if not ok.any():
                continue
            moved = idx[ok]
            new = (adv[moved] + _bc(step[ok], adv) * update[ok]).clamp(lo, hi)
            adv[moved], dist_post[moved] = self._binary_search(x[moved], new, moved, oracle, theta)
            dist[moved] = self._dist(adv[moved], x[moved])
            better = moved[dist[moved] < best_dist[moved]]
            best[better] = adv[better]
            best_dist[better] = dist[better]

        return RunResult(best, queries=oracle.used)

    def _start(self, x, targets, oracle: _Oracle, gen, lo, hi):
        """Adversarial starting points (the batch for targeted, else random noise + blend)."""
        n = len(x)
        dev = x.device
        adv = x.clone()
        have = torch.zeros(n, dtype=torch.bool, device=dev)
        if targets is not None:
            pred = oracle.labels(x, torch.arange(n, device=dev))
            xf = flat(x)
            p = 2.0 if self.norm == "l2" else float("inf")
            for i0 in range(0, n, 1024):
                rows = slice(i0, min(i0 + 1024, n))
                dm = torch.cdist(xf[rows], xf, p=p)
                dm[pred[None, :] != targets[rows, None]] = float("inf")
                best_d, j = dm.min(dim=1)
                found = torch.isfinite(best_d)
                ids = torch.arange(i0, rows.stop, device=dev)[found]
                adv[ids] = x[j[found]]
                have[ids] = True

        noise = torch.zeros_like(x)
        from_noise = torch.zeros(n, dtype=torch.bool, device=dev)
        for trial in range(self.init_trials):
            q = (~have & (oracle.left(torch.arange(n, device=dev)) > 0)).nonzero().squeeze(1)
            if len(q) == 0:
                break
            u = gen.subset(q).uniform(("init", trial), x.shape[1:], dtype=x.dtype).to(dev)
            u = lo + (hi - lo) * u
            dec = oracle.decide(u, q)
            hit = q[dec]
            noise[hit] = u[dec]
            have[hit] = True
            from_noise[hit] = True

        # reference initialize(): blend binary search towards x, tolerance 0.001
        idx = from_noise.nonzero().squeeze(1)
        if len(idx):
            low = torch.zeros(len(idx), device=dev)
            high = torch.ones(len(idx), device=dev)
            xs, ns = x[idx], noise[idx]
            while True:
                m = ((high - low > _BLEND_TOL) & (oracle.left(idx) > 0)).nonzero().squeeze(1)
                if len(m) == 0:
                    break
                mid = (high[m] + low[m]) / 2.0
                blended = (1 - _bc(mid, xs)) * xs[m] + _bc(mid, xs) * ns[m]
                dec = oracle.decide(blended, idx[m])
                high[m[dec]] = mid[dec]
                low[m[~dec]] = mid[~dec]
            adv[idx] = (1 - _bc(high, xs)) * xs + _bc(high, xs) * ns
        return adv, have

    def _binary_search(self, x, p, idx, oracle: _Oracle, theta: float):
        """Reference ``binary_search_batch`` for one adversarial point per sample.

        Returns the boundary points (known adversarial) and the distance of ``p`` to ``x``.
        """
        dist_post = self._dist(p, x)
        if self.norm == "l2":
            highs = torch.ones(len(x), device=x.device)
            thresholds = torch.full_like(highs, theta)
        else:
            highs = dist_post.clone()
            thresholds = torch.clamp(dist_post * theta, max=theta).clamp_min(1e-30)
        lows = torch.zeros_like(highs)
        while True:
            m = (((highs - lows) / thresholds > 1) & (oracle.left(idx) > 0)).nonzero().squeeze(1)
            if len(m) == 0:
                break
            mids = (highs[m] + lows[m]) / 2.0
            dec = oracle.decide(self._project(x[m], p[m], mids), idx[m])
            highs[m[dec]] = mids[dec]
            lows[m[~dec]] = mids[~dec]
        return self._project(x, p, highs), dist_post

    def _estimate_gradient(self, xb, idx, num_evals, delta, oracle: _Oracle, gen, lo, hi):
        """Monte-Carlo boundary normal at ``xb`` (unit L2 norm); reference ``approximate_gradient``.

        Samples with fewer queries left than ``num_evals`` use only those."""
        k = len(xb)
        shape = xb.shape[1:]
        dev, dt = xb.device, xb.dtype
        n_evals = oracle.left(idx).clamp(max=num_evals)
        grads = torch.zeros_like(xb)
        per_chunk = max(1, self.query_batch_size // num_evals)
        ar = torch.arange(num_evals, device=dev)
        for i0 in range(0, k, per_chunk):
            sl = slice(i0, min(i0 + per_chunk, k))
            xc, dc, owners = xb[sl], delta[sl], idx[sl]
            kc = len(xc)
            size = (num_evals, *shape)
            chunk = gen.subset(torch.arange(i0, sl.stop))
            if self.norm == "l2":
                rv = chunk.normal("probe", size, dtype=dt).to(dev)
            else:
                rv = 2 * chunk.uniform("probe", size, dtype=dt).to(dev) - 1
            rv = rv / rv.flatten(2).norm(dim=2).clamp_min(1e-12).view(
                kc, num_evals, *[1] * len(shape)
            )
            dcv = dc.view(kc, 1, *[1] * len(shape))
            pert = (xc[:, None] + dcv * rv).clamp(lo, hi)
            rv = (pert - xc[:, None]) / dcv
            valid = ar[None] < n_evals[sl, None]
            dec = oracle.decide(pert[valid], owners[:, None].expand(kc, num_evals)[valid])
            fval = torch.zeros(kc, num_evals, device=dev, dtype=dt)
            fval[valid] = 2.0 * dec.to(dt) - 1.0
            cnt = valid.sum(1).clamp_min(1).to(dt)
            mean_f = fval.sum(1) / cnt
            coef = torch.where(
                mean_f[:, None] == 1.0,
                torch.ones_like(fval),
                torch.where(
                    mean_f[:, None] == -1.0, -torch.ones_like(fval), fval - mean_f[:, None]
                ),
            ) * valid.to(dt)
            g = (coef.view(kc, num_evals, *[1] * len(shape)) * rv).sum(1) / cnt.view(
                kc, *[1] * len(shape)
            )
            g = g / flat(g).norm(dim=1).clamp_min(1e-12).view(kc, *[1] * len(shape))
            grads[sl] = g
        return grads


def _bc(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-sample vector against a batch shaped like ``like``."""
    return v.view(-1, *([1] * (like.ndim - 1)))
