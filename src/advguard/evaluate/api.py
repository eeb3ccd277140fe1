"""The narrow interface the sanity checks and escalations (``sanity.py``, ``undeclared.py``)
use to attack, verify and record on a running evaluation.

:class:`~advguard.evaluate.runner.Evaluator` implements it; the checks depend on this
protocol and on :mod:`advguard.evaluate.state`, never on the runner, so the runner can call
them without an import cycle.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import numpy as np
    import torch

    from advguard.attacks.base import AttackResult
    from advguard.attacks.registry import SuiteAttack
    from advguard.evaluate.report import Stage
    from advguard.evaluate.state import RunState
    from advguard.evaluate.threat_model import ThreatModel


class EvaluationContext(Protocol):
    """A running image/tabular evaluation, as the sanity checks see it."""

    model: Any
    """The model under evaluation (its query counter, bounds and input shape)."""
    attack_model: Any
    """The model the attacks differentiate or query (BPDA/EOT-adapted when declared)."""
    judge_model: Any
    """The model whose predictions decide fooled or not; an escalation may swap it and must
    restore it."""
    adaptive: dict[str, Any]
    """What :func:`~advguard.evaluate.runner.adaptive_models` adapted, for the report."""
    tm: ThreatModel
    x: np.ndarray
    y: np.ndarray
    progress: Callable[[str, int, int], None]
    clock: Callable[[], float]

    def inputs(self, pos: np.ndarray, state: RunState) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and labels of the samples at positions ``pos`` of the run."""
        ...

    def attack_survivors(
        self,
        state: RunState,
        attack: SuiteAttack,
        pos: np.ndarray,
        x: torch.Tensor,
        y: torch.Tensor,
        e: int,
        eps: float,
        targets: list[torch.Tensor] | None,
        stage: Stage,
        label: str,
        model: Any = None,
    ) -> int:
        """Run ``attack`` at epsilon index ``e`` on the still-robust samples among ``pos``,
        verify and record what it fools; returns the number newly fooled."""
        ...

    def run_attack(
        self,
        attack: SuiteAttack,
        model: Any,
        x: torch.Tensor,
        y: torch.Tensor,
        eps: float,
        targets: torch.Tensor | None = None,
        *,
        sample_ids: torch.Tensor,
        stream: tuple[Any, ...] = (),
    ) -> AttackResult:
        """One attack call on ``model`` (here, or on the workers of an :class:`AttackPool`),
        its random draws keyed by ``sample_ids`` (data-set indices) and ``stream``."""
        ...

    def verify(
        self, x_adv: torch.Tensor, x: torch.Tensor, y: torch.Tensor, eps: float
    ) -> torch.Tensor:
        """Which of ``x_adv`` are real adversarials: in bounds, in the ball, misclassified."""
        ...

    def record(
        self,
        state: RunState,
        pos: np.ndarray,
        x: torch.Tensor,
        x_adv: torch.Tensor,
        y: torch.Tensor,
        e: int,
        eps: float,
        label: str,
        key: int,
    ) -> None:
        """Record verified adversarials ``x_adv`` of the samples at ``pos`` under row ``key``."""
        ...


class AttackPool(Protocol):
    """Workers that run attack calls for an evaluation's driver (e.g. the Ray backend's
    actors during the sanity checks and escalations, once the shards are done).

    ``run`` splits the rows of ``x`` among the workers, each rebuilding ``attack`` from its
    :attr:`~advguard.attacks.registry.SuiteAttack.recipe` and running its rows on its own copy
    of the evaluation's attack model; every draw is keyed by ``sample_ids``, so the joined
    result is the one a local call returns. Its ``forward_evals``/``gradient_evals`` are the
    queries the workers' models counted."""

    def run(
        self,
        attack: SuiteAttack,
        x: torch.Tensor,
        y: torch.Tensor,
        eps: float,
        targets: torch.Tensor | None,
        sample_ids: torch.Tensor,
        stream: tuple[Any, ...],
    ) -> AttackResult: ...
