"""Run state of an evaluation: per-sample records, per-attack bookkeeping, sample selection.

Plain data shared by the runner (``runner.py``), the sanity checks and escalations
(``sanity.py``, ``undeclared.py``), checkpoints (``checkpoint.py``) and the report builder
(``build_report.py``); it imports nothing else of advguard's evaluation code.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from advguard.attacks.registry import SuiteAttack
from advguard.errors import InputError
from advguard.evaluate.report import Example, Stage

NOT_FOOLED = -1
NEVER = np.iinfo(np.int64).max
STAGES = ("suite", "sanity", "escalation")


def row_key(stage: Stage, e: int, order: int) -> int:
    """Total order of attack rows: stage, then epsilon, then position in the stage."""
    return STAGES.index(stage) * 1_000_000 + e * 1_000 + order


@dataclass
class Records:
    """Per-sample outcome of the evaluation (arrays of length n_samples)."""

    index: np.ndarray  # position in the data set
    label: np.ndarray
    clean_pred: np.ndarray
    clean_conf: np.ndarray  # probability of the true class on the clean input
    fooled_eps: np.ndarray  # index into epsilons of the first epsilon that fooled it, or -1
    fooled_by: np.ndarray  # suite index of the attack that fooled it (or escalation id), or -1
    linf: np.ndarray
    l2: np.ndarray
    l0: np.ndarray
    adv_conf: np.ndarray  # probability of the true class on the adversarial input
    row_at: np.ndarray  # (n, n_eps): smallest row key that fooled the sample at that epsilon
    feat_abs: np.ndarray  # (n, n_features): |x_adv - x| per feature of the recorded adversarial
    feat_changed: np.ndarray  # (n, n_features): the feature changed (> 1e-9), as 0/1

    @classmethod
    def empty(cls, n: int, n_eps: int, n_features: int = 0) -> Records:
        """Records of ``n`` samples; ``n_features`` > 0 keeps per-feature changes (tabular)."""
        f = np.full(n, np.nan, dtype=np.float64)
        i = np.full(n, NOT_FOOLED, dtype=np.int64)
        return cls(
            index=i.copy(),
            label=i.copy(),
            clean_pred=i.copy(),
            clean_conf=f.copy(),
            fooled_eps=i.copy(),
            fooled_by=i.copy(),
            linf=f.copy(),
            l2=f.copy(),
            l0=f.copy(),
            adv_conf=f.copy(),
            row_at=np.full((n, n_eps), NEVER, dtype=np.int64),
            feat_abs=np.zeros((n, n_features), dtype=np.float64),
            feat_changed=np.zeros((n, n_features), dtype=np.int64),
        )

    def take(self, pos: np.ndarray) -> Records:
        """The records of the samples at positions ``pos`` (copies)."""
        return Records(**{k: v[pos].copy() for k, v in self.as_dict().items()})

    def put(self, pos: np.ndarray, part: Records) -> None:
        """Write ``part`` (the records of positions ``pos``) into these records."""
        for k, v in self.as_dict().items():
            v[pos] = getattr(part, k)

    def as_dict(self) -> dict[str, np.ndarray]:
        return dict(vars(self))

    @property
    def correct(self) -> np.ndarray:
        return self.clean_pred == self.label

    def robust_at(self, e: int, before_key: int = NEVER) -> np.ndarray:
        """Bool mask: correctly classified and not fooled at epsilon index ``e`` or below
        (by rows ordered at or before ``before_key``, default all)."""
        if before_key == NEVER:
            return self.correct & (self.row_at[:, : e + 1] == NEVER).all(1)
        return self.correct & (self.row_at[:, : e + 1] > before_key).all(1)


@dataclass
class StageStats:
    """Bookkeeping of one attack at one epsilon (summed over batches)."""

    attacked: int = 0
    newly_fooled: int = 0
    forward: int = 0
    gradient: int = 0
    seconds: float = 0.0

    def add(self, other: dict[str, Any]) -> None:
        for k, v in other.items():
            setattr(self, k, getattr(self, k) + v)


@dataclass
class RunState:
    epsilons: list[float]
    attacks: list[SuiteAttack]
    records: Records
    stats: dict[tuple[int, str, Stage], StageStats] = field(default_factory=dict)
    order: dict[tuple[Stage, str], int] = field(default_factory=dict)
    examples: dict[int, list[Example]] = field(default_factory=dict)

    def stat(self, e: int, attack: str, stage: Stage) -> StageStats:
        self.order.setdefault((stage, attack), len([k for k in self.order if k[0] == stage]))
        return self.stats.setdefault((e, attack, stage), StageStats())

    def key(self, e: int, attack: str, stage: Stage) -> int:
        self.stat(e, attack, stage)
        return row_key(stage, e, self.order[(stage, attack)])


def sha256_array(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str((a.dtype.str, a.shape)).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def select_samples(n_total: int, n: int, seed: int) -> np.ndarray:
    """Deterministic random subset (in random order) of ``n`` of ``n_total`` indices."""
    if n_total == 0:
        raise InputError("the data set is empty")
    perm = np.random.default_rng(seed).permutation(n_total)
    return np.sort(perm[: min(n, n_total)])


def keep_examples(kept: list[Example], new: list[Example], k: int) -> list[Example]:
    """The ``k`` examples of lowest data-set index among ``kept`` and ``new`` (in that order):
    the same whatever the batch size, shard count or shard order of the run."""
    return sorted([*kept, *new], key=lambda ex: (ex.index, ex.attack))[:k]


@dataclass
class Shard:
    """The attack suite's outcome on some of a run's samples (see ``Evaluator.run_shard``).

    ``positions`` are positions in the run's sample list; ``records`` holds their rows.
    Plain data (arrays, numbers, pydantic examples): it travels between processes as is.
    """

    positions: np.ndarray
    records: Records
    stats: dict[tuple[int, str, Stage], StageStats]
    examples: dict[int, list[Example]]
    seconds: float = 0.0

    @classmethod
    def of(cls, state: RunState, positions: np.ndarray, seconds: float = 0.0) -> Shard:
        return cls(
            positions=np.asarray(positions, dtype=np.int64),
            records=state.records.take(positions),
            stats={k: StageStats(**vars(v)) for k, v in state.stats.items()},
            examples={e: list(v) for e, v in state.examples.items()},
            seconds=seconds,
        )


def merge_shards(state: RunState, shards: list[Shard], keep: int) -> None:
    """Fill ``state`` (a fresh run state) with the shards' records, summed bookkeeping and
    the ``keep`` lowest-index examples per epsilon. Every position of the run must be in
    exactly one shard; the result does not depend on the shards' order."""
    n = len(state.records.index)
    seen = np.zeros(n, dtype=np.int64)
    for sh in shards:
        pos = np.asarray(sh.positions)
        if pos.ndim != 1 or pos.dtype.kind not in "iu" or (len(pos) and not pos.min() >= 0):
            raise InputError("a shard's positions must be a 1-D array of sample positions")
        if len(pos) and pos.max() >= n:
            raise InputError(f"a shard has sample positions beyond the run's {n} samples")
        if not np.array_equal(sh.records.index, state.records.index[pos]):
            raise InputError("a shard's samples are not this run's samples (other data or seed)")
        np.add.at(seen, pos, 1)
    if (seen != 1).any():
        missing, twice = int((seen == 0).sum()), int((seen > 1).sum())
        raise InputError(
            f"shards must cover every sample exactly once: {missing} missing, {twice} repeated"
        )
    for sh in sorted(shards, key=lambda s: int(s.positions[0]) if len(s.positions) else -1):
        absorb_shard(state, sh, keep)


def absorb_shard(state: RunState, shard: Shard, keep: int) -> None:
    """Add one shard to ``state``: its records, its counters, its examples (the ``keep``
    lowest-index ones per epsilon are kept). Positions are not checked here (see
    :func:`merge_shards`)."""
    state.records.put(shard.positions, shard.records)
    for key, st in sorted(shard.stats.items()):
        state.stats.setdefault(key, StageStats()).add(vars(st))
    for e, exs in shard.examples.items():
        state.examples[e] = keep_examples(state.examples.get(e, []), exs, keep)
