"""Escalation benchmark: an undeclared randomized, non-differentiable defense on MNIST.

Model: ``advguard.models.zoo.small_cnn((1, 28, 28), 10)`` trained for one epoch on the first
``--train`` MNIST training images, put behind stochastic quantization with random dithering
(``DitherQuantize``: ``round((x + u) * L) / L`` with ``u ~ U(-1/2L, 1/2L)``, a fresh draw per
call, zero gradient) inside the ``preprocess`` module of a plain ``TorchClassifier``: the
defense is not declared.

Measured, on the first ``--n`` test images at Linf ``--eps``:

* the evaluation runner with a PGD suite (its sanity checks flag the model; the
  ``undeclared-defense`` escalation runs): robust accuracy of the suite alone, after the
  escalation, which escalation found the examples, its budget, convergence and wall time;
* a BPDA + EOT attack that *knows* the preprocessing (identity on the backward pass,
  ``--draws`` draws per step, every step run), judged like the runner on logits averaged over
  ``eot_samples`` draws (Athalye, Carlini & Wagner 2018).

Data: ``mnist.npz`` (Keras layout) from ``--data``, default ``../shared/datasets/mnist.npz``
or ``/work/shared/datasets/mnist.npz``. Run::

    python benchmarks/bench_escalation.py --out benchmarks/results/escalation_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from advguard.evaluate.runner import evaluate, select_samples
from advguard.evaluate.threat_model import ThreatModel
from advguard.models import TorchClassifier
from advguard.models.fit import fit
from advguard.models.wrappers import EOTClassifier
from advguard.models.zoo import small_cnn

REPO = Path(__file__).resolve().parent.parent
CANDIDATES = [REPO.parent / "shared/datasets/mnist.npz", Path("/work/shared/datasets/mnist.npz")]


class DitherQuantize(nn.Module):
    """Stochastic quantization with random dithering (random and non-differentiable)."""

    def __init__(self, levels: int = 4) -> None:
        super().__init__()
        self.levels = levels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = (torch.rand_like(x) - 0.5) / self.levels
        return torch.round((x + u).clamp(0, 1) * self.levels) / self.levels


def bpda_eot(module, pre, x, y, eps, steps, draws) -> torch.Tensor:
    """Signed-gradient PGD on the mean-logit margin, identity backward through ``pre``."""
    xa = x.clone()
    alpha = 2.5 * eps / steps
    for _ in range(steps):
        xa.requires_grad_(True)
        xr = xa.repeat(draws, 1, 1, 1)
        with torch.no_grad():
            out = pre(xr)
        z = module(xr + (out - xr).detach()).view(draws, len(x), -1).mean(0)
        zy = z.gather(1, y[:, None]).squeeze(1)
        zo = z.masked_fill(F.one_hot(y, z.shape[1]).bool(), -1e9)
        (g,) = torch.autograd.grad((zo.max(1).values - zy).sum(), xa)
        xa = torch.min(torch.max(xa.detach() + alpha * g.sign(), x - eps), x + eps).clamp(0, 1)
    return xa.detach()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--n", type=int, default=100, help="evaluated test images")
    ap.add_argument("--train", type=int, default=10000, help="training images (1 epoch)")
    ap.add_argument("--eps", type=float, default=0.3)
    ap.add_argument("--levels", type=int, default=4)
    ap.add_argument("--eot", type=int, default=8, help="eot_samples of the threat model")
    ap.add_argument("--steps", type=int, default=40, help="BPDA+EOT steps")
    ap.add_argument("--draws", type=int, default=8, help="BPDA+EOT draws per step")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/escalation_cpu.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    path = a.data or next((p for p in CANDIDATES if p.exists()), None)
    if path is None or not Path(path).exists():
        raise SystemExit("mnist.npz not found; pass --data")
    with np.load(path, allow_pickle=False) as d:
        x_tr = (d["x_train"][: a.train] / 255.0).astype(np.float32)[:, None]
        y_tr = d["y_train"][: a.train].astype(np.int64)
        x_te = (d["x_test"] / 255.0).astype(np.float32)[:, None]
        y_te = d["y_test"].astype(np.int64)

    t0 = time.perf_counter()
    torch.manual_seed(0)
    module = fit(small_cnn((1, 28, 28), 10), x_tr, y_tr, epochs=1, seed=0)
    train_s = time.perf_counter() - t0
    pre = DitherQuantize(a.levels)
    model = TorchClassifier(module, input_shape=(1, 28, 28), num_classes=10, preprocess=pre)
    tm = ThreatModel.model_validate(
        dict(
            name="undeclared-dither",
            norm="linf",
            epsilons=[a.eps],
            samples=a.n,
            seed=0,
            batch_size=100,
            attacks=[{"attack": "pgd", "steps": 20}],
            sanity_samples=min(a.n, 40),
            eot_samples=a.eot,
        )
    )
    t0 = time.perf_counter()
    rep = evaluate(model, x_te, y_te, tm)
    eval_s = time.perf_counter() - t0
    esc = next((c for c in rep.sanity_checks if c.id == "undeclared-defense"), None)
    r = rep.results[0]

    idx = select_samples(len(x_te), tm.samples, tm.seed)
    x, y = torch.tensor(x_te[idx]), torch.tensor(y_te[idx])
    judge = EOTClassifier(model, samples=tm.eot_samples)
    torch.manual_seed(1)
    t0 = time.perf_counter()
    clean_ok = judge.logits(x).argmax(1) == y
    xa = bpda_eot(module, pre, x, y, a.eps, a.steps, a.draws)
    bpda_ra = float((clean_ok & (judge.logits(xa).argmax(1) == y)).float().mean())
    bpda_s = time.perf_counter() - t0

    out = {
        "workload": {
            "data": "MNIST test, first samples of a seeded permutation",
            "model": f"small_cnn, 1 epoch on {a.train} images, DitherQuantize({a.levels}) "
            "as undeclared preprocess",
            "n": a.n,
            "epsilon": a.eps,
            "norm": "linf",
            "eot_samples": a.eot,
            "suite": "pgd, 20 steps",
            "bpda_eot": {"steps": a.steps, "draws": a.draws},
        },
        "clean_accuracy": rep.clean_accuracy.value,
        "robust_accuracy_suite": (r.first_robust_accuracy or r.robust_accuracy).value,
        "robust_accuracy_escalated": r.robust_accuracy.value,
        "robust_accuracy_bpda_eot": bpda_ra,
        "trustworthy": rep.trustworthy,
        "checks": {c.id: [c.status_before_escalation, c.status] for c in rep.sanity_checks},
        "escalation": None
        if esc is None
        else {
            k: esc.details[k]
            for k in (
                "converged",
                "rounds",
                "found_by",
                "model_evaluations",
                "seconds",
                "newly_fooled_per_epsilon",
                "large_epsilon",
            )
        }
        | {"round_1x_budget": esc.details["round_1x"].get("budget_per_sample_and_epsilon")},
        "per_attack": [
            {"stage": p.stage, "attack": p.attack, "attacked": p.attacked, "fooled": p.newly_fooled}
            for p in r.per_attack
        ],
        "seconds": {
            "train": train_s,
            "evaluate": eval_s,
            "bpda_eot": bpda_s,
            **rep.timing,
        },
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": a.threads,
            "cpu_count": os.cpu_count(),
            "note": "shared 2-core machine under load from other jobs; times are upper bounds",
        },
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=1, default=float) + "\n")
    print(json.dumps({k: out[k] for k in list(out)[1:6]}, indent=1))


if __name__ == "__main__":
    main()
