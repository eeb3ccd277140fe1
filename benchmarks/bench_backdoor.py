"""Backdoor benchmark: BadNets on MNIST, then find it in the data and in the model.

Data: MNIST (``/work/shared/datasets/mnist.npz`` or ``../shared/datasets/mnist.npz``, or
``--data``); the first ``--n-train`` training images train the models, the first ``--n-test``
test images measure them, the next ``--n-clean`` test images are the defender's small clean
sample (Neural Cleanse, STRIP superimposition pool, STRIP calibration).

Steps (all CPU, one thread by default, seeds fixed):

1. Poison: BadNets (Gu et al. 2017), ``--patch``x``--patch`` white square in the bottom-right
   corner, ``--rate`` of the training rows relabelled to class ``--target``.
2. Train ``advguard.models.zoo.small_cnn`` on the clean and on the poisoned set (same seed,
   ``--epochs``); report clean accuracy and attack success rate (ASR, non-target test images
   with the trigger classified as the target) with Clopper-Pearson 95 % intervals.
3. Data scan with the poisoned model's penultimate features: activation clustering (Chen et al.
   2019, PCA to 10 dims, 2-means, exclusionary reclassification) and spectral signatures (Tran
   et al. 2018, removing 1.5 x the class's poisoned share; run with the share the attacker used
   in the target class, the paper's setting); recall and false-positive rate against the manifest.
4. Neural Cleanse (Wang et al. 2019) on both models: flagged classes, anomaly indices.
5. STRIP (Gao et al. 2019), calibrated at 5 % FPR: TPR on triggered test images, FPR on clean.

Acceptance: ASR > 95 %, clean accuracy within 1 point of the clean model; a scan recovers
>= 80 % of poisoned rows at < 5 % FPR; Neural Cleanse flags the target class of the BadNets
model and no class of the clean model.

Run (about 7 CPU minutes on one thread; 26 min wall on the loaded shared 2-core machine)::

    python benchmarks/bench_backdoor.py --out benchmarks/results/backdoor_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
CANDIDATES = [Path("/work/shared/datasets/mnist.npz"), HERE.parent / "../shared/datasets/mnist.npz"]


def load_mnist(path: str | None) -> dict[str, np.ndarray]:
    for p in [Path(path)] if path else CANDIDATES:
        if p.is_file():
            with np.load(p, allow_pickle=False) as d:
                return {k: d[k] for k in d.files}
    print(f"skipped: MNIST not found (tried {', '.join(map(str, CANDIDATES))}); pass --data")
    sys.exit(0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None)
    ap.add_argument("--n-train", type=int, default=10000)
    ap.add_argument("--n-test", type=int, default=2000)
    ap.add_argument("--n-clean", type=int, default=500)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--rate", type=float, default=0.05)
    ap.add_argument("--target", type=int, default=0)
    ap.add_argument("--patch", type=int, default=3)
    ap.add_argument("--nc-steps", type=int, default=300)
    ap.add_argument("--nc-samples", type=int, default=200)
    ap.add_argument("--nc-batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(HERE / "results" / "backdoor_cpu.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from advguard.attacks.poisoning import poison
    from advguard.defenses.backdoor import (
        StripDetector,
        activation_clustering,
        backdoor_metrics,
        neural_cleanse,
        penultimate_features,
        precision_recall,
        spectral_signatures,
    )
    from advguard.models.fit import fit
    from advguard.models.torch_model import TorchClassifier
    from advguard.models.zoo import small_cnn

    d = load_mnist(args.data)
    x_tr = (d["x_train"][: args.n_train].astype(np.float32) / 255.0)[:, None]
    y_tr = d["y_train"][: args.n_train].astype(np.int64)
    x_te = (d["x_test"][: args.n_test].astype(np.float32) / 255.0)[:, None]
    y_te = d["y_test"][: args.n_test].astype(np.int64)
    lo, hi = args.n_test, args.n_test + args.n_clean
    x_cl = (d["x_test"][lo:hi].astype(np.float32) / 255.0)[:, None]
    y_cl = d["y_test"][lo:hi].astype(np.int64)

    t0 = time.time()
    res = poison(x_tr, y_tr, "badnets", rate=args.rate, target=args.target, size=args.patch,
                 seed=args.seed, num_classes=10)  # fmt: skip
    trig = res.manifest.trigger
    assert trig is not None
    truth = res.manifest.poisoned_mask()
    out: dict[str, Any] = {
        "schema": "advguard-bench-backdoor/1",
        "config": vars(args),
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "n_poisoned": int(truth.sum()),
    }
    models = {}
    for name, (xx, yy) in {"clean": (x_tr, y_tr), "badnets": (res.x, res.y)}.items():
        t = time.time()
        torch.manual_seed(args.seed)
        m = small_cnn((1, 28, 28), 10)
        fit(m, xx, yy, epochs=args.epochs, seed=args.seed)
        clf = TorchClassifier(m, input_shape=(1, 28, 28), num_classes=10)
        models[name] = clf
        out[f"{name}_model"] = {**backdoor_metrics(clf, x_te, y_te, trig),
                                "train_s": time.time() - t}  # fmt: skip
        print(name, "clean acc", out[f"{name}_model"]["clean_accuracy"]["value"],
              "ASR", out[f"{name}_model"]["attack_success_rate"]["value"], flush=True)  # fmt: skip
    ca = out["clean_model"]["clean_accuracy"]["value"]
    cb = out["badnets_model"]["clean_accuracy"]["value"]
    asr = out["badnets_model"]["attack_success_rate"]["value"]

    bad = models["badnets"]
    t = time.time()
    feats = penultimate_features(bad, res.x)
    ac = activation_clustering(feats, res.y, x=res.x, seed=args.seed)
    share = float(truth.sum() / (res.y == args.target).sum())
    sp = spectral_signatures(feats, res.y, rate=share)
    sp_target = spectral_signatures(feats, res.y, rate=share, classes=[args.target])
    out["data_scan"] = {
        "poisoned_share_of_target_class": share,
        "activation_clustering": {**precision_recall(ac.flagged, truth), "per_class": ac.per_class},
        "spectral_signatures_all_classes": precision_recall(sp.flagged, truth),
        "spectral_signatures_target_class_only": precision_recall(sp_target.flagged, truth),
        "seconds": time.time() - t,
    }
    print("AC", {k: out["data_scan"]["activation_clustering"][k]["value"]
                 for k in ("recall", "false_positive_rate")}, flush=True)  # fmt: skip

    out["neural_cleanse"] = {}
    for name, clf in models.items():
        t = time.time()
        n = args.nc_samples
        nc = neural_cleanse(
            clf, x_cl[:n], y_cl[:n], steps=args.nc_steps, batch_size=args.nc_batch, seed=args.seed
        )
        out["neural_cleanse"][name] = {**nc.summary(), "seconds": time.time() - t}
        print("NC", name, nc.flagged, np.round(nc.anomaly_index, 2), flush=True)

    t = time.time()
    half = args.n_clean // 2
    strip = StripDetector(bad, n=32).fit(x_cl[:half])
    strip.calibrate(x_cl[half:], fpr=0.05)
    non_target = y_te != args.target
    out["strip"] = {
        "fpr_target": 0.05,
        "tpr_triggered": float(strip.is_adversarial(trig.apply(x_te[non_target])).mean()),
        "fpr_clean_test": float(strip.is_adversarial(x_te).mean()),
        "seconds": time.time() - t,
    }
    print("STRIP", out["strip"], flush=True)

    scan = out["data_scan"]["activation_clustering"]
    nc_bad = out["neural_cleanse"]["badnets"]["flagged_classes"]
    nc_clean = out["neural_cleanse"]["clean"]["flagged_classes"]
    out["acceptance"] = {
        "asr_above_95": asr is not None and asr > 0.95,
        "clean_accuracy_within_1_point": ca is not None and cb is not None and ca - cb <= 0.01,
        "scan_recall_80_at_fpr_below_5": scan["recall"]["value"] >= 0.8
        and scan["false_positive_rate"]["value"] < 0.05,
        "neural_cleanse_flags_target": args.target in nc_bad,
        "neural_cleanse_clean_model_unflagged": not nc_clean,
    }
    out["total_s"] = time.time() - t0
    print(json.dumps(out["acceptance"], indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1, default=float))


if __name__ == "__main__":
    main()
