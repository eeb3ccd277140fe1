"""What each guard defense costs a model-extraction attacker.

The setting of tests/test_extraction.py: the target is the zoo MLP trained 30 epochs on 700
digits; the attacker owns an unlabelled pool (the other 797 digits plus shifted, noisy and
blended copies: 3188 inputs) and Jacobian seeds (2 per class, from the pool's digits); the
stolen model is scored on 300 held-out digits (fidelity: agreement with the target;
accuracy: with the true labels). The target sits behind a real guard (uvicorn on 127.0.0.1,
SQLite store, one API key) and the attacker talks to it with HttpClassifier, budget 5000
queries, under each defense:

* ``none``: probabilities answered, no budget, no detector;
* ``budget``: the guard's query budget (``limits.budget``, default here 1000 rows per day);
* ``label-only``: output hardening ``output.mode: label`` (only the top-1 label);
* ``prada``: the PRADA detector (Juuti et al. 2019, delta 0.95) set to block;
* ``all``: the three together.

When the guard refuses (429 budget-exhausted, 403 client-blocked) the attacker trains its
student on every answer it got, as a real attacker would.

    python benchmarks/bench_extraction_guard.py --out benchmarks/results/extraction_guard.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.datasets import load_digits

from advguard.attacks.extraction import EvalSet, jacobian_augmentation, knockoff, train_student
from advguard.attacks.extraction.common import as_classifier, build_student
from advguard.guard.app import CatchAll, create_app
from advguard.guard.auth import create_key
from advguard.guard.config import GuardConfig
from advguard.guard.drill import LocalGuardServer, client
from advguard.guard.pipeline import Guard, StatefulSlot
from advguard.guard.serving import ServedModel
from advguard.guard.stateful import PRADADetector
from advguard.guard.storage import GuardStore
from advguard.models import TorchClassifier
from advguard.models.base import ClassifierBase
from advguard.models.fit import fit
from advguard.models.http_model import EndpointError
from advguard.models.zoo import mlp

SHAPE = (1, 8, 8)
DEFENSES = ("none", "budget", "label-only", "prada", "all")


class Recording(ClassifierBase):
    """The attacker's view of the API: every answered batch is kept (inputs and scores)."""

    def __init__(self, inner):
        super().__init__(
            num_classes=inner.num_classes, input_shape=inner.input_shape, bounds=inner.bounds
        )
        self.inner, self.queries = inner, inner.queries
        self.xs, self.zs = [], []

    def logits(self, x):
        """One request per chunk, each answer kept as it arrives: after a refusal the
        attacker still has every chunk answered before it."""
        out = []
        for i in range(0, len(x), self.inner.batch_size):
            z = self.inner.logits(x[i : i + self.inner.batch_size])
            self.xs.append(x[i : i + self.inner.batch_size].detach().cpu().numpy())
            self.zs.append(z.detach().cpu().numpy())
            out.append(z)
        return torch.cat(out) if out else self.inner.logits(x)


def setup():
    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    y = d.target.astype(np.int64)
    perm = np.random.default_rng(0).permutation(len(x))
    x, y = x[perm], y[perm]
    tx, ty, ex, ey, base, by = x[:700], y[:700], x[700:1000], y[700:1000], x[1000:], y[1000:]
    rng = np.random.default_rng(1)
    shifted = np.roll(base, 1, axis=3)
    noisy = np.clip(base + rng.normal(0, 0.15, base.shape), 0, 1).astype(np.float32)
    lam = rng.uniform(0.3, 0.7, (len(base), 1, 1, 1)).astype(np.float32)
    mixed = lam * base + (1 - lam) * base[rng.permutation(len(base))]
    pool = np.concatenate([base, shifted, noisy, mixed])
    seeds = base[np.concatenate([np.flatnonzero(by == c)[:2] for c in range(10)])]
    torch.manual_seed(0)
    target = TorchClassifier(
        fit(mlp(SHAPE, 10), tx, ty, epochs=30, seed=0), input_shape=SHAPE, num_classes=10
    )
    return target, pool, seeds, EvalSet.from_target(target, ex, ey)


def guard_for(defense: str, target, tmp: Path, budget: int) -> Guard:
    cfg: dict[str, Any] = {
        "limits": {"rate": 100_000.0, "burst": 100_000, "budget": None},
        "edge": {"max_batch": 1024, "max_body_bytes": 64 * 1024 * 1024},
    }
    if defense in ("budget", "all"):
        cfg["limits"]["budget"] = budget
    if defense in ("label-only", "all"):
        cfg["output"] = {"mode": "label"}
    config = GuardConfig.model_validate(cfg)
    stateful = []
    if defense in ("prada", "all"):
        prada = PRADADetector(delta=0.95, min_queries=100, predict=target.predict)
        stateful.append(StatefulSlot("prada", prada, "block"))
    store = GuardStore(f"sqlite:///{tmp / f'{defense}.db'}")
    return Guard(config, store=store, model=ServedModel("model", "t:1", target), stateful=stateful)


def final_student(rec: Recording, mode: str, ev: EvalSet, epochs: int) -> dict[str, Any]:
    """Train on every answer the attacker got (what it has after a refusal)."""
    x = np.concatenate(rec.xs)
    p = np.exp(np.concatenate(rec.zs))
    p = p / p.sum(1, keepdims=True)
    soft = np.eye(10, dtype=np.float32)[p.argmax(1)] if mode == "labels" else p
    module = build_student("mlp", SHAPE, 10, 0)
    train_student(module, x, soft, epochs=epochs, seed=0)
    return {"queries": len(x), **ev.measure(as_classifier(module, rec))}


def run_one(defense, method, target, pool, seeds, ev, tmp, args) -> dict[str, Any]:
    guard = guard_for(defense, target, tmp, args.guard_budget)
    key = create_key(guard.store, f"{defense}-{method}").key
    label_only = defense in ("label-only", "all")
    mode = "labels" if (label_only or method == "jacobian") else "probabilities"
    out: dict[str, Any] = {"defense": defense, "method": method, "mode": mode}
    with LocalGuardServer(CatchAll(create_app(guard))) as srv:
        http = client(f"{srv.url}/v1/models/model/predict", key, target,
                      output="labels" if label_only else "probabilities")  # fmt: skip
        rec = Recording(http)
        kw = dict(budget=args.budget, mode=mode, eval_set=ev, epochs=args.epochs, seed=0)
        try:
            if method == "knockoff":
                res = knockoff(rec, pool, n_checkpoints=5, **kw)
            else:
                res = jacobian_augmentation(rec, seeds, max_rounds=10, **kw)
            out.update(curve=res.curve, final={"queries": res.queries_used, **res.final})
            out["refused"] = None
        except EndpointError as e:
            slug = "client-blocked" if "client-blocked" in str(e) else "budget-exhausted"
            out["refused"] = {"status": e.status, "problem": slug}
            out["final"] = final_student(rec, mode, ev, args.epochs)
    guard.close()
    out["queries_answered"] = http.samples_answered
    f = out["final"]
    out["fidelity"] = f["fidelity"]["value"]
    out["accuracy"] = f["accuracy"]["value"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=int, default=5000, help="the attacker's query budget")
    ap.add_argument("--guard-budget", type=int, default=1000, help="limits.budget rows/day")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    import tempfile

    t0 = time.time()
    target, pool, seeds, ev = setup()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in ("knockoff", "jacobian"):
            for defense in DEFENSES:
                r = run_one(defense, method, target, pool, seeds, ev, Path(tmp), args)
                rows.append(r)
                print(
                    f"{method:9s} {defense:11s} answered {r['queries_answered']:5d} "
                    f"refused {r['refused']} fidelity {r['fidelity']:.3f} "
                    f"accuracy {r['accuracy']:.3f}",
                    flush=True,
                )
    out = {
        "setting": {
            "target": "zoo MLP, 30 epochs on 700 digits",
            "target_accuracy": float((target.predict(ev.x) == ev.y).mean()),
            "pool": len(pool),
            "seeds": len(seeds),
            "eval": len(ev.x),
            "attacker_budget": args.budget,
            "guard_budget": args.guard_budget,
            "student": f"zoo MLP, {args.epochs} epochs",
        },
        "results": rows,
        "seconds": round(time.time() - t0, 1),
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
