"""Jacobian-based dataset augmentation (Papernot, McDaniel, Goodfellow, Jha, Celik, Swami 2017,
"Practical Black-Box Attacks against Machine Learning", AsiaCCS, Algorithm 1).

Start from a small seed set labelled by the oracle, train a substitute, then grow the set with
``x + lambda_r * sign(d F_sub(x)[oracle label] / dx)`` (clipped to the input bounds), label the
new points with the oracle and retrain; repeat. The step sign alternates every ``tau`` rounds
(``lambda_r = lambda * (-1)^floor(r / tau)``, the periodic step size of the paper's Sec. 5) so
the set does not drift away from the data. The paper's reservoir sampling is not built: when the
doubled set would exceed the budget, only the first points that fit are queried.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from advguard.attacks.extraction.common import (
    BudgetedOracle,
    EvalSet,
    ExtractionResult,
    Mode,
    Progress,
    as_classifier,
    build_student,
    train_student,
)
from advguard.errors import InputError
from advguard.models.base import Classifier


def _jacobian_step(
    module: torch.nn.Module, x: np.ndarray, labels: np.ndarray, lam: float, bounds: tuple
) -> np.ndarray:
    xt = torch.as_tensor(x, dtype=torch.float32).requires_grad_(True)
    out = module(xt)
    sel = out.gather(1, torch.as_tensor(labels).long()[:, None]).sum()
    (grad,) = torch.autograd.grad(sel, xt)
    new = xt.detach() + lam * grad.sign()
    return new.clamp(bounds[0], bounds[1]).numpy()


def jacobian_augmentation(
    target: Classifier,
    seed_x: Any,
    *,
    budget: int,
    mode: Mode = "labels",
    arch: str = "mlp",
    eval_set: EvalSet | None = None,
    lam: float = 0.1,
    tau: int = 3,
    max_rounds: int = 10,
    epochs: int = 40,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    progress: Progress | None = None,
) -> ExtractionResult:
    """Train a substitute of ``target`` from ``seed_x`` (labels unused) and Jacobian-augmented
    points, sending at most ``budget`` queries. The curve has one point per round."""
    seeds = np.asarray(seed_x, dtype=np.float32)
    if seeds.ndim < 2 or tuple(seeds.shape[1:]) != tuple(target.input_shape) or not len(seeds):
        raise InputError(
            f"seed set must have shape (N>0, {', '.join(map(str, target.input_shape))}), "
            f"got {seeds.shape}"
        )
    if lam <= 0 or tau < 1 or max_rounds < 0:
        raise InputError("need lam > 0, tau >= 1 and max_rounds >= 0")
    oracle = BudgetedOracle(target, budget, mode)
    xs = seeds[: oracle.budget]
    answers = oracle.answer(xs)
    curve: list[dict[str, Any]] = []
    module = None
    for r in range(max_rounds + 1):
        module = build_student(arch, target.input_shape, target.num_classes, seed)
        train_student(module, xs, answers, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed)
        student = as_classifier(module, target)
        if eval_set is not None:
            curve.append({"queries": oracle.used, "round": r, **eval_set.measure(student)})
        if progress is not None:
            progress("queries", oracle.used, oracle.budget)
        if r == max_rounds or oracle.remaining == 0:
            break
        lam_r = lam * (-1) ** (r // tau)
        new = _jacobian_step(module, xs, answers.argmax(axis=1), lam_r, target.bounds)
        new = new[: oracle.remaining]
        xs = np.concatenate([xs, new])
        answers = np.concatenate([answers, oracle.answer(new)])
    assert module is not None
    student = as_classifier(module, target)
    final = eval_set.measure(student) if eval_set is not None else {}
    return ExtractionResult(
        student=student, method="jacobian", mode=mode, budget=int(budget),
        queries_used=oracle.used, target_queries=oracle.target_queries, curve=curve,
        final=final,
        config={"arch": arch, "epochs": epochs, "lr": lr, "lambda": lam, "tau": tau,
                "seed_size": len(seeds), "seed": seed},
    )  # fmt: skip
