"""Adversarial training: PGD-AT (Madry et al. 2018), TRADES (Zhang et al. 2019) and fast
adversarial training (Wong et al. 2020) with catastrophic-overfitting detection.

All inputs are raw-space tensors inside ``bounds``; an optional ``preprocess`` module (e.g.
:class:`advguard.models.Normalize`) is applied inside, so perturbations live where the
attacker acts. The library never prints: progress goes through
``progress(stage, done, total)``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from advguard import _validate as check
from advguard.atomic import atomic_path, atomic_write_text
from advguard.attacks.evasion import gradient_descent
from advguard.attacks.norms import Norm, normalize, parse_norm, project, random_in_ball
from advguard.errors import InputError

Method = Literal["pgd-at", "trades", "fast-at"]
METHODS: tuple[str, ...] = ("pgd-at", "trades", "fast-at")
Progress = Callable[[str, int, int], None]
MANIFEST_SCHEMA = "advguard-adv-training/1"
CHECKPOINT_NAME = "model.safetensors"
MANIFEST_NAME = "manifest.json"
STATE_NAME = "resume-state.safetensors"
STATE_META_NAME = "resume-state.json"
STATE_SCHEMA = "advguard-train-state/1"


# -- configuration and results -------------------------------------------------------
@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run (recorded in the manifest)."""

    method: str
    epsilon: float
    norm: str
    epochs: int
    batch_size: int
    lr: float
    optimizer: str
    momentum: float
    weight_decay: float
    lr_schedule: str
    steps: int
    step_size: float
    beta: float
    mix: float
    fast_alpha: float
    random_init: bool
    ramp_epochs: int
    val_fraction: float
    val_samples: int
    eval_steps: int
    eval_step_size: float
    patience: int | None
    detect_co: bool
    co_check_every: int | None
    co_batch: int
    co_drop: float
    co_floor: float
    co_gap: float
    seed: int
    bounds: tuple[float, float]
    max_time_s: float | None


@dataclass
class TrainResult:
    """What :func:`adversarial_train` returns."""

    module: nn.Module
    manifest: dict[str, Any]
    checkpoint_path: Path | None = None
    manifest_path: Path | None = None
    preprocess: nn.Module | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    def classifier(self) -> Any:
        """The trained module as a :class:`advguard.models.TorchClassifier`."""
        from advguard.models.torch_model import TorchClassifier

        m = self.manifest["model"]
        return TorchClassifier(
            self.module,
            input_shape=tuple(m["input_shape"]),
            num_classes=int(m["num_classes"]),
            bounds=tuple(m["bounds"]),  # type: ignore[arg-type]
            preprocess=self.preprocess,
        )


# -- catastrophic overfitting ------------------------------------------------------
def detect_catastrophic_overfitting(
    pgd_acc: float,
    fgsm_acc: float | None,
    best_pgd_acc: float | None,
    *,
    drop: float = 0.2,
    floor: float = 0.05,
    gap: float = 0.5,
) -> str | None:
    """Return why training collapsed, or ``None`` when the probe looks healthy.

    Catastrophic overfitting (Wong et al. 2020) shows as PGD robust accuracy on
    held-out data collapsing while single-step (FGSM) accuracy stays high. Flags:

    - PGD accuracy fell by more than ``drop`` (fraction) below the best seen so far;
    - PGD accuracy at most ``floor`` while FGSM accuracy exceeds it by at least ``gap``.
    """
    if best_pgd_acc is not None and pgd_acc < best_pgd_acc - drop:
        return (
            f"PGD robust accuracy dropped from {best_pgd_acc:.1%} (best) to {pgd_acc:.1%} "
            f"(> {drop:.0%} points)"
        )
    if fgsm_acc is not None and pgd_acc <= floor and fgsm_acc - pgd_acc >= gap:
        return (
            f"PGD robust accuracy {pgd_acc:.1%} collapsed while FGSM accuracy stays {fgsm_acc:.1%}"
        )
    return None


# -- attacks on the module being trained ---------------------------------------------
class _Net(nn.Module):
    """``module(preprocess(x))`` without registering preprocess for training."""

    def __init__(self, module: nn.Module, preprocess: nn.Module | None) -> None:
        super().__init__()
        self.module = module
        self.pre = preprocess

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(self.pre(x) if self.pre is not None else x)


def _clip(x_adv: torch.Tensor, x: torch.Tensor, norm: Norm, eps: float, lo: float, hi: float):
    return (x + project(x_adv - x, norm, eps)).clamp(lo, hi)


class _NetOracle:
    """``value_and_grad`` on a bare module, for the gradient engine (no query counting)."""

    def __init__(self, net: nn.Module) -> None:
        self.net = net

    def value_and_grad(
        self, x: torch.Tensor, loss_fn: Callable[[torch.Tensor], torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = self.net(x)
            loss = loss_fn(logits)
            (g,) = torch.autograd.grad(loss.sum(), x)
        return logits.detach(), loss.detach(), g

    def logits(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - final_eval=False
        with torch.no_grad():
            return self.net(x)


def _perturb(
    net: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss: Callable[[torch.Tensor], torch.Tensor],
    start: Callable[[dict[str, Any], torch.Generator], torch.Tensor],
    *,
    epsilon: float,
    norm: Norm,
    steps: int,
    step_size: float,
    bounds: tuple[float, float],
    generator: torch.Generator,
) -> torch.Tensor:
    """``steps`` steepest-ascent steps of ``loss`` (a batch loss) from ``start``, projected
    onto the ball and the bounds, on the shared gradient engine; the last iterate."""
    lo, hi = bounds

    def step(g: torch.Tensor, x_adv: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
        return _clip(x_adv + step_size * normalize(g, norm), s["x0"], norm, epsilon, lo, hi)

    out = gradient_descent(
        _NetOracle(net),
        x,
        y,
        None,
        generator,
        steps=steps,
        loss=lambda _y, _t: loss,
        start=start,
        step=step,
        early_stop=False,
        final_eval=False,
    )
    return out.detach()


def pgd_perturb(
    net: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epsilon: float,
    norm: Norm,
    steps: int,
    step_size: float,
    bounds: tuple[float, float],
    generator: torch.Generator,
    random_start: bool = True,
) -> torch.Tensor:
    """Batched PGD maximising cross-entropy (Madry et al.) on ``net``; returns ``x_adv``."""
    lo, hi = bounds
    if epsilon <= 0:
        return x.detach().clone()
    x = x.detach()

    def start(s: dict[str, Any], gen: torch.Generator) -> torch.Tensor:
        if not random_start:
            return x.clone()
        return (x + random_in_ball(x, norm, epsilon, gen)).clamp(lo, hi)

    return _perturb(
        net,
        x,
        y,
        lambda logits: F.cross_entropy(logits, y),
        start,
        epsilon=epsilon,
        norm=norm,
        steps=steps,
        step_size=step_size,
        bounds=bounds,
        generator=generator,
    )


def trades_perturb(
    net: nn.Module,
    x: torch.Tensor,
    *,
    epsilon: float,
    norm: Norm,
    steps: int,
    step_size: float,
    bounds: tuple[float, float],
    generator: torch.Generator,
) -> torch.Tensor:
    """TRADES inner maximisation: ``x_adv`` maximising KL(f(x) || f(x_adv)).

    Starts from ``x + 0.001 * N(0, 1)`` as in Zhang et al.'s reference code.
    """
    lo, hi = bounds
    x = x.detach()
    if epsilon <= 0:
        return x.clone()
    with torch.no_grad():
        p_clean = F.softmax(net(x), dim=1)

    def start(s: dict[str, Any], gen: torch.Generator) -> torch.Tensor:
        noise = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
        return (x + 0.001 * noise).clamp(lo, hi)

    return _perturb(
        net,
        x,
        torch.zeros(len(x), dtype=torch.long, device=x.device),  # unused: the loss is the KL
        lambda logits: F.kl_div(F.log_softmax(logits, dim=1), p_clean, reduction="sum"),
        start,
        epsilon=epsilon,
        norm=norm,
        steps=steps,
        step_size=step_size,
        bounds=bounds,
        generator=generator,
    )


def fgsm_perturb(
    net: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epsilon: float,
    norm: Norm,
    alpha: float,
    bounds: tuple[float, float],
    generator: torch.Generator,
    random_init: bool = True,
) -> torch.Tensor:
    """Fast-AT step (Wong et al.): uniform random init in the ball, one step of ``alpha``."""
    lo, hi = bounds
    x = x.detach()
    if epsilon <= 0:
        return x.clone()
    x0 = (x + random_in_ball(x, norm, epsilon, generator)).clamp(lo, hi) if random_init else x
    x0 = x0.clone().requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(net(x0), y)
        (g,) = torch.autograd.grad(loss, x0)
    return _clip(x0.detach() + alpha * normalize(g, norm), x, norm, epsilon, lo, hi).detach()


def _accuracy(
    net: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, attack=None
) -> float:
    """Accuracy of ``net`` (eval mode) on ``x`` or on ``attack(xb, yb)``."""
    if len(x) == 0:
        return float("nan")
    correct = 0
    for i in range(0, len(x), batch_size):
        xb, yb = x[i : i + batch_size], y[i : i + batch_size]
        if attack is not None:
            xb = attack(xb, yb)
        with torch.no_grad():
            correct += int((net(xb).argmax(1) == yb).sum())
    return correct / len(x)


# -- helpers -------------------------------------------------------------------
def data_sha256(x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor) -> dict[str, str]:
    """SHA-256 of the training inputs' and labels' bytes (float32 x, int64 y)."""
    xa = np.ascontiguousarray(np.asarray(torch.as_tensor(x).detach().cpu(), dtype=np.float32))
    ya = np.ascontiguousarray(np.asarray(torch.as_tensor(y).detach().cpu(), dtype=np.int64))
    hx, hy = hashlib.sha256(xa.tobytes()).hexdigest(), hashlib.sha256(ya.tobytes()).hexdigest()
    both = hashlib.sha256(xa.tobytes() + ya.tobytes()).hexdigest()
    return {"sha256": both, "x_sha256": hx, "y_sha256": hy}


def _atomic_save_torch(module: nn.Module, path: Path, **meta: Any) -> Path:
    from advguard.models.io import save_torch

    with atomic_path(path) as tmp:
        save_torch(module, tmp, **meta)
    return path


def _versions() -> dict[str, str]:
    from advguard import __version__

    return {
        "advguard": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def _lr_factor(schedule: str, progress: float) -> float:
    if schedule == "none":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "step":  # /10 at 50% and 75% of training (Madry et al. style)
        return 1.0 if progress < 0.5 else 0.1 if progress < 0.75 else 0.01
    # "cyclic": triangular one-cycle as in Wong et al. 2020, peak at 40% of training
    return progress / 0.4 if progress < 0.4 else max(0.0, (1.0 - progress) / 0.6)


def _num(name: str, value: Any, *, low: float | None = None, strict: bool = False) -> float:
    return check.number(name, value, low=low, low_open=strict)


def _int(name: str, value: Any, low: int) -> int:
    limit = "steps" if name in ("steps", "eval_steps", "epochs") else None
    limit = "samples" if name in ("val_samples", "co_batch", "batch_size") else limit
    return check.integer(name, value, low=low, limit=limit)


def _check_choices(optimizer: str, lr_schedule: str) -> None:
    if optimizer not in ("adam", "sgd"):
        raise InputError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    if lr_schedule not in ("none", "cosine", "step", "cyclic"):
        raise InputError(
            f"lr_schedule must be one of none, cosine, step, cyclic; got {lr_schedule!r}"
        )


def _check_module(
    net: nn.Module, xt: torch.Tensor, yt: torch.Tensor, num_classes: int | None
) -> int:
    """The module's class count, after checking it maps the inputs to logits for the labels."""
    with torch.no_grad():
        try:
            out = net.eval()(xt[:2])
        except RuntimeError as exc:
            raise InputError(
                f"module cannot process inputs of shape {tuple(xt.shape[1:])}: {exc}"
            ) from None
    if out.ndim != 2:
        raise InputError(f"module must output logits (N, classes), got {tuple(out.shape)}")
    n_classes = int(out.shape[1]) if num_classes is None else int(num_classes)
    if n_classes != out.shape[1]:
        raise InputError(f"num_classes={num_classes} but the module outputs {out.shape[1]} logits")
    if int(yt.min()) < 0 or int(yt.max()) >= n_classes:
        raise InputError(
            f"labels must lie in [0, {n_classes - 1}], got [{int(yt.min())}, {int(yt.max())}]"
        )
    return n_classes


def _model_meta(
    factory: str | None,
    factory_kwargs: Mapping[str, Any] | None,
    input_shape: list[int],
    n_classes: int,
    bounds: tuple[float, float],
    preprocess: nn.Module | None,
) -> dict[str, Any]:
    """The manifest's ``model`` section."""
    return {
        "factory": factory,
        "factory_kwargs": dict(factory_kwargs) if factory_kwargs is not None else None,
        "input_shape": input_shape,
        "num_classes": n_classes,
        "bounds": [bounds[0], bounds[1]],
        "preprocess": repr(preprocess) if preprocess is not None else None,
    }


def _save_checkpoint(module: nn.Module, path: Path, model_meta: Mapping[str, Any]) -> None:
    """Atomically save ``module`` with the metadata ``load_model`` needs to rebuild it."""
    meta: dict[str, Any] = {
        "input_shape": model_meta["input_shape"],
        "num_classes": model_meta["num_classes"],
        "bounds": tuple(model_meta["bounds"]),
    }
    if model_meta["factory"] is not None:
        meta["factory"] = model_meta["factory"]
        meta["factory_kwargs"] = model_meta["factory_kwargs"]
    _atomic_save_torch(module, path, **meta)


def _prepare_data(
    x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor, bounds: tuple[float, float]
) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        xt = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
        yt = torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y)
    except (TypeError, ValueError) as exc:
        raise InputError(f"x and y must be numeric arrays ({exc})") from None
    if not (torch.is_floating_point(xt) or xt.dtype in (torch.uint8, torch.int32, torch.int64)):
        raise InputError(f"x must be numeric, got dtype {xt.dtype}")
    xt = xt.detach().to(torch.float32).cpu()
    if xt.ndim < 2:
        raise InputError(f"x must be a batch (N, ...) of inputs, got shape {tuple(xt.shape)}")
    if yt.ndim != 1 or len(yt) != len(xt):
        raise InputError(
            f"y must be a 1-D array with one label per input ({len(xt)}), got shape "
            f"{tuple(yt.shape)}"
        )
    if torch.is_floating_point(yt) and not torch.equal(yt, yt.round()):
        raise InputError("y must hold integer class labels, got non-integer floats")
    yt = yt.detach().cpu().long()
    if len(xt) < 2:
        raise InputError(f"need at least 2 training samples, got {len(xt)}")
    if not torch.isfinite(xt).all():
        raise InputError("x contains NaN or Inf; clean the data before training")
    lo, hi = bounds
    if float(xt.min()) < lo - 1e-5 or float(xt.max()) > hi + 1e-5:
        raise InputError(
            f"x lies outside bounds [{lo}, {hi}] (min {float(xt.min()):.4g}, "
            f"max {float(xt.max()):.4g}); scale the data or pass bounds="
        )
    return xt, yt


# -- resume state: tensors in safetensors, the rest in JSON (nothing is unpickled) -------
def _save_state(
    out: Path,
    *,
    module: nn.Module,
    best_state: Mapping[str, torch.Tensor] | None,
    opt: torch.optim.Optimizer,
    gen: torch.Generator,
    meta: dict[str, Any],
) -> None:
    """Write the end-of-epoch training state atomically (tensors first, then the JSON)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for k, v in module.state_dict().items():
        tensors[f"model.{k}"] = v.detach().cpu().contiguous()
    for k, v in (best_state or {}).items():
        tensors[f"best.{k}"] = v.detach().cpu().contiguous()
    opt_scalars: dict[str, dict[str, Any]] = {}
    for idx, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                opt_scalars.setdefault(str(idx), {})[k] = v
    tensors["rng.generator"] = gen.get_state()
    tensors["rng.torch"] = torch.get_rng_state()
    with atomic_path(out / STATE_NAME) as tmp:
        save_file(tensors, str(tmp))
    from advguard.models.io import file_sha256

    doc = {
        "schema": STATE_SCHEMA,
        **meta,
        "optimizer_scalars": opt_scalars,
        "has_best": best_state is not None,
        "tensors_sha256": file_sha256(out / STATE_NAME),
    }
    atomic_write_text(out / STATE_META_NAME, json.dumps(doc, indent=1, default=str) + "\n")


def _load_state(out: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
    """The saved state of an interrupted run in ``out``, or None when there is none."""
    meta_p, tens_p = out / STATE_META_NAME, out / STATE_NAME
    if not meta_p.exists() or not tens_p.exists():
        return None
    from safetensors.torch import load_file

    from advguard.models.io import file_sha256

    try:
        meta = json.loads(meta_p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read the resume state {meta_p}: {exc}") from None
    if not isinstance(meta, dict) or meta.get("schema") != STATE_SCHEMA:
        raise InputError(f"{meta_p} is not an advguard training state ({STATE_SCHEMA})")
    if file_sha256(tens_p) != meta.get("tensors_sha256"):
        raise InputError(
            f"{tens_p} does not match {meta_p} (interrupted while saving?); delete both to "
            "start over"
        )
    return meta, load_file(str(tens_p))


def _clear_state(out: Path | None) -> None:
    if out is not None:
        (out / STATE_META_NAME).unlink(missing_ok=True)
        (out / STATE_NAME).unlink(missing_ok=True)


# -- the trainer ----------------------------------------------------------------------
def adversarial_train(
    module: nn.Module,
    x: np.ndarray | torch.Tensor,
    y: np.ndarray | torch.Tensor,
    *,
    method: Method | str = "pgd-at",
    epsilon: float = 0.3,
    norm: str = "linf",
    epochs: int = 10,
    batch_size: int = 128,
    lr: float = 1e-3,
    optimizer: str = "adam",
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    lr_schedule: str = "none",
    steps: int = 10,
    step_size: float | None = None,
    beta: float = 6.0,
    mix: float = 0.0,
    fast_alpha: float = 1.25,
    random_init: bool = True,
    ramp_epochs: int | None = None,
    val_fraction: float = 0.1,
    val_samples: int = 512,
    eval_steps: int = 20,
    patience: int | None = None,
    detect_co: bool | None = None,
    co_check_every: int | None = None,
    co_batch: int = 256,
    co_drop: float = 0.2,
    co_floor: float = 0.05,
    co_gap: float = 0.5,
    bounds: tuple[float, float] = (0.0, 1.0),
    preprocess: nn.Module | None = None,
    num_classes: int | None = None,
    factory: str | None = None,
    factory_kwargs: Mapping[str, Any] | None = None,
    seed: int = 0,
    max_time_s: float | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    progress: Progress | None = None,
) -> TrainResult:
    """Adversarially train ``module`` on raw inputs ``x`` (N, ...) in ``bounds`` with labels ``y``.

    Methods
    -------
    ``"pgd-at"``
        Madry et al. 2018: minimise CE on PGD examples (``steps`` steps of ``step_size``,
        default ``2.5 * epsilon / steps``, random start). ``mix`` in [0, 1] is the weight
        of the clean loss: ``mix * CE(x) + (1 - mix) * CE(x_adv)``.
    ``"trades"``
        Zhang et al. 2019: ``CE(f(x), y) + beta * KL(f(x) || f(x_adv))``; ``x_adv``
        maximises the KL from ``x + 0.001 N(0, 1)`` with ``steps`` PGD steps.
    ``"fast-at"``
        Wong et al. 2020: FGSM from a uniform random start (``random_init``) with step
        ``fast_alpha * epsilon`` (default 1.25). Catastrophic-overfitting detection is on:
        after every epoch (and every ``co_check_every`` batches if given) PGD and FGSM
        accuracy are measured on ``co_batch`` held-out samples; on collapse (see
        :func:`detect_catastrophic_overfitting`) training stops and the best weights
        are restored. The event is recorded in the manifest.

    A ``val_fraction`` of the data is held out (stratification-free, seeded). After each
    epoch clean and PGD robust accuracy (``eval_steps`` steps, at the full ``epsilon``) are
    measured on at most ``val_samples`` held-out samples; the weights with the best robust
    accuracy are kept and returned. ``patience`` (epochs without improvement after the
    epsilon ramp) enables early stopping. ``ramp_epochs`` grows epsilon linearly from 0 over
    the first epochs (default: ``epochs // 3`` when ``epsilon`` is at least 20% of the input
    range, as for MNIST at 0.3; else 0).

    With ``out_dir`` the best weights are written (atomically, after each improvement) to
    ``out_dir/model.safetensors`` via :func:`advguard.models.io.save_torch` (with ``factory``
    metadata when given, so ``load_model`` can rebuild it) and a manifest to
    ``out_dir/manifest.json``. Deterministic for a given ``seed`` on CPU (the initial
    weights are the caller's). ``max_time_s`` stops training (after evaluating the
    current, partial epoch) once the wall-clock budget is spent.

    Nothing is lost on a crash: with ``out_dir``, the full training state (current and
    best weights, optimizer moments, RNG states, history) is saved after every epoch to
    ``resume-state.safetensors`` + ``resume-state.json`` (no pickle). ``resume=True``
    continues an interrupted run from its last finished epoch, with the same result as an
    uninterrupted run on CPU; the configuration and the data must be the same (checked). A
    run that finishes removes its resume state; ``resume=True`` without one starts afresh.
    """
    t_start = time.perf_counter()
    if not isinstance(module, nn.Module):
        raise InputError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    if method not in METHODS:
        raise InputError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    norm_c = parse_norm(norm, allowed=("linf", "l2"))
    lo, hi = (_num("bounds[0]", bounds[0]), _num("bounds[1]", bounds[1]))
    if not lo < hi:
        raise InputError(f"bounds must satisfy low < high, got {bounds}")
    eps = _num("epsilon", epsilon, low=0.0)
    epochs = _int("epochs", epochs, 1)
    batch_size = _int("batch_size", batch_size, 1)
    steps = _int("steps", steps, 1)
    eval_steps = _int("eval_steps", eval_steps, 1)
    val_samples = _int("val_samples", val_samples, 1)
    co_batch = _int("co_batch", co_batch, 1)
    seed = _int("seed", seed, 0)
    lr = _num("lr", lr, low=0.0, strict=True)
    weight_decay = _num("weight_decay", weight_decay, low=0.0)
    beta = _num("beta", beta, low=0.0)
    mix = _num("mix", mix, low=0.0)
    if mix > 1.0:
        raise InputError(f"mix (weight of the clean loss) must be in [0, 1], got {mix}")
    fast_alpha = _num("fast_alpha", fast_alpha, low=0.0, strict=True)
    val_fraction = _num("val_fraction", val_fraction, low=0.0)
    if not 0.0 < val_fraction < 1.0:
        raise InputError(
            f"val_fraction must be in (0, 1): a held-out split is needed for robust "
            f"accuracy, early stopping and overfitting checks; got {val_fraction}"
        )
    _check_choices(optimizer, lr_schedule)
    if patience is not None:
        patience = _int("patience", patience, 1)
    if co_check_every is not None:
        co_check_every = _int("co_check_every", co_check_every, 1)
    if max_time_s is not None:
        max_time_s = _num("max_time_s", max_time_s, low=0.0, strict=True)
    if step_size is None:
        alpha = 2.5 * eps / steps
    else:
        alpha = _num("step_size", step_size, low=0.0, strict=True)
    if ramp_epochs is None:
        ramp = epochs // 3 if eps >= 0.2 * (hi - lo) else 0
    else:
        ramp = _int("ramp_epochs", ramp_epochs, 0)
        if ramp >= epochs and ramp > 0:
            raise InputError(
                f"ramp_epochs ({ramp}) must be smaller than epochs ({epochs}) so training "
                "reaches the full epsilon"
            )
    detect = (method == "fast-at") if detect_co is None else bool(detect_co)
    if resume and out_dir is None:
        raise InputError("resume=True needs out_dir (where the interrupted run saved its state)")

    xt, yt = _prepare_data(x, y, (lo, hi))
    cfg = TrainConfig(
        method=str(method),
        epsilon=eps,
        norm=norm_c,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        optimizer=optimizer,
        momentum=float(momentum),
        weight_decay=weight_decay,
        lr_schedule=lr_schedule,
        steps=steps,
        step_size=alpha,
        beta=beta,
        mix=mix,
        fast_alpha=fast_alpha,
        random_init=bool(random_init),
        ramp_epochs=ramp,
        val_fraction=val_fraction,
        val_samples=val_samples,
        eval_steps=eval_steps,
        eval_step_size=2.5 * eps / eval_steps,
        patience=patience,
        detect_co=detect,
        co_check_every=co_check_every,
        co_batch=co_batch,
        co_drop=_num("co_drop", co_drop, low=0.0),
        co_floor=_num("co_floor", co_floor, low=0.0),
        co_gap=_num("co_gap", co_gap, low=0.0),
        seed=seed,
        bounds=(lo, hi),
        max_time_s=max_time_s,
    )

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = _Net(module, preprocess.eval() if preprocess is not None else None).cpu()
    n_classes = _check_module(net, xt, yt, num_classes)

    # held-out split (seeded)
    perm = torch.randperm(len(xt), generator=gen)
    n_val = max(1, round(val_fraction * len(xt)))
    if n_val >= len(xt):
        raise InputError(f"val_fraction {val_fraction} leaves no training data")
    val_idx, tr_idx = perm[:n_val], perm[n_val:]
    x_tr, y_tr = xt[tr_idx], yt[tr_idx]
    x_val, y_val = xt[val_idx][:val_samples], yt[val_idx][:val_samples]
    x_co, y_co = x_val[:co_batch], y_val[:co_batch]

    for p in module.parameters():
        p.requires_grad_(True)
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise InputError("module has no trainable parameters")
    opt: torch.optim.Optimizer
    if optimizer == "adam":
        opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=lr, momentum=float(momentum), weight_decay=weight_decay)

    out_path = Path(out_dir) if out_dir is not None else None
    ckpt_path = out_path / CHECKPOINT_NAME if out_path is not None else None
    man_path = out_path / MANIFEST_NAME if out_path is not None else None
    input_shape = [int(d) for d in xt.shape[1:]]
    model_meta = _model_meta(factory, factory_kwargs, input_shape, n_classes, (lo, hi), preprocess)
    manifest: dict[str, Any] = {
        "schema": MANIFEST_SCHEMA,
        "status": "running",
        "method": cfg.method,
        "config": asdict(cfg),
        "seed": seed,
        "data": {
            **data_sha256(xt, yt),
            "n": len(xt),
            "n_train": len(x_tr),
            "n_val": len(val_idx),
            "n_val_evaluated": len(x_val),
            "input_shape": input_shape,
            "num_classes": n_classes,
        },
        "model": model_meta,
        "epochs": [],
        "best_epoch": None,
        "best_val_robust_acc": None,
        "co_initial_probe": None,
        "co_events": [],
        "stop_reason": None,
        "total_time_s": None,
        "versions": _versions(),
        "checkpoint": None,
    }

    def save_best() -> None:
        if ckpt_path is not None:
            _save_checkpoint(module, ckpt_path, model_meta)

    def write_manifest() -> None:
        if man_path is None:
            return
        atomic_write_text(man_path, json.dumps(manifest, indent=2, sort_keys=False) + "\n")

    def probe() -> tuple[float, float]:
        """(PGD acc, FGSM acc) on the small held-out CO batch at full epsilon."""
        net.eval()
        g = torch.Generator().manual_seed(seed + 7)
        pgd = _accuracy(
            net,
            x_co,
            y_co,
            batch_size,
            lambda xb, yb: pgd_perturb(
                net, xb, yb, epsilon=eps, norm=norm_c, steps=eval_steps,
                step_size=cfg.eval_step_size, bounds=(lo, hi), generator=g,
            ),
        )  # fmt: skip
        fgsm = _accuracy(
            net,
            x_co,
            y_co,
            batch_size,
            lambda xb, yb: fgsm_perturb(
                net, xb, yb, epsilon=eps, norm=norm_c, alpha=eps, bounds=(lo, hi),
                generator=g, random_init=False,
            ),
        )  # fmt: skip
        return pgd, fgsm

    n_batches = math.ceil(len(x_tr) / batch_size)
    total_batches = epochs * n_batches
    ramp_batches = ramp * n_batches
    initial_state = copy.deepcopy(module.state_dict())
    best_state: dict[str, torch.Tensor] | None = None
    best_acc = -1.0
    best_probe: float | None = None
    best_epoch: int | None = None
    since_best = 0
    stop_reason: str | None = None
    step_count = 0
    history: list[dict[str, Any]] = manifest["epochs"]

    def rollback(event: dict[str, Any]) -> None:
        nonlocal stop_reason
        module.load_state_dict(best_state if best_state is not None else initial_state)
        event["rolled_back_to_epoch"] = best_epoch
        manifest["co_events"].append(event)
        stop_reason = "catastrophic-overfitting"

    start_epoch, time_before = 0, 0.0
    saved = _load_state(out_path) if resume and out_path is not None else None
    if saved is not None:
        meta, tensors = saved
        old_cfg = {k: v for k, v in meta["config"].items() if k != "max_time_s"}
        new_cfg = {
            k: v for k, v in json.loads(json.dumps(asdict(cfg))).items() if k != "max_time_s"
        }
        diff = sorted(k for k in new_cfg if old_cfg.get(k) != new_cfg[k])
        if diff:
            raise InputError(
                "cannot resume: the configuration differs from the interrupted run in "
                + ", ".join(f"{k} ({old_cfg.get(k)!r} -> {new_cfg[k]!r})" for k in diff)
            )
        if meta["data_sha256"] != manifest["data"]["sha256"]:
            raise InputError("cannot resume: the training data differ from the interrupted run")
        try:
            module.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        except RuntimeError as exc:
            raise InputError(
                f"cannot resume: the saved weights do not fit the model ({exc})"
            ) from None
        if meta["has_best"]:
            best_state = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
        opt_state: dict[int, dict[str, Any]] = {}
        for k, v in tensors.items():
            if k.startswith("optim."):
                _, idx, name = k.split(".", 2)
                opt_state.setdefault(int(idx), {})[name] = v
        for idx, scal in meta["optimizer_scalars"].items():
            opt_state.setdefault(int(idx), {}).update(scal)
        opt.load_state_dict({"state": opt_state, "param_groups": opt.state_dict()["param_groups"]})
        gen.set_state(tensors["rng.generator"])
        torch.set_rng_state(tensors["rng.torch"])
        start_epoch, step_count = int(meta["epochs_done"]), int(meta["step_count"])
        best_acc, best_epoch = float(meta["best_acc"]), meta["best_epoch"]
        best_probe, since_best = meta["best_probe"], int(meta["since_best"])
        manifest["epochs"][:] = meta["history"]
        manifest["co_initial_probe"] = meta["co_initial_probe"]
        manifest["co_events"] = meta["co_events"]
        manifest["best_epoch"], manifest["best_val_robust_acc"] = best_epoch, best_acc
        manifest["resumed_from_epoch"] = start_epoch
        time_before = float(meta["time_s"])
    elif detect:  # baseline probe: a fine-tuned model that collapses at once is caught too
        pgd0, fgsm0 = probe()
        manifest["co_initial_probe"] = {"pgd_acc": pgd0, "fgsm_acc": fgsm0}
        best_probe = pgd0

    def save_state(epochs_done: int) -> None:
        if out_path is None:
            return
        _save_state(
            out_path, module=module, best_state=best_state, opt=opt, gen=gen,
            meta={
                "config": asdict(cfg), "data_sha256": manifest["data"]["sha256"],
                "epochs_done": epochs_done, "step_count": step_count, "best_acc": best_acc,
                "best_epoch": best_epoch, "best_probe": best_probe, "since_best": since_best,
                "history": history, "co_initial_probe": manifest["co_initial_probe"],
                "co_events": manifest["co_events"],
                "time_s": time_before + time.perf_counter() - t_start,
            },
        )  # fmt: skip

    for epoch in range(start_epoch, epochs):
        t_epoch = time.perf_counter()
        order = torch.randperm(len(x_tr), generator=gen)
        sums = {"loss": 0.0, "clean_correct": 0, "adv_correct": 0, "n": 0}
        eps_now = eps
        out_of_time = False
        for b in range(n_batches):
            idx = order[b * batch_size : (b + 1) * batch_size]
            xb, yb = x_tr[idx], y_tr[idx]
            eps_now = eps * min(1.0, (step_count + 1) / ramp_batches) if ramp_batches else eps
            for group in opt.param_groups:
                group["lr"] = lr * _lr_factor(lr_schedule, step_count / total_batches)
            net.eval()  # attacks see the deterministic network (TRADES/Madry practice)
            if method == "pgd-at":
                x_adv = pgd_perturb(
                    net, xb, yb, epsilon=eps_now, norm=norm_c, steps=steps,
                    step_size=alpha * eps_now / eps if eps > 0 else 0.0,
                    bounds=(lo, hi), generator=gen, random_start=True,
                )  # fmt: skip
            elif method == "trades":
                x_adv = trades_perturb(
                    net, xb, epsilon=eps_now, norm=norm_c, steps=steps,
                    step_size=alpha * eps_now / eps if eps > 0 else 0.0,
                    bounds=(lo, hi), generator=gen,
                )  # fmt: skip
            else:
                x_adv = fgsm_perturb(
                    net, xb, yb, epsilon=eps_now, norm=norm_c, alpha=fast_alpha * eps_now,
                    bounds=(lo, hi), generator=gen, random_init=cfg.random_init,
                )  # fmt: skip
            net.train()
            if method == "trades":
                logits_clean = net(xb)
                logits_adv = net(x_adv)
                kl = F.kl_div(
                    F.log_softmax(logits_adv, dim=1),
                    F.softmax(logits_clean, dim=1),
                    reduction="batchmean",
                )
                loss = F.cross_entropy(logits_clean, yb) + beta * kl
            elif mix > 0:
                logits_clean = net(xb)
                logits_adv = net(x_adv)
                loss = mix * F.cross_entropy(logits_clean, yb) + (1 - mix) * F.cross_entropy(
                    logits_adv, yb
                )
            else:
                logits_adv = net(x_adv)
                logits_clean = None
                loss = F.cross_entropy(logits_adv, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step_count += 1
            sums["loss"] += float(loss.detach()) * len(idx)
            sums["adv_correct"] += int((logits_adv.detach().argmax(1) == yb).sum())
            if logits_clean is not None:
                sums["clean_correct"] += int((logits_clean.detach().argmax(1) == yb).sum())
            sums["n"] += len(idx)
            if progress is not None:
                progress("train", step_count, total_batches)
            if detect and co_check_every and (b + 1) % co_check_every == 0 and b + 1 < n_batches:
                pgd_acc, fgsm_acc = probe()
                reason = detect_catastrophic_overfitting(
                    pgd_acc, fgsm_acc, best_probe, drop=cfg.co_drop, floor=cfg.co_floor,
                    gap=cfg.co_gap,
                )  # fmt: skip
                if reason is not None and eps_now >= eps:
                    rollback(
                        {"epoch": epoch + 1, "batch": b + 1, "pgd_acc": pgd_acc,
                         "fgsm_acc": fgsm_acc, "best_pgd_acc": best_probe, "reason": reason}
                    )  # fmt: skip
                    break
                if eps_now >= eps:
                    best_probe = pgd_acc if best_probe is None else max(best_probe, pgd_acc)
            if max_time_s is not None and time.perf_counter() - t_start > max_time_s:
                out_of_time = True
                break
        if stop_reason is not None:
            break

        # -- end of epoch: held-out clean and robust accuracy --------------------------
        net.eval()
        g_eval = torch.Generator().manual_seed(seed + 1)
        val_clean = _accuracy(net, x_val, y_val, batch_size)
        val_robust = _accuracy(
            net,
            x_val,
            y_val,
            batch_size,
            lambda xb, yb, g=g_eval: pgd_perturb(
                net, xb, yb, epsilon=eps, norm=norm_c, steps=eval_steps,
                step_size=cfg.eval_step_size, bounds=(lo, hi), generator=g,
            ),
        )  # fmt: skip
        n = max(1, sums["n"])
        row: dict[str, Any] = {
            "epoch": epoch + 1,
            "epsilon": eps_now,
            "samples": sums["n"],
            "lr": opt.param_groups[0]["lr"],
            "loss": sums["loss"] / n,
            "train_adv_acc": sums["adv_correct"] / n,
            "train_clean_acc": sums["clean_correct"] / n if method == "trades" or mix > 0 else None,
            "val_clean_acc": val_clean,
            "val_robust_acc": val_robust,
        }
        co_reason = None
        if detect:
            pgd_acc, fgsm_acc = probe()
            row["co_probe_pgd_acc"], row["co_probe_fgsm_acc"] = pgd_acc, fgsm_acc
            if eps_now >= eps:
                co_reason = detect_catastrophic_overfitting(
                    pgd_acc, fgsm_acc, best_probe, drop=cfg.co_drop, floor=cfg.co_floor,
                    gap=cfg.co_gap,
                )  # fmt: skip
                if co_reason is None:
                    best_probe = pgd_acc if best_probe is None else max(best_probe, pgd_acc)
        row["time_s"] = time.perf_counter() - t_epoch
        history.append(row)
        if progress is not None:
            progress("epoch", epoch + 1, epochs)
        if co_reason is not None:
            rollback(
                {"epoch": epoch + 1, "batch": None, "pgd_acc": row["co_probe_pgd_acc"],
                 "fgsm_acc": row["co_probe_fgsm_acc"], "best_pgd_acc": best_probe,
                 "reason": co_reason}
            )  # fmt: skip
            break
        if val_robust > best_acc:
            best_acc, best_epoch, since_best = val_robust, epoch + 1, 0
            best_state = copy.deepcopy(module.state_dict())
            save_best()
        elif epoch + 1 > ramp:
            since_best += 1
        manifest["best_epoch"] = best_epoch
        manifest["best_val_robust_acc"] = best_acc if best_epoch is not None else None
        write_manifest()
        save_state(epoch + 1)
        if patience is not None and since_best >= patience:
            stop_reason = f"early stopping: no robust-accuracy gain for {patience} epoch(s)"
            break
        if out_of_time:
            stop_reason = f"time budget of {max_time_s:g} s spent (epoch {epoch + 1} partial)"
            break

    if best_state is not None:
        module.load_state_dict(best_state)
    else:  # collapsed before any epoch finished: the initial weights are the best we have
        module.load_state_dict(initial_state)
        save_best()
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    manifest["status"] = "stopped" if stop_reason is not None else "completed"
    manifest["stop_reason"] = stop_reason or "completed all epochs"
    manifest["best_epoch"] = best_epoch
    manifest["best_val_robust_acc"] = best_acc if best_epoch is not None else None
    manifest["total_time_s"] = time_before + time.perf_counter() - t_start
    if ckpt_path is not None:
        from advguard.models.io import file_sha256

        manifest["checkpoint"] = {"path": CHECKPOINT_NAME, "sha256": file_sha256(ckpt_path)}
    write_manifest()
    _clear_state(out_path)
    return TrainResult(
        module=module,
        manifest=manifest,
        checkpoint_path=ckpt_path,
        manifest_path=man_path,
        preprocess=preprocess,
        history=history,
    )


def load_trainable(
    spec: str | os.PathLike[str],
    *,
    input_shape: Sequence[int] | None = None,
    num_classes: int | None = None,
    factory: str | None = None,
) -> tuple[nn.Module, str | None, dict[str, Any] | None]:
    """Build the module to train from ``"package.module:factory"`` or an advguard safetensors.

    A factory is called as ``factory(input_shape=..., num_classes=...)`` (the zoo's
    signature). A ``.safetensors`` written by :func:`advguard.models.io.save_torch` is
    rebuilt and its weights loaded (fine-tuning): with the factory it records only if that
    is an advguard zoo factory, otherwise with ``factory`` given explicitly by the caller
    (a model file never chooses code to run). Returns ``(module, factory, factory_kwargs)``
    so the trained weights can be saved reloadable.
    """
    from advguard.models.io import (
        check_factory_spec,
        load_torch,
        read_safetensors_metadata,
        resolve_factory,
        validated_metadata,
    )

    text = os.fspath(spec)
    p = Path(text)
    if p.suffix.lower() == ".safetensors":
        if not p.is_file():
            raise InputError(f"model file not found: {p}")
        meta = validated_metadata(read_safetensors_metadata(p), p)
        chosen = check_factory_spec(factory) if factory is not None else meta.get("factory")
        if not chosen:
            raise InputError(
                f"{p} has no factory metadata; fine-tuning needs a safetensors file written by "
                "advguard (save_torch(..., factory=...)), an explicit factory, or start from "
                "'module:factory'"
            )
        clf = load_torch(factory, p)
        kwargs = meta.get("factory_kwargs") if chosen == meta.get("factory") else None
        return clf.module, str(chosen), dict(kwargs) if kwargs is not None else None
    if p.exists():
        raise InputError(
            f"--model must be 'package.module:factory' (e.g. advguard.models.zoo:small_cnn) or "
            f"a .safetensors file written by advguard, got {text!r}"
        )
    text = check_factory_spec(text)
    if input_shape is None or num_classes is None:
        raise InputError(f"factory {text!r} needs input_shape and num_classes")
    fn = resolve_factory(text)
    kwargs = {"input_shape": [int(d) for d in input_shape], "num_classes": int(num_classes)}
    try:
        module = fn(**kwargs)
    except TypeError as exc:
        raise InputError(
            f"factory {text!r} must accept input_shape= and num_classes= ({exc})"
        ) from None
    if not isinstance(module, nn.Module):
        raise InputError(f"factory {text!r} returned {type(module).__name__}, not an nn.Module")
    return module, text, kwargs


def load_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a training manifest (``manifest.json``) written by :func:`adversarial_train`."""
    p = Path(path)
    if p.is_dir():
        p = p / MANIFEST_NAME
    if not p.is_file():
        raise InputError(f"training manifest not found: {p}")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"{p} is not valid JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("schema") != MANIFEST_SCHEMA:
        raise InputError(f"{p} is not an advguard training manifest ({MANIFEST_SCHEMA})")
    return data
