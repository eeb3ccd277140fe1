"""Auto-PGD (APGD), Croce & Hein 2020, "Reliable evaluation of adversarial robustness
with an ensemble of diverse parameter-free attacks" (ICML 2020), Linf and L2.

APGD is PGD without a step-size parameter: it starts with step ``2 * epsilon``, adds
momentum, and at fixed checkpoints halves the step size of every sample whose
optimisation stalls, restarting it from the best point found so far. With
``loss="dlr"`` and targets it is APGD-T; :meth:`APGD.targeted_sweep` (or
:func:`apgd_targeted_sweep`) runs AutoAttack's APGD-T over the top runner-up classes.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from advguard import _validate as check
from advguard.attacks import losses
from advguard.attacks.base import Attack, AttackCall, AttackResult, RunResult
from advguard.attacks.norms import normalize, project, random_in_ball
from advguard.attacks.randomness import Key, SampleRandom
from advguard.models.base import (
    Classifier,
    WhiteBoxClassifier,
    is_evasion,
    is_white_box,
    label_count,
    mask_reject,
)

_LOSSES = ("ce", "dlr")
_MOMENTUM = 0.75
SWEEP_ROWS = 256
"""Rows per batch of :meth:`APGD.targeted_sweep` on CPU: one (sample, target rank) pair per
row. Measured on the MNIST CNNs, a CPU gradient costs the same per row from 32 to 256 rows
and up to 2.5x more at 512-2048 (activations leave the cache), so the sweep batches target
ranks only while few samples are left; on an accelerator every row goes in one batch."""


def checkpoints(steps: int) -> list[int]:
    """Iterations after which the step size may be halved: ``w_j = ceil(p_j * steps)``.

    ``p_0 = 0``, ``p_1 = 0.22``, ``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``; only
    checkpoints strictly inside ``(0, steps)`` matter (none is needed after the last step).
    """
    p = [0.0, 0.22]
    while p[-1] < 1.0:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    ws = {math.ceil(round(q * steps, 6)) for q in p[1:]}
    return sorted(w for w in ws if 0 < w < steps)


class APGD(Attack):
    """APGD-CE / APGD-DLR (untargeted) and APGD-T (targeted), for Linf and L2.

    Parameters
    ----------
    norm:
        ``"linf"`` or ``"l2"``.
    steps:
        Iterations per restart (``N_iter``; one gradient per iteration).
    restarts:
        Independent random starts; each runs on the samples not fooled so far.
    loss:
        ``"ce"`` (cross-entropy; targeted calls use the targeted cross-entropy) or
        ``"dlr"`` (Difference of Logits Ratio; targeted calls use the targeted DLR,
        i.e. APGD-T).
    rho:
        Condition 1 threshold: the step size is halved at a checkpoint when the loss
        increased in fewer than ``rho`` of the iterations since the previous one.
    n_target_classes:
        Runner-up classes tried by :meth:`targeted_sweep` (AutoAttack uses 9).

    A sample leaves the batch at the first iterate that fools the model (that
    iterate is returned); the others return the point with the highest loss seen
    over all restarts.
    """

    name = "apgd"
    norms = ("linf", "l2")

    def __init__(
        self,
        *,
        norm: str | float = "linf",
        steps: int = 100,
        restarts: int = 1,
        loss: str = "ce",
        rho: float = 0.75,
        n_target_classes: int = 9,
        seed: int = 0,
        allow_large: bool = False,
    ) -> None:
        super().__init__(norm=norm, seed=seed, allow_large=allow_large)
        self.steps = check.steps("steps", steps, allow_large=allow_large)
        self.restarts = check.restarts("restarts", restarts, allow_large=allow_large)
        self.loss = check.choice("loss", loss, _LOSSES)
        self.rho = check.number("rho", rho, low=0.0, high=1.0, low_open=True, high_open=True)
        self.n_target_classes = check.positive_int("n_target_classes", n_target_classes)
        self.name = f"apgd-{loss}"  # type: ignore[misc]  # per-instance display name

    def params(self) -> dict[str, Any]:
        p = super().params()
        p.pop("name", None)  # derived from ``loss``, not a constructor argument
        return p

    # -- algorithm ----------------------------------------------------------
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
        return RunResult(self._run_rows(model, x, y, epsilon, targets, rng, None))

    def _run_rows(
        self,
        model: Classifier,
        x: torch.Tensor,
        y: torch.Tensor,
        epsilon: float,
        targets: torch.Tensor | None,
        rng: SampleRandom,
        sweep: _SweepRows | None,
    ) -> torch.Tensor:
        """All restarts on the rows ``x``; ``sweep`` (a batched APGD-T sweep) drops the rows
        whose sample a lower-rank row has already fooled."""
        assert is_white_box(model)  # needs_gradients: the base class checked it
        out = x.clone()
        out_loss = torch.full((len(x),), float("-inf"), device=x.device)
        done = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        ckpts = checkpoints(self.steps)
        for r in range(self.restarts):
            if sweep is not None:
                sweep.drop_dominated(~done)
                done |= sweep.dropped
            idx = (~done).nonzero().squeeze(1)
            if len(idx) == 0:
                break
            t = None if targets is None else targets[idx]
            sub = rng.subset(idx).fork("restart", r)
            xr, lr, fooled = self._single_run(
                model, x[idx], y[idx], t, epsilon, sub, ckpts, (idx, sweep)
            )
            better = fooled | (lr > out_loss[idx])
            out[idx[better]] = xr[better]
            out_loss[idx[better]] = torch.where(fooled, torch.full_like(lr, float("inf")), lr)[
                better
            ]
            done[idx[fooled]] = True
        return out

    def _single_run(
        self,
        model: WhiteBoxClassifier,
        x: torch.Tensor,
        y: torch.Tensor,
        t: torch.Tensor | None,
        eps: float,
        rng: SampleRandom,
        ckpts: list[int],
        rows: tuple[torch.Tensor, _SweepRows | None],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One APGD run from a random start: (points, their loss, fooled mask).

        ``rows``: the rows' indices in the caller's batch and the sweep that may drop them."""
        lo, hi = model.bounds
        norm = self.norm
        n = len(x)
        row_of, sweep = rows
        res_x = x.clone()
        res_loss = torch.full((n,), float("-inf"), device=x.device)
        res_fooled = torch.zeros(n, dtype=torch.bool, device=x.device)

        def proj(v: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
            return (x0 + project(v - x0, norm, eps)).clamp(lo, hi)

        def fooled_of(logits: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
            pred = logits.argmax(1)
            return (pred == s["t"]) if s["t"] is not None else (pred != s["y"])

        def drop(s: dict[str, Any], fooled: torch.Tensor) -> dict[str, Any]:
            """Record the fooling iterates and remove those samples from the state."""
            if not fooled.any():
                return s
            res_x[s["idx"][fooled]] = s["xc"][fooled]
            res_fooled[s["idx"][fooled]] = True
            keep = ~fooled
            if sweep is not None:  # a lower-rank row fooled the sample: drop its other rows
                sweep.fooled(row_of[s["idx"][fooled]])
                keep &= ~sweep.drop_dominated_rows(row_of[s["idx"]])
            return {k: (v[keep] if isinstance(v, torch.Tensor) else v) for k, v in s.items()}

        xc = proj(x + random_in_ball(x, norm, eps, rng), x)
        loss_fn = losses.for_goal(self.loss, y, t)
        logits, loss, grad = model.value_and_grad(xc, loss_fn)
        s: dict[str, Any] = {
            "idx": torch.arange(n, device=x.device),
            "x0": x,
            "y": y,
            "t": t,
            "xc": xc,
            "x_prev": xc.clone(),
            "grad": grad,
            "loss_cur": loss,
            "eta": torch.full((n,), 2.0 * eps, device=x.device, dtype=x.dtype),
            "x_max": xc.clone(),
            "f_max": loss.clone(),
            "g_max": grad.clone(),
            "n_incr": torch.zeros(n, device=x.device),
            "f_max_ckpt": loss.clone(),
            "reduced_last": torch.zeros(n, dtype=torch.bool, device=x.device),
        }
        s = drop(s, fooled_of(logits, s))
        last_ckpt = 0
        view = (-1,) + (1,) * (x.ndim - 1)

        for k in range(self.steps):
            if len(s["idx"]) == 0:
                break
            xc, x0 = s["xc"], s["x0"]
            a = 1.0 if k == 0 else _MOMENTUM
            z = proj(xc + s["eta"].view(view) * normalize(s["grad"], norm), x0)
            x_new = proj(xc + a * (z - xc) + (1.0 - a) * (xc - s["x_prev"]), x0)
            s["x_prev"], s["xc"] = xc, x_new

            loss_fn = losses.for_goal(self.loss, s["y"], s["t"])
            last = k == self.steps - 1
            if last:  # no further step: the gradient would be wasted
                logits = model.logits(x_new)
                loss = loss_fn(logits)
            else:
                logits, loss, grad = model.value_and_grad(x_new, loss_fn)
                s["grad"] = grad
            s["n_incr"] = s["n_incr"] + (loss > s["loss_cur"]).to(s["n_incr"].dtype)
            s["loss_cur"] = loss
            imp = loss > s["f_max"]
            s["x_max"] = torch.where(imp.view(view), x_new, s["x_max"])
            s["f_max"] = torch.where(imp, loss, s["f_max"])
            if not last:
                s["g_max"] = torch.where(imp.view(view), s["grad"], s["g_max"])
            s = drop(s, fooled_of(logits, s))

            w = k + 1
            if w in ckpts:
                # Condition 1: too few loss increases since the last checkpoint.
                c1 = s["n_incr"] < self.rho * (w - last_ckpt)
                # Condition 2: step not reduced at the last checkpoint and no progress.
                c2 = ~s["reduced_last"] & (s["f_max"] <= s["f_max_ckpt"])
                red = c1 | c2
                rv = red.view(view)
                s["eta"] = torch.where(red, s["eta"] / 2, s["eta"])
                s["xc"] = torch.where(rv, s["x_max"], s["xc"])
                s["grad"] = torch.where(rv, s["g_max"], s["grad"])
                s["loss_cur"] = torch.where(red, s["f_max"], s["loss_cur"])
                s["reduced_last"] = red
                s["f_max_ckpt"] = s["f_max"].clone()
                s["n_incr"] = torch.zeros_like(s["n_incr"])
                last_ckpt = w

        res_x[s["idx"]] = s["x_max"]
        res_loss[s["idx"]] = s["f_max"]
        return res_x, res_loss, res_fooled

    # -- AutoAttack's APGD-T ------------------------------------------------
    def targeted_sweep(
        self,
        model: Classifier,
        x: torch.Tensor | np.ndarray,
        y: torch.Tensor | np.ndarray,
        *,
        epsilon: float,
        sample_ids: torch.Tensor | np.ndarray | None = None,
        stream: tuple[Key, ...] = (),
    ) -> AttackResult:
        """Targeted APGD against each of the top ``n_target_classes`` runner-up classes.

        Targets are ranked by the clean logits; each run attacks only the samples no
        earlier run has fooled. ``success`` is untargeted (prediction != ``y``);
        ``x_adv`` is the first successful point, or for samples never fooled the
        best-loss point against the most likely runner-up. Uses this attack's loss
        (``loss="dlr"`` is AutoAttack's APGD-T), norm, steps, restarts and seed.
        """
        call = self._begin(model, x, y, epsilon, None)
        x0, y0, eps, device = call.x0, call.y0, call.epsilon, call.device
        assert eps is not None  # APGD is not a minimum-norm attack
        n = len(x0)
        ids = self.random(call, sample_ids).ids  # checked per-sample ids (default 0..n-1)
        # a detector-guarded model's reject class is neither a target nor a success
        k = min(self.n_target_classes, label_count(model) - 1)
        x_adv = x0.clone()
        success = torch.zeros(n, dtype=torch.bool, device=device)
        attacked = torch.zeros(n, dtype=torch.bool, device=device)
        per_rank: list[int] = []
        if n > 0:
            logits = model.logits(x0)
            success = logits.argmax(1) != y0
            attacked = ~success if eps > 0 else torch.zeros_like(success)
            ranked = mask_reject(model, logits).argsort(dim=1, descending=True)
            surv = attacked.nonzero().squeeze(1)
            if len(surv) and k > 0:
                xs, fooled, per_rank = self._sweep_rows(call, ids, stream, ranked, surv, k)
                x_adv[surv] = xs
                success[surv[fooled]] = True
        return self._end(
            call,
            x_adv=x_adv,
            success=success,
            raw=x_adv,
            attacked=attacked,
            info={"target_classes": k, "fooled_per_target_rank": per_rank},
        )

    def _sweep_rows(
        self,
        call: AttackCall,
        ids: torch.Tensor,
        stream: tuple[Key, ...],
        ranked: torch.Tensor,
        surv: torch.Tensor,
        k: int,
    ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """The sweep over target ranks ``1..k`` of the samples ``surv``, as one batch of rows.

        Every (sample, rank) pair is a row, run with that rank's random stream (so a row
        draws what the sequential sweep's call for that rank draws); a row is dropped once
        a lower-rank row of its sample fools the model. A sample's result is its
        lowest-rank successful row (else its rank-1 row), exactly as in the sequential
        sweep; rows dropped on the strength of an iterate that the final check then
        rejects are run again. Returns (x_adv, fooled, fooled per target rank).
        """
        x0, y0, eps, model = call.x0, call.y0, call.epsilon, call.model
        assert eps is not None
        m, dev = len(surv), x0.device
        rank = torch.arange(1, k + 1, device=dev).repeat_interleave(m)  # rank-major rows
        sample = torch.arange(m, device=dev).repeat(k)
        src, t = surv[sample], ranked[surv[sample], rank]
        rng = SampleRandom.concat(
            [
                self.random(call, ids, (*stream, "target-rank", r)).subset(surv)
                for r in range(1, k + 1)
            ]
        )
        x_rows = x0[src].clone()
        ok = torch.zeros(len(src), dtype=torch.bool, device=dev)
        complete = torch.zeros_like(ok)
        cap = SWEEP_ROWS if dev.type == "cpu" else len(src)
        todo = next_sweep_rows(ok.view(k, m), complete.view(k, m), cap)
        while len(todo):
            sweep = _SweepRows(sample[todo], rank[todo], m)
            raw = self._run_rows(
                model, x0[src[todo]], y0[src[todo]], eps, t[todo], rng.subset(todo), sweep
            )
            rows = todo[~sweep.dropped]
            x_rows[rows] = self._clip(x0[src[rows]], raw[~sweep.dropped], eps, model.bounds)
            pred = model.logits(x_rows[rows]).argmax(1)
            ok[rows] = (pred == t[rows]) | is_evasion(model, pred, y0[src[rows]])
            complete[rows] = True
            todo = next_sweep_rows(ok.view(k, m), complete.view(k, m), cap)
        ok_km = ok.view(k, m)
        fooled = ok_km.any(0)
        first = torch.where(fooled, ok_km.to(torch.uint8).argmax(0), 0)  # winning rank - 1
        x_out = x_rows[first * m + torch.arange(m, device=dev)]
        stop = int(torch.where(fooled, first + 1, k).max())  # ranks the sequential sweep ran
        counts = torch.bincount(first[fooled], minlength=k)[:stop]
        return x_out, fooled, [int(c) for c in counts]


class _SweepRows:
    """The rows (sample, target rank) of a batched APGD-T sweep and which were dropped.

    A row is dropped once a lower-rank row of the same sample fools the model: the
    sequential sweep, which stops at a sample's first success, would never have run it.
    """

    def __init__(self, sample: torch.Tensor, rank: torch.Tensor, n_samples: int) -> None:
        self.sample, self.rank = sample, rank
        big = torch.iinfo(rank.dtype).max
        self.best = torch.full((n_samples,), big, dtype=rank.dtype, device=rank.device)
        self.dropped = torch.zeros(len(rank), dtype=torch.bool, device=rank.device)

    def fooled(self, rows: torch.Tensor) -> None:
        """Rows whose iterate fooled the model (towards their target)."""
        self.best.scatter_reduce_(0, self.sample[rows], self.rank[rows], reduce="amin")

    def drop_dominated_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Mark (and return as a mask over ``rows``) the rows a lower rank has beaten."""
        dom = self.rank[rows] > self.best[self.sample[rows]]
        self.dropped[rows[dom]] = True
        return dom

    def drop_dominated(self, mask: torch.Tensor) -> None:
        self.drop_dominated_rows(mask.nonzero().squeeze(1))


def next_sweep_rows(ok: torch.Tensor, complete: torch.Tensor, cap: int) -> torch.Tensor:
    """The rows to run next (rank-major indices of the ``(k, m)`` grids ``ok``/``complete``).

    A sample is decided once its rows, in rank order, reach a successful complete row (or
    all are complete). Each undecided sample gets its first ``max(1, cap // undecided)``
    incomplete ranks: ``cap`` bounds the rows of a batch (one rank at a time is the
    sequential sweep), so the result never depends on ``cap``, only the work does.
    """
    m = ok.shape[1]
    stop = ok | ~complete
    first = stop.to(torch.uint8).argmax(0)
    undecided = stop.any(0) & ~complete[first, torch.arange(m, device=ok.device)]
    per_sample = max(1, cap // max(1, int(undecided.sum())))
    open_rows = (~complete) & undecided[None, :]
    take = open_rows & (open_rows.long().cumsum(0) <= per_sample)
    return take.flatten().nonzero().squeeze(1)


def apgd_targeted_sweep(
    model: Classifier,
    x: torch.Tensor | np.ndarray,
    y: torch.Tensor | np.ndarray,
    *,
    epsilon: float,
    norm: str | float = "linf",
    steps: int = 100,
    n_target_classes: int = 9,
    seed: int = 0,
) -> AttackResult:
    """AutoAttack's APGD-T: targeted APGD-DLR against the top runner-up classes."""
    attack = APGD(norm=norm, steps=steps, loss="dlr", n_target_classes=n_target_classes, seed=seed)
    return attack.targeted_sweep(model, x, y, epsilon=epsilon)
