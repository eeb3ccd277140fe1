"""Guard benchmark: what the runtime guard costs over a plain FastAPI endpoint, under HTTP load.

Every configuration serves the same small MNIST CNN (``advguard.models.zoo.small_cnn``, the
weights of benchmarks/bench_attacks.py, cached in benchmarks/.cache) from its own uvicorn
process on 127.0.0.1 (one worker, one torch thread), and wrk (a separate process) posts the
same batch-1 JSON bodies to it:

* ``plain``: a minimal FastAPI endpoint: read the JSON, ``np.asarray``, the model's
  ``predict_proba`` in the thread pool, answer labels and probabilities. The floor.
* ``guard``: ``advguard guard serve`` (``advguard.guard.server.serve``) with its defaults,
  detectors off: API key, rate limit and budget, body and input validation, metrics, a
  decision record per request (SQLite, the default ``record_all_decisions: true``); small
  requests (the benchmark's ~5 KB bodies) run on the event loop while the model's inline runs
  average under ``edge.inline_max_ms`` (5 ms; advguard.guard.inline), else in the thread pool.
* ``guard-pool``: ``guard`` with ``edge: {inline_max_body_bytes: 0}``: every request takes
  the thread-pool hop (the defaults before issue 13).
* ``guard-fs``: the same with feature squeezing (1-bit depth + 2x2 median, calibrated at 5%
  FPR on held-out MNIST) rejecting above its threshold: three model passes per request.
* ``guard-batch`` / ``guard-fs-batch``: the two above with micro-batching
  (``batching: {max_batch: 32, max_wait_ms: 2}``).
* ``guard-inline``: ``guard`` with ``edge: {inline_max_ms: 1000}``: every request of the
  benchmark runs on the event loop whatever it takes (the opt-in setting before issue 13);
  ``guard-batch-inline``: ``guard-batch`` with the same (each request's admission on the
  loop, the batch in the batcher's thread; ``guard-batch``'s defaults admit on the loop too
  while admission stays under the bound).

After the runs the JSON's ``inline_switches`` gives, per guard configuration, how often the
inline rule moved the model to the thread pool and back (``advguard_guard_inline_switches``).

Each configuration runs at 1 connection (latency) and at 32 connections (throughput), for
``--duration`` seconds per run, over ``--rounds`` rounds that interleave the configurations so
that load from other processes hits all of them alike; the best round of each is reported
(highest requests/s; the latencies of that round). Results: ``benchmarks/results/guard.json``.

    python benchmarks/bench_guard.py --out benchmarks/results/guard.json
    python benchmarks/bench_guard.py --quick          # 3 s runs, one round

See benchmarks/README.md ("Guard benchmark") for the JSON fields.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import Request  # the plain endpoint's annotations are resolved from here
from fastapi.responses import JSONResponse

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_attacks import (  # noqa: E402  (data, cached model and environment helpers)
    CACHE,
    DEFAULT_DATA,
    cpu_name,
    get_model,
    git_info,
    load_data,
    load_module,
    n_cores,
    pkg_version,
)

SCHEMA = "advguard-bench-guard/1"
DATA_CANDIDATES = (DEFAULT_DATA, HERE.parents[2] / "shared" / "datasets" / "mnist.npz")
CONFIGS = (
    "plain",
    "guard",
    "guard-pool",
    "guard-fs",
    "guard-batch",
    "guard-fs-batch",
    "guard-inline",
    "guard-batch-inline",
)
MODEL_PATH = "/v1/models/mnist/predict"
FACTORY = "advguard.models.zoo:small_cnn"
TARGETS_TEXT = (
    "the guard's own work (auth, limits, validation, metrics, decision record) adds at most "
    "1 ms at p50 and 3 ms at p99 over the plain endpoint; throughput at least 80% of the plain "
    "endpoint at 32 concurrent clients; with micro-batching the guard's throughput exceeds the "
    "plain endpoint's"
)
P50_MAX_MS, P99_MAX_MS, THROUGHPUT_MIN, BATCH_MIN = 1.0, 3.0, 0.80, 1.0

WRK_LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %(key)s"
local bodies = {%(bodies)s}
local i = 0
request = function()
  i = i %% #bodies + 1
  return wrk.format(nil, nil, nil, bodies[i])
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests": %%d, "duration_us": %%d, "bytes": %%d, "connect": %%d, "read": %%d, ' ..
    '"write": %%d, "status": %%d, "timeout": %%d, "p50_us": %%d, "p90_us": %%d, "p99_us": %%d, ' ..
    '"p999_us": %%d, "max_us": %%d, "mean_us": %%f}\\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max, latency.mean))
end
"""


# -- the servers (each runs in its own process: ``bench_guard.py serve-...``) -----------------
def serve_plain(workdir: Path, port: int) -> None:
    """The floor: the smallest reasonable FastAPI endpoint around the same model."""
    import torch
    import uvicorn
    from fastapi import FastAPI
    from fastapi.concurrency import run_in_threadpool

    from advguard.models.io import load_model

    torch.set_num_threads(1)
    clf = load_model(workdir / "model.safetensors", factory=FACTORY)
    app = FastAPI()

    @app.post(MODEL_PATH)
    async def predict(request: Request) -> JSONResponse:
        x = np.asarray(json.loads(await request.body())["inputs"], dtype=np.float32)
        p = await run_in_threadpool(clf.predict_proba, x)
        return JSONResponse({"labels": p.argmax(1).tolist(), "probabilities": p.tolist()})

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    uvicorn.run(
        app, host="127.0.0.1", port=port, log_level="warning", access_log=False,
        server_header=False,
    )  # fmt: skip


def serve_guard(config: Path) -> None:
    """``advguard guard serve --config config`` without the CLI around it."""
    import torch

    from advguard.guard.config import load_config
    from advguard.guard.server import serve

    torch.set_num_threads(1)
    serve(load_config(config), log_level="warning")


# -- preparation --------------------------------------------------------------------------------
def prepare(
    workdir: Path, data: dict[str, Any], meta: dict[str, Any], n_bodies: int, db_dir: Path | None
) -> dict[str, Any]:
    """Model file, feature-squeezing detector, guard configs and API keys, request bodies."""
    import torch

    from advguard.defenses.detectors import FeatureSqueezingDetector, save_detector
    from advguard.guard.auth import create_key
    from advguard.guard.storage import GuardStore
    from advguard.models import TorchClassifier
    from advguard.models.io import load_model, save_torch

    torch.set_num_threads(1)
    module = load_module(meta["weights"], "cpu")
    save_torch(
        module, workdir / "model.safetensors", factory=FACTORY,
        factory_kwargs={"input_shape": [1, 28, 28], "num_classes": 10},
        input_shape=(1, 28, 28), num_classes=10, bounds=(0.0, 1.0),
    )  # fmt: skip
    clf = load_model(workdir / "model.safetensors", factory=FACTORY)
    assert isinstance(clf, TorchClassifier)
    fs = FeatureSqueezingDetector(clf)
    x_te, y_te = data["x_test"], data["y_test"]
    fs.calibrate(x_te[-1000:], fpr=0.05)
    save_detector(fs, workdir / "fs")
    # bodies: correctly classified test images the detector lets through (every answer 200)
    pool = x_te[: 4 * n_bodies]
    ok = (clf.predict(pool) == y_te[: len(pool)]) & ~fs.detect(pool)
    chosen = pool[ok][:n_bodies] if ok.sum() >= n_bodies else pool[:n_bodies]
    bodies = [json.dumps({"inputs": np.round(x[None], 4).tolist()}) for x in chosen]
    keys = {}
    for name in CONFIGS[1:]:
        (workdir / f"{name}.yaml").write_text(guard_yaml(name, db_dir))
        store = GuardStore(f"sqlite:///{(db_dir or workdir) / (name + '.db')}")
        keys[name] = create_key(store, "bench", ("predict",)).key
        store.close()
    return {
        "bodies": bodies,
        "keys": keys,
        "detector": {"threshold": fs.threshold, "calibration": fs.calibration},
        "body_bytes_mean": float(np.mean([len(b) for b in bodies])),
        "bodies_all_allowed": bool(ok.sum() >= n_bodies),
    }


def guard_yaml(name: str, db_dir: Path | None = None) -> str:
    db = f"{db_dir}/{name}.db" if db_dir is not None else f"{name}.db"
    lines = [
        "model:",
        "  name: mnist",
        "  path: model.safetensors",
        f"  factory: '{FACTORY}'",
        "storage:",
        f"  database_url: 'sqlite:///{db}'",
        "limits: {rate: 1000000.0, burst: 10000000, budget: 1000000000, budget_period: day}",
    ]
    if "-fs" in name:
        lines += ["detectors:", "  - {name: fs, path: fs}"]
    if "-batch" in name:
        lines += ["batching: {max_batch: 32, max_wait_ms: 2}"]
    # batch-1 bodies are ~5 KB: under the default edge.inline_max_body_bytes (64 KiB)
    if name.endswith("-pool"):  # every request takes the thread-pool hop
        lines += ["edge: {inline_max_body_bytes: 0}"]
    if name.endswith("-inline"):  # on the event loop whatever the inline runs take
        lines += ["edge: {inline_max_ms: 1000}"]
    return "\n".join(lines) + "\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(name: str, workdir: Path, port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(HERE.parent / "src"), env.get("PYTHONPATH")) if p
    )
    if name == "plain":
        cmd = [sys.executable, str(Path(__file__)), "serve-plain", str(workdir), str(port)]
    else:
        cfg = workdir / f"{name}.yaml"
        text = cfg.read_text().replace("server:", "")
        cfg.write_text(text + f"server: {{host: 127.0.0.1, port: {port}}}\n")
        cmd = [sys.executable, str(Path(__file__)), "serve-guard", str(cfg)]
    log = open(workdir / f"{name}.log", "wb")  # noqa: SIM115 (the server outlives this call)
    return subprocess.Popen(cmd, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT)


def wait_ready(port: int, proc: subprocess.Popen[bytes], timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server on port {port} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"server on port {port} did not become ready")


def inline_switches(port: int) -> dict[str, float]:
    """The guard's ``advguard_guard_inline_switches_total`` by ``to`` (loop, pool), its
    ``advguard_guard_inline`` gauge (1: on the loop, 0: in the pool) and the average inline
    run in ms (``advguard_guard_inline_run_seconds``), from its /metrics."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            text = r.read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("advguard_guard_inline_switches_total{"):
            to = line.split('to="', 1)[1].split('"', 1)[0]
            out[f"to_{to}"] = float(line.rsplit(" ", 1)[1])
        elif line.startswith("advguard_guard_inline{"):
            out["inline_now"] = float(line.rsplit(" ", 1)[1])
        elif line.startswith("advguard_guard_inline_run_seconds{"):
            out["inline_run_ms"] = round(float(line.rsplit(" ", 1)[1]) * 1000.0, 3)
    return out


# -- load -----------------------------------------------------------------------------------
def wrk_script(workdir: Path, name: str, key: str | None, bodies: list[str]) -> Path:
    lua = WRK_LUA % {
        "key": key or "none",
        "bodies": ",\n".join(f"[==[{b}]==]" for b in bodies),
    }
    path = workdir / f"{name}.lua"
    path.write_text(lua)
    return path


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_wrk(
    port: int, script: Path, connections: int, duration: int, pid: int | None = None
) -> dict[str, Any]:
    threads = min(connections, 2)
    cmd = [
        "wrk", f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--timeout", "10s",
        "--latency", "-s", str(script), f"http://127.0.0.1:{port}{MODEL_PATH}",
    ]  # fmt: skip
    load_before = os.getloadavg()[0]
    cpu_before = cpu_seconds(pid) if pid is not None else None
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60, check=True)
    cpu = cpu_seconds(pid) - cpu_before if pid is not None and cpu_before is not None else None
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("WRKJSON "))
    raw = json.loads(line[len("WRKJSON ") :])
    secs = raw["duration_us"] / 1e6
    errors = raw["connect"] + raw["read"] + raw["write"] + raw["timeout"]
    return {
        "connections": connections,
        "wrk_threads": threads,
        "duration_s": round(secs, 3),
        "requests": raw["requests"],
        "requests_per_s": round(raw["requests"] / secs, 1),
        "latency_ms": {
            k: round(raw[f"{k}_us"] / 1000.0, 3) for k in ("p50", "p90", "p99", "p999", "max")
        },
        "latency_ms_mean": round(raw["mean_us"] / 1000.0, 3),
        "non_2xx": raw["status"],
        # the server's CPU per answered request: barely affected by other processes' load
        "server_cpu_ms_per_request": (
            round(cpu * 1000.0 / raw["requests"], 3)
            if cpu is not None and raw["requests"]
            else None
        ),
        "socket_errors": errors,
        "loadavg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }


# -- scoring ------------------------------------------------------------------------------------
def best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    top = max(runs, key=lambda r: r["requests_per_s"])
    keep = ("requests_per_s", "latency_ms", "server_cpu_ms_per_request")
    return {**top, "rounds": [{k: r[k] for k in keep} for r in runs]}


def score(rows: dict[str, dict[int, dict[str, Any]]], lat_c: int, tp_c: int) -> list[dict]:
    """Ratios vs ``plain`` in the same run and the targets."""
    plain = rows.get("plain")
    targets: list[dict[str, Any]] = []
    if not plain:
        return targets

    def check(name: str, value: float, limit: float, op: str) -> None:
        ok = value <= limit if op == "<=" else value >= limit
        targets.append({"name": name, "value": round(value, 3), "limit": limit, "op": op,
                        "pass": bool(ok)})  # fmt: skip

    for name, by_c in rows.items():
        for c, row in by_c.items():
            ref = plain.get(c)
            if ref is None or name == "plain":
                continue
            row["vs_plain"] = {
                "p50_overhead_ms": round(row["latency_ms"]["p50"] - ref["latency_ms"]["p50"], 3),
                "p99_overhead_ms": round(row["latency_ms"]["p99"] - ref["latency_ms"]["p99"], 3),
                "throughput_ratio": round(row["requests_per_s"] / ref["requests_per_s"], 3),
            }
            if row["server_cpu_ms_per_request"] and ref["server_cpu_ms_per_request"]:
                row["vs_plain"]["server_cpu_ratio"] = round(
                    row["server_cpu_ms_per_request"] / ref["server_cpu_ms_per_request"], 3
                )
    if "guard" in rows and lat_c in rows["guard"]:
        v = rows["guard"][lat_c]["vs_plain"]
        check(f"guard_p50_overhead_ms_at_c{lat_c}", v["p50_overhead_ms"], P50_MAX_MS, "<=")
        check(f"guard_p99_overhead_ms_at_c{lat_c}", v["p99_overhead_ms"], P99_MAX_MS, "<=")
    if "guard" in rows and tp_c in rows["guard"]:
        v = rows["guard"][tp_c]["vs_plain"]
        check(f"guard_throughput_ratio_at_c{tp_c}", v["throughput_ratio"], THROUGHPUT_MIN, ">=")
    if "guard-batch" in rows and tp_c in rows["guard-batch"]:
        v = rows["guard-batch"][tp_c]["vs_plain"]
        check(f"guard_batch_throughput_ratio_at_c{tp_c}", v["throughput_ratio"], BATCH_MIN, ">")
        targets[-1]["pass"] = bool(v["throughput_ratio"] > BATCH_MIN)
    return targets


def environment() -> dict[str, Any]:
    import torch

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_cores_available": n_cores(),
        "torch": torch.__version__,
        "torch_threads_per_server": 1,
        "packages": {
            p: pkg_version(p)
            for p in ("advguard", "fastapi", "starlette", "uvicorn", "pydantic", "sqlalchemy")
        },
        "wrk": subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split("\n")[0],
        "git": {k: v for k, v in git_info().items() if k != "source_sha256_16"},
    }


def print_table(rows: dict[str, dict[int, dict[str, Any]]]) -> None:
    print(f"{'config':16s} {'conns':>5s} {'req/s':>9s} {'p50 ms':>8s} {'p90 ms':>8s} "
          f"{'p99 ms':>8s} {'non2xx':>6s} {'cpu ms':>7s} {'x plain':>8s} {'+p50':>7s} "
          f"{'+p99':>7s}")  # fmt: skip
    for name, by_c in rows.items():
        for c, r in sorted(by_c.items()):
            v = r.get("vs_plain", {})
            lat = r["latency_ms"]
            print(
                f"{name:16s} {c:5d} {r['requests_per_s']:9.1f} {lat['p50']:8.2f} "
                f"{lat['p90']:8.2f} {lat['p99']:8.2f} {r['non_2xx']:6d} "
                f"{r['server_cpu_ms_per_request'] or 0.0:7.3f} "
                f"{v.get('throughput_ratio', 1.0):8.3f} {v.get('p50_overhead_ms', 0.0):7.2f} "
                f"{v.get('p99_overhead_ms', 0.0):7.2f}"
            )


# -- main ---------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 s runs, one round")
    ap.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds; best is kept")
    ap.add_argument("--connections", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    ap.add_argument("--bodies", type=int, default=64, help="distinct request bodies")
    ap.add_argument("--data", type=Path, default=None, help=f"MNIST npz (default {DEFAULT_DATA})")
    ap.add_argument(
        "--db-dir", type=Path, default=None,
        help="folder for the guards' SQLite files (default: the work folder in benchmarks/.cache)",
    )  # fmt: skip
    ap.add_argument("--label", default="", help="free text stored in the JSON (e.g. contended)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.duration, args.rounds = 3, 1
    if args.data is None:  # ../shared of the checkout, or of the folder holding a worktree
        found = [p for p in DATA_CANDIDATES if p.exists()]
        args.data = found[0] if found else DEFAULT_DATA  # missing: sklearn digits fallback
    return args


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    t0 = time.time()
    data = load_data(args.data)
    meta = get_model(data, None, "cpu")
    db_dir = None
    if args.db_dir is not None:
        db_dir = Path(tempfile.mkdtemp(prefix="bench_guard_db_", dir=args.db_dir))
    prep = prepare(workdir, data, meta, args.bodies, db_dir)
    servers: dict[str, tuple[int, subprocess.Popen[bytes]]] = {}
    results: dict[str, dict[int, list[dict[str, Any]]]] = {n: {} for n in args.configs}
    try:
        for name in args.configs:
            port = free_port()
            servers[name] = (port, start_server(name, workdir, port))
        scripts = {}
        for name, (port, proc) in servers.items():
            wait_ready(port, proc)
            key = prep["keys"].get(name)
            scripts[name] = wrk_script(workdir, name, key, prep["bodies"])
            run_wrk(port, scripts[name], max(args.connections), 2)  # warm-up, not kept
        for _ in range(args.rounds):
            for c in args.connections:
                for name, (port, proc) in servers.items():
                    r = run_wrk(port, scripts[name], c, args.duration, proc.pid)
                    results[name].setdefault(c, []).append(r)
        switches = {n: inline_switches(port) for n, (port, _) in servers.items() if n != "plain"}
    finally:
        for _port, proc in servers.values():
            proc.send_signal(signal.SIGINT)
        for _port, proc in servers.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        if db_dir is not None:
            shutil.rmtree(db_dir, ignore_errors=True)
    rows = {n: {c: best(rs) for c, rs in by_c.items()} for n, by_c in results.items()}
    lat_c, tp_c = min(args.connections), max(args.connections)
    targets = score(rows, lat_c, tp_c)
    load = os.getloadavg()
    return {
        "schema": SCHEMA,
        "label": args.label,
        "environment": environment(),
        "contended": load[0] > n_cores(),
        "loadavg_at_end": [round(v, 2) for v in load],
        "config": {
            "duration_s": args.duration,
            "rounds": args.rounds,
            "connections": args.connections,
            "configs": args.configs,
            "bodies": len(prep["bodies"]),
            "body_bytes_mean": prep["body_bytes_mean"],
            "batch_rows_per_request": 1,
            "guard_yaml": {n: guard_yaml(n) for n in args.configs if n != "plain"},
            "database_dir": str(args.db_dir) if args.db_dir else "the benchmark's work folder",
        },
        "data": {"name": data["name"], "source": data["source"], "sha256": data["sha256"]},
        "model": {k: v for k, v in meta.items() if k != "weights"},
        "detector": {"kind": "feature-squeezing", **prep["detector"]},
        "rows": {n: {str(c): r for c, r in by_c.items()} for n, by_c in rows.items()},
        "inline_switches": switches,
        "targets_text": TARGETS_TEXT,
        "targets": targets,
        "targets_pass": bool(targets) and all(t["pass"] for t in targets),
        "notes": NOTES,
        "seconds": round(time.time() - t0, 1),
    }, rows


NOTES = [
    "Latency targets are judged at the lowest connection count (one client: no queueing), the "
    "throughput targets at the highest; ratios compare configurations of the same run.",
    "Each server is one uvicorn process, one worker, one torch thread; wrk runs on the same "
    "machine, so on a 2-core machine the load generator competes with the server for CPU.",
    "The guard records a decision row per request in SQLite (WAL, synchronous=FULL) on the "
    "benchmark's disk: with the defaults (no request is forensic here) a background writer "
    "commits them in groups just after the answers (forensics.plain_records: background); "
    "key, block, throttle and isolation rows are cached for auth.cache_ttl_s (1 s).",
    "The plain endpoint reads the JSON with json.loads and np.asarray and runs the model in the "
    "thread pool (what a sync FastAPI endpoint does); it has no auth, limits, validation, "
    "metrics or records.",
    "server_cpu_ms_per_request is the server process's user+system CPU time (all threads, "
    "/proc/<pid>/stat) during the run divided by the requests wrk counted: the cost of a "
    "request to the server, which other processes' load changes far less than wall time.",
    "contended is true when the 1-minute load average at the end exceeded the core count: other "
    "processes competed for the CPU and the absolute numbers (and, less, the ratios) are noisy.",
]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve-plain"]:
        serve_plain(Path(argv[1]), int(argv[2]))
        return 0
    if argv[:1] == ["serve-guard"]:
        serve_guard(Path(argv[1]))
        return 0
    if shutil.which("wrk") is None:
        print("wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 2
    args = parse_args(argv)
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench_guard_", dir=CACHE) as td:
        result, rows = run(args, Path(td))
    print_table(rows)
    for t in result["targets"]:
        print(f"target {t['name']}: {t['value']} {t['op']} {t['limit']}: "
              f"{'pass' if t['pass'] else 'FAIL'}")  # fmt: skip
    if result["contended"]:
        print(f"note: contended machine (load {result['loadavg_at_end'][0]})")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
