"""Carlini & Wagner L2 benchmark: advguard's CarliniWagnerL2 vs torchattacks.CW.

Rows (same samples, same model; untargeted, kappa 0):

* ``advguard-equal`` -- advguard at torchattacks' budget: 100 Adam steps, one binary-search
  step (no search), ``c`` = 1, learning rate 0.01, no abort-early (every sample runs all
  100 steps, plus one forward pass to check the last iterate).
* ``torchattacks-equal`` -- ``torchattacks.CW(c=1, kappa=0, steps=100, lr=0.01)`` (no binary
  search; its own batch-level early stop, which ``forward_samples_per_example`` shows).
* ``advguard-default`` -- advguard's defaults: 9 binary-search steps over ``c`` (from 0.01)
  of up to 100 Adam steps each, learning rate 0.05, per-sample abort-early.

Targets (issue 17): ``advguard-equal`` within 1.5x ``torchattacks-equal``'s time, and
``advguard-default`` stronger than ``torchattacks-equal``: success rate no lower and robust
accuracy at every L2 radius of ``--radii`` no higher.

The data loading and the cached trained weights (benchmarks/.cache/*.safetensors, 1 epoch)
come from benchmarks/bench_attacks.py. Each row runs in its own subprocess (own torch
threads); rows are interleaved over ``--repeats`` rounds; the best wall time and the best CPU
time are reported. Run it from the benchmark venv (``bash benchmarks/setup_env.sh``)::

    .bench-venv/bin/python benchmarks/bench_cw.py --n 256 --threads 1 --repeats 2 \\
        --out benchmarks/results/cw_cpu.json
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from bench_attacks import (  # noqa: E402  (cache helper shared with the attack benchmark)
    DEFAULT_DATA,
    child_main,
    environment,
    get_model,
    load_data,
    load_module,
    predict_chunked,
    result_header,
    run_child,
    sha256_file,
    write_json,
)

SCHEMA = "advguard-bench-cw/1"
ROWS = ("advguard-equal", "torchattacks-equal", "advguard-default")
EQUAL = {"steps": 100, "c": 1.0, "lr": 0.01, "kappa": 0.0}
TIME_RATIO_MAX = 1.5
TARGETS_TEXT = (
    "CW-L2 at an equal step budget (100 steps, one c = 1, lr 0.01) within 1.5x torchattacks' "
    "time; advguard's default (binary search over c) stronger than torchattacks at that budget: "
    "success rate no lower, robust accuracy at every L2 radius no higher"
)


def make_runner(row: str, module, seed: int):
    """``run(x, y) -> adversarial x`` and the parameters, for one row."""
    if row.startswith("advguard"):
        from advguard.attacks.evasion.cw import CarliniWagnerL2
        from advguard.models.torch_model import TorchClassifier

        clf = TorchClassifier(module, input_shape=(1, 28, 28), num_classes=10, bounds=(0.0, 1.0))
        if row == "advguard-equal":
            atk = CarliniWagnerL2(
                steps=EQUAL["steps"],
                binary_search_steps=1,
                initial_const=EQUAL["c"],
                learning_rate=EQUAL["lr"],
                confidence=EQUAL["kappa"],
                abort_early=False,
                seed=seed,
            )
        else:
            atk = CarliniWagnerL2(seed=seed)
        return (lambda x, y: atk(clf, x, y).x_adv), {"repr": repr(atk), **atk.params()}
    if row == "torchattacks-equal":
        import torchattacks

        ta = torchattacks.CW(
            module, c=EQUAL["c"], kappa=EQUAL["kappa"], steps=EQUAL["steps"], lr=EQUAL["lr"]
        )
        return (lambda x, y: ta(x, y)), {"repr": repr(ta), **EQUAL}
    raise ValueError(f"unknown row {row!r}")


def _child(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(spec["threads"])
    module = load_module(spec["weights"], "cpu")
    d = np.load(spec["samples"])
    x, y = torch.from_numpy(d["x"]), torch.from_numpy(d["y"])
    n = len(x)
    correct = (predict_chunked(module, x) == y).numpy()
    seen = [0]
    module[0].register_forward_pre_hook(lambda m, a: seen.__setitem__(0, seen[0] + len(a[0])))
    run, params = make_runner(spec["row"], module, spec["seed"])
    run(x[:8], y[:8])  # warm-up
    torch.manual_seed(spec["seed"])
    seen[0] = 0
    load_before = os.getloadavg()[0]
    c0, t0 = time.process_time(), time.perf_counter()
    adv = run(x, y)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    adv = adv.detach().float()
    fooled = (predict_chunked(module, adv) != y).numpy() & correct
    l2 = (adv - x).flatten(1).norm(dim=1).numpy()
    radii = spec["radii"]
    # robust at r: correctly classified and no adversarial found within L2 radius r
    robust = {f"{r:g}": float((correct & ~(fooled & (l2 <= r + 1e-6))).mean()) for r in radii}
    return {
        "status": "ok",
        "params": params,
        "time_s": round(wall, 3),
        "cpu_time_s": round(cpu, 3),
        "loadavg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "n": n,
        "n_initially_correct": int(correct.sum()),
        "success_rate": round(float(fooled.sum() / max(correct.sum(), 1)), 4),
        "median_l2_success": round(float(np.median(l2[fooled])), 4) if fooled.any() else None,
        "mean_l2_success": round(float(np.mean(l2[fooled])), 4) if fooled.any() else None,
        "robust_accuracy_at_l2": robust,
        "forward_samples_per_example": round(seen[0] / n, 2),
        "in_bounds": bool(float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0),
        "fooled_mask": np.packbits(fooled.astype(np.uint8)).tobytes().hex(),
    }


def merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Best wall and CPU time over the rounds; outcomes from the last round (deterministic)."""
    bad = [p for p in parts if p.get("status") != "ok"]
    if bad:
        return bad[0]
    last = dict(parts[-1])
    last.update(
        times_s=[p["time_s"] for p in parts],
        cpu_times_s=[p["cpu_time_s"] for p in parts],
        time_s=min(p["time_s"] for p in parts),
        cpu_time_s=min(p["cpu_time_s"] for p in parts),
        loadavg_1min=[v for p in parts for v in p["loadavg_1min"]],
        deterministic=len({p["fooled_mask"] for p in parts}) == 1,
    )
    last.pop("fooled_mask")
    return last


def targets(rows: dict[str, dict[str, Any]], radii: list[float]) -> list[dict[str, Any]]:
    eq, ta, df = (rows.get(r, {}) for r in ROWS)
    out: list[dict[str, Any]] = []
    if eq.get("status") == "ok" and ta.get("status") == "ok":
        for field in ("time_s", "cpu_time_s"):
            v = eq[field] / ta[field]
            out.append(
                {
                    "target": f"advguard_equal_{field[:-2]}_vs_torchattacks",
                    "value": round(v, 3),
                    "threshold": f"<= {TIME_RATIO_MAX}",
                    "pass": bool(v <= TIME_RATIO_MAX),
                }
            )
    else:
        out.append({"target": "time", "pass": None, "note": "equal-step row missing or failed"})
    if df.get("status") == "ok" and ta.get("status") == "ok":
        out.append(
            {
                "target": "advguard_default_success_rate_vs_torchattacks",
                "value": [df["success_rate"], ta["success_rate"]],
                "threshold": "advguard >= torchattacks",
                "pass": bool(df["success_rate"] >= ta["success_rate"]),
            }
        )
        for r in radii:
            a, b = df["robust_accuracy_at_l2"][f"{r:g}"], ta["robust_accuracy_at_l2"][f"{r:g}"]
            out.append(
                {
                    "target": f"advguard_default_robust_accuracy_at_l2_{r:g}_vs_torchattacks",
                    "value": [a, b],
                    "threshold": "advguard <= torchattacks",
                    "pass": bool(a <= b),
                }
            )
    else:
        out.append({"target": "strength", "pass": None, "note": "default row missing or failed"})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=256, help="first N MNIST test images (default 256)")
    p.add_argument("--repeats", type=int, default=2, help="interleaved rounds; best time")
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--radii", type=float, nargs="+", default=[1.0, 1.5, 2.0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads per child (default 1)")
    p.add_argument("--epochs", type=int, default=1, help="training epochs of the model")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--child-timeout", type=float, default=3600.0)
    p.add_argument(
        "--machine-note",
        default="",
        help="free text stored in the JSON, e.g. 'contended: 2 cores shared with other jobs'",
    )
    p.add_argument("--out", type=Path, default=HERE / "results" / "cw_cpu.json")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        return child_main(a.child, a.child_out, _child)

    import torch

    torch.set_num_threads(a.threads)
    data = load_data(a.data)
    print(f"data: {data['name']} ({data['source']})", flush=True)
    model = get_model(data, a.epochs, "cpu")
    n = min(a.n, len(data["x_test"]))
    parts: dict[str, list[dict[str, Any]]] = {r: [] for r in a.rows}
    with tempfile.TemporaryDirectory(prefix="bench_cw_") as td:
        tmp = Path(td)
        samples = tmp / "samples.npz"
        np.savez(samples, x=data["x_test"][:n], y=data["y_test"][:n])
        for rnd in range(a.repeats):
            for row in a.rows:
                if parts[row] and parts[row][-1].get("status") != "ok":
                    continue
                spec = {
                    "row": row,
                    "seed": a.seed,
                    "threads": a.threads,
                    "radii": a.radii,
                    "weights": model["weights"],
                    "samples": str(samples),
                }
                print(f"[round {rnd + 1}/{a.repeats}] {row} ...", end=" ", flush=True)
                res = run_child(spec, tmp, a.child_timeout, row, __file__)
                parts[row].append(res)
                if res["status"] == "ok":
                    print(
                        f"{res['time_s']:.2f} s wall, {res['cpu_time_s']:.2f} s CPU, success "
                        f"{100 * res['success_rate']:.1f}%, median L2 {res['median_l2_success']}",
                        flush=True,
                    )
                else:
                    print(f"{res['status']}: {res.get('error', '')[:300]}", flush=True)
    rows = {r: {"row": r, **merge(parts[r])} for r in a.rows}
    tg = targets(rows, a.radii)
    decided = [t["pass"] for t in tg if t["pass"] is not None]
    env = environment("cpu", a.threads)
    cw = REPO / "src/advguard/attacks/evasion/cw.py"
    env["git"]["source_sha256_16"]["src/advguard/attacks/evasion/cw.py"] = (
        sha256_file(cw)[:16] if cw.exists() else None
    )
    result = {
        **result_header(SCHEMA, env),
        "machine_note": a.machine_note,
        "config": {
            "n": n,
            "equal_budget": EQUAL,
            "radii": a.radii,
            "seed": a.seed,
            "repeats": a.repeats,
            "threads": a.threads,
            "batch": "all N at once",
            "samples": f"first {n} test images ({data['name']})",
        },
        "data": {"name": data["name"], "source": data["source"], "sha256": data["sha256"]},
        "model": model,
        "rows": list(rows.values()),
        "targets_text": TARGETS_TEXT,
        "targets": tg,
        "targets_pass": all(decided) if decided else None,
        "notes": [
            "success_rate = fooled / initially correctly classified samples; median/mean L2 "
            "over the fooled samples; robust_accuracy_at_l2[r] = share of all N samples that "
            "are correctly classified and have no adversarial within L2 radius r.",
            "time_s / cpu_time_s: wall and CPU time of one attack call on all N samples (one "
            "batch), best over the rounds; on a machine shared with other jobs wall times are "
            "noisy (see loadavg_1min), CPU times at 1 thread much less so.",
            "forward_samples_per_example counts every sample through the network's first "
            "layer (gradient steps and no-grad checks alike).",
        ],
    }
    write_json(result, a.out)
    for t in tg:
        print(t)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
