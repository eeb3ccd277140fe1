"""Helpers shared by the trainers of this package (adversarial training and DP-SGD).

Only the modules of ``advguard.defenses.training`` import this module; every name in it is
public to them.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import platform
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from advguard import _validate as check
from advguard.atomic import atomic_path
from advguard.attacks.norms import Norm, project
from advguard.errors import InputError
from advguard.models.devices import resolve_device as parse_device

Progress = Callable[[str, int, int], None]
CHECKPOINT_NAME = "model.safetensors"
MANIFEST_NAME = "manifest.json"


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
            bounds=tuple(m["bounds"]),
            preprocess=self.preprocess,
        )


class Net(nn.Module):
    """``module(preprocess(x))`` without registering preprocess for training."""

    def __init__(self, module: nn.Module, preprocess: nn.Module | None) -> None:
        super().__init__()
        self.module = module
        self.pre = preprocess

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(self.pre(x) if self.pre is not None else x)


def clip_to_ball(
    x_adv: torch.Tensor, x: torch.Tensor, norm: Norm, eps: float, lo: float, hi: float
):
    return (x + project(x_adv - x, norm, eps)).clamp(lo, hi)


class NetOracle:
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


def accuracy(
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


def data_sha256(x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor) -> dict[str, str]:
    """SHA-256 of the training inputs' and labels' bytes (float32 x, int64 y)."""
    xa = np.ascontiguousarray(np.asarray(torch.as_tensor(x).detach().cpu(), dtype=np.float32))
    ya = np.ascontiguousarray(np.asarray(torch.as_tensor(y).detach().cpu(), dtype=np.int64))
    hx, hy = hashlib.sha256(xa.tobytes()).hexdigest(), hashlib.sha256(ya.tobytes()).hexdigest()
    both = hashlib.sha256(xa.tobytes() + ya.tobytes()).hexdigest()
    return {"sha256": both, "x_sha256": hx, "y_sha256": hy}


def atomic_save_torch(module: nn.Module, path: Path, **meta: Any) -> Path:
    from advguard.models.io import save_torch

    with atomic_path(path) as tmp:
        save_torch(module, tmp, **meta)
    return path


def versions() -> dict[str, str]:
    from advguard import __version__

    return {
        "advguard": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def lr_factor(schedule: str, progress: float) -> float:
    if schedule == "none":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "step":  # /10 at 50% and 75% of training (Madry et al. style)
        return 1.0 if progress < 0.5 else 0.1 if progress < 0.75 else 0.01
    # "cyclic": triangular one-cycle as in Wong et al. 2020, peak at 40% of training
    return progress / 0.4 if progress < 0.4 else max(0.0, (1.0 - progress) / 0.6)


def number(name: str, value: Any, *, low: float | None = None, strict: bool = False) -> float:
    return check.number(name, value, low=low, low_open=strict)


def integer(name: str, value: Any, low: int) -> int:
    limit = "steps" if name in ("steps", "eval_steps", "epochs") else None
    limit = "samples" if name in ("val_samples", "co_batch", "batch_size") else limit
    return check.integer(name, value, low=low, limit=limit)


def check_choices(optimizer: str, lr_schedule: str) -> None:
    if optimizer not in ("adam", "sgd"):
        raise InputError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    if lr_schedule not in ("none", "cosine", "step", "cyclic"):
        raise InputError(
            f"lr_schedule must be one of none, cosine, step, cyclic; got {lr_schedule!r}"
        )


def check_module(
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


def model_meta(
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


def save_checkpoint(module: nn.Module, path: Path, section: Mapping[str, Any]) -> None:
    """Atomically save ``module`` with the metadata ``load_model`` needs to rebuild it."""
    meta: dict[str, Any] = {
        "input_shape": section["input_shape"],
        "num_classes": section["num_classes"],
        "bounds": tuple(section["bounds"]),
    }
    if section["factory"] is not None:
        meta["factory"] = section["factory"]
        meta["factory_kwargs"] = section["factory_kwargs"]
    atomic_save_torch(module, path, **meta)


def prepare_data(
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


# -- the caller's module: device, trainable parameters, restored flags ----------------
def module_device(module: nn.Module) -> torch.device:
    """The device of the module's first parameter (or buffer); CPU for an empty module."""
    for param in module.parameters():
        return param.device
    for buf in module.buffers():
        return buf.device
    return torch.device("cpu")


def resolve_device(device: str | torch.device | None, module: nn.Module) -> torch.device:
    """``device`` checked by :func:`advguard.models.devices.resolve_device` (an unavailable
    accelerator is a one-line error; ``"auto"`` picks CUDA when present), or the module's."""
    if device is None:
        return module_device(module)
    return parse_device(device)


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The parameters to train: those with ``requires_grad`` (frozen ones stay frozen)."""
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise InputError(
            "module has no trainable parameters (all have requires_grad=False; unfreeze the "
            "ones to train)"
        )
    return params


def make_optimizer(
    name: str, params: list[nn.Parameter], *, lr: float, momentum: float, weight_decay: float
) -> torch.optim.Optimizer:
    """Adam or SGD (with momentum) over ``params``."""
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


@contextlib.contextmanager
def borrowed(device: torch.device, *modules: nn.Module | None) -> Iterator[None]:
    """Lend the caller's modules to a trainer: on exit (also on error) every submodule's
    train/eval flag and each module's device are what they were (weights are the trained
    ones; ``requires_grad`` is never changed)."""
    mods = [m for m in modules if m is not None]
    flags = [[(sub, sub.training) for sub in m.modules()] for m in mods]
    devices = [module_device(m) for m in mods]
    try:
        for m in mods:
            m.to(device)
        yield
    finally:
        for m, dev, fl in zip(mods, devices, flags, strict=True):
            m.to(dev)
            for sub, was_training in fl:
                sub.training = was_training
