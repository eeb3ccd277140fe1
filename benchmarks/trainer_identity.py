"""Bit-identity check for refactors of the trainers (adversarial_train, dp_train) on digits.

Trains PGD-AT (plain, with a clean-loss mix and SGD + cyclic schedule), TRADES, fast-AT
(with in-epoch catastrophic-overfitting probes) for 2 epochs, an interrupted-and-resumed
PGD-AT run, and DP-SGD for 1 epoch, all with ``small_cnn``/``mlp`` and fixed seeds, and
saves the final weights, the histories and the manifests (timings, versions, checkpoint
file hashes and the config's ``device`` removed)::

    git checkout OLD && python benchmarks/trainer_identity.py before.pt
    git checkout NEW && python benchmarks/trainer_identity.py after.pt
    python benchmarks/trainer_identity.py --diff before.pt after.pt

(The trainer decomposition into TrainConfig/Trainer/strategies/resume: 111 of 111 outputs
bit-identical; about 30 s on one CPU thread.)
(The split of every function over 80 lines into helpers, issue 12: 111 of 111 bit-identical.)
"""

import contextlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from sklearn.datasets import load_digits

from advguard.defenses.training import adversarial_train
from advguard.models.zoo import mlp, small_cnn

TIME_KEYS = {"time_s", "total_time_s", "versions"}


def _strip(obj: Any) -> Any:
    """The manifest without wall-clock times and library versions."""
    if isinstance(obj, dict):
        if "sha256" in obj and "path" in obj:  # the checkpoint's file hash covers its timestamp
            return {"path": obj["path"]}
        # the training device (added to TrainConfig by the refactor) is not a result
        drop = TIME_KEYS | ({"device"} if "epsilon" in obj else set())
        return {k: _strip(v) for k, v in obj.items() if k not in drop}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def _diff(a_path: str, b_path: str) -> int:
    a, b = torch.load(a_path), torch.load(b_path)
    ta, tb = a["tensors"], b["tensors"]
    bad = [
        k for k in ta if k not in tb or ta[k].shape != tb[k].shape or not torch.equal(ta[k], tb[k])
    ]
    ja, jb = a["json"], b["json"]
    bad += [k for k in ja if jb.get(k) != ja[k]]
    n = len(ta) + len(ja)
    print(f"{n} outputs compared; {n - len(bad)} bit-identical; differing: {bad}")
    return 1 if bad else 0


def main(out_path: str) -> None:
    torch.set_num_threads(1)
    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    y = d.target.astype(np.int64)
    perm = np.random.default_rng(0).permutation(len(x))
    x, y = x[perm][:600], y[perm][:600]
    tensors: dict[str, torch.Tensor] = {}
    docs: dict[str, Any] = {}

    def record(name: str, res: Any) -> None:
        for k, v in res.module.state_dict().items():
            tensors[f"{name}.{k}"] = v.detach().clone()
        docs[f"{name}.history"] = json.dumps(_strip(res.history), sort_keys=True)
        docs[f"{name}.manifest"] = json.dumps(_strip(res.manifest), sort_keys=True, default=str)
        if res.checkpoint_path is not None:  # the saved (best) weights, not the file's hash
            for k, v in load_file(str(res.checkpoint_path)).items():
                tensors[f"{name}.file.{k}"] = v
        if res.manifest_path is not None:
            on_disk = json.loads(Path(res.manifest_path).read_text())
            docs[f"{name}.manifest_file"] = json.dumps(_strip(on_disk), sort_keys=True)

    common = {"epsilon": 0.1, "epochs": 2, "batch_size": 64, "steps": 3, "eval_steps": 3}
    runs: dict[str, dict[str, Any]] = {
        "pgd-at": {"method": "pgd-at"},
        "pgd-at-mix-sgd": {
            "method": "pgd-at",
            "mix": 0.5,
            "optimizer": "sgd",
            "lr": 0.05,
            "lr_schedule": "cyclic",
            "weight_decay": 1e-4,
            "norm": "l2",
            "epsilon": 0.5,
        },
        "trades": {"method": "trades", "beta": 3.0, "lr_schedule": "cosine"},
        "fast-at": {"method": "fast-at", "co_check_every": 3, "co_batch": 32, "ramp_epochs": 1},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name, kw in runs.items():
            torch.manual_seed(0)
            module = small_cnn((1, 8, 8), 10)
            kwargs = {**common, **kw}
            res = adversarial_train(module, x, y, seed=1, out_dir=Path(tmp) / name, **kwargs)
            record(name, res)

        # crashed in epoch 2 (after the epoch-1 state was saved), then resumed
        class Crash(Exception):
            pass

        def crash(stage: str, done: int, total: int) -> None:
            if stage == "train" and done == 11:  # 9 batches per epoch: batch 2 of epoch 2
                raise Crash

        out = Path(tmp) / "resumed"
        torch.manual_seed(0)
        with contextlib.suppress(Crash):
            adversarial_train(
                small_cnn((1, 8, 8), 10), x, y, seed=1, out_dir=out, progress=crash, **common
            )
        docs["resume.state"] = json.dumps(
            _strip(json.loads((out / "resume-state.json").read_text())), sort_keys=True
        )
        torch.manual_seed(5)
        res = adversarial_train(
            small_cnn((1, 8, 8), 10), x, y, seed=1, out_dir=out, resume=True, **common
        )
        record("resumed", res)
        try:
            from advguard.defenses.training import dp_train

            torch.manual_seed(0)
            res = dp_train(
                mlp((1, 8, 8), 10), x, y, epochs=1, batch_size=64, noise_multiplier=1.0,
                seed=2, out_dir=Path(tmp) / "dp",
            )  # fmt: skip
            record("dp-sgd", res)
        except ImportError:  # pragma: no cover - opacus missing
            print("opacus missing: dp_train not compared")
    torch.save({"tensors": tensors, "json": docs}, out_path)
    print(f"{len(tensors)} tensors and {len(docs)} documents saved to {out_path}")


if __name__ == "__main__":
    if sys.argv[1] == "--diff":
        sys.exit(_diff(sys.argv[2], sys.argv[3]))
    main(sys.argv[1])
