"""Square Attack benchmark: advguard vs torchattacks.Square, the official AutoAttack Square
and ART's SquareAttack.

Workload: Linf Square Attack, eps 0.3, a budget of 1,000 queries per sample (the
initialisation query included), p_init 0.8, one restart, margin loss, on the first N
MNIST test images (default 500), against ``advguard.models.zoo.small_cnn((1, 28, 28), 10)``
trained for 1 epoch with ``advguard.models.fit.fit``. The data loading and the cached
trained weights (benchmarks/.cache/*.safetensors) come from benchmarks/bench_attacks.py.

Robust-survivor workload (issue 17: Square 5000 on the samples an AutoAttack cascade left,
where the model's forward passes dominate and every implementation runs all 5,000 queries
on most samples)::

    python benchmarks/bench_square.py --n 200 --eps 0.1 --queries 5000 --seeds 0 \
        --impls advguard torchattacks official --out benchmarks/results/square_robust_cpu.json

Every row also splits its CPU time into the model's forward passes (forward hooks on the
network, CPU time of the thread) and the implementation's own overhead (everything else:
random draws, window placement, loss, bookkeeping), reported per forward call
(``overhead_us_per_call``) and per sample query (``overhead_us_per_query``): the forward
time is the model's and the same for every implementation, the overhead is the attack's.
``official`` is ``autoattack.square.SquareAttack`` (github.com/fra31/auto-attack; install it
with ``pip install --no-deps git+https://github.com/fra31/auto-attack`` or from a checkout).

Each implementation runs in its own subprocess (own torch threads, own RNG state); rows are
interleaved over ``--repeats`` rounds and the best wall time is reported. Reported per
implementation: success rate (fooled / initially correct samples), median and mean queries
of the successful samples, wall time, samples through the network, and checks of the
returned images (Linf ball, bounds). Ratios are advguard / peer.

Queries are counted as in the paper: one per candidate point evaluated for a sample, the
initialisation included (so a sample fooled by the initial stripes used 1 query).
advguard reports them in ``AttackResult.queries``; torchattacks returns them from
``attack_single_run`` (captured by wrapping that method); ART does not count them, so the
benchmark records, through ART's ``adv_criterion`` hook (called on the whole batch once per
iteration), the first iteration at which each sample is adversarial. The peers' budgets are
set to the same 1,000 candidate evaluations: torchattacks ``n_queries=999`` and ART
``max_iter=999`` (both evaluate one initial point plus one candidate per iteration). ART
additionally re-evaluates the current iterate of every sample each iteration (see
``forward_samples_per_example``); those calls are not candidate queries.

Run it from the benchmark venv (``bash benchmarks/setup_env.sh``)::

    .bench-venv/bin/python benchmarks/bench_square.py --n 500 --threads 1 \\
        --seeds 0 1 2 3 4 --out benchmarks/results/square_cpu.json

Every implementation runs once per seed on the same samples and the results are pooled over
the seeds: torchattacks and ART draw one square position per iteration for the whole batch,
so their per-sample outcomes are correlated and a single seed's median is very noisy (ART:
19 with seed 0, 31 with seed 1 on the default workload).
"""

from __future__ import annotations

import argparse
import json
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
    art_estimator,
    child_main,
    environment,
    get_model,
    linf_checks,
    load_data,
    load_module,
    predict_chunked,
    result_header,
    run_child,
    sha256_file,
)

SCHEMA = "advguard-bench-square/1"
IMPLS = ("advguard", "torchattacks", "official", "art")
DEFAULT_IMPLS = ("advguard", "torchattacks", "official")
P_INIT = 0.8
TARGETS_TEXT = (
    "advguard Square (Linf): success rate >= every peer's (robust accuracy no higher), "
    "median queries of successful samples no higher, wall time no higher, and its own "
    "overhead per sample query (CPU time outside the model's forward passes) below the peers'"
)


# ---------------------------------------------------------------------------
# implementations: run(x, y, x_np, y_np) -> (adv tensor, per-sample queries or None)
# ---------------------------------------------------------------------------
def make_runner(impl: str, module, eps: float, budget: int, seed: int, n: int):
    import torch

    if impl == "advguard":
        from advguard.attacks.evasion.square import SquareAttack
        from advguard.models.torch_model import TorchClassifier

        clf = TorchClassifier(module, input_shape=(1, 28, 28), num_classes=10, bounds=(0.0, 1.0))
        atk = SquareAttack(norm="linf", max_queries=budget, p_init=P_INIT, restarts=1, seed=seed)

        def run(x, y, xn, yn, correct):
            res = atk(clf, x, y, epsilon=eps)
            q = res.queries.cpu().numpy().astype(np.int64)
            return res.x_adv, q

        return run, {"repr": repr(atk)}

    if impl == "torchattacks":
        import torchattacks

        atk = torchattacks.Square(
            module,
            norm="Linf",
            eps=eps,
            n_queries=budget - 1,
            n_restarts=1,
            p_init=P_INIT,
            loss="margin",
            resc_schedule=True,
            seed=seed,
        )
        captured: list[Any] = []
        orig = atk.attack_single_run

        def single_run(x, y):
            nq, adv = orig(x, y)
            captured.append(nq.detach().cpu().numpy())
            return nq, adv

        atk.attack_single_run = single_run  # record the per-sample query counts it computes

        def run(x, y, xn, yn, correct):
            captured.clear()
            adv = atk(x, y)
            q = np.zeros(len(x), dtype=np.int64)
            if captured:
                q[np.flatnonzero(correct)] = captured[0].astype(np.int64)
            return adv, q

        return run, {
            "repr": repr(atk),
            "n_queries": budget - 1,
            "note": "n_queries iterations after 1 initial query = budget candidates",
        }

    if impl == "official":
        from autoattack.square import SquareAttack as OfficialSquare

        atk = OfficialSquare(
            module,
            norm="Linf",
            n_queries=budget - 1,
            eps=eps,
            p_init=P_INIT,
            n_restarts=1,
            seed=seed,
            loss="margin",
            resc_schedule=True,
            device="cpu",
        )
        got: list[Any] = []
        orig_single = atk.attack_single_run

        def official_single(x, y):
            nq, adv = orig_single(x, y)
            got.append(nq.detach().cpu().numpy())
            return nq, adv

        atk.attack_single_run = official_single  # record its per-sample query counts

        def run(x, y, xn, yn, correct):
            got.clear()
            adv = atk.perturb(x, y)
            q = np.zeros(len(x), dtype=np.int64)
            if got:
                q[np.flatnonzero(correct)] = got[0].astype(np.int64)
            return adv, q

        return run, {
            "repr": "autoattack.square.SquareAttack",
            "n_queries": budget - 1,
            "note": "n_queries iterations after 1 initial query = budget candidates",
        }

    if impl == "art":
        from art.attacks.evasion import SquareAttack as ArtSquare

        est = art_estimator(module)
        history: list[np.ndarray] = []

        def criterion(y_pred, y_true):
            adv = np.argmax(y_pred, axis=1) != np.argmax(y_true, axis=1)
            if len(adv) == n:  # ART calls it on the whole batch once per restart/iteration
                history.append(adv.copy())
            return adv

        params = {
            "eps": eps,
            "max_iter": budget - 1,
            "p_init": P_INIT,
            "nb_restarts": 1,
            "batch_size": n,
        }
        atk = ArtSquare(est, norm=np.inf, adv_criterion=criterion, verbose=False, **params)

        def run(x, y, xn, yn, correct):
            history.clear()
            adv = atk.generate(x=xn, y=yn)
            # history[0]: clean; history[m]: after the init + (m - 1) iterations = m candidates
            q = np.zeros(len(xn), dtype=np.int64)
            first = np.full(len(xn), -1)
            for m, h in enumerate(history):
                first[(first < 0) & h] = m
            q[first > 0] = first[first > 0]
            q[first < 0] = budget  # fooled by the last candidate, or never: whole budget
            return torch.from_numpy(adv), q

        return run, params

    raise ValueError(f"unknown implementation {impl!r}")


# ---------------------------------------------------------------------------
# child process: one implementation, one timed pass (+ an untimed warm-up)
# ---------------------------------------------------------------------------
def _child(spec: dict[str, Any]) -> dict[str, Any]:
    import logging

    import torch

    logging.disable(logging.WARNING)
    torch.set_num_threads(spec["threads"])
    eps, budget = spec["eps"], spec["budget"]
    module = load_module(spec["weights"], "cpu")
    d = np.load(spec["samples"])
    xn, yn = d["x"], d["y"]
    x, y = torch.from_numpy(xn), torch.from_numpy(yn)
    n = len(x)
    with torch.no_grad():
        pred_clean = torch.cat([module(x[i : i + 1000]).argmax(1) for i in range(0, n, 1000)])
    correct = (pred_clean == y).numpy()

    if spec.get("channels_last"):
        module = module.to(memory_format=torch.channels_last)
    seen = [0]
    fwd = {"cpu": 0.0, "calls": 0, "t0": 0.0}

    def pre_hook(m, a):
        seen[0] += len(a[0])
        fwd["calls"] += 1
        fwd["t0"] = time.thread_time()

    def post_hook(m, a, out):
        fwd["cpu"] += time.thread_time() - fwd["t0"]

    module.register_forward_pre_hook(pre_hook)
    module.register_forward_hook(post_hook)

    # warm-up on a few samples with a small budget (separate attack object)
    s0 = spec["seeds"][0]
    wrun, _ = make_runner(spec["impl"], module, eps, 20, s0, 8)
    torch.manual_seed(s0)
    np.random.seed(s0)
    wrun(x[:8], y[:8], xn[:8], yn[:8], correct[:8])

    per_seed = []
    params: dict[str, Any] = {}
    for seed in spec["seeds"]:
        run, params = make_runner(spec["impl"], module, eps, budget, seed, n)
        torch.manual_seed(seed)
        np.random.seed(seed)
        seen[0] = 0
        fwd.update(cpu=0.0, calls=0)
        load_before = os.getloadavg()[0]
        c0 = time.process_time()
        tc0 = time.thread_time()
        t0 = time.perf_counter()
        adv, q = run(x, y, xn, yn, correct)
        wall = time.perf_counter() - t0
        cpu = time.process_time() - c0
        thread_cpu = time.thread_time() - tc0
        forwards = seen[0]
        overhead = thread_cpu - fwd["cpu"]

        adv = adv.detach().cpu().float()
        fooled = (predict_chunked(module, adv) != y).numpy() & correct
        qs = q[fooled]
        per_seed.append(
            {
                "seed": seed,
                "time_s": round(wall, 3),
                "cpu_time_s": round(cpu, 3),
                "thread_cpu_s": round(thread_cpu, 3),
                "forward_cpu_s": round(fwd["cpu"], 3),
                "overhead_cpu_s": round(overhead, 3),
                "forward_calls": fwd["calls"],
                "overhead_us_per_call": round(1e6 * overhead / max(fwd["calls"], 1), 1),
                "overhead_us_per_query": round(1e6 * overhead / max(forwards, 1), 2),
                "loadavg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
                "n_success": int(fooled.sum()),
                "success_rate": round(float(fooled.sum() / max(correct.sum(), 1)), 4),
                "robust_accuracy": round(float((correct & ~fooled).sum() / n), 4),
                "median_queries_success": float(np.median(qs)) if len(qs) else None,
                "mean_queries_success": round(float(np.mean(qs)), 2) if len(qs) else None,
                "max_queries_any": int(q[correct].max()) if correct.any() else 0,
                "queries_over_budget": int((q[correct] > budget).sum()),
                "forward_samples_per_example": round(forwards / n, 2),
                **linf_checks(adv, x, eps),
                "queries_success": qs.astype(int).tolist(),
            }
        )
    return {
        "status": "ok",
        "params": params,
        "n": n,
        "n_initially_correct": int(correct.sum()),
        "per_seed": per_seed,
    }


def merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Pool the seeds; per seed the best wall time over the rounds."""
    bad = [p for p in parts if p.get("status") != "ok"]
    if bad:
        return bad[0]
    first = parts[0]
    seeds = []
    for k, s0 in enumerate(first["per_seed"]):
        rounds = [p["per_seed"][k] for p in parts]
        row = {key: v for key, v in s0.items() if key != "queries_success"}
        row["times_s"] = [r["time_s"] for r in rounds]
        row["time_s"] = min(row["times_s"])
        row["cpu_times_s"] = [r["cpu_time_s"] for r in rounds]
        # overhead: the round with the least overhead (the least disturbed by other load)
        quiet = min(rounds, key=lambda r: r["overhead_cpu_s"])
        for key in ("forward_cpu_s", "overhead_cpu_s", "overhead_us_per_call"):
            row[key] = quiet[key]
        row["overhead_us_per_query"] = quiet["overhead_us_per_query"]
        row["deterministic_over_rounds"] = len({r["mean_queries_success"] for r in rounds}) == 1
        seeds.append(row)
    pooled_q = np.concatenate(
        [np.asarray(s0["queries_success"], dtype=np.int64) for s0 in first["per_seed"]]
    )
    n_att = first["n_initially_correct"] * len(seeds)
    return {
        "status": "ok",
        "params": first["params"],
        "n": first["n"],
        "n_initially_correct": first["n_initially_correct"],
        "seeds": [r["seed"] for r in seeds],
        "success_rate": round(float(sum(r["n_success"] for r in seeds) / max(n_att, 1)), 4),
        "robust_accuracy": round(float(np.mean([r["robust_accuracy"] for r in seeds])), 4),
        "forward_cpu_s": round(float(np.mean([r["forward_cpu_s"] for r in seeds])), 3),
        "overhead_cpu_s": round(float(np.mean([r["overhead_cpu_s"] for r in seeds])), 3),
        "overhead_us_per_call": round(
            float(np.mean([r["overhead_us_per_call"] for r in seeds])), 1
        ),
        "overhead_us_per_query": round(
            float(np.mean([r["overhead_us_per_query"] for r in seeds])), 2
        ),
        "median_queries_success": float(np.median(pooled_q)) if len(pooled_q) else None,
        "mean_queries_success": round(float(pooled_q.mean()), 2) if len(pooled_q) else None,
        "time_s": round(float(np.mean([r["time_s"] for r in seeds])), 3),
        "time_s_total": round(float(np.sum([r["time_s"] for r in seeds])), 3),
        "cpu_time_s": round(float(np.mean([min(r["cpu_times_s"]) for r in seeds])), 3),
        "forward_samples_per_example": round(
            float(np.mean([r["forward_samples_per_example"] for r in seeds])), 2
        ),
        "max_queries_any": max(r["max_queries_any"] for r in seeds),
        "queries_over_budget": sum(r["queries_over_budget"] for r in seeds),
        "max_linf": max(r["max_linf"] for r in seeds),
        "linf_ok": all(r["linf_ok"] for r in seeds),
        "in_bounds": all(r["in_bounds"] for r in seeds),
        "per_seed": seeds,
    }


def targets(rows: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    adv = rows.get("advguard")
    out = []
    for peer in [i for i in IMPLS if i != "advguard" and i in rows]:
        r = rows[peer]
        if not (adv and adv.get("status") == "ok" and r.get("status") == "ok"):
            out.append({"peer": peer, "pass": None, "note": "row missing or failed"})
            continue
        checks = [
            (
                "success_rate",
                adv["success_rate"],
                r["success_rate"],
                adv["success_rate"] >= r["success_rate"],
                ">=",
            ),
            (
                "median_queries_success",
                adv["median_queries_success"],
                r["median_queries_success"],
                (adv["median_queries_success"] or 0) <= (r["median_queries_success"] or 0),
                "<=",
            ),
            ("time_s", adv["time_s"], r["time_s"], adv["time_s"] <= r["time_s"], "<="),
            (
                "overhead_us_per_query",
                adv["overhead_us_per_query"],
                r["overhead_us_per_query"],
                adv["overhead_us_per_query"] < r["overhead_us_per_query"],
                "<",
            ),
        ]
        for name, a, b, ok, op in checks:
            if a is None or b is None:  # e.g. no sample fooled: no median to compare
                out.append({"peer": peer, "metric": name, "pass": None, "note": "no value"})
                continue
            out.append(
                {
                    "peer": peer,
                    "metric": name,
                    "advguard": a,
                    "peer_value": b,
                    "want": f"advguard {op} peer",
                    "pass": bool(ok),
                }
            )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=500, help="first N MNIST test images (default 500)")
    p.add_argument("--eps", type=float, default=0.3)
    p.add_argument("--queries", type=int, default=1000, help="per-sample query budget")
    p.add_argument("--repeats", type=int, default=1, help="interleaved rounds; best time")
    p.add_argument("--impls", nargs="+", default=list(DEFAULT_IMPLS), choices=list(IMPLS))
    p.add_argument(
        "--channels-last",
        action="store_true",
        help="convert the network to channels_last for every implementation",
    )
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0, 1, 2],
        help="seeds; every implementation runs once per seed, results are pooled",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads per child (default 1)")
    p.add_argument("--epochs", type=int, default=1, help="training epochs of the model")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--child-timeout", type=float, default=3600.0)
    p.add_argument("--out", type=Path, default=HERE / "results" / "square_cpu.json")
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
    how = "cached" if model["cached"] else f"trained in {model['train_time_s']} s"
    print(
        f"model: small_cnn, test accuracy {100 * model['test_accuracy']:.2f}% ({how})", flush=True
    )
    n = min(a.n, len(data["x_test"]))
    x_s, y_s = data["x_test"][:n].copy(), data["y_test"][:n].copy()

    parts: dict[str, list[dict[str, Any]]] = {i: [] for i in a.impls}
    with tempfile.TemporaryDirectory(prefix="bench_square_") as td:
        tmp = Path(td)
        samples = tmp / "samples.npz"
        np.savez(samples, x=x_s, y=y_s)
        for rnd in range(a.repeats):
            for impl in a.impls:
                if parts[impl] and parts[impl][-1].get("status") != "ok":
                    continue
                spec = {
                    "impl": impl,
                    "eps": a.eps,
                    "budget": a.queries,
                    "seeds": a.seeds,
                    "threads": a.threads,
                    "weights": model["weights"],
                    "samples": str(samples),
                    "channels_last": a.channels_last,
                }
                print(f"[round {rnd + 1}/{a.repeats}] {impl} ...", end=" ", flush=True)
                res = run_child(spec, tmp, a.child_timeout, impl, __file__)
                parts[impl].append(res)
                if res["status"] == "ok":
                    print(
                        ", ".join(
                            f"seed {r['seed']}: {r['time_s']:.2f} s, success "
                            f"{100 * r['success_rate']:.1f}%, "
                            f"median q {r['median_queries_success']}"
                            for r in res["per_seed"]
                        ),
                        flush=True,
                    )
                else:
                    print(f"{res['status']}: {res.get('error', '')[:300]}", flush=True)
    rows = {i: {"impl": i, **merge(parts[i])} for i in a.impls}
    adv = rows.get("advguard", {})
    for i, r in rows.items():
        if i == "advguard" or r.get("status") != "ok" or adv.get("status") != "ok":
            continue
        r["advguard_time_ratio"] = round(adv["time_s"] / r["time_s"], 3)
        if adv["median_queries_success"] and r["median_queries_success"]:
            r["advguard_median_queries_ratio"] = round(
                adv["median_queries_success"] / r["median_queries_success"], 3
            )
        r["advguard_success_rate_diff_points"] = round(
            100 * (adv["success_rate"] - r["success_rate"]), 2
        )
        r["advguard_robust_accuracy_diff_points"] = round(
            100 * (adv["robust_accuracy"] - r["robust_accuracy"]), 2
        )
        r["advguard_cpu_time_ratio"] = round(adv["cpu_time_s"] / r["cpu_time_s"], 3)
        r["advguard_overhead_ratio"] = round(
            adv["overhead_us_per_query"] / max(r["overhead_us_per_query"], 1e-9), 3
        )
    tg = targets(rows)
    decided = [t["pass"] for t in tg if t["pass"] is not None]
    env = environment("cpu", a.threads)
    sq = REPO / "src/advguard/attacks/evasion/square.py"
    env["git"]["source_sha256_16"]["src/advguard/attacks/evasion/square.py"] = (
        sha256_file(sq)[:16] if sq.exists() else None
    )
    result = {
        **result_header(SCHEMA, env),
        "config": {
            "n": n,
            "eps": a.eps,
            "norm": "linf",
            "budget_queries": a.queries,
            "p_init": P_INIT,
            "restarts": 1,
            "loss": "margin",
            "seeds": a.seeds,
            "repeats": a.repeats,
            "threads": a.threads,
            "batch": "all N at once",
            "channels_last": a.channels_last,
            "samples": f"first {n} test images ({data['name']})",
        },
        "data": {"name": data["name"], "source": data["source"], "sha256": data["sha256"]},
        "model": model,
        "rows": list(rows.values()),
        "targets_text": TARGETS_TEXT,
        "targets": tg,
        "targets_pass": all(decided) if decided else None,
        "notes": [
            "success_rate = fooled / initially correctly classified samples (same set for "
            "every implementation), pooled over the seeds; median/mean queries are over the "
            "fooled samples of all seeds pooled; time_s is the mean wall time of one run "
            "(all N samples, one seed), best over rounds; per_seed has the details. The "
            "random search is noisy: medians of single seeds vary by several queries, hence "
            "the pooling over seeds.",
            "queries = candidate points evaluated per sample, initialisation included "
            "(paper's definition); *_queries_success are over the fooled samples only.",
            "advguard draws the square's position independently per sample and uniformly "
            "over all h-s+1 offsets (paper); torchattacks and ART draw one position per "
            "iteration shared by the whole batch and exclude the last offset (reference "
            "code). ART accepts the stripe initialisation only if it lowers the loss.",
            "forward_samples_per_example counts every sample through the network "
            "(attack queries + the implementation's own bookkeeping calls).",
            "forward_cpu_s: CPU time inside the network's forward (hooks on the module, "
            "thread CPU time); overhead_cpu_s = thread CPU time of the run - forward_cpu_s "
            "(the implementation's own work); overhead_us_per_query = overhead_cpu_s / "
            "samples through the network, overhead_us_per_call per forward call (iteration). "
            "Per seed the round with the least overhead is kept.",
            "official = autoattack.square.SquareAttack (fra31/auto-attack), which like "
            "torchattacks draws one window position per iteration for the whole batch and "
            "never redraws signs that leave the iterate unchanged.",
            "Each implementation runs in its own process with the given torch threads; "
            "the machine may be shared, see loadavg_1min and cpu_time_s.",
        ],
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = a.out.with_name(a.out.name + ".tmp")
    tmp_out.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp_out, a.out)

    print()
    print(f"\nper run (mean over seeds {a.seeds}):")
    print(
        f"{'impl':<13} {'time_s':>8} {'success%':>9} {'robust%':>8} {'med_q':>7} {'mean_q':>8} "
        f"{'fwd/ex':>8} {'ovh_us/q':>9} {'max_linf':>9} {'x_time':>7}"
    )
    for r in rows.values():
        if r.get("status") != "ok":
            print(f"{r['impl']:<13} {r.get('status')}: {r.get('error', '')[:80]}")
            continue
        print(
            f"{r['impl']:<13} {r['time_s']:>8.2f} {100 * r['success_rate']:>9.2f} "
            f"{100 * r['robust_accuracy']:>8.2f} "
            f"{r['median_queries_success']!s:>7} {r['mean_queries_success']!s:>8} "
            f"{r['forward_samples_per_example']:>8.1f} {r['overhead_us_per_query']:>9.2f} "
            f"{r['max_linf']:>9.4f} {r.get('advguard_time_ratio', '-')!s:>7}"
        )
    for t in tg:
        if t["pass"] is None:
            print(f"target vs {t['peer']}: not decided ({t['note']})")
        else:
            print(
                f"target vs {t['peer']} {t['metric']}: {t['advguard']} vs {t['peer_value']} "
                f"({t['want']}) -> {'PASS' if t['pass'] else 'FAIL'}"
            )
    print(f"\nwrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
