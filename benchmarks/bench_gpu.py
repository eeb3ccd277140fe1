"""GPU benchmark: advguard against torchattacks on one CUDA device, in the same run.

Workloads, each on two models (MNIST ``small_cnn`` 1x28x28, and a CIFAR-10-size VGG-style
CNN on 3x32x32 inputs):

* ``pgd`` -- Linf PGD with a random start (MNIST: eps 0.3, 40 steps of 0.01; CIFAR-size:
  eps 8/255, 10 steps of 2/255). Implementations: ``plain`` (a hand-written loop, the
  floor), ``advguard`` (``advguard.attacks.evasion.pgd.PGD``), ``torchattacks.PGD``.
* ``linf-standard`` -- advguard's preset (APGD-CE, APGD-T on 9 target classes, Square with
  5000 queries on the survivors) through ``advguard.evaluate.evaluate``, against
  torchattacks' ``MultiAttack([APGD(ce), APGDT(n_classes=10), Square(n_queries=5000)])``,
  the same cascade, on the same samples at one epsilon.
* ``adv-training`` -- PGD adversarial training (10 steps of 2.5 eps / 10, Adam 1e-3,
  batch 128, no warm-up) with ``advguard.defenses.training.adversarial_train`` against a
  hand-written loop whose inner attack is ``torchattacks.PGD``; both from the same
  initial weights, then robust accuracy under advguard PGD-20 on held-out samples.

CIFAR-10 is not in ../shared/datasets, so the CIFAR-size model trains on synthetic 3x32x32
data (10 classes: smooth random class prototypes plus noise, in [0, 1]); its accuracies say
nothing about CIFAR-10, its timings are those of a CIFAR-10-size workload.

Precision: full float32. cuDNN runs deterministic algorithms without autotuning and TF32
is off (``advguard.models.devices.configure_determinism``), for advguard and torchattacks
alike; mixed precision is never used. Times are wall clock after ``torch.cuda.synchronize``,
the best of ``--repeats`` timed passes after one untimed warm-up batch (the long
``linf-standard`` and training workloads run once).

The script refuses to run without CUDA (exit 2). ``--cpu-smoke`` runs every code path with
tiny sizes on the CPU to check the script itself; its JSON is marked ``"smoke": true`` and
is not a result. Set-up: ``bash benchmarks/setup_env.sh`` (torchattacks), then::

    .bench-venv/bin/python benchmarks/bench_gpu.py --out benchmarks/results/gpu_h200.json
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DATA_CANDIDATES = (
    REPO.parent / "shared" / "datasets" / "mnist.npz",
    REPO / "shared" / "datasets" / "mnist.npz",
)
SCHEMA = "advguard-bench-gpu/1"

# (eps, steps, step size) of the PGD workload per model
PGD_SETTINGS = {"mnist": (0.3, 40, 0.01), "cifar-size": (8 / 255, 10, 2 / 255)}
SQUARE_QUERIES = 5000


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- data and models ------------------------------------------------------------------------
def load_mnist(path: Path | None, n_train: int, n_test: int) -> dict[str, Any]:
    """MNIST (Keras-style npz) from ``path`` or ../shared/datasets; exit 2 when missing."""
    candidates = [path] if path is not None else list(DATA_CANDIDATES)
    for p in candidates:
        if p is not None and p.is_file():
            d = np.load(p)
            return {
                "name": "mnist",
                "source": str(p),
                "x_train": (d["x_train"][:n_train].astype(np.float32) / 255.0)[:, None],
                "y_train": d["y_train"][:n_train].astype(np.int64),
                "x_test": (d["x_test"][:n_test].astype(np.float32) / 255.0)[:, None],
                "y_test": d["y_test"][:n_test].astype(np.int64),
            }
    sys.exit(f"error: MNIST not found at {', '.join(map(str, candidates))}; pass --data")


def synthetic_cifar(n_train: int, n_test: int, seed: int = 0) -> dict[str, Any]:
    """10 classes of 3x32x32 images: a smooth random prototype per class plus pixel noise."""
    import torch

    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.random((10, 3, 4, 4), dtype=np.float32))
    protos = torch.nn.functional.interpolate(coarse, size=(32, 32), mode="bilinear").numpy()

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, 10, n)
        x = 0.5 * protos[y] + 0.5 * rng.random((n, 3, 32, 32), dtype=np.float32)
        return np.clip(x, 0.0, 1.0).astype(np.float32), y.astype(np.int64)

    (xtr, ytr), (xte, yte) = draw(n_train), draw(n_test)
    src = f"synthetic (seed {seed}; CIFAR-10 is not available)"
    return {"name": "cifar-size", "source": src, "x_train": xtr, "y_train": ytr,
            "x_test": xte, "y_test": yte}  # fmt: skip


def cifar_cnn() -> Any:
    """A VGG-style CNN for 3x32x32 inputs (64-64-128-128-256, about 1.4M parameters)."""
    from torch import nn

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU()]

    return nn.Sequential(
        *block(3, 64), *block(64, 64), nn.MaxPool2d(2),
        *block(64, 128), *block(128, 128), nn.MaxPool2d(2),
        *block(128, 256), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(256 * 4 * 4, 256), nn.ReLU(), nn.Linear(256, 10),
    )  # fmt: skip


def build_module(name: str) -> Any:
    from advguard.models.zoo import small_cnn

    return small_cnn((1, 28, 28), 10) if name == "mnist" else cifar_cnn()


def train_clean(data: dict[str, Any], epochs: int, device: Any) -> tuple[Any, float]:
    """The benchmark model: advguard's ``fit`` on ``device``; returns (module, seconds)."""
    import torch

    from advguard.models.fit import fit

    torch.manual_seed(0)
    module = build_module(data["name"])
    t0 = time.perf_counter()
    fit(module, data["x_train"], data["y_train"], epochs=epochs, batch_size=128, seed=0,
        device=device)  # fmt: skip
    _sync(device)
    return module.eval().requires_grad_(False), time.perf_counter() - t0


# -- timing and scoring ---------------------------------------------------------------------
def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def accuracy(module: Any, x: Any, y: Any, chunk: int = 1000) -> float:
    import torch

    with torch.no_grad():
        pred = torch.cat([module(x[i : i + chunk]).argmax(1) for i in range(0, len(x), chunk)])
    return float((pred == y).float().mean())


def time_batched(run: Callable[[Any, Any], Any], x: Any, y: Any, bs: int, repeats: int,
                 device: Any) -> tuple[float, Any]:  # fmt: skip
    """Best wall time of ``repeats`` passes of ``run`` over ``(x, y)`` in batches of ``bs``
    (after one untimed warm-up batch); returns (seconds, adversarial inputs of the last)."""
    import torch

    run(x[:bs], y[:bs])
    _sync(device)
    best, adv = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        adv = torch.cat([run(x[i : i + bs], y[i : i + bs]).detach() for i in range(0, len(x), bs)])
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best, adv


def row(workload: str, model: str, impl: str, seconds: float, n: int, **extra: Any) -> dict:
    out = {"workload": workload, "model": model, "impl": impl, "seconds": round(seconds, 4),
           "samples_per_s": round(n / seconds, 1) if seconds > 0 else None, "n": n}  # fmt: skip
    out.update(extra)
    _log(f"  {workload:13s} {model:10s} {impl:12s} {seconds:8.3f} s  {extra}")
    return out


# -- workloads ------------------------------------------------------------------------------
def plain_pgd(module: Any, x: Any, y: Any, eps: float, alpha: float, steps: int) -> Any:
    import torch

    delta = (torch.rand_like(x) * 2 - 1) * eps
    xa = (x + delta).clamp(0, 1)
    for _ in range(steps):
        xa.requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(module(xa), y)
        (g,) = torch.autograd.grad(loss, xa)
        xa = (torch.min(torch.max(xa.detach() + alpha * g.sign(), x - eps), x + eps)).clamp(0, 1)
    return xa.detach()


def bench_pgd(name: str, module: Any, x: Any, y: Any, a: argparse.Namespace, device: Any) -> list:
    import torchattacks

    from advguard.attacks.evasion.pgd import PGD
    from advguard.models.torch_model import TorchClassifier

    eps, steps, alpha = PGD_SETTINGS[name]
    steps = min(steps, a.max_steps)
    clf = TorchClassifier(module, input_shape=tuple(x.shape[1:]), num_classes=10, device=device)
    ours = PGD(norm="linf", steps=steps, step_size=alpha, random_start=True, seed=0)
    theirs = torchattacks.PGD(module, eps=eps, alpha=alpha, steps=steps, random_start=True)
    impls = {
        "plain": lambda xb, yb: plain_pgd(module, xb, yb, eps, alpha, steps),
        "advguard": lambda xb, yb: ours(clf, xb, yb, epsilon=eps).x_adv,
        "torchattacks": lambda xb, yb: theirs(xb, yb),
    }
    rows = []
    for impl, run in impls.items():
        s, adv = time_batched(run, x, y, a.batch_size, a.repeats, device)
        linf = float((adv - x).abs().max())
        rows.append(row("pgd", name, impl, s, len(x), eps=eps, steps=steps,
                        robust_accuracy=accuracy(module, adv, y), max_linf=linf))  # fmt: skip
    return rows


def bench_linf_standard(name: str, module: Any, x: Any, y: Any, a: argparse.Namespace,
                        device: Any) -> list:  # fmt: skip
    import torchattacks

    from advguard.evaluate import evaluate, load_threat_model
    from advguard.models.torch_model import TorchClassifier

    eps = PGD_SETTINGS[name][0]
    steps, queries = min(100, a.max_steps), min(SQUARE_QUERIES, a.max_queries)
    clf = TorchClassifier(module, input_shape=tuple(x.shape[1:]), num_classes=10, device=device)
    tm = load_threat_model("linf-standard").with_overrides(
        epsilons=[eps], samples=len(x), batch_size=a.batch_size, seed=0, sanity_checks=False,
        attacks=[{"attack": "apgd-ce", "steps": steps, "restarts": 1},
                 {"attack": "apgd-t", "steps": steps, "n_target_classes": 9},
                 {"attack": "square", "max_queries": queries}],
    )  # fmt: skip
    _sync(device)
    t0 = time.perf_counter()
    rep = evaluate(clf, x.cpu().numpy(), y.cpu().numpy(), tm)
    _sync(device)
    ours_s = time.perf_counter() - t0
    res = rep.result_at(eps)
    assert res is not None
    ta = torchattacks.MultiAttack([
        torchattacks.APGD(module, norm="Linf", eps=eps, steps=steps, n_restarts=1, loss="ce"),
        torchattacks.APGDT(module, norm="Linf", eps=eps, steps=steps, n_restarts=1, n_classes=10),
        torchattacks.Square(module, norm="Linf", eps=eps, n_queries=queries, n_restarts=1),
    ])  # fmt: skip
    s, adv = time_batched(lambda xb, yb: ta(xb, yb), x, y, a.batch_size, 1, device)
    return [
        row("linf-standard", name, "advguard", ours_s, len(x), eps=eps, sanity_checks=False,
            robust_accuracy=res.robust_accuracy.value,
            clean_accuracy=rep.clean_accuracy.value),
        row("linf-standard", name, "torchattacks", s, len(x), eps=eps,
            robust_accuracy=accuracy(module, adv, y), max_linf=float((adv - x).abs().max())),
    ]  # fmt: skip


def _torchattacks_at(module: Any, data: dict[str, Any], eps: float, a: argparse.Namespace,
                     device: Any) -> None:  # fmt: skip
    import torch
    import torchattacks

    x = torch.from_numpy(data["x_train"])
    y = torch.from_numpy(data["y_train"])
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(module.parameters(), lr=1e-3)
    atk = torchattacks.PGD(module, eps=eps, alpha=2.5 * eps / a.at_steps, steps=a.at_steps)
    for _ in range(a.at_epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 128):
            b = perm[i : i + 128]
            xb, yb = x[b].to(device), y[b].to(device)
            xa = atk(xb, yb)  # torchattacks sets eval mode for the attack, then restores it
            module.train()
            loss = torch.nn.functional.cross_entropy(module(xa), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def bench_adv_training(data: dict[str, Any], x: Any, y: Any, a: argparse.Namespace,
                       device: Any) -> list:  # fmt: skip
    import torch

    from advguard.attacks.evasion.pgd import PGD
    from advguard.defenses.training import adversarial_train
    from advguard.models.torch_model import TorchClassifier

    name = data["name"]
    eps = PGD_SETTINGS[name][0]
    torch.manual_seed(0)
    init = build_module(name).state_dict()
    rows = []
    for impl in ("advguard", "torchattacks"):
        module = build_module(name).to(device)
        module.load_state_dict(init)
        _sync(device)
        t0 = time.perf_counter()
        if impl == "advguard":
            adversarial_train(module, data["x_train"], data["y_train"], method="pgd-at",
                              epsilon=eps, epochs=a.at_epochs, steps=a.at_steps, ramp_epochs=0,
                              val_fraction=0.02, val_samples=64, device=device, seed=0)  # fmt: skip
        else:
            _torchattacks_at(module, data, eps, a, device)
        _sync(device)
        s = time.perf_counter() - t0
        module.eval().requires_grad_(False)
        clf = TorchClassifier(module, input_shape=tuple(x.shape[1:]), num_classes=10)
        adv = PGD(norm="linf", steps=min(20, a.max_steps), random_start=True)(
            clf, x, y, epsilon=eps
        ).x_adv
        rows.append(row("adv-training", name, impl, s, len(data["x_train"]), eps=eps,
                        epochs=a.at_epochs, steps=a.at_steps,
                        clean_accuracy=accuracy(module, x, y),
                        robust_accuracy_pgd20=accuracy(module, adv, y)))  # fmt: skip
    return rows


# -- the run --------------------------------------------------------------------------------
def environment(device: Any) -> dict[str, Any]:
    import importlib.metadata as md

    import torch

    def version(pkg: str) -> str | None:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    cuda = device.type == "cuda"
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if cuda else None,
        "precision": "float32 (no autocast, TF32 off)",
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "packages": {p: version(p) for p in ("advguard", "torchattacks", "numpy")},
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", help="cuda or cuda:N (default cuda)")
    p.add_argument("--data", type=Path, default=None, help="MNIST npz (Keras-style keys)")
    p.add_argument("--out", type=Path, default=None, help="Result JSON (default: print only)")
    p.add_argument("--n-attack", type=int, default=2000, help="Samples for the PGD workload")
    p.add_argument("--n-eval", type=int, default=500, help="Samples for linf-standard")
    p.add_argument("--n-train", type=int, default=20000, help="Training samples")
    p.add_argument("--clean-epochs", type=int, default=2)
    p.add_argument("--at-epochs", type=int, default=1, help="Adversarial-training epochs")
    p.add_argument("--at-steps", type=int, default=10, help="Inner PGD steps when training")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-steps", type=int, default=100, help="Cap on attack steps (smoke)")
    p.add_argument("--max-queries", type=int, default=SQUARE_QUERIES, help="Cap on Square")
    p.add_argument("--models", default="mnist,cifar-size")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="Tiny sizes on the CPU to check the script; not a result")  # fmt: skip
    a = p.parse_args(argv)
    if a.cpu_smoke:
        a.device, a.n_attack, a.n_eval, a.repeats = "cpu", 32, 16, 1
        a.n_train = min(a.n_train, 256)
        a.clean_epochs, a.at_epochs, a.at_steps, a.batch_size = 1, 1, 2, 16
        a.max_steps, a.max_queries = 3, 20
    return a


def resolve(a: argparse.Namespace) -> Any:
    """The device; exit 2 with one line when CUDA is asked for but absent."""
    import torch

    from advguard.errors import InputError
    from advguard.models.devices import configure_determinism, resolve_device

    if not a.cpu_smoke and not str(a.device).startswith("cuda"):
        sys.exit("error: bench_gpu.py benchmarks a CUDA GPU: give --device cuda or cuda:N")
    if not a.cpu_smoke and not torch.cuda.is_available():
        print("error: bench_gpu.py needs a CUDA GPU (torch.cuda.is_available() is False); "
              "nothing was measured", file=sys.stderr)  # fmt: skip
        sys.exit(2)
    try:
        dev = resolve_device(a.device)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    configure_determinism(dev)
    return dev


def run_model(name: str, a: argparse.Namespace, device: Any) -> tuple[dict, list]:
    import torch

    n_test = max(a.n_attack, a.n_eval)
    if name == "mnist":
        data = load_mnist(a.data, a.n_train, n_test)
    else:
        data = synthetic_cifar(a.n_train, n_test)
    module, train_s = train_clean(data, a.clean_epochs, device)
    x = torch.from_numpy(data["x_test"]).to(device)
    y = torch.from_numpy(data["y_test"]).to(device)
    info = {"data": data["source"], "clean_train_seconds": round(train_s, 3),
            "clean_accuracy": accuracy(module, x, y), "n_test": len(x)}  # fmt: skip
    _log(f"{name}: {info}")
    rows = bench_pgd(name, module, x[: a.n_attack], y[: a.n_attack], a, device)
    rows += bench_linf_standard(name, module, x[: a.n_eval], y[: a.n_eval], a, device)
    rows += bench_adv_training(data, x[: a.n_eval], y[: a.n_eval], a, device)
    return info, rows


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    device = resolve(a)
    started = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    models, rows = {}, []
    for name in [m.strip() for m in a.models.split(",") if m.strip()]:
        if name not in PGD_SETTINGS:
            sys.exit(f"error: unknown model {name!r}; use mnist and/or cifar-size")
        models[name], r = run_model(name, a, device)
        rows += r
    result = {"schema": SCHEMA, "smoke": bool(a.cpu_smoke), "started": started,
              "environment": environment(device), "config": {k: str(v) for k, v in vars(a).items()},
              "models": models, "rows": rows}  # fmt: skip
    if a.out is not None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=2) + "\n")
        _log(f"wrote {a.out}")
    else:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
