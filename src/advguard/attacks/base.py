"""What every attack is and returns.

An attack is a small object configured once (steps, restarts, norm, seed...) and
called on a model adapter with a batch::

    result = PGD(norm="linf", steps=40)(model, x, y, epsilon=0.3)
    result.x_adv      # inside the bounds and the epsilon ball, always
    result.success    # per-sample: misclassified (untargeted) / hit target (targeted)

The base class does everything that is the same for all attacks: argument and
input checks, device and dtype, leaving already-misclassified samples alone,
the final clip to bounds and epsilon ball, the success check on the returned
points, and query accounting. A subclass implements :meth:`Attack._run` only; it
returns a :class:`RunResult` (the candidates, and optionally per-sample query counts
and info), so nothing is passed through instance attributes and one attack object can
serve several calls at once. Optional hooks: :meth:`Attack._setup` (checks on the model
and info known before any work) and :meth:`Attack._finish` (post-processing of the
final result, e.g. schema enforcement).

To add an attack: copy ``attacks/evasion/fgsm.py``, implement ``_run``, validate the
constructor's arguments with :mod:`advguard._validate`, and add one line to
``attacks/registry.py``; ``tests/test_attack_contract.py`` then checks the common
promises for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from advguard import _validate as check
from advguard.attacks.norms import Norm, norm_of, parse_norm, project
from advguard.attacks.randomness import Key, SampleRandom
from advguard.errors import InputError
from advguard.models.base import Classifier, check_inputs, check_labels, is_white_box


@dataclass
class AttackResult:
    """Outcome of one attack call on one batch (tensors on the input's device)."""

    x_adv: torch.Tensor
    """Adversarial inputs, clipped to the bounds and (if given) the epsilon ball."""
    success: torch.Tensor
    """Bool per sample: the returned input is misclassified (or hits the target)."""
    raw: torch.Tensor
    """What the attack produced before clipping (min-norm attacks may exceed epsilon)."""
    attacked: torch.Tensor
    """Bool per sample: False where the sample was already adversarial and skipped."""
    forward_evals: int = 0
    """Samples sent through the model (forward passes, counted per sample)."""
    gradient_evals: int = 0
    """Per-sample gradients computed."""
    queries: torch.Tensor | None = None
    """Per-sample model queries where the attack tracks them (black-box attacks)."""
    info: dict[str, Any] = field(default_factory=dict)

    def perturbation(self, x: torch.Tensor, norm: Norm | str) -> torch.Tensor:
        """Per-sample size of ``x_adv - x`` in the given norm."""
        return norm_of(self.x_adv - x.to(self.x_adv), parse_norm(norm))


@dataclass
class RunResult:
    """What :meth:`Attack._run` returns for the samples it was given."""

    x: torch.Tensor
    """Adversarial candidates, one per sample (the base class clips them)."""
    queries: torch.Tensor | None = None
    """Per-sample model queries spent, where the attack counts them."""
    info: dict[str, Any] = field(default_factory=dict)
    """Anything to report in :attr:`AttackResult.info`."""


@dataclass
class AttackCall:
    """One call's checked inputs and the query counters at its start (prologue output)."""

    model: Any
    x0: torch.Tensor
    y0: torch.Tensor
    targets: torch.Tensor | None
    epsilon: float | None
    device: torch.device
    orig_device: torch.device
    f0: int
    g0: int
    info: dict[str, Any]


class Attack:
    """Base class. Subclasses set the class variables and implement ``_run``."""

    name: ClassVar[str] = "attack"
    norms: ClassVar[tuple[str, ...]] = ("linf", "l2")
    needs_gradients: ClassVar[bool] = True
    minimum_norm: ClassVar[bool] = False
    """Minimum-norm attacks (CW, DeepFool) take ``epsilon`` as optional: without it
    they return their smallest adversarial; with it, the result is clipped to the ball."""
    supports_targeted: ClassVar[bool] = True
    tracks_queries: ClassVar[bool] = False
    """True: ``AttackResult.queries`` is always a per-sample tensor (0 where skipped)."""

    def __init__(
        self, *, norm: str | float = "linf", seed: int = 0, allow_large: bool = False
    ) -> None:
        self.norm: Norm = parse_norm(norm, self.norms)
        self.seed = check.integer("seed", seed)
        self.allow_large = check.flag("allow_large", allow_large)

    # -- public entry point ---------------------------------------------------
    def __call__(
        self,
        model: Classifier,
        x: torch.Tensor | np.ndarray,
        y: torch.Tensor | np.ndarray,
        *,
        epsilon: float | None = None,
        targets: torch.Tensor | np.ndarray | None = None,
        sample_ids: torch.Tensor | np.ndarray | None = None,
        stream: tuple[Key, ...] = (),
    ) -> AttackResult:
        """Attack the batch ``(x, y)`` at ``epsilon`` (towards ``targets`` if given).

        ``sample_ids`` (default ``0..n-1``) key every random draw per sample: a sample with
        the same id draws the same noise whatever its batch, so results do not depend on
        batch size or sharding (pass the samples' indices in the data set). ``stream`` names
        a further independent stream (e.g. the target rank of a multi-target sweep).
        """
        call = self._begin(model, x, y, epsilon, targets)
        x0, y0, t0, eps = call.x0, call.y0, call.targets, call.epsilon
        n = len(x0)
        if n == 0:
            empty = torch.zeros(0, dtype=torch.bool, device=call.device)
            return self._end(call, x_adv=x0, success=empty, raw=x0, attacked=empty)

        pred = model.logits(x0).argmax(1)
        already = (pred == t0) if t0 is not None else (pred != y0)
        active = ~already
        if eps == 0.0:
            active[:] = False
        raw = x0.clone()
        run: RunResult | None = None
        if active.any():
            idx = active.nonzero().squeeze(1)
            rng = self.random(call, sample_ids, stream).subset(idx)
            out = self._run(model, x0[idx], y0[idx], eps, None if t0 is None else t0[idx], rng)
            # a bare tensor (attacks written before RunResult) is still accepted
            run = out if isinstance(out, RunResult) else RunResult(out)
            raw[idx] = run.x.detach().to(raw.dtype)

        x_adv = self._clip(x0, raw, eps, model.bounds)
        if active.any():
            idx = active.nonzero().squeeze(1)
            p = model.logits(x_adv[idx]).argmax(1)
            ok = (p == t0[idx]) if t0 is not None else (p != y0[idx])
            success = already.clone()
            success[idx] = ok
        else:
            success = already.clone()
        queries = None
        if self.tracks_queries or (run is not None and run.queries is not None):
            queries = torch.zeros(n, dtype=torch.long, device=call.device)
            if run is not None and run.queries is not None:
                queries[active] = run.queries.detach().to(call.device).long()
        return self._end(
            call,
            x_adv=x_adv,
            success=success,
            raw=raw,
            attacked=active,
            queries=queries,
            info=None if run is None else run.info,
        )

    # -- to implement -------------------------------------------------------
    def _run(
        self,
        model: Classifier,
        x: torch.Tensor,
        y: torch.Tensor,
        epsilon: float | None,
        targets: torch.Tensor | None,
        rng: SampleRandom,
    ) -> RunResult:
        """Adversarial candidates for the (not yet fooled) samples ``x``.

        ``epsilon`` is None only for minimum-norm attacks called without a budget;
        ``targets`` is None for untargeted calls; draw all randomness from ``rng`` (one
        stream per sample of ``x``; name each draw by its purpose, restart and step, and
        follow samples leaving the working set with ``rng.subset``).
        """
        raise NotImplementedError  # pragma: no cover

    def random(
        self,
        call: AttackCall,
        sample_ids: torch.Tensor | np.ndarray | None,
        stream: tuple[Key, ...] = (),
    ) -> SampleRandom:
        """The per-sample random stream of a call: keyed by the attack's seed, name and
        epsilon, ``stream`` and each sample's id."""
        n = len(call.x0)
        if sample_ids is None:
            ids = torch.arange(n, dtype=torch.int64)
        else:
            ids = torch.as_tensor(sample_ids).reshape(-1)
            if len(ids) != n or ids.dtype.is_floating_point or ids.dtype == torch.bool:
                raise InputError(f"sample_ids must be {n} integers (one per sample)")
        rng = SampleRandom(self.seed, ids.long(), device=call.device)
        return rng.fork(self.name, call.epsilon, *stream)

    def _setup(self, model: Classifier) -> dict[str, Any]:
        """Checks on the model before any work, and info known up front (for every call,
        empty batches included). Runs after the input checks; model queries made here
        count in the result's ``forward_evals``."""
        return {}

    def _finish(self, result: AttackResult, call: AttackCall) -> AttackResult:
        """Post-process the final result (the inputs and model are in ``call``)."""
        return result

    # -- prologue and epilogue, shared with attack variants (APGD.targeted_sweep) ----
    def _begin(
        self,
        model: Classifier,
        x: torch.Tensor | np.ndarray,
        y: torch.Tensor | np.ndarray,
        epsilon: float | None,
        targets: torch.Tensor | np.ndarray | None,
    ) -> AttackCall:
        """Check the model, epsilon, inputs and targets; snapshot the query counters."""
        if self.needs_gradients and not is_white_box(model):
            raise InputError(
                f"{self.name} needs gradients; {type(model).__name__} is black-box. "
                "Use a TorchClassifier or a black-box attack."
            )
        eps = self._check_epsilon(epsilon)
        x0, y0, device, orig_device = self._prepare(model, x, y)
        t0 = None
        if targets is not None:
            if not self.supports_targeted:
                raise InputError(f"{self.name} does not support targeted attacks")
            t0 = torch.as_tensor(targets).to(device)
            check_labels(model, t0, len(x0), "targets")
            t0 = t0.long()
        f0, g0 = model.queries.snapshot()
        info = self._setup(model)
        return AttackCall(model, x0, y0, t0, eps, device, orig_device, f0, g0, dict(info))

    def _end(
        self,
        call: AttackCall,
        *,
        x_adv: torch.Tensor,
        success: torch.Tensor,
        raw: torch.Tensor,
        attacked: torch.Tensor,
        queries: torch.Tensor | None = None,
        info: dict[str, Any] | None = None,
    ) -> AttackResult:
        """Build the result on the input's device with the queries spent since ``_begin``."""
        if queries is None and self.tracks_queries:
            queries = torch.zeros(len(x_adv), dtype=torch.long)
        f1, g1 = call.model.queries.snapshot()
        dev = call.orig_device
        result = AttackResult(
            x_adv=x_adv.to(dev),
            success=success.to(dev),
            raw=raw.to(dev),
            attacked=attacked.to(dev),
            forward_evals=f1 - call.f0,
            gradient_evals=g1 - call.g0,
            queries=None if queries is None else queries.to(dev),
            info={**call.info, **(info or {})},
        )
        return self._finish(result, call)

    # -- helpers ------------------------------------------------------------
    @staticmethod
    def _prepare(
        model: Classifier, x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor, torch.device, torch.device]:
        """Check and copy a batch onto the model's device: ``(x0, y0, device, input_device)``."""
        device = getattr(model, "device", torch.device("cpu"))
        x_in = torch.as_tensor(x)
        x0 = x_in.detach().to(device=device, dtype=torch.float32).clone()
        check_inputs(model, x0)
        y0 = torch.as_tensor(y).to(device)
        check_labels(model, y0, len(x0))
        return x0, y0.long(), device, x_in.device

    def params(self) -> dict[str, Any]:
        """The attack's configuration, for reports (everything needed to re-run it)."""
        p = {k: v for k, v in vars(self).items() if not k.startswith("_")}
        if not p.get("allow_large", True):
            p.pop("allow_large")
        return p

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"

    def _check_epsilon(self, epsilon: float | None) -> float | None:
        if epsilon is None:
            if self.minimum_norm:
                return None
            raise InputError(f"{self.name} needs an epsilon (the perturbation budget)")
        if isinstance(epsilon, (str, bool)):
            raise InputError(f"epsilon must be a number, got {epsilon!r}")
        try:
            eps = float(epsilon)
        except (TypeError, ValueError):
            raise InputError(f"epsilon must be a number, got {epsilon!r}") from None
        if not np.isfinite(eps) or eps < 0:
            raise InputError(f"epsilon must be a finite number >= 0, got {epsilon!r}")
        return eps

    def _clip(
        self, x0: torch.Tensor, x: torch.Tensor, eps: float | None, bounds: tuple[float, float]
    ) -> torch.Tensor:
        """Project into the epsilon ball, then clip to bounds.

        Clipping a point of the ball to the box moves every coordinate of the
        perturbation towards zero (x0 is inside the box), so the result stays in
        the ball for every Lp norm.
        """
        delta = x - x0
        if eps is not None:
            delta = project(delta, self.norm, eps) if self.norm != "l0" else delta
        return (x0 + delta).clamp(bounds[0], bounds[1])
