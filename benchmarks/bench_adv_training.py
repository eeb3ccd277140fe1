"""Adversarial-training benchmark: MNIST, Linf eps 0.3, evaluated under ``linf-standard``.

Trains a zoo CNN from scratch (``--arch``: ``trades_cnn``, the 4-conv "SmallCNN" of the
TRADES paper and the usual MNIST robustness model, by default; or advguard's 2-conv
``small_cnn``) with :func:`advguard.defenses.training.adversarial_train` (default: PGD-AT,
10 steps of 2.5 eps / 10, Adam with a cosine learning rate, epsilon ramped up linearly over
the first two epochs; ``--method fast-at`` or ``trades`` for the others), then evaluates the
trained model on the first ``--n-eval`` MNIST *test* images with ``advguard.evaluate.evaluate``
under the ``linf-standard`` threat model restricted to eps 0.3 (APGD-CE, APGD-T, Square
on survivors).

Targets: robust accuracy >= 88% at eps 0.3, clean accuracy >= 98%, training < 30 minutes
on 2 CPU cores. Speed is measured and reported, never asserted in tests.

Needs MNIST at ../shared/datasets/mnist.npz (or ``--data``); skips cleanly (exit 0, no
JSON) when it is missing. Full run (27 minutes of training plus 13 of evaluation on 2
cores; result in ``results/adv_training_pgdat_trades_cnn_cpu.json``)::

    .venv/bin/python benchmarks/bench_adv_training.py --method pgd-at --arch trades_cnn \\
        --epochs 12 --ramp-epochs 2 --n-eval 1000 --minutes 30 --threads 2 \\
        --out benchmarks/results/adv_training_pgdat_trades_cnn_cpu.json

Tiny smoke configuration (about 1 minute)::

    .venv/bin/python benchmarks/bench_adv_training.py --epochs 1 --n-train 5000 \\
        --n-eval 100 --minutes 3 --threads 2 --out /tmp/adv_training_smoke.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_attacks import (  # noqa: E402  (shared benchmark helpers)
    DEFAULT_DATA,
    environment,
    load_data,
    result_header,
)

SCHEMA = "advguard-bench-adv-training/1"
TARGETS = {"robust_accuracy_min": 0.88, "clean_accuracy_min": 0.98, "train_minutes_max": 30.0}
EPSILON = 0.3
ARCHITECTURES = ("small_cnn", "trades_cnn")  # factories in advguard.models.zoo

# Per-method defaults (Wong et al. 2020 for fast-AT on MNIST: Adam, cyclic lr peaking at
# 5e-3; Madry et al. / Zhang et al. settings scaled down to the CPU budget otherwise).
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "fast-at": {"lr": 5e-3, "lr_schedule": "cyclic", "batch_size": 100},
    "pgd-at": {"lr": 1e-3, "lr_schedule": "cosine", "batch_size": 100, "steps": 10},
    "trades": {"lr": 1e-3, "lr_schedule": "cosine", "batch_size": 100, "steps": 10, "beta": 6.0},
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", choices=list(METHOD_DEFAULTS), default="pgd-at")
    p.add_argument("--arch", choices=ARCHITECTURES, default="trades_cnn", help="zoo model")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--ramp-epochs", type=int, default=2, help="epsilon ramp epochs")
    p.add_argument("--n-train", type=int, default=None, help="first N training images (all)")
    p.add_argument("--n-eval", type=int, default=1000, help="first N test images evaluated")
    p.add_argument("--minutes", type=float, default=30.0, help="training time budget")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--out", type=Path, default=HERE / "results" / "adv_training_cpu.json")
    a = p.parse_args(argv)

    if not a.data.exists():
        print(f"skipped: MNIST not found at {a.data} (this benchmark needs real MNIST)")
        return 0

    import torch

    from advguard.defenses.training import adversarial_train
    from advguard.evaluate import evaluate, load_threat_model
    from advguard.models import TorchClassifier, zoo

    torch.set_num_threads(a.threads)
    data = load_data(a.data)
    x_tr, y_tr = data["x_train"], data["y_train"]
    if a.n_train is not None:
        x_tr, y_tr = x_tr[: a.n_train], y_tr[: a.n_train]
    x_te, y_te = data["x_test"][: a.n_eval], data["y_test"][: a.n_eval]
    print(
        f"data: {data['name']} train {len(x_tr)}, eval {len(x_te)}; "
        f"method {a.method}, model {a.arch}"
    )

    hp = dict(METHOD_DEFAULTS[a.method])
    torch.manual_seed(a.seed)
    factory = f"advguard.models.zoo:{a.arch}"
    module = getattr(zoo, a.arch)((1, 28, 28), 10)

    def progress(stage: str, done: int, total: int) -> None:
        if stage == "epoch":
            print(f"  epoch {done}/{total} done", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        res = adversarial_train(
            module,
            x_tr,
            y_tr,
            method=a.method,
            epsilon=EPSILON,
            epochs=a.epochs,
            val_fraction=max(1000 / len(x_tr), 0.02) if len(x_tr) > 2000 else 0.1,
            val_samples=500,
            eval_steps=20,
            seed=a.seed,
            max_time_s=a.minutes * 60.0,
            factory=factory,
            factory_kwargs={"input_shape": [1, 28, 28], "num_classes": 10},
            out_dir=tmp,
            progress=progress,
            ramp_epochs=min(a.ramp_epochs, a.epochs - 1),  # a 1-epoch smoke run: no ramp
            **hp,
        )
        train_s = time.perf_counter() - t0
        manifest = res.manifest

    clf = TorchClassifier(res.module, input_shape=(1, 28, 28), num_classes=10)
    tm = load_threat_model("linf-standard").with_overrides(
        epsilons=[EPSILON], samples=len(x_te), seed=a.seed
    )
    t1 = time.perf_counter()
    report = evaluate(clf, x_te, y_te, tm)
    eval_s = time.perf_counter() - t1
    r = report.result_at(EPSILON)
    assert r is not None
    clean = report.clean_accuracy.value
    robust = r.robust_accuracy.value
    met = {
        "robust_accuracy": robust is not None and robust >= TARGETS["robust_accuracy_min"],
        "clean_accuracy": clean is not None and clean >= TARGETS["clean_accuracy_min"],
        "train_time": train_s / 60.0 <= TARGETS["train_minutes_max"],
    }
    result = {
        **result_header(SCHEMA, environment("cpu", a.threads)),
        "workload": {
            "data": data["name"],
            "data_sha256": data["sha256"],
            "n_train": len(x_tr),
            "n_eval": len(x_te),
            "model": factory + "((1, 28, 28), 10)",
            "method": a.method,
            "epsilon": EPSILON,
            "epochs": a.epochs,
            "minutes_budget": a.minutes,
            "hyperparameters": hp,
            "threat_model": "linf-standard with epsilons=[0.3]",
        },
        "targets": TARGETS,
        "results": {
            "clean_accuracy": clean,
            "clean_accuracy_ci": [report.clean_accuracy.ci_low, report.clean_accuracy.ci_high],
            "robust_accuracy": robust,
            "robust_accuracy_ci": [r.robust_accuracy.ci_low, r.robust_accuracy.ci_high],
            "per_attack": [row.model_dump() for row in r.per_attack],
            "trustworthy": report.trustworthy,
            "train_seconds": round(train_s, 1),
            "eval_seconds": round(eval_s, 1),
            "epochs_run": len(manifest["epochs"]),
            "best_epoch": manifest["best_epoch"],
            "stop_reason": manifest["stop_reason"],
            "co_events": manifest["co_events"],
        },
        "targets_met": met,
        "training_manifest": manifest,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(
        f"{a.method}: clean {clean:.1%}, robust@0.3 (linf-standard, n={len(x_te)}) "
        f"{robust:.1%}, trained {train_s / 60:.1f} min ({len(manifest['epochs'])} epochs, "
        f"stop: {manifest['stop_reason']}); targets met: {met}"
    )
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
