"""One trial of a sweep: train, save the model file, evaluate it from the file, return numbers.

:func:`run_trial` is the same function on every backend. It gets plain data (a trial's
``config`` from :meth:`~advguard.defenses.sweep.spec.SweepSpec.trials`) and returns plain
data; the trained model travels as a file (``model.safetensors`` + ``manifest.json`` in the
trial's folder, with its SHA-256), never as a pickled object. The evaluation loads that file
back, so the numbers are those of the artifact a user would ship.

Every trial trains from the same seed (initial weights, held-out split, batch order) with
``threads`` torch threads, so its numbers depend on its parameters only: the local and the
Ray Tune backend give the same results for the same spec. The evaluation data is the
training run's held-out split (:func:`~advguard.defenses.training.holdout_split`), never
the examples the model trained on.
"""

from __future__ import annotations

import hashlib
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from advguard.errors import InputError

Clock = Callable[[], float]


def run_trial(
    config: dict[str, Any], trial_dir: str | Path, clock: Clock | None = None
) -> dict[str, Any]:
    """Train and evaluate one trial; a failure is returned as ``status: "error"`` with a
    one-line ``error`` (never raised), so one bad combination does not stop a sweep."""
    clock = clock or time.perf_counter
    threads = torch.get_num_threads()
    torch.set_num_threads(int(config.get("threads", 1)))
    try:
        return {
            "status": "ok",
            "error": None,
            **_train_and_evaluate(config, Path(trial_dir), clock),
        }
    except Exception as e:  # a trial's failure is data, recorded in sweep.json
        last = traceback.extract_tb(e.__traceback__)[-1:] if e.__traceback__ else []
        where = f" (at {Path(last[0].filename).name}:{last[0].lineno})" if last else ""
        msg = " ".join(str(e).split())[:300]
        return {"status": "error", "error": f"{type(e).__name__}: {msg}{where}"}
    finally:
        torch.set_num_threads(threads)


def weights_sha256(path: str | Path) -> str:
    """SHA-256 of a safetensors file's tensors (names, dtypes, shapes and bytes, in name
    order): equal for equal weights. The file's own hash is not: safetensors writes its
    metadata in a per-process hash-map order."""
    from safetensors import safe_open

    h = hashlib.sha256()
    with safe_open(str(path), "pt") as f:
        for name in sorted(f.keys()):
            t = f.get_tensor(name).contiguous()
            h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _train_and_evaluate(config: dict[str, Any], out: Path, clock: Clock) -> dict[str, Any]:
    from advguard.data import load_dataset
    from advguard.defenses.training import adversarial_train, holdout_split, load_trainable
    from advguard.evaluate.job import data_info
    from advguard.evaluate.runner import evaluate
    from advguard.evaluate.threat_model import ThreatModel
    from advguard.models.io import file_sha256, load_model

    ds = load_dataset(config["data"])
    if ds.modality == "text":
        raise InputError(f"{ds.name} is text data; sweeps train torch models on images/tables")
    seed, train_args = int(config["seed"]), dict(config["train"])
    torch.manual_seed(seed)  # the initial weights: the same for every trial
    module, factory, factory_kwargs = load_trainable(
        config["arch"], input_shape=tuple(ds.x.shape[1:]), num_classes=ds.num_classes
    )
    t0 = clock()
    res = adversarial_train(
        module, ds.x, ds.y, method=config["defense"], bounds=ds.bounds, seed=seed,
        factory=factory, factory_kwargs=factory_kwargs, device=config.get("device"),
        out_dir=out, **train_args,
    )  # fmt: skip
    train_s = clock() - t0
    if res.checkpoint_path is None:  # pragma: no cover - out_dir is always given
        raise InputError("training wrote no model file")
    _, val_idx = holdout_split(len(ds.x), train_args.get("val_fraction", 0.1), seed)
    tm = ThreatModel.model_validate(config["threat_model"])
    model = load_model(res.checkpoint_path, device=config.get("device") or "cpu")
    sha = file_sha256(res.checkpoint_path)
    t1 = clock()
    report = evaluate(
        model, ds.x[val_idx], ds.y[val_idx], tm,
        model_info={"path": str(res.checkpoint_path), "sha256": sha},
        data_info={**data_info(ds), "split": "held-out split of the training run"},
        clock=clock,
    )  # fmt: skip
    eval_s = clock() - t1
    report.write(out)
    man = res.manifest
    return {
        "clean_accuracy": report.clean_accuracy.value,
        "robust_accuracy": [
            {"epsilon": r.epsilon, "value": r.robust_accuracy.value, "n": r.robust_accuracy.n}
            for r in report.results
        ],
        "n_evaluated": int(report.clean_accuracy.n),
        "trustworthy": bool(report.trustworthy),
        "best_epoch": man.get("best_epoch"),
        "stop_reason": man.get("stop_reason"),
        "train_time_s": train_s,
        "eval_time_s": eval_s,
        "model": {
            "path": res.checkpoint_path.name,
            "sha256": sha,
            "weights_sha256": weights_sha256(res.checkpoint_path),
        },
    }
