"""PGD for tabular models under feature constraints (immutable, monotone, integer,
one-hot, linear relations), in the spirit of Simonetto et al. 2022 (CPGD / MoEvA2)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from advguard import _validate as check
from advguard.attacks import losses
from advguard.attacks.base import Attack, AttackCall, AttackResult, RunResult
from advguard.attacks.evasion._gradient import State, gradient_descent
from advguard.attacks.norms import normalize, project, random_in_ball
from advguard.attacks.randomness import SampleRandom
from advguard.attacks.tabular._common import check_model, enforce_schema, schema_params
from advguard.attacks.tabular.schema import FeatureSchema, load_schema
from advguard.models.base import Classifier, is_white_box

_LOSSES = ("ce", "margin")


class ConstrainedPGD(Attack):
    """White-box PGD whose every returned row is valid under a :class:`FeatureSchema`.

    The attack keeps a *relaxed* iterate that moves along the loss gradient (masked so
    immutable features never move and monotone features never move the wrong way),
    projected onto the epsilon ball, the bounds and the monotone half-spaces. After every
    step it is repaired into a feasible row (:meth:`FeatureSchema.repair`: integer and step
    rounding, one-hot argmax, linear relations, ball); the loss and the gradient are taken
    at that feasible row and the best feasible row is kept. Discrete features can thus
    change once the relaxed iterate has moved far enough.

    Parameters
    ----------
    schema:
        A :class:`FeatureSchema`, the path of a YAML schema, or a mapping (inline YAML).
    norm:
        ``"linf"`` or ``"l2"``; epsilon is in the model's raw input units.
    steps, step_size, rel_step_size, random_start, restarts, loss, seed:
        As in :class:`~advguard.attacks.evasion.pgd.PGD` (``loss``: ``"ce"`` or ``"margin"``).

    Every returned row is valid: a sample that is not fooled gets the valid iterate with
    the highest loss (or its original), and counts as a failure. ``result.info`` holds
    ``schema_valid`` (rows valid, always all of them) and ``reverted_after_clip`` (rows
    the base class's final clip broke, reverted; normally 0).
    """

    name = "constrained-pgd"
    norms = ("linf", "l2")

    def __init__(
        self,
        schema: FeatureSchema | str | os.PathLike | Mapping[str, Any],
        *,
        norm: str | float = "linf",
        steps: int = 50,
        step_size: float | None = None,
        rel_step_size: float | None = None,
        random_start: bool = True,
        restarts: int = 1,
        loss: str = "ce",
        seed: int = 0,
        allow_large: bool = False,
    ) -> None:
        super().__init__(norm=norm, seed=seed, allow_large=allow_large)
        self.schema = load_schema(schema)
        self.steps = check.steps("steps", steps, allow_large=allow_large)
        self.step_size = None if step_size is None else check.positive("step_size", step_size)
        self.rel_step_size = (
            2.5 / self.steps
            if rel_step_size is None
            else check.positive("rel_step_size", rel_step_size)
        )
        self.random_start = check.flag("random_start", random_start)
        self.restarts = check.restarts("restarts", restarts, allow_large=allow_large)
        self.loss = check.choice("loss", loss, _LOSSES)

    def params(self) -> dict[str, Any]:
        p = super().params()
        p["schema"] = schema_params(self.schema)
        return p

    def _setup(self, model: Classifier) -> dict[str, Any]:
        check_model(self.schema, model, self.name)
        return {}

    def _finish(self, result: AttackResult, call: AttackCall) -> AttackResult:
        return enforce_schema(self.schema, call.x0, result, call.epsilon, self.norm)

    # ------------------------------------------------------------------ internals
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
        assert is_white_box(model)  # needs_gradients: the base class checked it
        schema = self.schema
        c = schema.compiled
        dev, dt = x.device, x.dtype
        clip = model.bounds
        lo_np, hi_np = schema.effective_bounds(x.detach().cpu().double().numpy(), clip)
        lo_all = torch.as_tensor(lo_np, dtype=dt, device=dev)
        hi_all = torch.as_tensor(hi_np, dtype=dt, device=dev)
        imm = torch.as_tensor(c.immutable, device=dev)
        inc = torch.as_tensor(c.mono > 0, device=dev)
        dec = torch.as_tensor(c.mono < 0, device=dev)
        alpha = self.step_size if self.step_size is not None else self.rel_step_size * epsilon

        def relax_project(z, x0, lo, hi):
            z = x0 + project(z - x0, self.norm, epsilon)
            z = torch.maximum(torch.minimum(z, hi), lo)
            z = torch.where(inc, torch.maximum(z, x0), z)
            z = torch.where(dec, torch.minimum(z, x0), z)
            return torch.where(imm, x0, z)

        def feasible(z, x0):
            rep, _ = schema.repair(x0, z, epsilon=epsilon, norm=self.norm, clip=clip)
            return rep

        def start(s: State, gen: SampleRandom) -> torch.Tensor:
            x0 = s["x0"]
            z = x0.clone()
            if self.random_start:
                r = random_in_ball(x0, self.norm, epsilon, gen)
                r = torch.where(inc, r.abs(), torch.where(dec, -r.abs(), r))
                z = relax_project(x0 + r, x0, s["lo"], s["hi"])
            s["z"] = z  # the relaxed iterate; the engine keeps it aligned with the batch
            return feasible(z, x0)

        def step(grad: torch.Tensor, xr: torch.Tensor, s: State) -> torch.Tensor:
            x0, z = s["x0"], s["z"]
            g = torch.where(imm, torch.zeros_like(grad), grad)
            # monotone: never push further into the forbidden side of the original
            g = torch.where(inc & (g < 0) & (z <= x0), torch.zeros_like(g), g)
            g = torch.where(dec & (g > 0) & (z >= x0), torch.zeros_like(g), g)
            s["z"] = relax_project(z + alpha * normalize(g, self.norm), x0, s["lo"], s["hi"])
            return feasible(s["z"], x0)

        best = gradient_descent(
            model,
            x,
            y,
            targets,
            rng,
            steps=self.steps,
            restarts=self.restarts,
            loss=lambda yy, tt: losses.for_goal(self.loss, yy, tt),
            start=start,
            step=step,
            state={"lo": lo_all, "hi": hi_all},
        )
        return RunResult(best)
