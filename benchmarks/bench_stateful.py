"""Query counts at which the stateful detectors flag advguard's black-box attacks on digits.

The setting of tests/test_guard_stateful.py, over more images: the small CNN trained on the
first 1400 (seeded) digits; the k-NN detector (Chen et al. 2020) calibrated on those 1400
images replayed as one stream at a per-query FPR of 0.001; PRADA (Juuti et al. 2019) with
delta 0.95 and the model's predicted classes. Every attack query batch is shown to the
detector as one client before the model answers. Benign clients replay the 397 test images,
each in its own random order.

    python benchmarks/bench_stateful.py --images 20 --out benchmarks/results/stateful.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits

from advguard.attacks import HopSkipJump, SquareAttack
from advguard.attacks.transfer import train_surrogate
from advguard.guard.stateful import KNNStatefulDetector, PRADADetector
from advguard.models import TorchClassifier
from advguard.models.base import ClassifierBase
from advguard.models.fit import fit
from advguard.models.zoo import small_cnn


class Observed(ClassifierBase):
    def __init__(self, inner, detector, client_id):
        super().__init__(
            num_classes=inner.num_classes, input_shape=inner.input_shape, bounds=inner.bounds
        )
        self.inner, self.detector, self.client_id = inner, detector, client_id
        self.queries = inner.queries
        self.verdict = None

    def logits(self, x):
        self.verdict = self.detector.observe(self.client_id, x.detach().cpu().numpy())
        return self.inner.logits(x)


def jacobian_extraction(spy, seeds, rounds, lam=0.1):
    sur, _ = train_surrogate(seeds, target=spy, holdout=0.0, epochs=5, seed=0)
    xs, ys = seeds, spy.inner.predict(seeds)
    for _ in range(rounds):
        xt = torch.tensor(xs, requires_grad=True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(
                sur.forward(xt).gather(1, torch.tensor(ys)[:, None]).sum(), xt
            )
        new = np.clip(xs + lam * np.sign(g.numpy()), 0.0, 1.0).astype(np.float32)
        xs, ys = np.concatenate([xs, new]), np.concatenate([ys, spy.predict(new)])
        sur, _ = train_surrogate(
            xs, ys, bounds=(0.0, 1.0), num_classes=10, holdout=0.0, epochs=5, seed=0
        )
    return sur


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=20)
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    y = d.target.astype(np.int64)
    perm = np.random.default_rng(0).permutation(len(x))
    x, y = x[perm], y[perm]
    x_tr, y_tr, x_te, y_te = x[:1400], y[:1400], x[1400:], y[1400:]
    torch.manual_seed(0)
    model = TorchClassifier(
        fit(small_cnn((1, 8, 8), 10), x_tr, y_tr, epochs=15, seed=0),
        input_shape=(1, 8, 8),
        num_classes=10,
    )
    t0 = time.time()
    knn = KNNStatefulDetector(k=args.k, window=1000)
    knn.calibrate(x_tr, fpr=0.001)
    prada = PRADADetector(delta=0.95, predict=model.predict)
    out: dict = {"k": args.k, "threshold": knn.threshold, "calibration": knn.calibration}

    rng = np.random.default_rng(1)
    benign = {"knn_min_score": [], "prada_min_w": [], "flagged": 0}
    for c in range(20):
        order = rng.permutation(len(x_te))
        vk = knn.observe(f"b{c}", x_te[order])
        vp = prada.observe(f"b{c}", x_te[order])
        benign["knn_min_score"].append(float(knn.stream_scores(x_te[order])[args.k :].min()))
        benign["prada_min_w"].append(vp.score)
        benign["flagged"] += int(vk.flagged or vp.flagged)
    out["benign"] = {
        "clients": 20,
        "flagged": benign["flagged"],
        "knn_min_score": min(benign["knn_min_score"]),
        "prada_min_w": min(benign["prada_min_w"]),
    }

    attacks = {
        "square-linf-0.1": (SquareAttack(norm="linf", max_queries=1000), 0.1),
        "square-linf-0.2": (SquareAttack(norm="linf", max_queries=1000), 0.2),
        "hopskipjump-l2": (HopSkipJump(norm="l2", max_queries=1000), None),
    }
    rows = {}
    for name, (atk, eps) in attacks.items():
        for det in (knn, prada):
            res = []
            for i in range(args.images):
                spy = Observed(model, det, f"{name}-{det.name}-{i}")
                r = atk(spy, x_te[i : i + 1], y_te[i : i + 1], epsilon=eps)
                v = spy.verdict
                res.append(
                    {
                        "image": i,
                        "success": bool(r.success[0]),
                        "queries": v.queries_seen,
                        "first_detection": v.first_detection,
                    }
                )
            rows[f"{name}/{det.name}"] = res
    seeds = x_tr[np.concatenate([np.where(y_tr == c)[0][:2] for c in range(10)])]
    for det in (prada, knn):
        spy = Observed(model, det, f"jbda-{det.name}")
        jacobian_extraction(spy, seeds, rounds=6)
        v = spy.verdict
        rows[f"jacobian-extraction/{det.name}"] = [
            {"queries": v.queries_seen, "first_detection": v.first_detection, "score": v.score}
        ]
        spy = Observed(model, det, f"natural-{det.name}")
        train_surrogate(x_tr[:1000], target=spy, holdout=0.0, epochs=1)
        v = spy.verdict
        rows[f"natural-extraction/{det.name}"] = [
            {"queries": v.queries_seen, "first_detection": v.first_detection, "score": v.score}
        ]
    out["attacks"] = rows
    out["seconds"] = round(time.time() - t0, 1)
    for key, res in rows.items():
        det_at = [r["first_detection"] for r in res if r["first_detection"] is not None]
        missed = [r for r in res if r["first_detection"] is None]
        print(
            f"{key:40s} detected {len(det_at)}/{len(res)}"
            + (f" at queries {min(det_at)}-{max(det_at)} (median {np.median(det_at):g})"
               if det_at else "")
            + (f"; missed: queries used {[r['queries'] for r in missed]}" if missed else "")
        )  # fmt: skip
    print("benign", out["benign"])
    print("extraction", {k: v for k, v in rows.items() if "extraction" in k})
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
