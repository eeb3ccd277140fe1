"""Black-box coordinate search for tabular models under feature constraints."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from advguard import _validate as check
from advguard.attacks import losses
from advguard.attacks.base import Attack, AttackCall, AttackResult, RunResult
from advguard.attacks.randomness import SampleRandom
from advguard.attacks.tabular._common import check_model, enforce_schema, schema_params
from advguard.attacks.tabular.schema import FeatureSchema, load_schema
from advguard.models.base import Classifier

_SCALAR, _FLIP, _CATEGORY = 0, 1, 2


class ConstrainedSearch(Attack):
    """Greedy randomized coordinate search using only ``model.logits`` (scores).

    Each sample walks through its mutable features and one-hot groups in a random order
    (a new order every pass) and proposes one move per query:

    - a continuous feature moves by ``+/- scale * epsilon``,
    - an integer or stepped feature by ``+/-`` whole units (at least one),
    - a binary feature flips, a one-hot group switches to another category.

    Every proposal is repaired into a valid row inside the epsilon ball
    (:meth:`FeatureSchema.repair`); proposals that repair back to the current row cost
    no query. A move is kept when it raises the margin loss (``max_{j != y} z_j - z_y``,
    or the targeted margin); the sample stops once it is adversarial. After a pass with
    no improvement ``scale`` halves; the search for a sample ends below ``min_scale`` or
    when its ``max_queries`` are spent.

    ``result.queries`` holds the model queries the search spent on each sample (the
    first scores the starting point), never more than ``max_queries``; it is 0 for
    samples that were skipped. The base class's checks before and after (one forward
    pass each) are counted in ``forward_evals`` only. Works with any adapter, e.g. a
    :class:`~advguard.models.SklearnClassifier` around a gradient-boosted ensemble.

    Parameters
    ----------
    schema:
        A :class:`FeatureSchema`, the path of a YAML schema, or a mapping (inline YAML).
    norm:
        ``"linf"``, ``"l2"`` or ``"l1"``; epsilon is in the model's raw input units.
    max_queries:
        Query budget per sample.
    init_scale, min_scale:
        First and smallest continuous move, as a fraction of epsilon.
    """

    name = "constrained-search"
    norms = ("linf", "l2", "l1")
    needs_gradients = False
    tracks_queries = True

    def __init__(
        self,
        schema: FeatureSchema | str | os.PathLike | Mapping[str, Any],
        *,
        norm: str | float = "linf",
        max_queries: int = 500,
        init_scale: float = 1.0,
        min_scale: float = 1.0 / 16,
        seed: int = 0,
        allow_large: bool = False,
    ) -> None:
        super().__init__(norm=norm, seed=seed, allow_large=allow_large)
        self.schema = load_schema(schema)
        self.max_queries = check.queries("max_queries", max_queries, allow_large=allow_large)
        self.init_scale = check.number("init_scale", init_scale, low=0.0, high=1.0, low_open=True)
        self.min_scale = check.number(
            "min_scale", min_scale, low=0.0, high=self.init_scale, low_open=True
        )

    def params(self) -> dict[str, Any]:
        p = super().params()
        p["schema"] = schema_params(self.schema)
        return p

    def _setup(self, model: Classifier) -> dict[str, Any]:
        check_model(self.schema, model, self.name)
        return {"max_queries": self.max_queries}

    def _finish(self, result: AttackResult, call: AttackCall) -> AttackResult:
        return enforce_schema(self.schema, call.x0, result, call.epsilon, self.norm)

    # ------------------------------------------------------------------ internals
    def _moves(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(kind, feature or group, sign or target column) for every possible move."""
        c = self.schema.compiled
        kind: list[int] = []
        where: list[int] = []
        arg: list[int] = []
        for j in range(len(c.names)):
            if c.immutable[j] or c.categorical[j]:
                continue
            if c.binary[j]:
                kind.append(_FLIP)
                where.append(j)
                arg.append(0)
                continue
            # both ways, also for monotone features: moving back toward the original is
            # allowed, and repair clamps a forbidden move to a no-op (no query spent)
            for s in (1, -1):
                kind.append(_SCALAR)
                where.append(j)
                arg.append(s)
        for g, cols in enumerate(c.groups):
            if c.group_immutable[g]:
                continue
            for col in cols:
                kind.append(_CATEGORY)
                where.append(g)
                arg.append(int(col))
        return np.array(kind, dtype=np.int64), np.array(where, dtype=np.int64), np.array(arg)

    def _score(
        self, model: Classifier, xs: np.ndarray, y: torch.Tensor, t: torch.Tensor | None
    ) -> np.ndarray:
        logits = model.logits(torch.as_tensor(xs, dtype=torch.float32, device=y.device))
        s = losses.margin(logits, y) if t is None else losses.margin_targeted(logits, t)
        return s.detach().cpu().double().numpy()

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
        schema = self.schema
        c = schema.compiled
        clip = model.bounds
        n = len(x)
        x0 = x.detach().cpu().numpy().astype(np.float32)
        cur = x0.copy()
        kind, where, arg = self._moves()
        n_moves = len(kind)
        queries = np.zeros(n, dtype=np.int64)
        if n_moves == 0:
            return RunResult(x.clone(), queries=torch.from_numpy(queries))

        score = self._score(model, cur, y, targets)
        queries += 1
        done = score > 0
        finished = np.zeros(n, dtype=bool)
        scale = np.full(n, self.init_scale)
        ptr = np.zeros(n, dtype=np.int64)
        pass_improved = np.zeros(n, dtype=bool)

        passes = np.zeros(n, dtype=np.int64)  # per row: move orders drawn so far

        def shuffle(rows: np.ndarray) -> np.ndarray:
            """A fresh random move order for each row, keyed by the row's pass number."""
            out = np.empty((len(rows), n_moves), dtype=np.int64)
            for p in np.unique(passes[rows]):
                sel = np.flatnonzero(passes[rows] == p)
                sub = rng.subset(torch.as_tensor(rows[sel]))
                u = sub.randint(("order", int(p)), 0, 1 << 62, (n_moves,))
                out[sel] = u.argsort(dim=1).cpu().numpy()
            passes[rows] += 1
            return out

        order = shuffle(np.arange(n))
        unit = np.where(np.isnan(c.unit), 1.0, c.unit)
        while True:
            act = np.flatnonzero(~done & ~finished & (queries < self.max_queries))
            if not len(act):
                break
            m = order[act, ptr[act]]
            mk, mw, ma = kind[m], where[m], arg[m]
            cand = cur[act].astype(np.float64)
            rows = np.arange(len(act))
            sc = mk == _SCALAR
            if sc.any():
                j = mw[sc]
                cont = c.continuous[j]
                whole = unit[j] * np.maximum(1.0, np.floor(scale[act][sc] * epsilon / unit[j]))
                size = np.where(cont, scale[act][sc] * epsilon, whole)
                cand[rows[sc], j] += ma[sc] * size
            fl = mk == _FLIP
            if fl.any():
                j = mw[fl]
                cand[rows[fl], j] = 1.0 - cand[rows[fl], j]
            ca = mk == _CATEGORY
            if ca.any():
                for r, g, col in zip(rows[ca], mw[ca], ma[ca], strict=True):
                    cand[r, c.groups[g]] = 0.0
                    cand[r, col] = 1.0
            rep, ok = schema.repair(
                x0[act], cand.astype(np.float32), epsilon=epsilon, norm=self.norm, clip=clip
            )
            changed = ok & (rep != cur[act]).any(1)
            improved = np.zeros(len(act), dtype=bool)
            if changed.any():
                sel = act[changed]
                yt = y[torch.as_tensor(sel, device=y.device)]
                tt = None if targets is None else targets[torch.as_tensor(sel, device=y.device)]
                s_new = self._score(model, rep[changed], yt, tt)
                queries[sel] += 1
                better = s_new > score[sel]
                improved[np.flatnonzero(changed)[better]] = True
                acc = sel[better]
                cur[acc] = rep[changed][better]
                score[acc] = s_new[better]
                done[acc] = s_new[better] > 0
            pass_improved[act] |= improved
            ptr[act] += 1
            end = act[ptr[act] >= n_moves]
            if len(end):
                stuck = end[~pass_improved[end]]
                scale[stuck] /= 2
                finished[stuck[scale[stuck] < self.min_scale * (1 - 1e-9)]] = True
                order[end] = shuffle(end)
                ptr[end] = 0
                pass_improved[end] = False
        return RunResult(
            torch.as_tensor(cur, device=x.device, dtype=x.dtype), queries=torch.from_numpy(queries)
        )
