"""Differentially private training: DP-SGD (Abadi et al. 2016) through Opacus.

Each example's gradient is clipped to ``max_grad_norm`` and Gaussian noise of scale
``noise_multiplier * max_grad_norm`` is added to every summed batch gradient; batches are
drawn by Poisson sampling, so the privacy accountant's guarantee applies. The result is an
``(epsilon, delta)``-DP model with respect to the training examples: what a membership-
inference attacker can learn about any one of them is bounded.

Needs the ``privacy`` extra (``pip install 'advguard[privacy]'``). The guarantee covers the
*final* weights: no checkpoint is chosen by looking at held-out data (that data would be
private too, and selection is not accounted for). Noise comes from torch's seeded
pseudo-random generator (Opacus' default, reproducible); it is not a cryptographically
secure source.

>>> from advguard.defenses.training import dp_train
>>> res = dp_train(module, x, y, target_epsilon=8.0, epochs=10, out_dir="runs/dp")
...                                                   # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from advguard.atomic import atomic_write_text
from advguard.defenses.training._common import (
    CHECKPOINT_NAME,
    MANIFEST_NAME,
    Net,
    Progress,
    TrainResult,
    accuracy,
    borrowed,
    check_choices,
    check_module,
    data_sha256,
    integer,
    lr_factor,
    make_optimizer,
    model_meta,
    number,
    prepare_data,
    resolve_device,
    save_checkpoint,
    trainable_parameters,
    versions,
)
from advguard.errors import InputError, MissingDependencyError

DP_MANIFEST_SCHEMA = "advguard-dp-training/1"
ACCOUNTANTS = ("rdp", "prv")
DEFAULT_TARGET_EPSILON = 8.0


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence expected warnings: Opacus' "secure RNG off" (the module docstring says so),
    RDP's "optimal order is the largest alpha" (the reported epsilon is then a valid but
    looser upper bound) and torch's "backward hook fires without input gradients"."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        yield


def _opacus() -> Any:
    try:
        import opacus
    except ImportError:
        raise MissingDependencyError("opacus", "privacy", "DP-SGD training") from None
    return opacus


def holdout_split(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, held-out indices) that :func:`dp_train` uses for ``n`` examples.

    Tells which examples are members of the training set: what a privacy audit (e.g. a
    membership-inference test) needs.
    """
    perm = torch.randperm(int(n), generator=torch.Generator().manual_seed(int(seed))).numpy()
    n_val = max(1, round(float(val_fraction) * int(n)))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def dp_train(
    module: nn.Module,
    x: np.ndarray | torch.Tensor,
    y: np.ndarray | torch.Tensor,
    *,
    target_epsilon: float | None = None,
    delta: float | None = None,
    noise_multiplier: float | None = None,
    max_grad_norm: float = 1.0,
    epochs: int = 10,
    batch_size: int = 256,
    lr: float = 0.5,
    optimizer: str = "sgd",
    momentum: float = 0.0,
    lr_schedule: str = "none",
    accountant: str = "rdp",
    val_fraction: float = 0.1,
    val_samples: int = 2000,
    bounds: tuple[float, float] = (0.0, 1.0),
    preprocess: nn.Module | None = None,
    num_classes: int | None = None,
    factory: str | None = None,
    factory_kwargs: dict[str, Any] | None = None,
    seed: int = 0,
    out_dir: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
) -> TrainResult:
    """Train ``module`` with DP-SGD on raw inputs ``x`` in ``bounds`` and labels ``y``.

    Give the privacy budget as ``target_epsilon`` (default 8; the noise multiplier is then
    computed by the accountant for ``epochs`` epochs) *or* fix ``noise_multiplier`` and read
    the spent epsilon from the manifest. ``delta`` defaults to ``min(1e-5, 0.1 / n_train)``
    and must stay below ``1 / n_train`` (a larger delta allows leaking whole examples).
    ``batch_size`` is the *expected* batch size of Poisson sampling. The module must be
    Opacus-compatible (no BatchNorm: use GroupNorm; ``opacus.validators.ModuleValidator.fix``
    rewrites a model).

    A ``val_fraction`` of the data is held out and only measured (clean accuracy per
    epoch); the returned weights are the final ones. With ``out_dir`` the weights are saved
    atomically after every epoch (``model.safetensors``) with a manifest recording the
    privacy parameters and the epsilon spent so far, so a crash loses at most one epoch of
    work (a DP run is not resumable: restart it, and count the spent budget of the lost run
    if its model was ever released).

    The module trains on its own device and keeps its device, its train/eval flags and its
    frozen (``requires_grad=False``) parameters.
    """
    t_start = time.perf_counter()
    opacus = _opacus()
    if not isinstance(module, nn.Module):
        raise InputError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    cfg = _DPConfig.validated(
        target_epsilon=target_epsilon, noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm, epochs=epochs, batch_size=batch_size,
        val_samples=val_samples, seed=seed, lr=lr, momentum=momentum, optimizer=optimizer,
        lr_schedule=lr_schedule, accountant=accountant, val_fraction=val_fraction,
        bounds=bounds,
    )  # fmt: skip
    xt, yt = prepare_data(x, y, cfg.bounds)
    dev = resolve_device(None, module)
    with borrowed(dev, module, preprocess):
        net = Net(module, preprocess.eval() if preprocess is not None else None)
        _check_opacus_compatible(opacus, net)
        n_classes = check_module(net, xt.to(dev), yt, num_classes)
        torch.manual_seed(cfg.seed)
        split = _split(xt, yt, cfg, delta)
        run = _make_private(opacus, net, module, split, cfg, dev)
        manifest = _new_dp_manifest(
            cfg, run, split, xt, yt, n_classes, str(opacus.__version__),
            model_meta(factory, factory_kwargs, [int(d) for d in xt.shape[1:]], n_classes,
                       cfg.bounds, preprocess),
        )  # fmt: skip
        out_path = Path(out_dir) if out_dir is not None else None
        paths = (out_path / CHECKPOINT_NAME, out_path / MANIFEST_NAME) if out_path else None
        _train_epochs(run, net, module, split, cfg, manifest, paths, progress, dev)
    return _finish(module, preprocess, manifest, cfg, paths, t_start)


def _check_opacus_compatible(opacus: Any, net: nn.Module) -> None:
    """Refuse layers Opacus cannot compute per-example gradients for (e.g. BatchNorm)."""
    errors = opacus.validators.ModuleValidator.validate(net, strict=False)
    if errors:
        raise InputError(
            "the model cannot be trained with DP-SGD: "
            + "; ".join(str(e) for e in errors[:5])
            + " (opacus.validators.ModuleValidator.fix(model) replaces BatchNorm by GroupNorm)"
        )


@dataclass(frozen=True)
class _DPConfig:
    """The validated settings of a DP-SGD run."""

    target: float | None
    sigma: float | None
    clip: float
    epochs: int
    batch_size: int
    val_samples: int
    seed: int
    lr: float
    momentum: float
    optimizer: str
    lr_schedule: str
    accountant: str
    val_fraction: float
    bounds: tuple[float, float]

    @classmethod
    def validated(
        cls, *, target_epsilon: float | None, noise_multiplier: float | None, **kw: Any
    ) -> _DPConfig:
        if target_epsilon is not None and noise_multiplier is not None:
            raise InputError(
                "give target_epsilon (the noise is then computed) or noise_multiplier (the "
                "epsilon is then reported), not both"
            )
        target = sigma = None
        if noise_multiplier is None:
            eps = DEFAULT_TARGET_EPSILON if target_epsilon is None else target_epsilon
            target = number("target_epsilon", eps, low=0.0, strict=True)
        else:
            sigma = number("noise_multiplier", noise_multiplier, low=0.0, strict=True)
        clip = number("max_grad_norm", kw["max_grad_norm"], low=0.0, strict=True)
        ints = {k: integer(k, kw[k], 1) for k in ("epochs", "batch_size", "val_samples")}
        seed = integer("seed", kw["seed"], 0)
        lr = number("lr", kw["lr"], low=0.0, strict=True)
        momentum = number("momentum", kw["momentum"], low=0.0)
        check_choices(kw["optimizer"], kw["lr_schedule"])
        if kw["accountant"] not in ACCOUNTANTS:
            raise InputError(
                f"accountant must be one of {', '.join(ACCOUNTANTS)}, got {kw['accountant']!r}"
            )
        val_fraction = number("val_fraction", kw["val_fraction"], low=0.0)
        if not 0.0 < val_fraction < 1.0:
            raise InputError(f"val_fraction must be in (0, 1), got {val_fraction}")
        bounds = kw["bounds"]
        lo, hi = (number("bounds[0]", bounds[0]), number("bounds[1]", bounds[1]))
        if not lo < hi:
            raise InputError(f"bounds must satisfy low < high, got {bounds}")
        return cls(
            target=target, sigma=sigma, clip=clip, **ints, seed=seed, lr=lr, momentum=momentum,
            optimizer=kw["optimizer"], lr_schedule=kw["lr_schedule"],
            accountant=kw["accountant"], val_fraction=val_fraction, bounds=(lo, hi),
        )  # fmt: skip


@dataclass
class _Split:
    x_tr: torch.Tensor
    y_tr: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    n_val: int
    delta: float


def _split(xt: torch.Tensor, yt: torch.Tensor, cfg: _DPConfig, delta: float | None) -> _Split:
    """The seeded train/held-out split and the checked (or default) delta."""
    tr_idx, val_idx = holdout_split(len(xt), cfg.val_fraction, cfg.seed)
    if len(tr_idx) < 2:
        raise InputError(f"val_fraction {cfg.val_fraction} leaves no training data")
    n_train = len(tr_idx)
    if cfg.batch_size >= n_train:
        raise InputError(
            f"batch_size ({cfg.batch_size}) must be smaller than the training set ({n_train}): "
            "DP-SGD's guarantee comes from sampling a small share of the data per step"
        )
    if delta is None:
        delta_v = min(1e-5, 0.1 / n_train)
    else:
        delta_v = number("delta", delta, low=0.0, strict=True)
        if delta_v >= 1.0 / n_train:
            raise InputError(
                f"delta ({delta_v:g}) must be below 1/n_train ({1.0 / n_train:.3g}): with a "
                "larger delta the guarantee allows publishing whole training examples"
            )
    return _Split(
        xt[tr_idx], yt[tr_idx], xt[val_idx][: cfg.val_samples], yt[val_idx][: cfg.val_samples],
        len(val_idx), delta_v,
    )  # fmt: skip


@dataclass
class _PrivateRun:
    engine: Any
    net: Any
    opt: Any
    loader: Any
    sigma: float


def _make_private(
    opacus: Any, net: nn.Module, module: nn.Module, split: _Split, cfg: _DPConfig, dev: torch.device
) -> _PrivateRun:
    """Opacus' privacy engine around the model, optimizer and a Poisson-sampled loader."""
    opt = make_optimizer(
        cfg.optimizer, trainable_parameters(module), lr=cfg.lr, momentum=cfg.momentum,
        weight_decay=0.0,
    )  # fmt: skip
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(split.x_tr, split.y_tr),
        batch_size=cfg.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(cfg.seed + 1),
    )
    net.train()
    noise_gen = torch.Generator(dev).manual_seed(cfg.seed + 2)  # the noise is drawn on dev
    with _quiet():
        engine = opacus.PrivacyEngine(accountant=cfg.accountant)
        if cfg.sigma is None:
            assert cfg.target is not None
            dp_net, dp_opt, dp_loader = engine.make_private_with_epsilon(
                module=net, optimizer=opt, data_loader=loader, target_epsilon=cfg.target,
                target_delta=split.delta, epochs=cfg.epochs, max_grad_norm=cfg.clip,
                poisson_sampling=True, noise_generator=noise_gen,
            )  # fmt: skip
            sigma = float(dp_opt.noise_multiplier)
        else:
            sigma = cfg.sigma
            dp_net, dp_opt, dp_loader = engine.make_private(
                module=net, optimizer=opt, data_loader=loader, noise_multiplier=sigma,
                max_grad_norm=cfg.clip, poisson_sampling=True, noise_generator=noise_gen,
            )  # fmt: skip
    return _PrivateRun(engine, dp_net, dp_opt, dp_loader, sigma)


def _new_dp_manifest(
    cfg: _DPConfig,
    run: _PrivateRun,
    split: _Split,
    xt: torch.Tensor,
    yt: torch.Tensor,
    n_classes: int,
    opacus_version: str,
    model_section: dict[str, Any],
) -> dict[str, Any]:
    """The manifest at the start of a DP-SGD run (``status: running``)."""
    config = {
        "method": "dp-sgd", "target_epsilon": cfg.target, "delta": split.delta,
        "noise_multiplier": run.sigma, "max_grad_norm": cfg.clip, "epochs": cfg.epochs,
        "expected_batch_size": cfg.batch_size, "lr": cfg.lr, "optimizer": cfg.optimizer,
        "momentum": cfg.momentum, "lr_schedule": cfg.lr_schedule,
        "accountant": cfg.accountant, "val_fraction": cfg.val_fraction,
        "val_samples": cfg.val_samples, "seed": cfg.seed, "bounds": list(cfg.bounds),
    }  # fmt: skip
    n, vf, seed = len(xt), cfg.val_fraction, cfg.seed
    return {
        "schema": DP_MANIFEST_SCHEMA,
        "status": "running",
        "method": "dp-sgd",
        "config": config,
        "seed": seed,
        "privacy": {
            "epsilon": 0.0,
            "delta": split.delta,
            "noise_multiplier": run.sigma,
            "max_grad_norm": cfg.clip,
            "sample_rate": 1.0 / len(run.loader),
            "steps": 0,
            "accountant": cfg.accountant,
            "guarantee": "example-level (epsilon, delta)-DP of the final weights",
        },
        "data": {
            **data_sha256(xt, yt),
            "n": n,
            "n_train": len(split.x_tr),
            "n_val": split.n_val,
            "n_val_evaluated": len(split.x_val),
            "split": f"advguard.defenses.training.holdout_split({n}, {vf}, {seed})",
            "input_shape": [int(d) for d in xt.shape[1:]],
            "num_classes": n_classes,
        },
        "model": model_section,
        "epochs": [],
        "stop_reason": None,
        "total_time_s": None,
        "versions": {**versions(), "opacus": opacus_version},
        "checkpoint": None,
    }


def _finish(
    module: nn.Module,
    preprocess: nn.Module | None,
    manifest: dict[str, Any],
    cfg: _DPConfig,
    paths: tuple[Path, Path] | None,
    t_start: float,
) -> TrainResult:
    """Complete the manifest (checking the spent budget), save the final weights."""
    manifest["status"] = "completed"
    manifest["stop_reason"] = "completed all epochs"
    manifest["total_time_s"] = time.perf_counter() - t_start
    if cfg.target is not None and manifest["privacy"]["epsilon"] > cfg.target * 1.01 + 1e-9:
        raise AssertionError(  # the accountant's own calibration failed: never ship that
            f"spent epsilon {manifest['privacy']['epsilon']:.4f} exceeds the target {cfg.target}"
        )
    _save(module, manifest, paths)
    if paths is not None:
        from advguard.models.io import file_sha256

        manifest["checkpoint"] = {"path": CHECKPOINT_NAME, "sha256": file_sha256(paths[0])}
        atomic_write_text(paths[1], json.dumps(manifest, indent=2) + "\n")
    return TrainResult(
        module=module,
        manifest=manifest,
        checkpoint_path=paths[0] if paths is not None else None,
        manifest_path=paths[1] if paths is not None else None,
        preprocess=preprocess,
        history=manifest["epochs"],
    )


def _save(module: nn.Module, manifest: dict[str, Any], paths: tuple[Path, Path] | None) -> None:
    if paths is not None:
        save_checkpoint(module, paths[0], manifest["model"])
        atomic_write_text(paths[1], json.dumps(manifest, indent=2) + "\n")


def _train_epochs(
    run: _PrivateRun,
    net: nn.Module,
    module: nn.Module,
    split: _Split,
    cfg: _DPConfig,
    manifest: dict[str, Any],
    paths: tuple[Path, Path] | None,
    progress: Progress | None,
    dev: torch.device,
) -> None:
    """All epochs of DP-SGD; afterwards Opacus' hooks and per-sample state are gone."""
    total = cfg.epochs * len(run.loader)
    step = 0
    with _quiet():
        try:
            for epoch in range(cfg.epochs):
                t_epoch = time.perf_counter()
                step, stats = _dp_epoch(run, cfg, step, total, progress, dev)
                run.net.eval()
                spent = float(run.engine.get_epsilon(split.delta))
                manifest["privacy"]["epsilon"], manifest["privacy"]["steps"] = spent, step
                seen = stats["seen"]
                manifest["epochs"].append(
                    {
                        "epoch": epoch + 1,
                        "samples": seen,
                        "lr": run.opt.param_groups[0]["lr"],
                        "loss": stats["loss_sum"] / max(1, seen),
                        "train_acc": stats["correct"] / max(1, seen),
                        "val_clean_acc": accuracy(
                            net, split.x_val.to(dev), split.y_val.to(dev), 512
                        ),
                        "epsilon_spent": spent,
                        "time_s": time.perf_counter() - t_epoch,
                    }
                )
                _save(module, manifest, paths)
                if progress is not None:
                    progress("epoch", epoch + 1, cfg.epochs)
        finally:
            if hasattr(run.net, "remove_hooks"):
                run.net.remove_hooks()
            for p in module.parameters():
                for attr in ("grad_sample", "_forward_counter", "summed_grad"):
                    if hasattr(p, attr):
                        delattr(p, attr)
                p.grad = None


def _dp_epoch(
    run: _PrivateRun,
    cfg: _DPConfig,
    step: int,
    total: int,
    progress: Progress | None,
    dev: torch.device,
) -> tuple[int, dict[str, Any]]:
    """One pass over the Poisson-sampled loader; (steps so far, loss/accuracy sums)."""
    run.net.train()
    stats: dict[str, Any] = {"loss_sum": 0.0, "correct": 0, "seen": 0}
    for xb, yb in run.loader:
        xb, yb = xb.to(dev), yb.to(dev)
        for group in run.opt.param_groups:
            group["lr"] = cfg.lr * lr_factor(cfg.lr_schedule, step / total)
        run.opt.zero_grad(set_to_none=True)
        logits = run.net(xb)
        if len(xb) > 0:
            loss = F.cross_entropy(logits, yb)
            stats["loss_sum"] += float(loss.detach()) * len(xb)
            stats["correct"] += int((logits.detach().argmax(1) == yb).sum())
            stats["seen"] += len(xb)
        else:  # Poisson sampling drew no example: a noise-only step (Opacus)
            loss = logits.sum() * 0.0
        loss.backward()
        run.opt.step()
        step += 1
        if progress is not None:
            progress("train", step, total)
    return step, stats


__all__ = ["ACCOUNTANTS", "DP_MANIFEST_SCHEMA", "dp_train", "holdout_split"]
