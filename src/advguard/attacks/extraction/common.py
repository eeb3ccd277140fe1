"""Shared pieces of the model-extraction attacks: a query budget kept exactly, student training
on soft or hard answers, fidelity/accuracy measurement and adversarial transfer."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from advguard.errors import InputError
from advguard.models import QueryBudgetExceeded, TorchClassifier
from advguard.models.base import Classifier

SCHEMA_VERSION = "1.0"
Mode = Literal["probabilities", "labels"]
MODES: tuple[str, ...] = ("probabilities", "labels")
ARCHS: tuple[str, ...] = ("mlp", "small_cnn")
Progress = Callable[[str, int, int], None]


class BudgetedOracle:
    """The attacker's only access to the target: answers at most ``budget`` samples in total.

    ``mode="probabilities"`` returns the target's probability vectors; ``mode="labels"`` only its
    top-1 labels, as one-hot rows (what a label-only API reveals). A request that would pass the
    budget raises :class:`QueryBudgetExceeded` *before* anything is sent. ``used`` counts answered
    samples; ``target_queries`` is what the target's own counter moved by (the two must agree).
    """

    def __init__(self, target: Classifier, budget: int, mode: Mode = "probabilities") -> None:
        if mode not in MODES:
            raise InputError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if int(budget) < 1:
            raise InputError(f"the query budget must be >= 1, got {budget}")
        self.target = target
        self.budget = int(budget)
        self.mode: Mode = mode
        self.used = 0
        self._start = int(target.queries.forward)

    @property
    def remaining(self) -> int:
        return self.budget - self.used

    @property
    def target_queries(self) -> int:
        return int(self.target.queries.forward) - self._start

    def answer(self, x: np.ndarray) -> np.ndarray:
        n = len(x)
        if n > self.remaining:
            raise QueryBudgetExceeded(self.budget, self.used, n)
        if n == 0:
            return np.zeros((0, self.target.num_classes), dtype=np.float32)
        if self.mode == "probabilities":
            out = np.asarray(self.target.predict_proba(x), dtype=np.float64)
            if out.shape != (n, self.target.num_classes) or not np.all(np.isfinite(out)):
                raise InputError("the target returned non-finite or wrongly shaped probabilities")
            out = np.clip(out, 0.0, None)
            out = out / np.maximum(out.sum(axis=1, keepdims=True), 1e-12)
        else:
            labels = np.asarray(self.target.predict(x)).astype(np.int64)
            out = np.eye(self.target.num_classes)[labels]
        self.used += n
        return out.astype(np.float32)


def build_student(arch: str, input_shape: Sequence[int], num_classes: int, seed: int) -> nn.Module:
    from advguard.models.zoo import mlp, small_cnn

    if arch not in ARCHS:
        raise InputError(f"arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    torch.manual_seed(seed)
    shape = tuple(int(d) for d in input_shape)
    return mlp(shape, num_classes) if arch == "mlp" else small_cnn(shape, num_classes)


def train_student(
    module: nn.Module,
    x: np.ndarray,
    soft: np.ndarray,
    *,
    epochs: int = 30,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
) -> nn.Module:
    """Train on the target's answers with cross-entropy against the answered distribution
    (soft labels in probability mode, one-hot in label mode); Adam; returns eval mode."""
    xt = torch.as_tensor(x, dtype=torch.float32)
    st = torch.as_tensor(soft, dtype=torch.float32)
    if len(xt) == 0 or len(xt) != len(st):
        raise InputError("need at least one answered query to train a student")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    module.train()
    opt = torch.optim.Adam(module.parameters(), lr=lr)
    for _ in range(int(epochs)):
        perm = torch.randperm(len(xt), generator=g)
        for i in range(0, len(xt), batch_size):
            b = perm[i : i + batch_size]
            logp = torch.log_softmax(module(xt[b]), dim=1)
            loss = -(st[b] * logp).sum(dim=1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return module.eval()


def as_classifier(module: nn.Module, target: Classifier) -> TorchClassifier:
    return TorchClassifier(
        module, input_shape=target.input_shape, num_classes=target.num_classes,
        bounds=target.bounds,
    )  # fmt: skip


@dataclass
class EvalSet:
    """Held-out inputs for measuring a stolen model: the target's labels on them (queried once,
    outside the attack budget) and, if known, the true labels."""

    x: np.ndarray
    target_labels: np.ndarray
    y: np.ndarray | None = None

    @classmethod
    def from_target(cls, target: Classifier, x: Any, y: Any = None) -> EvalSet:
        xa = np.asarray(x, dtype=np.float32)
        if len(xa) == 0:
            raise InputError("the evaluation set is empty")
        ya = None if y is None else np.asarray(y).astype(np.int64)
        return cls(x=xa, target_labels=np.asarray(target.predict(xa)).astype(np.int64), y=ya)

    def measure(self, student: Classifier) -> dict[str, Any]:
        from advguard.stats import proportion

        pred = np.asarray(student.predict(self.x))
        out: dict[str, Any] = {
            "fidelity": proportion(int((pred == self.target_labels).sum()), len(pred)).model_dump()
        }
        if self.y is not None:
            out["accuracy"] = proportion(int((pred == self.y).sum()), len(pred)).model_dump()
        return out


def transfer_rate(
    student: TorchClassifier,
    target: Classifier,
    eval_set: EvalSet,
    *,
    epsilon: float,
    n: int = 200,
    steps: int = 20,
    seed: int = 0,
) -> dict[str, Any]:
    """PGD (Linf) on the stolen model, replayed against the target: of the examples both models
    get right and that fool the student, how many also fool the target. The target is queried
    ``n`` more times (outside the attack budget)."""
    from advguard.attacks import PGD
    from advguard.stats import proportion

    y = eval_set.y if eval_set.y is not None else eval_set.target_labels
    ok = (np.asarray(student.predict(eval_set.x)) == y) & (eval_set.target_labels == y)
    idx = np.flatnonzero(ok)[:n]
    if len(idx) == 0:
        raise InputError("no evaluation example is classified right by both models")
    xs, ys = torch.as_tensor(eval_set.x[idx]), torch.as_tensor(y[idx])
    res = PGD(steps=steps, seed=seed)(student, xs, ys, epsilon=epsilon)
    fooled_student = res.success.cpu().numpy()
    adv = res.x_adv[res.success].detach().cpu().numpy()
    fooled_target = (
        int((np.asarray(target.predict(adv)) != ys.numpy()[fooled_student]).sum())
        if len(adv)
        else 0
    )
    return {
        "epsilon": float(epsilon),
        "norm": "linf",
        "attack": f"PGD({steps} steps) on the stolen model",
        "student_success": proportion(int(fooled_student.sum()), len(idx)).model_dump(),
        "transfer": proportion(fooled_target, int(fooled_student.sum())).model_dump(),
    }


@dataclass
class ExtractionResult:
    student: TorchClassifier
    method: str
    mode: str
    budget: int
    queries_used: int
    target_queries: int
    curve: list[dict[str, Any]]
    final: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)
    transfer: dict[str, Any] | None = None

    @property
    def fidelity(self) -> float:
        return float(self.final["fidelity"]["value"])

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "method": self.method,
            "mode": self.mode,
            "budget": self.budget,
            "queries_used": self.queries_used,
            "target_queries_counted": self.target_queries,
            "final": self.final,
            "curve": self.curve,
            "transfer": self.transfer,
            "config": self.config,
        }


def checkpoints(budget: int, n: int) -> list[int]:
    """Up to ``n`` query counts, roughly geometric, ending at ``budget``."""
    if n <= 1:
        return [budget]
    pts = np.unique(np.geomspace(max(budget / 2 ** (n - 1), 1), budget, n).round().astype(int))
    return [int(p) for p in pts if p >= 1]


MAX_POOL_BYTES = 2 * 1024**3


def load_query_pool(path: str | Any) -> tuple[np.ndarray, np.ndarray | None]:
    """Read an attacker's query pool from ``.npz``: inputs ``x`` and, optionally, labels ``y``
    (only used to score the stolen model; an unlabelled pool is the usual case). Never
    unpickles; ``(N, H, W)`` images get a channel axis."""
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"query pool not found: {p}")
    try:
        loaded = np.load(p, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise InputError(f"{p}: expected an .npz archive with an array 'x', got a single array")
        with loaded as z:
            if "x" not in z.files:
                raise InputError(f"{p}: the archive needs an array 'x' (has {', '.join(z.files)})")
            x = z["x"]
            y = z["y"] if "y" in z.files else None
    except (ValueError, OSError) as e:
        raise InputError(f"{p}: not a readable .npz of plain arrays ({e})") from None
    if x.nbytes > MAX_POOL_BYTES or not np.issubdtype(x.dtype, np.number) or x.ndim < 2:
        raise InputError(f"{p}: 'x' must be a numeric array (N, ...) under 2 GiB, got {x.shape}")
    x = x.astype(np.float32)
    if x.ndim == 3:
        x = x[:, None]
    if not np.all(np.isfinite(x)):
        raise InputError(f"{p}: 'x' contains NaN or Inf")
    if y is not None:
        if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
            raise InputError(f"{p}: 'y' must hold one integer label per input")
        y = y.astype(np.int64)
    return x, y
