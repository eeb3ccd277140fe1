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
    check_choices,
    check_module,
    data_sha256,
    integer,
    lr_factor,
    model_meta,
    number,
    prepare_data,
    save_checkpoint,
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
    """
    t_start = time.perf_counter()
    opacus = _opacus()
    if not isinstance(module, nn.Module):
        raise InputError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    if target_epsilon is not None and noise_multiplier is not None:
        raise InputError(
            "give target_epsilon (the noise is then computed) or noise_multiplier (the "
            "epsilon is then reported), not both"
        )
    if noise_multiplier is None:
        target = number(
            "target_epsilon",
            DEFAULT_TARGET_EPSILON if target_epsilon is None else target_epsilon,
            low=0.0,
            strict=True,
        )
        sigma: float | None = None
    else:
        target = None
        sigma = number("noise_multiplier", noise_multiplier, low=0.0, strict=True)
    clip = number("max_grad_norm", max_grad_norm, low=0.0, strict=True)
    epochs = integer("epochs", epochs, 1)
    batch_size = integer("batch_size", batch_size, 1)
    val_samples = integer("val_samples", val_samples, 1)
    seed = integer("seed", seed, 0)
    lr = number("lr", lr, low=0.0, strict=True)
    momentum = number("momentum", momentum, low=0.0)
    check_choices(optimizer, lr_schedule)
    if accountant not in ACCOUNTANTS:
        raise InputError(f"accountant must be one of {', '.join(ACCOUNTANTS)}, got {accountant!r}")
    val_fraction = number("val_fraction", val_fraction, low=0.0)
    if not 0.0 < val_fraction < 1.0:
        raise InputError(f"val_fraction must be in (0, 1), got {val_fraction}")
    lo, hi = (number("bounds[0]", bounds[0]), number("bounds[1]", bounds[1]))
    if not lo < hi:
        raise InputError(f"bounds must satisfy low < high, got {bounds}")

    xt, yt = prepare_data(x, y, (lo, hi))
    net = Net(module, preprocess.eval() if preprocess is not None else None).cpu()
    errors = opacus.validators.ModuleValidator.validate(net, strict=False)
    if errors:
        raise InputError(
            "the model cannot be trained with DP-SGD: "
            + "; ".join(str(e) for e in errors[:5])
            + " (opacus.validators.ModuleValidator.fix(model) replaces BatchNorm by GroupNorm)"
        )
    n_classes = check_module(net, xt, yt, num_classes)

    torch.manual_seed(seed)
    tr_idx, val_idx = holdout_split(len(xt), val_fraction, seed)
    if len(tr_idx) < 2:
        raise InputError(f"val_fraction {val_fraction} leaves no training data")
    x_tr, y_tr = xt[tr_idx], yt[tr_idx]
    x_val, y_val = xt[val_idx][:val_samples], yt[val_idx][:val_samples]
    n_train, n_val = len(tr_idx), len(val_idx)
    if batch_size >= n_train:
        raise InputError(
            f"batch_size ({batch_size}) must be smaller than the training set ({n_train}): "
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

    for p in module.parameters():
        p.requires_grad_(True)
    params = [p for p in net.parameters() if p.requires_grad]
    if not params:
        raise InputError("module has no trainable parameters")
    opt: torch.optim.Optimizer
    if optimizer == "adam":
        opt = torch.optim.Adam(params, lr=lr)
    else:
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x_tr, y_tr),
        batch_size=batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed + 1),
    )
    net.train()
    noise_gen = torch.Generator().manual_seed(seed + 2)
    with _quiet():
        engine = opacus.PrivacyEngine(accountant=accountant)
        if sigma is None:
            assert target is not None
            dp_net, dp_opt, dp_loader = engine.make_private_with_epsilon(
                module=net, optimizer=opt, data_loader=loader, target_epsilon=target,
                target_delta=delta_v, epochs=epochs, max_grad_norm=clip,
                poisson_sampling=True, noise_generator=noise_gen,
            )  # fmt: skip
            sigma = float(dp_opt.noise_multiplier)
        else:
            dp_net, dp_opt, dp_loader = engine.make_private(
                module=net, optimizer=opt, data_loader=loader, noise_multiplier=sigma,
                max_grad_norm=clip, poisson_sampling=True, noise_generator=noise_gen,
            )  # fmt: skip
    sample_rate = 1.0 / len(dp_loader)

    out_path = Path(out_dir) if out_dir is not None else None
    ckpt_path = out_path / CHECKPOINT_NAME if out_path is not None else None
    man_path = out_path / MANIFEST_NAME if out_path is not None else None
    input_shape = [int(d) for d in xt.shape[1:]]
    config = {
        "method": "dp-sgd",
        "target_epsilon": target,
        "delta": delta_v,
        "noise_multiplier": sigma,
        "max_grad_norm": clip,
        "epochs": epochs,
        "expected_batch_size": batch_size,
        "lr": lr,
        "optimizer": optimizer,
        "momentum": momentum,
        "lr_schedule": lr_schedule,
        "accountant": accountant,
        "val_fraction": val_fraction,
        "val_samples": val_samples,
        "seed": seed,
        "bounds": [lo, hi],
    }
    manifest: dict[str, Any] = {
        "schema": DP_MANIFEST_SCHEMA,
        "status": "running",
        "method": "dp-sgd",
        "config": config,
        "seed": seed,
        "privacy": {
            "epsilon": 0.0,
            "delta": delta_v,
            "noise_multiplier": sigma,
            "max_grad_norm": clip,
            "sample_rate": sample_rate,
            "steps": 0,
            "accountant": accountant,
            "guarantee": "example-level (epsilon, delta)-DP of the final weights",
        },
        "data": {
            **data_sha256(xt, yt),
            "n": len(xt),
            "n_train": n_train,
            "n_val": n_val,
            "n_val_evaluated": len(x_val),
            "split": f"advguard.defenses.training.holdout_split({len(xt)}, {val_fraction}, {seed})",
            "input_shape": input_shape,
            "num_classes": n_classes,
        },
        "model": model_meta(factory, factory_kwargs, input_shape, n_classes, (lo, hi), preprocess),
        "epochs": [],
        "stop_reason": None,
        "total_time_s": None,
        "versions": {**versions(), "opacus": str(opacus.__version__)},
        "checkpoint": None,
    }

    def save() -> None:
        if ckpt_path is not None and man_path is not None:
            save_checkpoint(module, ckpt_path, manifest["model"])
            atomic_write_text(man_path, json.dumps(manifest, indent=2) + "\n")

    n_batches = len(dp_loader)
    total = epochs * n_batches
    step = 0
    with _quiet():
        try:
            for epoch in range(epochs):
                t_epoch = time.perf_counter()
                dp_net.train()
                loss_sum, correct, seen = 0.0, 0, 0
                for xb, yb in dp_loader:
                    for group in dp_opt.param_groups:
                        group["lr"] = lr * lr_factor(lr_schedule, step / total)
                    dp_opt.zero_grad(set_to_none=True)
                    logits = dp_net(xb)
                    if len(xb) > 0:
                        loss = F.cross_entropy(logits, yb)
                        loss_sum += float(loss.detach()) * len(xb)
                        correct += int((logits.detach().argmax(1) == yb).sum())
                        seen += len(xb)
                    else:  # Poisson sampling drew no example: a noise-only step (Opacus)
                        loss = logits.sum() * 0.0
                    loss.backward()
                    dp_opt.step()
                    step += 1
                    if progress is not None:
                        progress("train", step, total)
                dp_net.eval()
                spent = float(engine.get_epsilon(delta_v))
                manifest["privacy"]["epsilon"], manifest["privacy"]["steps"] = spent, step
                manifest["epochs"].append(
                    {
                        "epoch": epoch + 1,
                        "samples": seen,
                        "lr": dp_opt.param_groups[0]["lr"],
                        "loss": loss_sum / max(1, seen),
                        "train_acc": correct / max(1, seen),
                        "val_clean_acc": accuracy(net, x_val, y_val, 512),
                        "epsilon_spent": spent,
                        "time_s": time.perf_counter() - t_epoch,
                    }
                )
                save()
                if progress is not None:
                    progress("epoch", epoch + 1, epochs)
        finally:
            if hasattr(dp_net, "remove_hooks"):
                dp_net.remove_hooks()
            for p in module.parameters():
                for attr in ("grad_sample", "_forward_counter", "summed_grad"):
                    if hasattr(p, attr):
                        delattr(p, attr)
                p.grad = None

    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    manifest["status"] = "completed"
    manifest["stop_reason"] = "completed all epochs"
    manifest["total_time_s"] = time.perf_counter() - t_start
    if target is not None and manifest["privacy"]["epsilon"] > target * 1.01 + 1e-9:
        raise AssertionError(  # the accountant's own calibration failed: never ship that
            f"spent epsilon {manifest['privacy']['epsilon']:.4f} exceeds the target {target}"
        )
    save()
    if ckpt_path is not None and man_path is not None:
        from advguard.models.io import file_sha256

        manifest["checkpoint"] = {"path": CHECKPOINT_NAME, "sha256": file_sha256(ckpt_path)}
        atomic_write_text(man_path, json.dumps(manifest, indent=2) + "\n")
    return TrainResult(
        module=module,
        manifest=manifest,
        checkpoint_path=ckpt_path,
        manifest_path=man_path,
        preprocess=preprocess,
        history=manifest["epochs"],
    )


__all__ = ["ACCOUNTANTS", "DP_MANIFEST_SCHEMA", "dp_train", "holdout_split"]
