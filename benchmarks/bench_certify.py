"""Randomized-smoothing certification benchmark (Cohen et al. protocol) on MNIST.

A CNN is trained with Gaussian data augmentation (sigma 0.25, cached in benchmarks/.cache),
then ``SmoothedClassifier.certify`` runs on ``--samples`` test images with n0=100, n=10000,
alpha=0.001, sigma=0.25. Reported: certified accuracy at L2 radii 0..1.5 (the curve), at
radius 0.5 in particular, abstain rate, wall time and throughput (noisy forwards/s).

The default architecture is ``tiny_cnn`` (two stride-2 5x5 convolutions, ~0.25 M multiply-
adds per image): 500 images x 10,100 noise samples are 5 M forward passes, which the
zoo's ``small_cnn`` (~4 M multiply-adds per image) cannot do in 5 minutes on 2 CPU cores.
``--arch small_cnn`` runs the zoo model instead.

Needs /work/shared/datasets/mnist.npz (or --data); skips (exit 0, no JSON) if it is missing::

    python benchmarks/bench_certify.py --samples 500 --threads 2 \\
        --out benchmarks/results/certify_cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_attacks import (  # noqa: E402
    CACHE,
    DEFAULT_DATA,
    config_hash,
    environment,
    result_header,
    sha256_file,
)

SCHEMA = "advguard-bench-certify/1"
TARGET_S = 300.0
RADII = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5]


def build(arch: str):
    from torch import nn

    from advguard.models.zoo import small_cnn

    if arch == "small_cnn":
        return small_cnn((1, 28, 28), 10)
    if arch == "tiny_cnn":
        return nn.Sequential(
            nn.Conv2d(1, 8, 5, stride=2, padding=2),
            nn.ReLU(),
            nn.Conv2d(8, 16, 5, stride=2, padding=2),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(16 * 7 * 7, 64),
            nn.ReLU(),
            nn.Linear(64, 10),
        )
    raise SystemExit(f"unknown --arch {arch!r} (tiny_cnn or small_cnn)")


def load_mnist(path: Path) -> dict[str, Any]:
    d = np.load(path)
    return {
        "name": "mnist",
        "source": str(path),
        "sha256": sha256_file(path),
        "x_train": (d["x_train"].astype(np.float32) / 255.0)[:, None],
        "y_train": d["y_train"].astype(np.int64),
        "x_test": (d["x_test"].astype(np.float32) / 255.0)[:, None],
        "y_test": d["y_test"].astype(np.int64),
    }


def get_model(data: dict[str, Any], arch: str, sigma: float, epochs: int, device: str):
    """Noise-trained model from benchmarks/.cache, trained on first use."""
    import torch
    from safetensors.torch import load_file, save_file

    from advguard.defenses.certify import train_with_noise

    cfg = {
        "arch": arch,
        "data_sha256": data["sha256"],
        "trainer": "advguard.defenses.certify.train_with_noise",
        "sigma": sigma,
        "epochs": epochs,
        "batch_size": 128,
        "lr": 1e-3,
        "seed": 0,
        "init": "torch.manual_seed(seed) before building",
    }
    key = config_hash(cfg)
    CACHE.mkdir(parents=True, exist_ok=True)
    ignore = CACHE / ".gitignore"
    if not ignore.exists():
        ignore.write_text("# benchmark cache (trained weights); never committed\n*\n")
    weights = CACHE / f"certify_{arch}_{key}.safetensors"
    meta_path = weights.with_suffix(".json")
    torch.manual_seed(cfg["seed"])  # initial weights are part of the recipe
    module = build(arch)
    if weights.exists() and meta_path.exists():
        module.load_state_dict(load_file(str(weights)))
        meta = json.loads(meta_path.read_text())
        meta["cached"] = True
        return module.eval(), meta
    t0 = time.perf_counter()
    train_with_noise(
        module,
        data["x_train"],
        data["y_train"],
        sigma,
        epochs=epochs,
        batch_size=cfg["batch_size"],
        lr=cfg["lr"],
        seed=cfg["seed"],
        device=device,
    )
    module = module.cpu().eval()
    state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(weights), metadata={"config_hash": key})
    meta = {"train_config": cfg, "config_hash": key, "train_time_s": time.perf_counter() - t0}
    meta_path.write_text(json.dumps(meta, indent=2))
    meta["cached"] = False
    return module, meta


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--samples", type=int, default=500)
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--n0", type=int, default=100)
    ap.add_argument("--alpha", type=float, default=0.001)
    ap.add_argument("--sigma", type=float, default=0.25)
    ap.add_argument("--arch", default="tiny_cnn", choices=["tiny_cnn", "small_cnn"])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "certify_cpu.json")
    args = ap.parse_args(argv)

    if not args.data.exists():
        print(f"SKIP: {args.data} not found (MNIST is needed for this benchmark)")
        return 0
    import torch

    from advguard.defenses.certify import SmoothedClassifier, certified_accuracy_curve
    from advguard.models import TorchClassifier
    from advguard.stats import proportion

    torch.set_num_threads(args.threads)
    data = load_mnist(args.data)
    module, meta = get_model(data, args.arch, args.sigma, args.epochs, args.device)
    model = TorchClassifier(module, input_shape=(1, 28, 28), num_classes=10, device=args.device)
    base_acc = model.accuracy(data["x_test"], data["y_test"])
    # the first --samples test images, as in Cohen et al.'s scripts (every k-th is also common)
    x, y = data["x_test"][: args.samples], data["y_test"][: args.samples]
    smoothed = SmoothedClassifier(model, args.sigma, batch_size=args.batch_size, seed=args.seed)
    smoothed.certify(x[:1], n0=10, n=args.batch_size)  # warm-up
    t0 = time.perf_counter()
    res = smoothed.certify(x, n0=args.n0, n=args.n, alpha=args.alpha)
    wall = time.perf_counter() - t0
    curve = certified_accuracy_curve(res.labels, res.radii, y, RADII)
    m = len(y)
    forwards = m * (args.n0 + args.n)
    at_05 = proportion(round(float(curve[RADII.index(0.5)]) * m), m)
    result = result_header(SCHEMA, environment(args.device, args.threads))
    result.update(
        {
            "config": {
                "samples": m,
                "n0": args.n0,
                "n": args.n,
                "alpha": args.alpha,
                "sigma": args.sigma,
                "arch": args.arch,
                "batch_size": args.batch_size,
                "seed": args.seed,
                "data": data["source"],
                "data_sha256": data["sha256"],
            },
            "model": {**meta, "base_test_accuracy": base_acc},
            "certified_accuracy": {f"{r:g}": float(c) for r, c in zip(RADII, curve, strict=True)},
            "certified_accuracy_at_0.5": at_05.model_dump(),
            "abstain_rate": float((res.labels == -1).mean()),
            "median_radius_correct": float(np.median(res.radii[res.labels == y]))
            if (res.labels == y).any()
            else None,
            "wall_s": round(wall, 2),
            "per_sample_s": round(wall / m, 4),
            "noisy_forwards_per_s": round(forwards / wall, 1),
            "extrapolated_wall_s_500": round(wall / m * 500, 1),
            "target": f"500 samples in < {TARGET_S:.0f} s on 2 cores",
            "target_met_extrapolated": wall / m * 500 < TARGET_S,
        }
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"{args.arch} (noise-trained, sigma {args.sigma}): base test accuracy {base_acc:.2%}; "
        f"{m} samples certified with n0={args.n0}, n={args.n}, alpha={args.alpha}"
    )
    pts = zip(RADII, curve, strict=True)
    print("certified accuracy: " + ", ".join(f"r={r:g}: {c:.1%}" for r, c in pts))
    print(f"at radius 0.5: {at_05}; abstain rate {result['abstain_rate']:.1%}")
    print(
        f"wall {wall:.1f} s ({wall / m:.3f} s/sample, {forwards / wall:,.0f} forwards/s); "
        f"500 samples extrapolated: {wall / m * 500:.0f} s (target < {TARGET_S:.0f} s)"
    )
    print(f"JSON: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
