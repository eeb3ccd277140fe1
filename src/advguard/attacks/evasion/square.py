"""Square Attack, Andriushchenko, Croce, Flammarion & Hein, ECCV 2020.

"Square Attack: a query-efficient black-box adversarial attack via random search"
(https://arxiv.org/abs/1912.00049). Score-based black-box: the attack only reads the
model's scores through ``model.logits`` and never asks for gradients.

The algorithm follows the paper and its reference implementation
(github.com/max-andr/square-attack):

* Loss to *minimise*: untargeted, the margin ``z_y - max_{j != y} z_j``; targeted, the
  cross-entropy of the target class ``-log p_t`` (the paper's choice for targeted
  attacks). ``loss="margin"`` / ``loss="ce"`` overrides the default.
* Linf: initialisation with vertical stripes of ``+-eps`` (one random sign per channel and
  column); each iteration sets one random ``s x s`` window of the perturbation to ``+-eps``
  (one random sign per channel), resampling the signs while the window would leave the
  current iterate unchanged.
* L2: initialisation with a grid of the paper's "meta pseudo-Gaussian" squares (two
  halves of opposite sign, random sign per channel), rescaled to norm ``eps``; each
  iteration moves the mass of a second random window into a new pattern on the first
  window (Algorithm 3 of the paper) and rescales the perturbation to norm ``eps``.
* ``p`` (fraction of pixels changed) is piecewise constant: ``p_init`` halved at
  iterations 10, 50, 200, 500, 1000, 2000, 4000, 6000 and 8000 of a 10 000-query run,
  rescaled to the actual budget (``it -> int(it / budget * 10000)``) as in the reference
  code. The window side is ``s = round(sqrt(p * n_features / c))`` (Linf: clipped to
  ``[1, min(h, w) - 1]``; L2: at least 3 and odd, at most ``min(h, w)``).
* A candidate replaces the current iterate only if it lowers the loss (or fools the
  model); a sample leaves the batch, and is no longer queried, as soon as it is fooled.

Window positions are drawn independently for every sample and uniformly over all
``h - s + 1`` positions (the paper's ``U({0, ..., w - h})``).

Query accounting: ``max_queries`` is the per-sample budget over all restarts, the
initialisation query included; it is split evenly over ``restarts`` (each restart
re-initialises the samples not yet fooled). ``AttackResult.queries`` gives the queries the
attack spent on each sample (0 for samples the base class skipped). The base class's own
clean prediction and final success check are not included.

Inputs must be image-shaped: ``(C, H, W)``, or ``(H, W)`` treated as one channel, with
``H, W >= 2``. Flat ``(D,)`` inputs raise :class:`~advguard.errors.InputError`; use
HopSkipJump (any shape) for tabular models, or give the adapter an image ``input_shape``
(``SklearnClassifier`` flattens for the estimator).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from advguard import _validate as check
from advguard.attacks import losses
from advguard.attacks.base import Attack, RunResult
from advguard.attacks.randomness import SampleRandom
from advguard.errors import InputError
from advguard.models.base import Classifier
from advguard.models.local import LocalForward

_LOSSES = ("margin", "ce")
_P_INIT_DEFAULT = {"linf": 0.8, "l2": 0.1}
_MAX_SIGN_RESAMPLES = 100  # reference: unbounded while loop (ends with probability 1)


def p_selection(p_init: float, it: int, n_iters: int) -> float:
    """Piecewise-constant schedule of ``p`` (reference ``p_selection``), rescaled to the budget."""
    it = int(it / n_iters * 10000)
    if 10 < it <= 50:
        return p_init / 2
    if 50 < it <= 200:
        return p_init / 4
    if 200 < it <= 500:
        return p_init / 8
    if 500 < it <= 1000:
        return p_init / 16
    if 1000 < it <= 2000:
        return p_init / 32
    if 2000 < it <= 4000:
        return p_init / 64
    if 4000 < it <= 6000:
        return p_init / 128
    if 6000 < it <= 8000:
        return p_init / 256
    if it > 8000:
        return p_init / 512
    return p_init


def _pseudo_gaussian_rectangle(x: int, y: int) -> np.ndarray:
    """Reference ``pseudo_gaussian_pert_rectangles``: nested rectangles, weight 1/(k+1)^2."""
    delta = np.zeros([x, y])
    x_c, y_c = x // 2 + 1, y // 2 + 1
    c2 = [x_c - 1, y_c - 1]
    for counter in range(max(x_c, y_c)):
        delta[
            max(c2[0], 0) : min(c2[0] + (2 * counter + 1), x),
            max(0, c2[1]) : min(c2[1] + (2 * counter + 1), y),
        ] += 1.0 / (counter + 1) ** 2
        c2[0] -= 1
        c2[1] -= 1
    nrm = np.sqrt(np.sum(delta**2))
    return delta / nrm if nrm > 0 else delta


@lru_cache(maxsize=64)
def meta_pattern(s: int) -> np.ndarray:
    """Reference ``meta_pseudo_gaussian_pert`` (without its random transpose): two halves of
    nested squares with opposite signs, unit L2 norm, shape ``(s, s)``."""
    delta = np.zeros([s, s])
    delta[: s // 2] = _pseudo_gaussian_rectangle(s // 2, s)
    delta[s // 2 :] = -_pseudo_gaussian_rectangle(s - s // 2, s)
    delta /= np.sqrt(np.sum(delta**2))
    return delta


class SquareAttack(Attack):
    """Square Attack (score-based black-box random search), Linf and L2, (un)targeted.

    Parameters
    ----------
    norm:
        ``"linf"`` or ``"l2"``.
    max_queries:
        Per-sample query budget (all restarts together, the initialisation query
        included). Never exceeded.
    p_init:
        Initial fraction of pixels changed per iteration. Default 0.8 (Linf) / 0.1 (L2),
        the paper's values.
    restarts:
        Random restarts; the budget is split evenly over them (the first restarts get the
        remainder). Each restart re-initialises the samples not yet fooled.
    loss:
        ``"margin"`` or ``"ce"``; default margin for untargeted and cross-entropy for
        targeted attacks, as in the paper.
    seed:
        Seed of the attack's random draws (keyed per sample).
    incremental:
        Linf: once the window is at most a quarter of the image side, compute each
        candidate's logits from cached feature maps, recomputing only the regions its
        window can change (:class:`advguard.models.local.LocalForward`; a plain
        ``TorchClassifier`` over a sequential CNN only, else the full forward pass). The
        logits equal the full pass's up to float rounding; ``False``: always the full pass.

    ``result.queries`` holds the per-sample queries the attack used. Unfooled samples
    return the iterate with the lowest loss (best over restarts).
    """

    name = "square"
    norms = ("linf", "l2")
    needs_gradients = False
    minimum_norm = False
    supports_targeted = True
    tracks_queries = True

    def __init__(
        self,
        *,
        norm: str | float = "linf",
        max_queries: int = 1000,
        p_init: float | None = None,
        restarts: int = 1,
        loss: str | None = None,
        seed: int = 0,
        allow_large: bool = False,
        incremental: bool = True,
    ) -> None:
        super().__init__(norm=norm, seed=seed, allow_large=allow_large)
        if not isinstance(incremental, bool):
            raise InputError(f"incremental must be true or false, got {incremental!r}")
        self.incremental = incremental
        check.queries("max_queries", max_queries, allow_large=allow_large)
        check.restarts("restarts", restarts, allow_large=allow_large)
        if restarts > max_queries:
            raise InputError(
                f"restarts ({restarts}) cannot exceed max_queries ({max_queries}): "
                "every restart needs at least its initialisation query"
            )
        if p_init is None:
            p_init = _P_INIT_DEFAULT[self.norm]
        p = check.number("p_init", p_init, low=0.0, high=1.0, low_open=True)
        if loss is not None:
            check.choice("loss", loss, _LOSSES)
        self.max_queries = int(max_queries)
        self.p_init = p
        self.restarts = int(restarts)
        self.loss = loss

    def _setup(self, model: Classifier) -> dict[str, Any]:
        _image_dims(tuple(model.input_shape))  # clear error before any work
        return {"max_queries": self.max_queries}

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
        assert epsilon is not None  # not a minimum-norm attack: the base class checked it
        n = len(x)
        c, h, w = _image_dims(tuple(x.shape[1:]))
        x4 = x.reshape(n, c, h, w)
        goal = targets if targets is not None else y
        best = x4.clone()
        best_loss = torch.full((n,), float("inf"), device=x.device)
        fooled = torch.zeros(n, dtype=torch.bool, device=x.device)
        queries = torch.zeros(n, dtype=torch.long, device=x.device)
        base, extra = divmod(self.max_queries, self.restarts)
        for r in range(self.restarts):
            budget = base + (1 if r < extra else 0)
            idx = (~fooled).nonzero().squeeze(1)
            if len(idx) == 0:
                break
            xb, lb, fb, qb = self._single_run(
                model,
                x4[idx],
                goal[idx],
                targets is not None,
                float(epsilon),
                budget,
                rng.subset(idx).fork("restart", r),
            )
            queries[idx] += qb
            better = fb | (lb < best_loss[idx])
            best[idx[better]] = xb[better]
            best_loss[idx[better]] = torch.where(
                fb[better], torch.full_like(lb[better], float("-inf")), lb[better]
            )
            fooled[idx[fb]] = True
        return RunResult(best.reshape(x.shape), queries=queries)

    def _objective(
        self, logits: torch.Tensor, goal: torch.Tensor, targeted: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss to minimise, fooled mask) from the scores."""
        kind = self.loss or ("ce" if targeted else "margin")
        if targeted:
            loss = (
                -losses.ce_targeted(logits, goal) if kind == "ce" else losses.margin(logits, goal)
            )
            fooled = logits.argmax(1) == goal
        else:
            loss = -losses.ce(logits, goal) if kind == "ce" else -losses.margin(logits, goal)
            fooled = logits.argmax(1) != goal
        return loss, fooled

    def _single_run(self, model, x, goal, targeted, eps, budget, gen):
        """One restart on ``x`` (N, C, H, W) with ``budget`` queries per sample."""
        if self.norm == "linf":
            return self._linf_run(model, x, goal, targeted, eps, budget, gen)
        lo, hi = model.bounds
        n = len(x)
        dev = x.device
        x_best = self._l2_init(x, eps, lo, hi, gen)
        loss, fooled = self._objective(model.logits(x_best), goal, targeted)
        queries = torch.ones(n, dtype=torch.long, device=dev)

        # compact working set of the samples still to fool
        a = (~fooled).nonzero().squeeze(1)
        xa, xba, ga, la = x[a], x_best[a], goal[a], loss[a]
        iters = 0  # candidate queries so far for every sample still in the working set
        for i_iter in range(budget - 1):
            if len(a) == 0:
                break
            p = p_selection(self.p_init, i_iter, budget)
            g_it = gen.subset(a).fork("iter", i_iter)
            x_new = self._l2_candidate(xa, xba, p, eps, lo, hi, g_it)
            loss_new, fool_new = self._objective(model.logits(x_new), ga, targeted)
            iters += 1
            improved = (loss_new < la) | fool_new
            xba = torch.where(improved[:, None, None, None], x_new, xba)
            la = torch.where(improved, loss_new, la)
            if fool_new.any():
                done = a[fool_new]
                x_best[done] = xba[fool_new]
                loss[done] = la[fool_new]
                fooled[done] = True
                queries[done] = 1 + iters
                keep = ~fool_new
                a, xa, xba, ga, la = a[keep], xa[keep], xba[keep], ga[keep], la[keep]
        if len(a):
            x_best[a] = xba
            loss[a] = la
            queries[a] = 1 + iters
        return x_best, loss, fooled, queries

    # -- Linf -----------------------------------------------------------------
    def _linf_run(self, model, x, goal, targeted, eps, budget, gen):
        """One Linf restart: stripes, then one window of +-eps per sample and iteration.

        Per iteration only the windows are touched: the window's pixels are gathered from
        the two possible values ``clamp(x +- eps)`` (computed once), the candidate is the
        current iterate with that window written in, and the iterate keeps the window if
        the loss dropped. All of an iteration's draws (window position, signs, the first
        sign resamples) come from one :meth:`SampleRandom.bits_many` call.
        """
        lo, hi = model.bounds
        n, c, h, w = x.shape
        dev = x.device
        init = eps * _signs(gen, "init", (c, 1, w), dev, x.dtype)
        x_best = (x + init).clamp(lo, hi)
        loss, fooled = self._objective(model.logits(x_best), goal, targeted)
        queries = torch.ones(n, dtype=torch.long, device=dev)
        # bit for bit the old ``(x + eps * sign).clamp(lo, hi)`` for either sign
        pm = eps * torch.tensor([1.0, -1.0], dtype=x.dtype, device=dev)
        a = (~fooled).nonzero().squeeze(1)
        ws = _LinfWork(
            idx=a,
            gen=gen.subset(a),
            xp=(x[a] + pm[0]).clamp(lo, hi).reshape(len(a), -1),
            xm=(x[a] + pm[1]).clamp(lo, hi).reshape(len(a), -1),
            xb=x_best[a].reshape(len(a), -1),
            goal=goal[a],
            loss=loss[a],
        )
        iters = 0  # candidate queries so far for every sample still in the working set
        local = LocalForward.build(model, (c, h, w)) if self.incremental else None
        cached = False  # local holds the feature maps of ws.xb
        for i_iter in range(budget - 1):
            if ws.idx.shape[0] == 0:
                break
            s = _linf_side(self.p_init, i_iter, budget, h, w)
            lin, wb, wnew = _linf_window(ws, s, c, h, w, ws.gen.fork("iter", i_iter))
            use_local = local is not None and 4 * s <= min(h, w)
            if use_local:
                assert local is not None
                if not cached:
                    local.reset(ws.xb.view(-1, c, h, w))
                    cached = True
                top = lin[:, 0]  # channel 0, window row 0, column 0
                logits = local.propose(top // w, top % w, wnew.view(-1, c, s, s))
            else:
                cached = False
                cand = ws.xb.clone()
                cand.scatter_(1, lin, wnew)
                logits = model.logits(cand.view(-1, c, h, w))
            loss_new, fool_new = self._objective(logits, ws.goal, targeted)
            iters += 1
            improved = (loss_new < ws.loss) | fool_new
            if use_local:
                assert local is not None
                local.settle(improved)
            ws.xb.scatter_(1, lin, torch.where(improved[:, None], wnew, wb))
            ws.loss = torch.where(improved, loss_new, ws.loss)
            if fool_new.any():
                done = ws.idx[fool_new]
                x_best[done] = ws.xb[fool_new].view(-1, c, h, w)
                loss[done] = ws.loss[fool_new]
                fooled[done] = True
                queries[done] = 1 + iters
                ws = ws.keep(~fool_new)
                if cached:
                    assert local is not None
                    local.subset(~fool_new)
        if len(ws.idx):
            x_best[ws.idx] = ws.xb.view(-1, c, h, w)
            loss[ws.idx] = ws.loss
            queries[ws.idx] = 1 + iters
        return x_best, loss, fooled, queries

    # -- L2 -------------------------------------------------------------------
    @staticmethod
    def _patterns(s: int, gen: SampleRandom, key, dev, dtype) -> torch.Tensor:
        """One meta pattern of side ``s`` per sample, each transposed with probability 1/2."""
        pat = torch.as_tensor(meta_pattern(s), dtype=dtype, device=dev)
        flip = gen.uniform(key).to(dev) >= 0.5
        return torch.where(flip[:, None, None], pat.T, pat)

    def _l2_init(self, x, eps, lo, hi, gen):
        _, c, h, w = x.shape
        delta = torch.zeros_like(x)
        s = max(h // 5, 1)
        sp_init = max((h - s * 5) // 2, 0)
        ch = sp_init
        for _ in range(h // s):
            cw = sp_init
            for _ in range(w // s):
                pat = self._patterns(s, gen, ("flip", ch, cw), x.device, x.dtype)[:, None]
                bump = pat * _signs(gen, ("signs", ch, cw), (c, 1, 1), x.device, x.dtype)
                win = delta[:, :, ch : ch + s, cw : cw + s]
                win += bump[:, :, : win.shape[2], : win.shape[3]]
                cw += s
            ch += s
        nrm = delta.flatten(1).norm(dim=1).clamp_min(1e-12)[:, None, None, None]
        return (x + delta / nrm * eps).clamp(lo, hi)

    def _l2_candidate(self, x, x_best, p, eps, lo, hi, gen):
        n, c, h, w = x.shape
        dev, dt = x.device, x.dtype
        s = max(round(math.sqrt(p * h * w)), 3)
        if s % 2 == 0:
            s += 1
        s = min(s, h, w)
        delta = x_best - x
        r1, c1 = _window_coords(h, w, s, gen, "window1", dev)
        r2, c2 = _window_coords(h, w, s, gen, "window2", dev)
        ni = torch.arange(n, device=dev)[:, None, None, None]
        ci = torch.arange(c, device=dev)[None, :, None, None]
        i1 = (ni, ci, r1[:, None, :, None], c1[:, None, None, :])
        i2 = (ni, ci, r2[:, None, :, None], c2[:, None, None, :])
        win1 = delta[i1]  # (n, c, s, s)
        mask1 = _coords_mask(r1, c1, h, w)
        mask2 = _coords_mask(r2, c2, h, w)
        norm_win1 = win1.pow(2).sum((2, 3), keepdim=True).sqrt()
        norm_img = delta.pow(2).sum((1, 2, 3), keepdim=True).sqrt()
        norm_wins = (delta * (mask1 | mask2)).pow(2).sum((2, 3), keepdim=True).sqrt()

        new = self._patterns(s, gen, "flip", dev, dt)[:, None] * _signs(
            gen, "signs", (c, 1, 1), dev, dt
        )
        new = new + win1 / (1e-10 + norm_win1)
        budget = ((eps**2 - norm_img.pow(2)).clamp_min(0) / c + norm_wins.pow(2)).sqrt()
        new = new / new.pow(2).sum((2, 3), keepdim=True).sqrt().clamp_min(1e-12) * budget
        delta = delta.clone()
        delta[i2] = 0.0
        delta[i1] = new
        nrm = delta.flatten(1).norm(dim=1).clamp_min(1e-12)[:, None, None, None]
        return (x + delta / nrm * eps).clamp(lo, hi)


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------
def _image_dims(shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(shape) == 3:
        c, h, w = shape
    elif len(shape) == 2:
        c, (h, w) = 1, shape
    else:
        raise InputError(
            f"Square Attack needs image-shaped inputs (C, H, W) or (H, W); the model's inputs "
            f"have shape {shape}. Use HopSkipJump for flat/tabular inputs, or declare the "
            "adapter's input_shape as an image."
        )
    if min(h, w) < 2:
        raise InputError(f"Square Attack needs images of at least 2x2 pixels, got {shape}")
    return int(c), int(h), int(w)


def _signs(gen: SampleRandom, key, shape, dev, dtype) -> torch.Tensor:
    """Random signs, shape ``(n, *shape)``, one stream per sample."""
    return gen.sign(key, shape, dtype=dtype).to(dev)


def _window_coords(h, w, s, gen: SampleRandom, key, dev) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column indices (n, s) of one random s x s window per sample."""
    vh = gen.randint((key, "row"), 0, h - s + 1).to(dev)
    vw = gen.randint((key, "col"), 0, w - s + 1).to(dev)
    ar = torch.arange(s, device=dev)
    return vh[:, None] + ar, vw[:, None] + ar


def _coords_mask(rows: torch.Tensor, cols: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Boolean (n, 1, h, w) mask of the windows starting at rows[:, 0], cols[:, 0]."""
    s = rows.shape[1]
    dev = rows.device
    rh = torch.arange(h, device=dev)[None]
    rw = torch.arange(w, device=dev)[None]
    mh = (rh >= rows[:, :1]) & (rh < rows[:, :1] + s)
    mw = (rw >= cols[:, :1]) & (rw < cols[:, :1] + s)
    return (mh[:, :, None] & mw[:, None, :])[:, None]


# ---------------------------------------------------------------------------
# Linf iteration
# ---------------------------------------------------------------------------
_PRE_RESAMPLES = 12
"""Sign resamples drawn up front with every iteration's window (see :func:`_linf_window`)."""


@dataclass
class _LinfWork:
    """The samples of a Linf restart still to fool; images flattened to (n, c*h*w)."""

    idx: torch.Tensor  # positions in the restart's batch
    gen: SampleRandom  # their random streams
    xp: torch.Tensor  # clamp(x + eps)
    xm: torch.Tensor  # clamp(x - eps)
    xb: torch.Tensor  # current iterate
    goal: torch.Tensor
    loss: torch.Tensor

    def keep(self, mask: torch.Tensor) -> _LinfWork:
        return _LinfWork(
            idx=self.idx[mask],
            gen=self.gen.subset(mask),
            xp=self.xp[mask],
            xm=self.xm[mask],
            xb=self.xb[mask],
            goal=self.goal[mask],
            loss=self.loss[mask],
        )


def _linf_side(p_init: float, i_iter: int, budget: int, h: int, w: int) -> int:
    """Window side ``round(sqrt(p * h * w))`` (= sqrt(p * n_features / c)) in [1, min(h, w) - 1]."""
    s = round(math.sqrt(p_selection(p_init, i_iter, budget) * h * w))
    return min(max(s, 1), min(h, w) - 1)


@lru_cache(maxsize=64)
def _window_offsets(c: int, h: int, w: int, s: int, dev: torch.device) -> torch.Tensor:
    """Flat offsets (c*s*s,) of an s x s window at (0, 0) in a (c, h, w) image."""
    ar = torch.arange(s)
    offs = torch.arange(c)[:, None, None] * (h * w) + ar[:, None] * w + ar[None, :]
    return offs.reshape(-1).to(dev)


def _linf_window(ws: _LinfWork, s: int, c: int, h: int, w: int, gen: SampleRandom):
    """One random s x s window per sample and its new values.

    Returns the window's flat indices ``lin`` (n, c*s*s), its values in the current
    iterate and its new values. As in the reference code,
    the signs (one per channel) are redrawn while they would leave the iterate unchanged,
    up to ``_MAX_SIGN_RESAMPLES`` times: whether a sign vector changes the window is read
    from two per-channel tables (window equal to its ``+eps`` / ``-eps`` version), so the
    first ``_PRE_RESAMPLES`` redraws cost no image operation.
    """
    n = ws.xb.shape[0]
    pre = _PRE_RESAMPLES
    z = gen.bits_cat(_linf_draws(c, pre))  # row, col, signs, resamples (as SampleRandom)
    span = h - s + 1
    base = (_shr1(z[:, :1]) % span) * w + _shr1(z[:, 1:2]) % span  # (n, 1): top-left pixel
    lin = base + _window_offsets(c, h, w, s, ws.xb.device)[None, :]
    wp, wm, wb = ws.xp.gather(1, lin), ws.xm.gather(1, lin), ws.xb.gather(1, lin)
    same_p = (wp == wb).view(n, c, -1).all(2)  # (n, c): channel unchanged by +eps
    same_m = (wm == wb).view(n, c, -1).all(2)
    pos = (z[:, 2:] < 0).view(n, 1 + pre, c)  # sign > 0 (SampleRandom.sign)
    unchanged = torch.where(pos, same_p[:, None], same_m[:, None]).all(2)  # (n, 1 + pre)
    first = (~unchanged).to(torch.int8).argmax(1)  # first draw that changes the window
    chosen = pos[torch.arange(n, device=pos.device), first]  # (n, c)
    stuck = unchanged.all(1)
    if bool(stuck.any()):
        chosen = _resample_more(gen, stuck, chosen, same_p, same_m, pre)
    wnew = torch.where(chosen[:, :, None], wp.view(n, c, -1), wm.view(n, c, -1)).view(n, -1)
    return lin, wb, wnew


@lru_cache(maxsize=16)
def _linf_draws(c: int, pre: int) -> tuple[tuple[Any, tuple[int, ...]], ...]:
    """An iteration's draws: window row and column (randint), signs, first resamples."""
    resample = tuple((("resample", t), (c, 1, 1)) for t in range(pre))
    return (("row", (1,)), ("col", (1,)), ("signs", (c, 1, 1)), *resample)


def _resample_more(gen, stuck, chosen, same_p, same_m, pre: int) -> torch.Tensor:
    """Further sign redraws (``_PRE_RESAMPLES`` up to ``_MAX_SIGN_RESAMPLES``) for the
    samples whose first draws all left the window unchanged; the last draw stands for a
    sample that never changes (its candidate is then the current iterate)."""
    c = chosen.shape[1]
    chosen = chosen.clone()
    need = stuck.nonzero().squeeze(1)
    for t in range(pre, _MAX_SIGN_RESAMPLES):
        pos = gen.subset(need).bits(("resample", t), (c, 1, 1)).view(-1, c) < 0
        chosen[need] = pos
        unchanged = torch.where(pos, same_p[need], same_m[need]).all(1)
        if not bool(unchanged.any()):
            break
        need = need[unchanged]
    return chosen


def _shr1(z: torch.Tensor) -> torch.Tensor:
    """Logical ``z >> 1`` of int64 bits: the 63 bits ``SampleRandom.randint`` reduces."""
    return (z >> 1) & ((1 << 63) - 1)
