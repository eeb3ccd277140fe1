"""Knockoff Nets (Orekondy, Schiele, Fritz 2019, "Knockoff Nets: Stealing Functionality of
Black-Box Models", CVPR): query the victim with natural, unlabelled data from *another*
distribution than its training data, and train a "knockoff" student on the answers.

Built here: the paper's ``random`` sampling strategy (a random draw of the query pool without
replacement, up to the budget), in probability mode (the student fits the returned posterior,
as in the paper) and label-only mode (top-1 answers only). The adaptive (bandit) strategy of the
paper is not built. The query budget is kept exactly: at most ``budget`` samples are sent.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from advguard.attacks.extraction.common import (
    BudgetedOracle,
    EvalSet,
    ExtractionResult,
    Mode,
    Progress,
    as_classifier,
    build_student,
    checkpoints,
    train_student,
)
from advguard.errors import InputError
from advguard.models.base import Classifier


def knockoff(
    target: Classifier,
    pool_x: Any,
    *,
    budget: int,
    mode: Mode = "probabilities",
    arch: str = "mlp",
    eval_set: EvalSet | None = None,
    n_checkpoints: int = 5,
    epochs: int = 40,
    lr: float = 1e-3,
    batch_size: int = 64,
    query_batch: int = 256,
    seed: int = 0,
    progress: Progress | None = None,
) -> ExtractionResult:
    """Steal ``target`` with up to ``budget`` queries drawn from ``pool_x`` (labels unused).

    At each of ``n_checkpoints`` query counts a fresh student is trained on all answers so far
    and measured on ``eval_set`` (fidelity = agreement with the target; accuracy if labelled),
    giving the curve of stolen-model quality against queries used.
    """
    pool = np.asarray(pool_x, dtype=np.float32)
    if pool.ndim < 2 or tuple(pool.shape[1:]) != tuple(target.input_shape):
        raise InputError(
            f"query pool must have shape (N, {', '.join(map(str, target.input_shape))}), "
            f"got {pool.shape}"
        )
    if len(pool) == 0:
        raise InputError("the query pool is empty")
    oracle = BudgetedOracle(target, budget, mode)
    n = min(int(budget), len(pool))
    order = np.random.default_rng(seed).permutation(len(pool))[:n]
    xq = pool[order]
    answers = np.zeros((n, target.num_classes), dtype=np.float32)
    points = [c for c in checkpoints(n, n_checkpoints) if c <= n]
    curve: list[dict[str, Any]] = []
    done = 0
    student = None
    for c in points:
        while done < c:
            step = min(query_batch, c - done)
            answers[done : done + step] = oracle.answer(xq[done : done + step])
            done += step
            if progress is not None:
                progress("queries", done, n)
        module = build_student(arch, target.input_shape, target.num_classes, seed)
        train_student(
            module, xq[:done], answers[:done], epochs=epochs, lr=lr, batch_size=batch_size,
            seed=seed,
        )  # fmt: skip
        student = as_classifier(module, target)
        if eval_set is not None:
            curve.append({"queries": done, **eval_set.measure(student)})
    assert student is not None
    final = eval_set.measure(student) if eval_set is not None else {}
    return ExtractionResult(
        student=student, method="knockoff", mode=mode, budget=int(budget),
        queries_used=oracle.used, target_queries=oracle.target_queries, curve=curve,
        final=final,
        config={"arch": arch, "epochs": epochs, "lr": lr, "pool_size": len(pool),
                "strategy": "random", "seed": seed},
    )  # fmt: skip
