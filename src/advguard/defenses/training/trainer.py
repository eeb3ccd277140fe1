"""Adversarial training: PGD-AT (Madry et al. 2018), TRADES (Zhang et al. 2019) and fast
adversarial training (Wong et al. 2020) with catastrophic-overfitting detection.

All inputs are raw-space tensors inside ``bounds``; an optional ``preprocess`` module (e.g.
:class:`advguard.models.Normalize`) is applied inside, so perturbations live where the
attacker acts. The library never prints: progress goes through
``progress(stage, done, total)``.

Layout: :class:`TrainConfig` (validated once by :meth:`TrainConfig.validated`) drives
:func:`train`, which runs a :class:`Trainer` (epochs, the overfitting probe, rollback) with a
method from :mod:`advguard.defenses.training.strategies`; the resume state lives in
:mod:`advguard.defenses.training.resume`. :func:`adversarial_train` is the keyword API.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from advguard.atomic import atomic_write_text
from advguard.attacks.norms import parse_norm
from advguard.defenses.training import resume as state
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
from advguard.defenses.training.strategies import (
    METHODS,
    STRATEGIES,
    fgsm_perturb,
    pgd_perturb,
    trades_perturb,
)
from advguard.errors import InputError

Method = Literal["pgd-at", "trades", "fast-at"]
MANIFEST_SCHEMA = "advguard-adv-training/1"


# -- configuration -----------------------------------------------------------------------
@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run (recorded in the manifest).

    Fields left ``None`` are derived by :meth:`validated`: ``step_size`` (``2.5 * epsilon /
    steps``), ``eval_step_size`` (``2.5 * epsilon / eval_steps``), ``ramp_epochs``
    (``epochs // 3`` when ``epsilon`` is at least 20% of the input range, else 0),
    ``detect_co`` (on for fast-AT) and ``device`` (the module's own device, set by
    :func:`train`).

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

    ``device`` is where the module trains (default: its own device; an unavailable one is
    a one-line error).
    """

    method: str = "pgd-at"
    epsilon: float = 0.3
    norm: str = "linf"
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_schedule: str = "none"
    steps: int = 10
    step_size: float | None = None
    beta: float = 6.0
    mix: float = 0.0
    fast_alpha: float = 1.25
    random_init: bool = True
    ramp_epochs: int | None = None
    val_fraction: float = 0.1
    val_samples: int = 512
    eval_steps: int = 20
    eval_step_size: float | None = None
    patience: int | None = None
    detect_co: bool | None = None
    co_check_every: int | None = None
    co_batch: int = 256
    co_drop: float = 0.2
    co_floor: float = 0.05
    co_gap: float = 0.5
    seed: int = 0
    bounds: tuple[float, float] = (0.0, 1.0)
    max_time_s: float | None = None
    device: str | None = None

    def validated(self) -> TrainConfig:
        """This configuration checked (one-line :class:`InputError` on a bad value) with the
        derived fields filled in; validating a validated configuration changes nothing."""
        if self.method not in METHODS:
            raise InputError(f"unknown method {self.method!r}; use one of {', '.join(METHODS)}")
        norm = parse_norm(self.norm, allowed=("linf", "l2"))
        lo, hi = (number("bounds[0]", self.bounds[0]), number("bounds[1]", self.bounds[1]))
        if not lo < hi:
            raise InputError(f"bounds must satisfy low < high, got {self.bounds}")
        eps = number("epsilon", self.epsilon, low=0.0)
        sizes = {
            k: integer(k, getattr(self, k), 1)
            for k in ("epochs", "batch_size", "steps", "eval_steps", "val_samples", "co_batch")
        }
        seed = integer("seed", self.seed, 0)
        reals = {
            "lr": number("lr", self.lr, low=0.0, strict=True),
            "weight_decay": number("weight_decay", self.weight_decay, low=0.0),
            "beta": number("beta", self.beta, low=0.0),
            "mix": number("mix", self.mix, low=0.0),
        }
        if reals["mix"] > 1.0:
            raise InputError(f"mix (weight of the clean loss) must be in [0, 1], got {self.mix}")
        fast_alpha = number("fast_alpha", self.fast_alpha, low=0.0, strict=True)
        val_fraction = number("val_fraction", self.val_fraction, low=0.0)
        if not 0.0 < val_fraction < 1.0:
            raise InputError(
                f"val_fraction must be in (0, 1): a held-out split is needed for robust "
                f"accuracy, early stopping and overfitting checks; got {val_fraction}"
            )
        check_choices(self.optimizer, self.lr_schedule)
        optional = self._validated_optional(eps, sizes, (lo, hi))
        updates: dict[str, Any] = {
            "method": str(self.method), "epsilon": eps, "norm": norm, **sizes, **reals,
            "seed": seed, "fast_alpha": fast_alpha, "val_fraction": val_fraction,
            "momentum": float(self.momentum), "random_init": bool(self.random_init),
            "bounds": (lo, hi), **optional,
            "co_drop": number("co_drop", self.co_drop, low=0.0),
            "co_floor": number("co_floor", self.co_floor, low=0.0),
            "co_gap": number("co_gap", self.co_gap, low=0.0),
        }  # fmt: skip
        return replace(self, **updates)

    def _validated_optional(
        self, eps: float, sizes: Mapping[str, int], bounds: tuple[float, float]
    ) -> dict[str, Any]:
        """The optional and derived fields, checked or filled in."""
        out: dict[str, Any] = {
            "patience": None if self.patience is None else integer("patience", self.patience, 1),
            "co_check_every": None
            if self.co_check_every is None
            else integer("co_check_every", self.co_check_every, 1),
            "max_time_s": None
            if self.max_time_s is None
            else number("max_time_s", self.max_time_s, low=0.0, strict=True),
        }
        # a derived step is 0 at epsilon 0: only a step given for epsilon > 0 must be positive
        for key, n in (("step_size", sizes["steps"]), ("eval_step_size", sizes["eval_steps"])):
            value = getattr(self, key)
            out[key] = (
                2.5 * eps / n if value is None else number(key, value, low=0.0, strict=eps > 0)
            )
        epochs, (lo, hi) = sizes["epochs"], bounds
        if self.ramp_epochs is None:
            out["ramp_epochs"] = epochs // 3 if eps >= 0.2 * (hi - lo) else 0
        else:
            ramp = integer("ramp_epochs", self.ramp_epochs, 0)
            if ramp >= epochs and ramp > 0:
                raise InputError(
                    f"ramp_epochs ({ramp}) must be smaller than epochs ({epochs}) so training "
                    "reaches the full epsilon"
                )
            out["ramp_epochs"] = ramp
        detect = self.detect_co
        out["detect_co"] = (self.method == "fast-at") if detect is None else bool(detect)
        if self.device is not None and not isinstance(self.device, str | torch.device):
            raise InputError(f"device must be a string such as 'cpu', got {self.device!r}")
        return out


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


# -- the trainer ----------------------------------------------------------------------
class Trainer:
    """One adversarial-training run of ``module`` under a validated :class:`TrainConfig`.

    :meth:`run` = resume (or a baseline :meth:`probe`), then :meth:`epoch` until the last
    epoch, early stopping, the time budget or catastrophic overfitting (:meth:`rollback`).
    """

    def __init__(
        self,
        module: nn.Module,
        xt: torch.Tensor,
        yt: torch.Tensor,
        cfg: TrainConfig,
        *,
        preprocess: nn.Module | None,
        meta: dict[str, Any],
        out_path: Path | None,
        progress: Progress | None,
        t_start: float,
    ) -> None:
        self.module, self.cfg, self.progress, self.t_start = module, cfg, progress, t_start
        self.strategy = STRATEGIES[cfg.method](cfg)
        dev = torch.device(cfg.device or "cpu")
        torch.manual_seed(cfg.seed)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        # perturbations draw from ``gen`` on the CPU; on an accelerator from its own generator
        self.pgen = self.gen if dev.type == "cpu" else torch.Generator(dev).manual_seed(cfg.seed)
        self.net = Net(module, preprocess.eval() if preprocess is not None else None)
        n_classes = check_module(self.net, xt.to(dev), yt, meta["num_classes"])
        perm = torch.randperm(len(xt), generator=self.gen)  # held-out split (seeded)
        n_val = max(1, round(cfg.val_fraction * len(xt)))
        if n_val >= len(xt):
            raise InputError(f"val_fraction {cfg.val_fraction} leaves no training data")
        val_idx, tr_idx = perm[:n_val], perm[n_val:]
        self.x_tr, self.y_tr = xt[tr_idx].to(dev), yt[tr_idx].to(dev)
        self.x_val = xt[val_idx][: cfg.val_samples].to(dev)
        self.y_val = yt[val_idx][: cfg.val_samples].to(dev)
        self.x_co, self.y_co = self.x_val[: cfg.co_batch], self.y_val[: cfg.co_batch]
        self.opt = make_optimizer(
            cfg.optimizer, trainable_parameters(module), lr=cfg.lr, momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
        )  # fmt: skip
        self.paths = (
            (out_path, out_path / CHECKPOINT_NAME, out_path / MANIFEST_NAME)
            if out_path is not None
            else None
        )
        input_shape = [int(d) for d in xt.shape[1:]]
        self.manifest = _new_manifest(cfg, xt, yt, len(self.x_tr), n_val, len(self.x_val), {
            **meta, "input_shape": input_shape, "num_classes": n_classes,
        }, preprocess)  # fmt: skip
        self.history: list[dict[str, Any]] = self.manifest["epochs"]
        self.n_batches = math.ceil(len(self.x_tr) / cfg.batch_size)
        self.initial_state = copy.deepcopy(module.state_dict())
        self.best_state: dict[str, torch.Tensor] | None = None
        self.best_acc, self.since_best = -1.0, 0
        self.best_epoch: int | None = None
        self.best_probe: float | None = None
        self.stop_reason: str | None = None
        self.step_count, self.start_epoch, self.time_before = 0, 0, 0.0

    # -- outputs ------------------------------------------------------------------
    def save_best(self) -> None:
        if self.paths is not None:
            save_checkpoint(self.module, self.paths[1], self.manifest["model"])

    def write_manifest(self) -> None:
        if self.paths is not None:
            text = json.dumps(self.manifest, indent=2, sort_keys=False) + "\n"
            atomic_write_text(self.paths[2], text)

    def save_state(self, epochs_done: int) -> None:
        if self.paths is None:
            return
        m = self.manifest
        state.save_state(
            self.paths[0], module=self.module, best_state=self.best_state, opt=self.opt,
            gen=self.gen,
            meta={
                "config": asdict(self.cfg), "data_sha256": m["data"]["sha256"],
                "epochs_done": epochs_done, "step_count": self.step_count,
                "best_acc": self.best_acc, "best_epoch": self.best_epoch,
                "best_probe": self.best_probe, "since_best": self.since_best,
                "history": self.history, "co_initial_probe": m["co_initial_probe"],
                "co_events": m["co_events"],
                "time_s": self.time_before + time.perf_counter() - self.t_start,
            },
        )  # fmt: skip

    # -- overfitting probe and rollback -----------------------------------------------
    def probe(self) -> tuple[float, float]:
        """(PGD acc, FGSM acc) on the small held-out CO batch at full epsilon."""
        c, net = self.cfg, self.net
        net.eval()
        g = torch.Generator(self.pgen.device).manual_seed(c.seed + 7)
        assert c.eval_step_size is not None
        pgd = accuracy(
            net, self.x_co, self.y_co, c.batch_size,
            lambda xb, yb: pgd_perturb(
                net, xb, yb, epsilon=c.epsilon, norm=c.norm, steps=c.eval_steps,  # type: ignore[arg-type]
                step_size=c.eval_step_size, bounds=c.bounds, generator=g,
            ),
        )  # fmt: skip
        fgsm = accuracy(
            net, self.x_co, self.y_co, c.batch_size,
            lambda xb, yb: fgsm_perturb(
                net, xb, yb, epsilon=c.epsilon, norm=c.norm, alpha=c.epsilon,  # type: ignore[arg-type]
                bounds=c.bounds, generator=g, random_init=False,
            ),
        )  # fmt: skip
        return pgd, fgsm

    def check_collapse(self, eps_now: float) -> tuple[float, float, str | None]:
        """Probe; the collapse reason (at full epsilon) or None, updating the best probe."""
        pgd_acc, fgsm_acc = self.probe()
        reason = None
        if eps_now >= self.cfg.epsilon:
            c = self.cfg
            reason = detect_catastrophic_overfitting(
                pgd_acc, fgsm_acc, self.best_probe, drop=c.co_drop, floor=c.co_floor, gap=c.co_gap
            )
            if reason is None:
                best = self.best_probe
                self.best_probe = pgd_acc if best is None else max(best, pgd_acc)
        return pgd_acc, fgsm_acc, reason

    def rollback(self, event: dict[str, Any]) -> None:
        """Restore the best (or initial) weights and stop: training collapsed."""
        self.module.load_state_dict(
            self.best_state if self.best_state is not None else self.initial_state
        )
        event["rolled_back_to_epoch"] = self.best_epoch
        self.manifest["co_events"].append(event)
        self.stop_reason = "catastrophic-overfitting"

    # -- training -----------------------------------------------------------------
    def start(self, resume: bool) -> None:
        """Continue an interrupted run in ``out_dir`` when asked, else probe the baseline."""
        saved = state.load_state(self.paths[0]) if resume and self.paths is not None else None
        m = self.manifest
        if saved is not None:
            meta, tensors = saved
            state.check_compatible(meta, asdict(self.cfg), m["data"]["sha256"])
            self.best_state = state.restore(
                meta, tensors, module=self.module, opt=self.opt, gen=self.gen
            )
            self.start_epoch, self.step_count = int(meta["epochs_done"]), int(meta["step_count"])
            self.best_acc, self.best_epoch = float(meta["best_acc"]), meta["best_epoch"]
            self.best_probe, self.since_best = meta["best_probe"], int(meta["since_best"])
            self.history[:] = meta["history"]
            m["co_initial_probe"], m["co_events"] = meta["co_initial_probe"], meta["co_events"]
            m["best_epoch"], m["best_val_robust_acc"] = self.best_epoch, self.best_acc
            m["resumed_from_epoch"] = self.start_epoch
            self.time_before = float(meta["time_s"])
        elif self.cfg.detect_co:  # baseline: a fine-tuned model that collapses at once is caught
            pgd0, fgsm0 = self.probe()
            m["co_initial_probe"] = {"pgd_acc": pgd0, "fgsm_acc": fgsm0}
            self.best_probe = pgd0

    def train_batch(self, idx: torch.Tensor, eps_now: float, sums: dict[str, Any]) -> None:
        """One optimisation step on the training examples ``idx`` at ``eps_now``."""
        c, net = self.cfg, self.net
        xb, yb = self.x_tr[idx], self.y_tr[idx]
        for group in self.opt.param_groups:
            group["lr"] = c.lr * lr_factor(
                c.lr_schedule, self.step_count / (c.epochs * self.n_batches)
            )
        net.eval()  # attacks see the deterministic network (TRADES/Madry practice)
        x_adv = self.strategy.perturb(net, xb, yb, eps_now, self.pgen)
        net.train()
        loss, logits_clean, logits_adv = self.strategy.loss(net, xb, yb, x_adv)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        record_batch_stats(sums, logits_adv.detach(), yb, self.manifest["data"]["num_classes"])
        sums["grad_norm"] += grad_norm(self.opt)
        sums["batches"] += 1
        self.opt.step()
        self.step_count += 1
        sums["loss"] += float(loss.detach()) * len(idx)
        sums["adv_correct"] += int((logits_adv.detach().argmax(1) == yb).sum())
        if logits_clean is not None:
            sums["clean_correct"] += int((logits_clean.detach().argmax(1) == yb).sum())
            sums["clean_tracked"] = True
        sums["n"] += len(idx)
        if self.progress is not None:
            self.progress("train", self.step_count, c.epochs * self.n_batches)

    def epoch(self, epoch: int) -> bool:
        """Train and evaluate epoch ``epoch`` (0-based); True when training must stop."""
        c = self.cfg
        t_epoch = time.perf_counter()
        order = torch.randperm(len(self.x_tr), generator=self.gen)
        sums: dict[str, Any] = {"loss": 0.0, "clean_correct": 0, "adv_correct": 0, "n": 0,
                                "grad_norm": 0.0, "batches": 0}  # fmt: skip
        eps_now, out_of_time = c.epsilon, False
        ramp_batches = (c.ramp_epochs or 0) * self.n_batches
        for b in range(self.n_batches):
            idx = order[b * c.batch_size : (b + 1) * c.batch_size]
            eps_now = (
                c.epsilon * min(1.0, (self.step_count + 1) / ramp_batches)
                if ramp_batches
                else c.epsilon
            )
            self.train_batch(idx, eps_now, sums)
            due = c.detect_co and c.co_check_every and (b + 1) % c.co_check_every == 0
            if due and b + 1 < self.n_batches and self.probe_in_epoch(epoch, b, eps_now):
                return True
            if c.max_time_s is not None and time.perf_counter() - self.t_start > c.max_time_s:
                out_of_time = True
                break
        return self.end_epoch(epoch, eps_now, sums, t_epoch, out_of_time)

    def probe_in_epoch(self, epoch: int, b: int, eps_now: float) -> bool:
        """The in-epoch overfitting check after batch ``b``; True after a rollback."""
        pgd_acc, fgsm_acc, reason = self.check_collapse(eps_now)
        if reason is None:
            return False
        self.rollback(
            {"epoch": epoch + 1, "batch": b + 1, "pgd_acc": pgd_acc, "fgsm_acc": fgsm_acc,
             "best_pgd_acc": self.best_probe, "reason": reason}
        )  # fmt: skip
        return True

    def evaluate(self) -> tuple[float, float]:
        """Held-out (clean, PGD robust) accuracy at the full epsilon."""
        c, net = self.cfg, self.net
        net.eval()
        g_eval = torch.Generator(self.pgen.device).manual_seed(c.seed + 1)
        assert c.eval_step_size is not None
        val_clean = accuracy(net, self.x_val, self.y_val, c.batch_size)
        if c.epsilon == 0:  # no budget: robust accuracy is the clean accuracy
            return val_clean, val_clean
        val_robust = accuracy(
            net, self.x_val, self.y_val, c.batch_size,
            lambda xb, yb, g=g_eval: pgd_perturb(
                net, xb, yb, epsilon=c.epsilon, norm=c.norm, steps=c.eval_steps,  # type: ignore[arg-type]
                step_size=c.eval_step_size, bounds=c.bounds, generator=g,
            ),
        )  # fmt: skip
        return val_clean, val_robust

    def end_epoch(
        self, epoch: int, eps_now: float, sums: dict[str, Any], t_epoch: float, out_of_time: bool
    ) -> bool:
        """Evaluate, record, keep the best weights, checkpoint; True when training must stop."""
        c, m = self.cfg, self.manifest
        val_clean, val_robust = self.evaluate()
        n = max(1, sums["n"])
        row: dict[str, Any] = {
            "epoch": epoch + 1, "epsilon": eps_now, "samples": sums["n"],
            "lr": self.opt.param_groups[0]["lr"], "loss": sums["loss"] / n,
            "train_adv_acc": sums["adv_correct"] / n,
            "train_clean_acc": sums["clean_correct"] / n if sums.get("clean_tracked") else None,
            "val_clean_acc": val_clean, "val_robust_acc": val_robust,
            **epoch_stats(sums),
        }  # fmt: skip
        co_reason = None
        if c.detect_co:
            pgd_acc, fgsm_acc, co_reason = self.check_collapse(eps_now)
            row["co_probe_pgd_acc"], row["co_probe_fgsm_acc"] = pgd_acc, fgsm_acc
        row["time_s"] = time.perf_counter() - t_epoch
        self.history.append(row)
        if self.progress is not None:
            self.progress("epoch", epoch + 1, c.epochs)
        if co_reason is not None:
            self.rollback(
                {"epoch": epoch + 1, "batch": None, "pgd_acc": row["co_probe_pgd_acc"],
                 "fgsm_acc": row["co_probe_fgsm_acc"], "best_pgd_acc": self.best_probe,
                 "reason": co_reason}
            )  # fmt: skip
            return True
        if val_robust > self.best_acc:
            self.best_acc, self.best_epoch, self.since_best = val_robust, epoch + 1, 0
            self.best_state = copy.deepcopy(self.module.state_dict())
            self.save_best()
        elif epoch + 1 > (c.ramp_epochs or 0):
            self.since_best += 1
        m["best_epoch"] = self.best_epoch
        m["best_val_robust_acc"] = self.best_acc if self.best_epoch is not None else None
        self.write_manifest()
        self.save_state(epoch + 1)
        if c.patience is not None and self.since_best >= c.patience:
            self.stop_reason = f"early stopping: no robust-accuracy gain for {c.patience} epoch(s)"
            return True
        if out_of_time:
            self.stop_reason = (
                f"time budget of {c.max_time_s:g} s spent (epoch {epoch + 1} partial)"
            )
            return True
        return False

    def run(self, resume: bool) -> TrainResult:
        """Train to the end; the module holds the best weights afterwards."""
        self.start(resume)
        for epoch in range(self.start_epoch, self.cfg.epochs):
            if self.epoch(epoch):
                break
        return self.finish()

    def finish(self) -> TrainResult:
        """Load the best weights, complete the manifest and drop the resume state."""
        m = self.manifest
        if self.best_state is not None:
            self.module.load_state_dict(self.best_state)
        else:  # collapsed before any epoch finished: the initial weights are the best we have
            self.module.load_state_dict(self.initial_state)
            self.save_best()
        m["status"] = "stopped" if self.stop_reason is not None else "completed"
        m["stop_reason"] = self.stop_reason or "completed all epochs"
        m["best_epoch"] = self.best_epoch
        m["best_val_robust_acc"] = self.best_acc if self.best_epoch is not None else None
        m["total_time_s"] = self.time_before + time.perf_counter() - self.t_start
        if self.paths is not None:
            from advguard.models.io import file_sha256

            m["checkpoint"] = {"path": CHECKPOINT_NAME, "sha256": file_sha256(self.paths[1])}
        self.write_manifest()
        state.clear_state(self.paths[0] if self.paths is not None else None)
        return TrainResult(
            module=self.module,
            manifest=m,
            checkpoint_path=self.paths[1] if self.paths is not None else None,
            manifest_path=self.paths[2] if self.paths is not None else None,
            preprocess=self.net.pre,
            history=self.history,
        )


def record_batch_stats(
    sums: dict[str, Any], logits: torch.Tensor, y: torch.Tensor, num_classes: int
) -> None:
    """Add one batch to the per-class sums of ``sums``: cross-entropy of each example trained
    on, and the norm of its loss gradient with respect to the logits (``||softmax - onehot||``,
    the EL2N score of Paul et al. 2021), so per-class means can be compared across runs."""
    with torch.no_grad():
        lg = logits.float()
        ce = torch.nn.functional.cross_entropy(lg, y, reduction="none")
        p = torch.softmax(lg, dim=1)
        p[torch.arange(len(y), device=y.device), y] -= 1.0
        gn = p.norm(dim=1)
        yc = y.to("cpu")
        for key, v in (("class_loss", ce), ("class_grad", gn)):
            add = torch.bincount(yc, weights=v.to("cpu", torch.float64), minlength=num_classes)
            sums[key] = sums[key] + add if key in sums else add
        cnt = torch.bincount(yc, minlength=num_classes)
        sums["class_n"] = sums["class_n"] + cnt if "class_n" in sums else cnt


def grad_norm(opt: torch.optim.Optimizer) -> float:
    """The L2 norm of the gradient over the optimizer's parameters (after ``backward``)."""
    total = 0.0
    for group in opt.param_groups:
        for q in group["params"]:
            if q.grad is not None:
                total += float(q.grad.detach().float().pow(2).sum())
    return math.sqrt(total)


def epoch_stats(sums: dict[str, Any]) -> dict[str, Any]:
    """The monitoring fields of an epoch row: mean parameter-gradient norm per batch and,
    per class, the examples seen, their mean loss and mean logit-gradient norm (``None``
    for a class with no example)."""
    batches = max(1, int(sums.get("batches", 0)))
    n = sums.get("class_n")
    if n is None:
        return {"grad_norm": None, "per_class": None}
    counts = [int(v) for v in n.tolist()]

    def mean(key: str) -> list[float | None]:
        return [
            float(t) / c if c else None for t, c in zip(sums[key].tolist(), counts, strict=True)
        ]

    return {
        "grad_norm": float(sums["grad_norm"]) / batches,
        "per_class": {"n": counts, "loss": mean("class_loss"), "grad_norm": mean("class_grad")},
    }


def _new_manifest(
    cfg: TrainConfig,
    xt: torch.Tensor,
    yt: torch.Tensor,
    n_train: int,
    n_val: int,
    n_val_evaluated: int,
    meta: Mapping[str, Any],
    preprocess: nn.Module | None,
) -> dict[str, Any]:
    """The manifest at the start of a run (``status: running``)."""
    shape, n_classes = meta["input_shape"], meta["num_classes"]
    return {
        "schema": MANIFEST_SCHEMA,
        "status": "running",
        "method": cfg.method,
        "config": asdict(cfg),
        "seed": cfg.seed,
        "data": {
            **data_sha256(xt, yt),
            "n": len(xt),
            "n_train": n_train,
            "n_val": n_val,
            "n_val_evaluated": n_val_evaluated,
            "input_shape": shape,
            "num_classes": n_classes,
        },
        "model": model_meta(
            meta["factory"], meta["factory_kwargs"], shape, n_classes, cfg.bounds, preprocess
        ),
        "epochs": [],
        "best_epoch": None,
        "best_val_robust_acc": None,
        "co_initial_probe": None,
        "co_events": [],
        "stop_reason": None,
        "total_time_s": None,
        "versions": versions(),
        "checkpoint": None,
    }


def train(
    module: nn.Module,
    x: np.ndarray | torch.Tensor,
    y: np.ndarray | torch.Tensor,
    config: TrainConfig,
    *,
    preprocess: nn.Module | None = None,
    num_classes: int | None = None,
    factory: str | None = None,
    factory_kwargs: Mapping[str, Any] | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    progress: Progress | None = None,
) -> TrainResult:
    """Adversarially train ``module`` on raw inputs ``x`` (N, ...) in ``config.bounds`` with
    labels ``y`` as ``config`` (a :class:`TrainConfig`, validated here once) says.

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

    The module trains in place on ``config.device`` (default: its own device) and is
    otherwise left as it was: same device, same train/eval flags, and parameters with
    ``requires_grad=False`` stay frozen and unchanged (only trainable parameters change).
    """
    t_start = time.perf_counter()
    if not isinstance(module, nn.Module):
        raise InputError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    cfg = config.validated()
    if resume and out_dir is None:
        raise InputError("resume=True needs out_dir (where the interrupted run saved its state)")
    xt, yt = prepare_data(x, y, cfg.bounds)
    dev = resolve_device(cfg.device, module)
    cfg = replace(cfg, device=str(dev))
    meta = {"num_classes": num_classes, "factory": factory, "factory_kwargs": factory_kwargs}
    with borrowed(dev, module, preprocess):
        trainer = Trainer(
            module, xt, yt, cfg, preprocess=preprocess, meta=meta, progress=progress,
            out_path=Path(out_dir) if out_dir is not None else None, t_start=t_start,
        )  # fmt: skip
        return trainer.run(resume)


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
    device: str | torch.device | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    progress: Progress | None = None,
) -> TrainResult:
    """Adversarially train ``module`` on raw inputs ``x`` (N, ...) in ``bounds`` with labels ``y``.

    The keyword API: the keywords build a :class:`TrainConfig` (the methods and every
    setting are described there) and :func:`train` runs it (outputs, resuming, and what
    happens to the caller's module are described there).
    """
    if not isinstance(module, nn.Module):
        raise InputError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    config = TrainConfig(
        method=method, epsilon=epsilon, norm=norm, epochs=epochs, batch_size=batch_size, lr=lr,
        optimizer=optimizer, momentum=momentum, weight_decay=weight_decay,
        lr_schedule=lr_schedule, steps=steps, step_size=step_size, beta=beta, mix=mix,
        fast_alpha=fast_alpha, random_init=random_init, ramp_epochs=ramp_epochs,
        val_fraction=val_fraction, val_samples=val_samples, eval_steps=eval_steps,
        patience=patience, detect_co=detect_co, co_check_every=co_check_every,
        co_batch=co_batch, co_drop=co_drop, co_floor=co_floor, co_gap=co_gap, seed=seed,
        bounds=bounds, max_time_s=max_time_s,
        device=str(device) if isinstance(device, torch.device) else device,
    )  # fmt: skip
    return train(
        module, x, y, config, preprocess=preprocess, num_classes=num_classes, factory=factory,
        factory_kwargs=factory_kwargs, out_dir=out_dir, resume=resume, progress=progress,
    )  # fmt: skip


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


__all__ = [
    "CHECKPOINT_NAME",
    "MANIFEST_NAME",
    "MANIFEST_SCHEMA",
    "METHODS",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "adversarial_train",
    "data_sha256",
    "detect_catastrophic_overfitting",
    "fgsm_perturb",
    "load_manifest",
    "load_trainable",
    "pgd_perturb",
    "trades_perturb",
    "train",
]
