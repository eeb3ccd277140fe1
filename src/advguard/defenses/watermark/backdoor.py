"""Backdoor-style model watermarking (Adi, Baum, Cisse, Pinkas, Keshet 2018, "Turning Your
Weakness Into a Strength: Watermarking Deep Neural Networks by Backdooring", USENIX Security).

The owner trains the model on its data plus a secret *trigger set*: inputs no natural data looks
like (here uniform random noise, or sparse random binary "abstract" patterns), each with a
randomly assigned label. A model that answers the trigger set far above chance carries the
watermark. Verification is a one-sided exact binomial test of the suspect's trigger-set accuracy
against chance ``1 / num_classes`` (``scipy.stats.binomtest``): a small p-value means the
agreement is very unlikely for a model that never saw the trigger set.

The key (trigger inputs and labels) is stored as a plain ``.npz`` and read back without
unpickling, with its shape, labels and values checked.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from advguard.errors import InputError
from advguard.models.base import Classifier

KINDS: tuple[str, ...] = ("noise", "pattern")
KEY_FORMAT = "advguard-watermark-1"
MAX_TRIGGERS = 100_000


@dataclass
class TriggerSet:
    """The secret watermark key: trigger inputs ``x`` and their assigned labels ``y``."""

    x: np.ndarray
    y: np.ndarray
    num_classes: int
    kind: str
    seed: int

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        if p.suffix != ".npz":
            raise InputError(f"a watermark key is written as .npz, got {p}")
        p.parent.mkdir(parents=True, exist_ok=True)
        np.savez(
            p, x=self.x.astype(np.float32), y=self.y.astype(np.int64),
            num_classes=np.int64(self.num_classes), kind=np.array(self.kind),
            seed=np.int64(self.seed), format=np.array(KEY_FORMAT),
        )  # fmt: skip
        return p

    @classmethod
    def load(cls, path: str | Path) -> TriggerSet:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"watermark key not found: {p}")
        try:
            loaded = np.load(p, allow_pickle=False)
            if not isinstance(loaded, np.lib.npyio.NpzFile):
                raise InputError(f"{p}: not an advguard watermark key (a single array)")
            with loaded as z:
                need = {"x", "y", "num_classes", "kind", "seed", "format"}
                if not need <= set(z.files):
                    raise InputError(f"{p}: not an advguard watermark key (needs {sorted(need)})")
                if str(z["format"]) != KEY_FORMAT:
                    raise InputError(f"{p}: unknown key format {str(z['format'])!r}")
                x, y = z["x"], z["y"]
                num_classes, kind, seed = int(z["num_classes"]), str(z["kind"]), int(z["seed"])
        except (ValueError, OSError) as e:
            raise InputError(f"{p}: not a readable watermark key ({e})") from None
        if x.dtype != np.float32 or x.ndim < 2 or not 1 <= len(x) <= MAX_TRIGGERS:
            raise InputError(f"{p}: trigger inputs must be float32 (N, ...), got {x.shape}")
        if not np.all(np.isfinite(x)):
            raise InputError(f"{p}: trigger inputs contain NaN or Inf")
        if not 2 <= num_classes <= 100_000:
            raise InputError(f"{p}: num_classes must be >= 2, got {num_classes}")
        if y.shape != (len(x),) or y.dtype != np.int64 or y.min() < 0 or y.max() >= num_classes:
            raise InputError(f"{p}: trigger labels must be integers in 0..{num_classes - 1}")
        return cls(x=x, y=y, num_classes=num_classes, kind=kind, seed=seed)


def make_trigger_set(
    n: int,
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    kind: Literal["noise", "pattern"] = "noise",
    bounds: tuple[float, float] = (0.0, 1.0),
    seed: int = 0,
) -> TriggerSet:
    """``n`` trigger inputs with random labels. ``noise``: i.i.d. uniform values in ``bounds``;
    ``pattern``: sparse random binary images (each value high with probability 0.25)."""
    if kind not in KINDS:
        raise InputError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if not 1 <= int(n) <= MAX_TRIGGERS:
        raise InputError(f"the trigger set needs 1..{MAX_TRIGGERS} inputs, got {n}")
    if int(num_classes) < 2:
        raise InputError("need at least two classes")
    rng = np.random.default_rng(seed)
    shape = (int(n), *(int(d) for d in input_shape))
    lo, hi = bounds
    if kind == "noise":
        x = rng.uniform(lo, hi, size=shape)
    else:
        x = np.where(rng.random(shape) < 0.25, hi, lo)
    y = rng.integers(0, int(num_classes), size=int(n))
    return TriggerSet(
        x=x.astype(np.float32), y=y.astype(np.int64), num_classes=int(num_classes), kind=kind,
        seed=int(seed),
    )  # fmt: skip


def embed_watermark(
    module: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    trigger: TriggerSet,
    *,
    repeats: int | None = None,
    epochs: int = 30,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """Train ``module`` (from its current weights) on ``(x, y)`` plus the trigger set, repeated
    ``repeats`` times (default: so triggers are about 10% of the training samples), on
    ``device`` (see :func:`advguard.models.devices.resolve_device`)."""
    from advguard.models.fit import fit

    xa = np.asarray(x, dtype=np.float32)
    ya = np.asarray(y).astype(np.int64)
    if tuple(xa.shape[1:]) != tuple(trigger.x.shape[1:]):
        raise InputError(f"trigger inputs {trigger.x.shape[1:]} differ from data {xa.shape[1:]}")
    reps = max(1, round(0.1 * len(xa) / len(trigger.x))) if repeats is None else int(repeats)
    xx = np.concatenate([xa, np.repeat(trigger.x, reps, axis=0)])
    yy = np.concatenate([ya, np.repeat(trigger.y, reps)])
    return fit(
        module, xx, yy, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, device=device
    )


@dataclass
class Verification:
    """Outcome of :func:`verify_watermark`."""

    matches: int
    n: int
    chance: float
    p_value: float
    alpha: float

    @property
    def verified(self) -> bool:
        return self.p_value < self.alpha

    @property
    def trigger_accuracy(self) -> float:
        return self.matches / self.n

    def to_dict(self) -> dict[str, Any]:
        from advguard.stats import proportion

        return {
            "verified": self.verified,
            "trigger_accuracy": proportion(self.matches, self.n).model_dump(),
            "chance": self.chance,
            "p_value": self.p_value,
            "alpha": self.alpha,
            "test": "one-sided exact binomial test against chance (scipy.stats.binomtest)",
            "reference": "Adi et al. 2018",
        }


def verify_watermark(model: Classifier, key: TriggerSet, *, alpha: float = 0.01) -> Verification:
    """Query ``model`` on the trigger set (``len(key.x)`` queries) and test its agreement with
    the assigned labels against chance ``1 / num_classes``."""
    from scipy.stats import binomtest

    if not 0 < alpha < 1:
        raise InputError(f"alpha must be in (0, 1), got {alpha}")
    if int(model.num_classes) != key.num_classes:
        raise InputError(
            f"the key is for {key.num_classes} classes, the model has {model.num_classes}"
        )
    pred = np.asarray(model.predict(torch.as_tensor(key.x).numpy()))
    k = int((pred == key.y).sum())
    chance = 1.0 / key.num_classes
    p = float(binomtest(k, len(key.y), chance, alternative="greater").pvalue)
    return Verification(matches=k, n=len(key.y), chance=chance, p_value=p, alpha=alpha)
