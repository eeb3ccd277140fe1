"""Does the guard's default inline rule keep a slow model off the event loop (issue 13)?

A deliberately slow model (``advguard.models.zoo.mlp`` with three 4096-unit hidden layers,
random weights: ~10-20 ms a forward pass on one torch thread) is served by the guard in three
configurations, each in its own uvicorn process (one worker, one torch thread):

* ``slow-defaults``: the defaults (small requests inline while the model's inline runs
  average under ``edge.inline_max_ms``, 5 ms);
* ``slow-inline``: ``edge: {inline_max_ms: 1000}``: every request on the event loop;
* ``slow-pool``: ``edge: {inline_max_body_bytes: 0}``: every request in the thread pool.

wrk loads the predict endpoint (``--connections``, default 8) while a second wrk measures
``GET /healthz`` at one connection: a model on the event loop delays every other request,
health checks included. Per configuration: the health check's latency (p50/p90/p99) and
requests/s, predict requests/s, and the inline rule's state from /metrics. Quick and
noise-prone; compare the configurations of one run.

    python benchmarks/bench_guard_slow.py --out benchmarks/results/guard_slow_model.json
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_guard as bg  # noqa: E402  (servers, wrk scripts, /metrics reader)

CONFIGS = {
    "slow-defaults": "",
    "slow-inline": "edge: {inline_max_ms: 1000}\n",
    "slow-pool": "edge: {inline_max_body_bytes: 0}\n",
}
HIDDEN = [4096, 4096, 4096]


def prepare(workdir: Path) -> None:
    import torch

    from advguard.models import zoo
    from advguard.models.io import save_torch

    torch.manual_seed(0)
    kw: dict[str, Any] = {"input_shape": [1, 28, 28], "num_classes": 10, "hidden": HIDDEN}
    save_torch(
        zoo.mlp(**kw).eval(), workdir / "model.safetensors", factory="advguard.models.zoo:mlp",
        factory_kwargs=kw, input_shape=(1, 28, 28), num_classes=10, bounds=(0.0, 1.0),
    )  # fmt: skip


def guard_yaml(workdir: Path, name: str) -> str:
    return (
        "model:\n  name: mnist\n  path: model.safetensors\n  factory: 'advguard.models.zoo:mlp'\n"
        f"storage:\n  database_url: 'sqlite:///{workdir / name}.db'\n"
        "limits: {rate: 1000000.0, burst: 10000000, budget: 1000000000, budget_period: day}\n"
        + CONFIGS[name]
    )


def measure(workdir: Path, name: str, bodies: list[str], conns: int, secs: int) -> dict[str, Any]:
    from advguard.guard.auth import create_key
    from advguard.guard.storage import GuardStore

    (workdir / f"{name}.yaml").write_text(guard_yaml(workdir, name))
    store = GuardStore(f"sqlite:///{workdir / name}.db")
    key = create_key(store, "bench", ("predict",)).key
    store.close()
    port = bg.free_port()
    proc = bg.start_server(name, workdir, port)
    try:
        bg.wait_ready(port, proc)
        script = bg.wrk_script(workdir, name, key, bodies)
        url = f"http://127.0.0.1:{port}"
        load = subprocess.Popen(
            ["wrk", "-t1", f"-c{conns}", f"-d{secs + 4}s", "--timeout", "10s", "-s", str(script),
             url + bg.MODEL_PATH],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        time.sleep(2)  # the rule has seen the model by now
        hz = subprocess.run(
            ["wrk", "-t1", "-c1", f"-d{secs}s", "--latency", url + "/healthz"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        predict = load.communicate()[0]
        lat = dict(re.findall(r"^\s+(50|90|99)%\s+(\S+)", hz, re.M))
        return {
            "healthz_latency": {f"p{k}": v for k, v in lat.items()},
            "healthz_requests_per_s": float(_rps(hz)),
            "predict_requests_per_s": float(_rps(predict)),
            "inline": bg.inline_switches(port),
        }
    finally:
        proc.send_signal(2)
        proc.wait(20)


def _rps(wrk_out: str) -> str:
    m = re.search(r"Requests/sec:\s+(\S+)", wrk_out)
    return m.group(1) if m else "nan"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--connections", type=int, default=8, help="predict connections")
    ap.add_argument("--duration", type=int, default=4, help="seconds of /healthz measurement")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    bodies = [
        json.dumps({"inputs": np.round(rng.random((1, 1, 28, 28)), 3).tolist()}) for _ in range(8)
    ]
    bg.CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench_guard_slow_", dir=bg.CACHE) as td:
        workdir = Path(td)
        prepare(workdir)
        rows = {n: measure(workdir, n, bodies, args.connections, args.duration) for n in CONFIGS}
    for name, row in rows.items():
        print(name, json.dumps(row))
    if args.out is not None:
        doc = {
            "schema": "advguard-bench-guard-slow/1",
            "model": {"factory": "advguard.models.zoo:mlp", "hidden": HIDDEN, "weights": "random"},
            "connections": args.connections,
            "duration_s": args.duration,
            "environment": bg.environment(),
            "rows": rows,
        }
        args.out.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
