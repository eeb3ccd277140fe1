"""Scaling benchmark: one ``linf-standard`` evaluation locally and on Ray workers.

The same evaluation (MNIST test images, the benchmark ``small_cnn`` of ``bench_attacks.py``,
threat model ``linf-standard`` with ``--samples`` samples and batch size ``--batch-size``) runs
in three configurations, each in a fresh child process:

* ``local-1t``: the local backend, one process, 1 torch thread;
* ``local-2t``: the local backend, one process, 2 torch threads;
* ``ray-2w``:  ``RayBackend(workers=2)`` on a local Ray instance started by the child, each
  worker 1 thread (the driver merges and runs the sanity checks, 1 thread).

Wall times include everything the user waits for (model and data loading excepted:
``load_s`` is reported separately); for Ray that is Ray's start, the workers' start and model
loads, the shards and the merge. The three ``report.json`` are compared number by number
(timings excluded): they must be identical.

Overheads (child ``overhead``): Ray start (``ray.init``), worker start + model load (actors up
to their first answer), per-shard dispatch + wire + merge + checkpoint (slope of the wall time
of the same tiny evaluation cut into 2 vs N one-sample shards) and the merge of many shards
on the driver (synthetic records).

Targets (issue 16): Ray >= 1.6x faster than ``local-1t`` and no slower than ``local-2t``;
overhead per shard < 0.5 s. On a machine shared with other work the numbers are noisy.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/bench_scale.py \\
        --samples 120 --batch-size 60 --out benchmarks/results/scale_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_attacks as common  # noqa: E402  (data, cached model, environment)

SCHEMA = "advguard-bench-scale/1"
CONFIGS = {"local-1t": ("local", 1), "local-2t": ("local", 2), "ray-2w": ("ray", 1)}
TARGETS = {"ray_speedup_vs_local_1t_min": 1.6, "ray_vs_local_2t_max": 1.0, "shard_overhead_s": 0.5}


# ---------------------------------------------------------------------------
# set-up (parent): model file, data file, threat model
# ---------------------------------------------------------------------------
def prepare(a: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Write the advguard model file, the test data and the threat model; return the spec."""
    from advguard.evaluate.threat_model import load_threat_model
    from advguard.models import TorchClassifier
    from advguard.models.io import save_torch

    data = common.load_data(a.data)
    meta = common.get_model(data, None, "cpu")
    module = common.load_module(meta["weights"], "cpu")
    clf = TorchClassifier(module, input_shape=(1, 28, 28), num_classes=10, bounds=(0.0, 1.0))
    model = save_torch(
        clf,
        tmp / "small_cnn.safetensors",
        factory="advguard.models.zoo:small_cnn",
        factory_kwargs={"input_shape": [1, 28, 28], "num_classes": 10},
    )
    n = min(len(data["x_test"]), 2000)
    np.savez(tmp / "mnist_test.npz", x=data["x_test"][:n], y=data["y_test"][:n])
    tm = load_threat_model(a.threat_model).model_copy(
        update={"samples": a.samples, "batch_size": a.batch_size}
    )
    (tmp / "tm.json").write_text(tm.model_dump_json())
    return {
        "model": str(model),
        "data": str(tmp / "mnist_test.npz"),
        "threat_model": str(tmp / "tm.json"),
        "model_meta": {k: v for k, v in meta.items() if k != "weights"},
        "data_name": data["name"],
        "data_sha256": data["sha256"],
    }


# ---------------------------------------------------------------------------
# children
# ---------------------------------------------------------------------------
def _load(spec: dict[str, Any]) -> tuple[Any, Any, Any, Any]:
    from advguard.evaluate.distributed import WorkSpec
    from advguard.evaluate.job import load_model_and_data
    from advguard.evaluate.threat_model import ThreatModel

    tm = ThreatModel.model_validate_json(Path(spec["threat_model"]).read_text())
    model, data, info = load_model_and_data(spec["model"], spec["data"])
    return tm, model, data, (info, WorkSpec.of(spec["model"], spec["data"], tm))


def child_eval(spec: dict[str, Any], config: str, out: Path) -> dict[str, Any]:
    """One evaluation; writes its report.json to ``out`` and returns the timings."""
    import torch

    from advguard.evaluate.runner import Evaluator

    backend, threads = CONFIGS[config]
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    tm, model, data, (info, work) = _load(spec)
    ev = Evaluator(model, data.x, data.y, tm, model_info=info)
    t_load = time.perf_counter() - t0
    row: dict[str, Any] = {"config": config, "torch_threads": threads, "load_s": t_load}
    t0, c0 = time.perf_counter(), time.process_time()
    if backend == "local":
        report = ev.run()
    else:
        from advguard.evaluate.distributed import RayBackend

        rb = RayBackend(workers=2, shards=spec["shards"])
        rb._ray()
        row["ray_start_s"] = time.perf_counter() - t0
        report = rb.run(ev, work)
        row["shards"] = len(rb.submitted)
        row["shard_sizes"] = [len(s) for s in rb.submitted]
        row["worker_pids"] = len(set(rb.shard_pids))
    row["wall_s"] = time.perf_counter() - t0
    row["cpu_s_this_process"] = time.process_time() - c0  # Ray: the driver's share only
    if backend == "ray":  # after the timed part: these probes start processes of their own
        row["ray_worker_threads"] = _ray_worker_threads()
    row["suite_s"] = report.timing.get("suite_seconds")
    row["sanity_s"] = report.timing.get("sanity_and_escalation_seconds")
    report.write(out)
    row["robust_accuracy"] = {str(r.epsilon): r.robust_accuracy.value for r in report.results}
    return row


def _ray_worker_threads() -> list[int]:
    import ray

    @ray.remote
    def threads() -> int:
        import torch

        return int(torch.get_num_threads())

    return list(ray.get([threads.remote() for _ in range(2)]))


def child_overhead(spec: dict[str, Any], n_shards: int) -> dict[str, Any]:
    """Ray start, worker start + model load, per-shard overhead, merge cost."""
    import ray
    import torch

    from advguard.evaluate.distributed import RayBackend, ShardWorker, build_evaluator
    from advguard.evaluate.runner import Evaluator
    from advguard.evaluate.threat_model import ThreatModel

    torch.set_num_threads(1)
    tm, model, data, (info, work) = _load(spec)
    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    RayBackend(workers=2)._ray()
    out["ray_start_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    build_evaluator(work)
    out["model_and_data_load_in_process_s"] = time.perf_counter() - t0
    actor = ray.remote(ShardWorker)
    t0 = time.perf_counter()
    actors = [actor.remote(work) for _ in range(2)]
    ray.get([x.pid.remote() for x in actors])
    out["workers_start_and_model_load_s"] = time.perf_counter() - t0
    for x in actors:
        ray.kill(x)
    # the same tiny evaluation (one FGSM step per sample) cut into 2 or n one-sample shards
    tiny = ThreatModel.model_validate(
        {
            **tm.model_dump(mode="json"),
            "name": "tiny",
            "epsilons": [0.1],
            "samples": n_shards,
            "batch_size": 1,
            "attacks": [{"attack": "fgsm"}],
            "sanity_checks": False,
        }
    )
    tiny_work = type(work).of(work.model, work.data, tiny)
    walls = {}
    for shards in (2, n_shards):
        with tempfile.TemporaryDirectory() as ck:
            ev = Evaluator(model, data.x, data.y, tiny, model_info=info, checkpoint_dir=ck)
            t0 = time.perf_counter()
            RayBackend(workers=2, shards=shards).run(ev, tiny_work)
            walls[shards] = time.perf_counter() - t0
    out["tiny_run_wall_s"] = {str(k): v for k, v in walls.items()}
    out["per_shard_overhead_s"] = (walls[n_shards] - walls[2]) / (n_shards - 2)
    out.update(merge_cost())
    return out


def merge_cost(n: int = 10_000, n_eps: int = 4, shards: int = 100) -> dict[str, Any]:
    """Driver-side cost of checking (wire format) and merging ``shards`` shards of ``n``
    samples (synthetic records of the real layout)."""
    from advguard.evaluate.distributed import shard_from_wire, shard_to_wire
    from advguard.evaluate.state import Records, RunState, Shard, StageStats, merge_shards

    rng = np.random.default_rng(0)
    rec = Records.empty(n, n_eps)
    rec.index[:] = np.arange(n)
    rec.label[:] = rng.integers(0, 10, n)
    rec.clean_conf[:] = rng.random(n)
    stats = {(e, a, "suite"): StageStats(n, 1, 2, 3, 0.1) for e in range(n_eps) for a in "abc"}
    parts = np.array_split(np.arange(n), shards)
    wires = [shard_to_wire(Shard(p, rec.take(p), dict(stats), {})) for p in parts]
    t0 = time.perf_counter()
    back = [shard_from_wire(w) for w in wires]
    t_check = time.perf_counter() - t0
    state = RunState([0.1] * n_eps, [], Records.empty(n, n_eps))
    state.records.index[:] = np.arange(n)
    t0 = time.perf_counter()
    merge_shards(state, back, keep=8)
    t_merge = time.perf_counter() - t0
    return {
        "merge_synthetic": {"samples": n, "shards": shards, "epsilons": n_eps},
        "wire_check_s": t_check,
        "merge_s": t_merge,
        "check_and_merge_per_shard_s": (t_check + t_merge) / shards,
    }


# ---------------------------------------------------------------------------
# parent: run the children, compare reports, ratios, targets
# ---------------------------------------------------------------------------
def run_child(args: list[str], threads: int, timeout: float) -> dict[str, Any]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = os.pathsep.join(
        [str(common.REPO / "src"), *filter(None, [env.get("PYTHONPATH")])]
    )
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        res = Path(f.name)
    cmd = [sys.executable, str(Path(__file__).resolve()), *args, "--child-out", str(res)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "timeout_s": timeout}
    if proc.returncode != 0:
        return {"status": "error", "stderr_tail": proc.stderr[-3000:]}
    row = json.loads(res.read_text())
    res.unlink()
    return {"status": "ok", **row}


def numbers(path: Path) -> dict[str, Any]:
    """report.json as flat path -> value, without timings and the environment."""
    from advguard.evaluate.report import report_fields

    return report_fields(json.loads(path.read_text()))


def compare(reports: dict[str, Path]) -> dict[str, Any]:
    base_name = "local-1t"
    base = numbers(reports[base_name])
    out: dict[str, Any] = {"reference": base_name, "compared_fields": len(base)}
    for name, path in reports.items():
        if name == base_name:
            continue
        other = numbers(path)
        diff = sorted(k for k in set(base) | set(other) if base.get(k) != other.get(k))
        out[name] = {"identical": not diff, "differing_fields": diff[:20], "n_differing": len(diff)}
    return out


def score(rows: dict[str, dict[str, Any]], overhead: dict[str, Any]) -> dict[str, Any]:
    w = {k: r.get("wall_s") for k, r in rows.items() if r.get("status") == "ok"}
    ratios: dict[str, Any] = {}
    if {"local-1t", "ray-2w"} <= set(w):
        ratios["ray_speedup_vs_local_1t"] = w["local-1t"] / w["ray-2w"]
    if {"local-2t", "ray-2w"} <= set(w):
        ratios["ray_time_vs_local_2t"] = w["ray-2w"] / w["local-2t"]
    if {"local-1t", "local-2t"} <= set(w):
        ratios["local_2t_speedup_vs_1t"] = w["local-1t"] / w["local-2t"]
    per_shard = overhead.get("per_shard_overhead_s")
    targets = {
        "ray_speedup_vs_local_1t": _target(
            ratios.get("ray_speedup_vs_local_1t"), ">=", TARGETS["ray_speedup_vs_local_1t_min"]
        ),
        "ray_time_vs_local_2t": _target(
            ratios.get("ray_time_vs_local_2t"), "<=", TARGETS["ray_vs_local_2t_max"]
        ),
        "per_shard_overhead_s": _target(per_shard, "<", TARGETS["shard_overhead_s"]),
    }
    return {"ratios": ratios, "targets": targets}


def _target(value: float | None, op: str, bound: float) -> dict[str, Any]:
    if value is None:
        return {"value": None, "target": f"{op} {bound}", "met": None}
    met = {"<": value < bound, "<=": value <= bound, ">=": value >= bound}[op]
    return {"value": round(value, 4), "target": f"{op} {bound}", "met": met}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=120, help="samples evaluated (default 120)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=60,
        help="threat model batch size (default 60: 2 batches of 120 samples, one per worker; "
        "Ray shards are whole batches)",
    )
    p.add_argument("--shards", type=int, default=8, help="Ray work units (default 4/worker)")
    p.add_argument(
        "--threat-model",
        default="linf-standard",
        help="preset (default linf-standard; 'quick' for a smoke run of this script)",
    )
    p.add_argument("--overhead-shards", type=int, default=32)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--data", type=Path, default=common.DEFAULT_DATA)
    p.add_argument("--child-timeout", type=float, default=3600.0)
    p.add_argument("--out", type=Path, default=HERE / "results" / "scale_cpu.json")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--report-dir", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        spec = json.loads(Path(a.spec).read_text())
        if a.child == "overhead":
            row = child_overhead(spec, a.overhead_shards)
        else:
            row = child_eval(spec, a.child, Path(a.report_dir))
        Path(a.child_out).write_text(json.dumps(row))
        return 0
    return parent(a)


def parent(a: argparse.Namespace) -> int:
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_scale_") as td:
        tmp = Path(td)
        spec = prepare(a, tmp)
        spec["shards"] = a.shards
        (tmp / "spec.json").write_text(json.dumps(spec))
        base = ["--spec", str(tmp / "spec.json")]
        rows: dict[str, dict[str, Any]] = {}
        reports: dict[str, Path] = {}
        for name in a.configs:
            print(f"running {name} ...", flush=True)
            reports[name] = tmp / name
            rows[name] = run_child(
                [*base, "--child", name, "--report-dir", str(reports[name])],
                CONFIGS[name][1],
                a.child_timeout,
            )
            print(f"  {name}: {rows[name].get('wall_s', rows[name])}", flush=True)
        print("running overhead ...", flush=True)
        overhead = run_child(
            [*base, "--child", "overhead", "--overhead-shards", str(a.overhead_shards)],
            1,
            a.child_timeout,
        )
        ok = [n for n in reports if rows[n].get("status") == "ok"]
        identity = compare({n: reports[n] / "report.json" for n in ok}) if "local-1t" in ok else {}
    result = common.result_header(SCHEMA, common.environment("cpu", 1))
    result.update(
        {
            "workload": {
                "threat_model": a.threat_model,
                "samples": a.samples,
                "batch_size": a.batch_size,
                "ray_shards": a.shards,
                "data": spec["data_name"],
                "data_sha256": spec["data_sha256"],
                "model": spec["model_meta"],
            },
            "load_average_at_end": os.getloadavg(),
            "configs": rows,
            "overhead": overhead,
            "reports_identical": identity,
            **score(rows, overhead),
            "bench_wall_s": time.perf_counter() - t_all,
            "notes": [
                "wall_s excludes loading the model and data (load_s), includes for Ray its "
                "start, the workers' start and model loads, shards, merge, sanity checks",
                "per_shard_overhead_s: (wall of the tiny run in overhead_shards one-sample "
                "shards - wall in 2 shards) / (overhead_shards - 2), checkpoint writes "
                "included",
            ],
        }
    )
    common.write_json(result, a.out)
    print(json.dumps({"ratios": result["ratios"], "targets": result["targets"]}, indent=2))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
