"""advguard's linf-standard suite vs torchattacks' AutoAttack (standard) on the MNIST CNN.

Both run on the same model and the same samples, in one process, one after the other:

* advguard: ``evaluate(model, x, y, linf-standard)`` at each epsilon (APGD-CE, APGD-T, Square as a
  cascade, per-sample worst case), with sanity checks off (pure attack cost) and, optionally, on.
* torchattacks: ``AutoAttack(norm="Linf", version="standard")`` (APGD-CE, APGD-T, FAB-T, Square
  5000 queries), which also runs its members as a cascade on the still-robust samples. Its
  wrapper leaves APGD and APGD-T at torchattacks' default of 10 steps (the original
  AutoAttack uses 100), so the same cascade is also run with 100 steps
  (``MultiAttack``); ratios and targets compare against that like-for-like run.

Run inside the benchmark venv (``bash benchmarks/setup_env.sh``)::

    .bench-venv/bin/python benchmarks/bench_autoattack.py --n 500 --eps 0.3 0.1 \
        --out benchmarks/results/autoattack_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_attacks as common  # noqa: E402  (shares data, cached model and environment)


def robust_accuracy(module, x, y, device) -> float:
    import torch

    with torch.no_grad():
        pred = torch.cat(
            [module(x[i : i + 512].to(device)).argmax(1).cpu() for i in range(0, len(x), 512)]
        )
    return float((pred == y).float().mean())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=500, help="test samples (the first N)")
    ap.add_argument("--eps", type=float, nargs="+", default=[0.3, 0.1])
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sanity", action="store_true", help="also time advguard with sanity checks")
    ap.add_argument("--skip-torchattacks", action="store_true")
    ap.add_argument("--data", type=Path, default=common.DEFAULT_DATA)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "autoattack_cpu.json")
    args = ap.parse_args(argv)

    import torch

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    data = common.load_data(args.data)
    meta = common.get_model(data, None, args.device)
    module = common.load_module(meta["weights"], args.device)
    x = torch.from_numpy(data["x_test"][: args.n])
    y = torch.from_numpy(data["y_test"][: args.n])
    clean = robust_accuracy(module, x, y, args.device)

    from advguard.evaluate import evaluate, load_threat_model
    from advguard.models import TorchClassifier

    rows: list[dict[str, Any]] = []
    for eps in args.eps:
        tm = load_threat_model("linf-standard").with_overrides(
            epsilons=[eps], samples=args.n, batch_size=args.batch_size, sanity_checks=False
        )
        model = TorchClassifier(module, input_shape=(1, 28, 28), num_classes=10, device=args.device)
        # evaluate() samples a seeded subset; pass exactly the N samples so both see the same
        t0 = time.perf_counter()
        rep = evaluate(model, x.numpy(), y.numpy(), tm)
        t_adv = time.perf_counter() - t0
        r = rep.results[0]
        row = {
            "epsilon": eps,
            "clean_accuracy": clean,
            "advguard": {
                "suite": [s.attack for s in rep.suite],
                "robust_accuracy": r.robust_accuracy.value,
                "robust_ci": [r.robust_accuracy.ci_low, r.robust_accuracy.ci_high],
                "seconds": round(t_adv, 2),
                "gradient_evals": sum(a.gradient_evals for a in r.per_attack),
                "forward_evals": sum(a.forward_evals for a in r.per_attack),
            },
        }
        if args.sanity:
            tm2 = tm.with_overrides(sanity_checks=True)
            t0 = time.perf_counter()
            rep2 = evaluate(
                TorchClassifier(
                    module, input_shape=(1, 28, 28), num_classes=10, device=args.device
                ),
                x.numpy(),
                y.numpy(),
                tm2,
            )
            row["advguard_with_sanity"] = {
                "robust_accuracy": rep2.results[0].robust_accuracy.value,
                "seconds": round(time.perf_counter() - t0, 2),
                "checks": {c.id: c.status for c in rep2.sanity_checks},
            }
        if not args.skip_torchattacks:
            import torchattacks

            def run_ta(attack: Any) -> tuple[torch.Tensor, float]:
                t0 = time.perf_counter()
                advs = [
                    attack(
                        x[i : i + args.batch_size].to(args.device),
                        y[i : i + args.batch_size].to(args.device),
                    ).cpu()
                    for i in range(0, len(x), args.batch_size)
                ]
                return torch.cat(advs), time.perf_counter() - t0

            # (1) the stock wrapper: torchattacks' AutoAttack leaves APGD and APGD-T at
            # torchattacks' default of 10 steps (the original AutoAttack uses 100)
            stock = torchattacks.AutoAttack(
                module, norm="Linf", eps=eps, version="standard", n_classes=10, seed=0
            )
            # (2) the same cascade at the original AutoAttack settings (100 steps), the
            # like-for-like comparison with linf-standard
            faithful = torchattacks.MultiAttack(
                [
                    torchattacks.APGD(module, norm="Linf", eps=eps, steps=100, n_restarts=1,
                                      loss="ce", seed=0),
                    torchattacks.APGDT(module, norm="Linf", eps=eps, steps=100, n_restarts=1,
                                       n_classes=10, seed=0),
                    torchattacks.FAB(module, norm="Linf", eps=eps, multi_targeted=True,
                                     n_classes=10, n_restarts=1, seed=0),
                    torchattacks.Square(module, norm="Linf", eps=eps, n_queries=5000,
                                        n_restarts=1, seed=0),
                ]
            )  # fmt: skip
            for key, attack, steps in (
                ("torchattacks_autoattack", stock, 10),
                ("torchattacks_autoattack_100_steps", faithful, 100),
            ):
                x_adv, t_ta = run_ta(attack)
                row[key] = {
                    "suite": [f"apgd-ce({steps})", f"apgd-t({steps})", "fab-t", "square(5000)"],
                    "robust_accuracy": robust_accuracy(module, x_adv, y, args.device),
                    "seconds": round(t_ta, 2),
                    "max_linf": float((x_adv - x).abs().amax().detach()),
                }
            ta = row["torchattacks_autoattack_100_steps"]
            t_ta = ta["seconds"]
            row["ratios"] = {
                "time_advguard_over_torchattacks_100_steps": round(t_adv / t_ta, 3)
                if t_ta
                else None,
                "time_advguard_over_torchattacks_stock": round(
                    t_adv / row["torchattacks_autoattack"]["seconds"], 3
                ),
                "robust_accuracy_difference_points": round(
                    100 * (row["advguard"]["robust_accuracy"] - ta["robust_accuracy"]), 2
                ),
                "robust_accuracy_difference_points_stock": round(
                    100
                    * (
                        row["advguard"]["robust_accuracy"]
                        - row["torchattacks_autoattack"]["robust_accuracy"]
                    ),
                    2,
                ),
            }
            row["targets"] = {
                "robust_accuracy_no_higher": row["advguard"]["robust_accuracy"]
                <= ta["robust_accuracy"] + 1e-12,
                "wall_time_no_higher": t_adv <= t_ta,
            }
        rows.append(row)
        print(json.dumps(row, indent=1), flush=True)

    result = {
        "schema": "advguard-bench-autoattack/1",
        "environment": common.environment(args.device, threads),
        "model": {k: v for k, v in meta.items() if k != "weights"},
        "config": {"n": args.n, "batch_size": args.batch_size, "eps": args.eps},
        "rows": rows,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "notes": "advguard runs linf-standard (APGD-CE 100 steps, APGD-T 9 targets x 100 steps, "
        "Square 5000 queries) as a cascade. torchattacks_autoattack is torchattacks' stock "
        "AutoAttack(version='standard'), which leaves APGD/APGD-T at torchattacks' default of "
        "10 steps; torchattacks_autoattack_100_steps is the same cascade (APGD-CE, APGD-T, "
        "FAB-T, Square-5000) at the original AutoAttack's 100 steps, the like-for-like "
        "comparison that ratios and targets use.",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
