"""When the k-NN stateful detector flags Square if the attacker interleaves many images.

bench_stateful.py attacks one image per stream. Here Square (Linf 0.1, up to 1000 queries
per image) attacks a batch of B test images at once for one client, so each query batch holds
one query per image: an image's own earlier queries are spread over B times as many rows.
The setting is otherwise that of bench_stateful.py (CNN on 1400 digits, k = 50, window 1000,
calibrated on those 1400 images at a per-query FPR of 0.001).

    python benchmarks/bench_stateful_interleave.py --out benchmarks/results/stateful_interleave.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits

from advguard.attacks import SquareAttack
from advguard.guard.stateful import KNNStatefulDetector
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    y = d.target.astype(np.int64)
    perm = np.random.default_rng(0).permutation(len(x))
    x, y = x[perm], y[perm]
    torch.manual_seed(0)
    model = TorchClassifier(
        fit(small_cnn((1, 8, 8), 10), x[:1400], y[:1400], epochs=15, seed=0),
        input_shape=(1, 8, 8),
        num_classes=10,
    )
    knn = KNNStatefulDetector(k=50, window=1000)
    knn.calibrate(x[:1400], fpr=0.001)
    rows = []
    for b in (int(t) for t in args.batches.split(",")):
        spy = Observed(model, knn, f"batch-{b}")
        r = SquareAttack(norm="linf", max_queries=1000)(
            spy, x[1400 : 1400 + b], y[1400 : 1400 + b], epsilon=0.1
        )
        v = spy.verdict
        row = {
            "images_interleaved": b,
            "first_detection": v.first_detection,
            "queries_sent": v.queries_seen,
            "evasions": int(r.success.sum()),
        }
        rows.append(row)
        print(row, flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"threshold": knn.threshold, "runs": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
