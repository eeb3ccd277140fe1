"""Simulate training-set poisoning: label flipping and backdoor (trigger) injection.

- Label flipping: random (each chosen row gets a uniformly drawn *other* class) or targeted
  (rows of class ``source`` relabelled ``target``), the classic availability/targeted
  label-noise attack (Biggio, Nelson, Laskov 2012; Xiao, Xiao, Eckert 2012).
- BadNets (Gu et al. 2017, arXiv:1708.06733): stamp a patch trigger on chosen rows and relabel
  them ``target``.
- Blended injection (Chen et al. 2017, arXiv:1712.05526): blend a whole-image pattern with
  ratio ``alpha`` into chosen rows and relabel them ``target``.

``rate`` is always the share of the *whole* training set that is poisoned
(``round(rate * N)`` rows), drawn without replacement from the eligible rows (backdoors: rows
whose label is not ``target``, or only rows of ``source`` when given; targeted flipping: rows
of ``source``). Everything is deterministic for a ``seed``. The result carries a
:class:`PoisonManifest`: which rows changed, their original labels and the trigger (as arrays,
so it can be re-applied at test time).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from advguard.attacks.poisoning.triggers import TriggerSpec, blend_trigger, patch_trigger
from advguard.errors import InputError

ATTACKS = ("badnets", "blend", "label-flip")
#: Attacks a manifest may name (the CLI simulates ATTACKS; clean-label needs a model).
MANIFEST_ATTACKS = (*ATTACKS, "feature-collision")
MANIFEST_FORMAT = "advguard-poison-manifest/1"
#: Largest manifest file read back (bytes).
MAX_MANIFEST_BYTES = 64 * 1024 * 1024


@dataclass(eq=False)
class PoisonManifest:
    """What a poisoning run changed: ``indices`` (sorted rows of the poisoned set that were
    modified), their ``original_labels`` and ``new_labels``, and the ``trigger`` (None for
    label flipping)."""

    attack: str
    rate: float
    seed: int
    n_total: int
    indices: np.ndarray
    original_labels: np.ndarray
    new_labels: np.ndarray
    target: int | None = None
    source: int | None = None
    trigger: TriggerSpec | None = None
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def n_poisoned(self) -> int:
        return len(self.indices)

    def poisoned_mask(self) -> np.ndarray:
        m = np.zeros(self.n_total, dtype=bool)
        m[self.indices] = True
        return m

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
            "attack": self.attack,
            "rate": self.rate,
            "seed": self.seed,
            "n_total": self.n_total,
            "n_poisoned": self.n_poisoned,
            "target": self.target,
            "source": self.source,
            "params": self.params,
            "indices": self.indices.tolist(),
            "original_labels": self.original_labels.tolist(),
            "new_labels": self.new_labels.tolist(),
            "trigger": None if self.trigger is None else self.trigger.to_dict(),
        }

    def save(self, path: str | Path) -> Path:
        from advguard.atomic import atomic_write_text

        return atomic_write_text(path, json.dumps(self.to_dict()))

    @classmethod
    def from_dict(cls, d: Any) -> PoisonManifest:
        """Validate a manifest read from an untrusted file."""
        if not isinstance(d, dict) or d.get("format") != MANIFEST_FORMAT:
            raise InputError(f"not an advguard poisoning manifest (format {MANIFEST_FORMAT})")
        try:
            n_total = int(d["n_total"])
            idx = np.asarray(d["indices"], dtype=np.int64).reshape(-1)
            orig = np.asarray(d["original_labels"], dtype=np.int64).reshape(-1)
            new = np.asarray(d["new_labels"], dtype=np.int64).reshape(-1)
            rate, seed = float(d["rate"]), int(d["seed"])
            target = None if d.get("target") is None else int(d["target"])
            source = None if d.get("source") is None else int(d["source"])
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"malformed poisoning manifest: {e}") from None
        if n_total < 1 or not (len(idx) == len(orig) == len(new)):
            raise InputError("malformed poisoning manifest: row and label lists disagree")
        if len(idx) and (idx.min() < 0 or idx.max() >= n_total or len(np.unique(idx)) != len(idx)):
            raise InputError("malformed poisoning manifest: row indices out of range or repeated")
        attack = d.get("attack")
        if attack not in MANIFEST_ATTACKS:
            raise InputError(f"malformed poisoning manifest: unknown attack {attack!r}")
        trig = d.get("trigger")
        params = d.get("params") or {}
        if not isinstance(params, dict):
            raise InputError("malformed poisoning manifest: params must be an object")
        return cls(
            attack=attack,
            rate=rate,
            seed=seed,
            n_total=n_total,
            indices=idx,
            original_labels=orig,
            new_labels=new,
            target=target,
            source=source,
            trigger=None if trig is None else TriggerSpec.from_dict(trig),
            params=params,
        )

    @classmethod
    def load(cls, path: str | Path) -> PoisonManifest:
        p = Path(path)
        size = p.stat().st_size
        if size > MAX_MANIFEST_BYTES:
            raise InputError(f"{p}: manifest is {size} bytes, more than {MAX_MANIFEST_BYTES}")
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise InputError(f"{p}: not a JSON manifest: {str(e)[:200]}") from None
        try:
            return cls.from_dict(d)
        except InputError as e:
            raise InputError(f"{p}: {e}") from None


@dataclass(eq=False)
class PoisonResult:
    """The poisoned training set (same rows, same order) and its manifest."""

    x: np.ndarray
    y: np.ndarray
    manifest: PoisonManifest


def check_xy(
    x: np.ndarray, y: np.ndarray, num_classes: int | None
) -> tuple[np.ndarray, np.ndarray, int]:
    x = np.asarray(x)
    y = np.asarray(y)
    if x.ndim < 2 or len(x) == 0 or len(x) != len(y) or y.ndim != 1:
        raise InputError(f"need N inputs and N labels, got x {x.shape} and y {y.shape}")
    if y.dtype.kind not in "iu":
        raise InputError(f"labels must be integers, got {y.dtype}")
    if not np.isfinite(x).all():
        raise InputError("inputs contain NaN or Inf")
    k = int(num_classes) if num_classes is not None else int(y.max()) + 1
    if y.min() < 0 or y.max() >= k:
        raise InputError(f"labels must lie in [0, {k - 1}]")
    return x.astype(np.float32, copy=True), y.astype(np.int64, copy=True), k


def _count(rate: float, n: int) -> int:
    if not 0 < float(rate) < 1:
        raise InputError(f"rate must lie strictly between 0 and 1, got {rate}")
    return max(1, round(float(rate) * n))


def _pick(eligible: np.ndarray, k: int, rng: np.random.Generator, what: str) -> np.ndarray:
    if k > len(eligible):
        raise InputError(
            f"rate asks for {k} poisoned rows but only {len(eligible)} rows are eligible ({what})"
        )
    return np.sort(rng.choice(eligible, size=k, replace=False))


def _check_class(v: int | None, k: int, what: str) -> int | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | np.integer) or not 0 <= int(v) < k:
        raise InputError(f"{what} must be a class in [0, {k - 1}], got {v!r}")
    return int(v)


def label_flip(
    x: np.ndarray,
    y: np.ndarray,
    *,
    rate: float,
    target: int | None = None,
    source: int | None = None,
    num_classes: int | None = None,
    seed: int = 0,
) -> PoisonResult:
    """Flip labels of ``round(rate * N)`` rows.

    Without ``source``/``target``: random flipping, each chosen row gets a uniformly drawn
    different class. With both: targeted, rows of ``source`` are relabelled ``target``. With
    only ``target``: rows of any other class are relabelled ``target``.
    """
    xa, ya, k = check_xy(x, y, num_classes)
    target, source = _check_class(target, k, "target"), _check_class(source, k, "source")
    if source is not None and target is None:
        raise InputError("targeted label flipping needs a target class with the source class")
    if source is not None and source == target:
        raise InputError("source and target classes must differ")
    rng = np.random.default_rng(seed)
    n = _count(rate, len(ya))
    if target is None:
        idx = _pick(np.arange(len(ya)), n, rng, "all rows")
        shift = rng.integers(1, k, size=len(idx))  # never the same class
        new = (ya[idx] + shift) % k
    else:
        eligible = np.flatnonzero(ya == source if source is not None else ya != target)
        idx = _pick(eligible, n, rng, f"class {source}" if source is not None else "non-target")
        new = np.full(len(idx), target, dtype=np.int64)
    orig = ya[idx].copy()
    ya[idx] = new
    mode = "random" if target is None else ("targeted" if source is not None else "to-target")
    man = PoisonManifest(
        "label-flip", float(rate), int(seed), len(ya), idx, orig, new.astype(np.int64),
        target=target, source=source, params={"mode": mode, "num_classes": k},
    )  # fmt: skip
    return PoisonResult(xa, ya, man)


def backdoor(
    x: np.ndarray,
    y: np.ndarray,
    trigger: TriggerSpec,
    *,
    rate: float,
    num_classes: int | None = None,
    seed: int = 0,
    attack: str = "badnets",
) -> PoisonResult:
    """Stamp ``trigger`` on ``round(rate * N)`` rows (not of the target class, or of
    ``trigger.source`` only) and relabel them ``trigger.target`` (dirty-label backdoor)."""
    xa, ya, k = check_xy(x, y, num_classes)
    if xa.ndim != 4 or tuple(xa.shape[1:]) != trigger.input_shape:
        raise InputError(
            f"trigger of shape {trigger.input_shape} does not fit inputs {tuple(xa.shape[1:])}"
        )
    lo, hi = trigger.bounds
    if xa.min() < lo - 1e-5 or xa.max() > hi + 1e-5:
        raise InputError(f"inputs leave the trigger's bounds {trigger.bounds}")
    target = _check_class(trigger.target, k, "target")
    source = _check_class(trigger.source, k, "source")
    rng = np.random.default_rng(seed)
    n = _count(rate, len(ya))
    eligible = np.flatnonzero(ya == source if source is not None else ya != target)
    idx = _pick(eligible, n, rng, f"class {source}" if source is not None else "non-target")
    orig = ya[idx].copy()
    xa[idx] = trigger.apply(xa[idx])
    ya[idx] = target
    man = PoisonManifest(
        attack, float(rate), int(seed), len(ya), idx, orig, np.full(len(idx), target),
        target=target, source=source, trigger=trigger, params=dict(trigger.params or {}),
    )  # fmt: skip
    return PoisonResult(xa, ya, man)


def poison(
    x: np.ndarray,
    y: np.ndarray,
    attack: str,
    *,
    rate: float = 0.05,
    target: int | None = 0,
    source: int | None = None,
    bounds: tuple[float, float] = (0.0, 1.0),
    num_classes: int | None = None,
    seed: int = 0,
    size: int = 3,
    position: str | Sequence[int] = "bottom-right",
    colour: float | Sequence[float] | None = None,
    style: str = "solid",
    alpha: float = 0.2,
) -> PoisonResult:
    """One entry point for the CLI: ``attack`` is ``badnets``, ``blend`` or ``label-flip``."""
    if attack not in ATTACKS:
        raise InputError(f"unknown poisoning attack {attack!r}; use one of {', '.join(ATTACKS)}")
    if attack == "label-flip":
        return label_flip(
            x, y, rate=rate, target=target, source=source, num_classes=num_classes, seed=seed
        )
    if target is None:
        raise InputError(f"{attack} needs a target class")
    shape = tuple(np.asarray(x).shape[1:])
    if attack == "badnets":
        pos = position if isinstance(position, str) else (int(position[0]), int(position[1]))
        trig = patch_trigger(
            shape, target=target, bounds=bounds, size=size, position=pos, colour=colour,
            style=style, source=source,
        )  # fmt: skip
    else:
        trig = blend_trigger(
            shape, target=target, bounds=bounds, alpha=alpha, seed=seed, source=source
        )
    return backdoor(x, y, trig, rate=rate, num_classes=num_classes, seed=seed, attack=attack)
