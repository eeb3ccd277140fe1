"""The adversarially trained MNIST CNN the AutoAttack benchmark evaluates, cached by config.

Trained with advguard's own PGD-AT (:func:`advguard.defenses.training.adversarial_train`),
as ``bench_adv_training.py`` does, but sized to train in about 10-15 minutes on one CPU
thread. Weights are cached in ``benchmarks/.cache`` (gitignored) under the hash of the
training configuration, so later runs load them in milliseconds.

    PYTHONPATH=src python benchmarks/robust_model.py --data ../shared/datasets/mnist.npz
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

import bench_attacks as common  # noqa: E402

ROBUST_CONFIG: dict[str, Any] = {
    "arch": "small_cnn",
    "method": "pgd-at",
    "epsilon": 0.3,
    "epochs": 5,
    "ramp_epochs": 1,
    "n_train": 60000,
    "steps": 7,
    "step_size": 0.1,
    "batch_size": 100,
    "lr": 1e-3,
    "lr_schedule": "cosine",
    "seed": 0,
    "minutes": 15.0,
}


def robust_model(
    data: dict[str, Any], cfg: dict[str, Any] | None = None, threads: int = 1
) -> dict[str, Any]:
    """Train (or load from the cache) the PGD-AT model; return its metadata with ``weights``."""
    import torch
    from safetensors.torch import save_file

    from advguard.defenses.training import adversarial_train
    from advguard.models import zoo

    cfg = dict(ROBUST_CONFIG if cfg is None else cfg)
    key = common.config_hash({**cfg, "data_sha256": data["sha256"]})
    common.CACHE.mkdir(parents=True, exist_ok=True)
    ignore = common.CACHE / ".gitignore"
    if not ignore.exists():
        ignore.write_text("# benchmark cache (trained weights); never committed\n*\n")
    weights = common.CACHE / f"pgdat_{cfg['arch']}_{data['name']}_{key}.safetensors"
    meta_path = weights.with_suffix(".json")
    if weights.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        return {**meta, "cached": True, "weights": str(weights)}

    torch.set_num_threads(threads)
    torch.manual_seed(cfg["seed"])
    module = getattr(zoo, cfg["arch"])((1, 28, 28), 10)
    x, y = data["x_train"][: cfg["n_train"]], data["y_train"][: cfg["n_train"]]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        res = adversarial_train(
            module, x, y, method=cfg["method"], epsilon=cfg["epsilon"], epochs=cfg["epochs"],
            ramp_epochs=cfg["ramp_epochs"], steps=cfg["steps"], step_size=cfg["step_size"],
            batch_size=cfg["batch_size"], lr=cfg["lr"], lr_schedule=cfg["lr_schedule"],
            val_fraction=1000 / len(x), val_samples=500, eval_steps=20, seed=cfg["seed"],
            max_time_s=cfg["minutes"] * 60.0, out_dir=tmp,
            progress=lambda s, d, t: print(f"  {s} {d}/{t}", flush=True) if s == "epoch" else None,
        )  # fmt: skip
    train_s = time.perf_counter() - t0
    trained = res.module.cpu().eval()
    state = {k: v.detach().cpu().contiguous() for k, v in trained.state_dict().items()}
    save_file(state, str(weights), metadata={"config_hash": key})
    meta = {
        "train_config": cfg,
        "config_hash": key,
        "trainer": "advguard.defenses.training.adversarial_train",
        "train_time_s": round(train_s, 1),
        "train_threads": threads,
        "epochs_run": len(res.manifest["epochs"]),
        "stop_reason": res.manifest["stop_reason"],
    }
    meta_path.write_text(json.dumps(meta, indent=2))
    return {**meta, "cached": False, "weights": str(weights)}


def load_robust(weights: str, arch: str, device: str = "cpu") -> Any:
    from safetensors.torch import load_file

    from advguard.models import zoo

    module = getattr(zoo, arch)((1, 28, 28), 10)
    module.load_state_dict(load_file(weights))
    module = module.to(device).eval()
    module.requires_grad_(False)
    return module


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=common.DEFAULT_DATA)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    meta = robust_model(common.load_data(a.data), threads=a.threads)
    print(json.dumps(meta, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
