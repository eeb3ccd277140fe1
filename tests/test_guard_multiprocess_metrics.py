"""Prometheus multiprocess mode of ``advguard guard serve --workers N``: every scrape answers the
sum over the workers (a real two-worker server behind Redis), the merge rules of the gauges
(simulated workers in one process), the metrics directory ``serve`` prepares, and the one-process
output left as it was."""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import generate_latest, values
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from advguard.cli import app as cli_app
from advguard.errors import InputError
from advguard.guard import server
from advguard.guard.config import GuardConfig
from advguard.guard.metrics import GuardMetrics, reap_dead_workers
from guard_helpers import free_port
from model_files import mlp_file

FACTORY_KW = {"input_shape": [1, 8, 8], "num_classes": 10, "hidden": [16]}
N_REQUESTS = 40


def _samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """The samples named ``name`` in an exposition, by their sorted labels."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


# -- one process: as before --------------------------------------------------------------------


def test_one_process_output_is_unchanged(monkeypatch):
    """Without the multiprocess directory the guard's registry is what a scrape reads (the same
    bytes, ``_created`` samples included) and the drift gauges read their function at scrape."""
    m = GuardMetrics()
    assert m.multiproc is None and m.scrape_registry() is m.registry
    m.child(m.requests, "digits", "1", "predict", "200").inc(3)
    calls = []

    def drift() -> tuple[float, float, float]:
        calls.append(1)
        return (0.25, 0.5, -1.5)

    m.watch_drift("digits", drift)
    body = m.render()
    assert body == generate_latest(m.registry)
    text = body.decode()
    assert "advguard_guard_requests_created" in text
    assert _samples(text, "advguard_guard_drift_input_psi") == {(("model", "digits"),): 0.25}
    assert _samples(text, "advguard_guard_drift_confidence_zscore") == {
        (("model", "digits"),): -1.5
    }
    assert len(calls) >= 3 and m._refresher is None  # read at scrape, no refresh thread
    m.close()

    seen = {}

    def fake_run(app, **kw):
        seen["env"] = os.environ.get(server.MULTIPROC_ENV)
        seen["workers"] = kw.get("workers")

    import uvicorn

    monkeypatch.delenv(server.MULTIPROC_ENV, raising=False)
    monkeypatch.setattr(uvicorn, "run", fake_run)
    monkeypatch.setattr(server, "build_asgi", lambda cfg: object())
    server.serve(GuardConfig())
    assert seen == {"env": None, "workers": None}  # workers == 1: no directory, one app


# -- the merge rules, two simulated workers in this process -----------------------------------


@contextlib.contextmanager
def _worker(pid: int, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Metrics created (and children labelled) inside write to the files of process ``pid``."""
    cls = values.MultiProcessValue(process_identifier=lambda: pid)
    with monkeypatch.context() as mp:
        mp.setattr(values, "ValueClass", cls)
        yield


def test_scrape_merges_the_workers_files(tmp_path, monkeypatch):
    monkeypatch.setenv(server.MULTIPROC_ENV, str(tmp_path))
    # two running processes (this one and its parent) and one that is gone (pid > pid_max)
    pid_a, pid_b, dead = os.getpid(), os.getppid(), 2**22 + 12345
    drift_a = [math.nan, math.nan, math.nan]
    open_incidents = [2.0]
    with _worker(pid_a, monkeypatch):
        a = GuardMetrics()
        assert a.multiproc == str(tmp_path)
        a.requests.labels("digits", "1", "predict", "200").inc(3)
        a.latency.labels("digits", "predict").observe(0.003)
        a.watch_drift("digits", lambda: tuple(drift_a))
        gauge = a.gauge("advguard_guard_incidents_open", "Open incidents.")
        a.watch(gauge, lambda: open_incidents[0], per_worker=False)
        a.refresh()
    with _worker(pid_b, monkeypatch):
        b = GuardMetrics()
        b.requests.labels("digits", "1", "predict", "200").inc(4)
        b.requests.labels("digits", "1", "predict", "429").inc()
        b.latency.labels("digits", "predict").observe(0.3)
        b.watch_drift("digits", lambda: (0.4, 0.1, 2.0))
        b.refresh()
    with _worker(dead, monkeypatch):
        c = GuardMetrics()
        c.requests.labels("digits", "1", "predict", "200").inc(10)
        c.watch_drift("digits", lambda: (7.0, 7.0, 7.0))
        c.refresh()
    model = (("model", "digits"),)
    try:
        assert len(list(tmp_path.glob(f"gauge_live*_{dead}.db"))) == 2
        text = a.render().decode()
        # the dead worker's live gauges left the merge; its counters stay in the sums
        assert not list(tmp_path.glob(f"gauge_live*_{dead}.db"))
        assert reap_dead_workers(str(tmp_path)) == []  # the scrape reaped it already
        req = _samples(text, "advguard_guard_requests_total")
        assert sorted(req.values()) == [1.0, 17.0]  # summed over the workers, per label set
        assert _samples(text, "advguard_guard_request_latency_seconds_count") == {
            (("endpoint", "predict"), ("model", "digits")): 2.0
        }
        # b's window is the only one with rows: the max leaves out a's NaN (written as -inf)
        assert _samples(text, "advguard_guard_drift_input_psi") == {model: 0.4}
        assert _samples(text, "advguard_guard_drift_confidence_zscore") == {model: 2.0}
        assert _samples(text, "advguard_guard_incidents_open") == {(): 2.0}
        assert "pid" not in text

        drift_a[:] = [0.9, 0.05, -3.0]
        open_incidents[0] = 5.0
        text = a.render().decode()  # a answers: it writes its own values first
        assert _samples(text, "advguard_guard_drift_input_psi") == {model: 0.9}
        assert _samples(text, "advguard_guard_drift_prediction_psi") == {model: 0.1}
        assert _samples(text, "advguard_guard_drift_confidence_zscore") == {model: -3.0}
        assert _samples(text, "advguard_guard_incidents_open") == {(): 5.0}
        assert "advguard_guard_requests" in {f.name for f in a.collect()}

        # no worker's window has rows: NaN, as in one process
        with _worker(pid_b, monkeypatch):
            from prometheus_client.multiprocess import mark_process_dead

            mark_process_dead(pid_b, str(tmp_path))
        drift_a[:] = [math.nan] * 3
        text = a.render().decode()
        assert math.isnan(_samples(text, "advguard_guard_drift_input_psi")[model])
        assert _samples(text, "advguard_guard_drift_confidence_zscore") == {model: -3.0}
    finally:
        for m in (a, b, c):
            m.close()
        values.close_all_multiprocess_files()


def test_serve_prepares_a_private_directory(tmp_path, monkeypatch):
    import uvicorn

    seen: dict[str, object] = {}

    def fake_run(app, **kw):
        path = os.environ[server.MULTIPROC_ENV]
        seen.update(app=app, workers=kw["workers"], path=path)
        seen["mode"] = os.stat(path).st_mode & 0o777
        seen["files"] = sorted(os.listdir(path))

    monkeypatch.delenv(server.MULTIPROC_ENV, raising=False)
    monkeypatch.setattr(uvicorn, "run", fake_run)
    monkeypatch.setattr(server, "build_asgi", lambda cfg: object())
    cfg = GuardConfig.model_validate(
        {"server": {"workers": 2}, "limits": {"redis_url": "redis://127.0.0.1:6379/0"}}
    )
    server.serve(cfg)
    assert seen["workers"] == 2 and seen["app"] == "advguard.guard.server:app_from_env"
    assert seen["mode"] == 0o700 and seen["files"] == []
    assert not os.path.exists(str(seen["path"]))  # made by serve: removed after the run
    assert server.MULTIPROC_ENV not in os.environ

    given = tmp_path / "prom"
    given.mkdir(mode=0o700)
    (given / "counter_999.db").write_bytes(b"stale")
    (given / "notes.txt").write_text("kept")
    monkeypatch.setenv(server.MULTIPROC_ENV, str(given))
    server.serve(cfg)
    assert seen["path"] == str(given) and seen["files"] == ["notes.txt"]  # stale files wiped
    assert given.is_dir()  # the operator's directory stays
    given.chmod(0o777)
    with pytest.raises(InputError, match="only its owner"):
        server.serve(cfg)


# -- a real two-worker server -----------------------------------------------------------------


def _redis_or_skip() -> None:
    try:
        import redis

        redis.Redis(host="127.0.0.1", port=6379, socket_connect_timeout=1).ping()
    except Exception:
        pytest.skip("Redis at 127.0.0.1:6379 is not reachable (needed by --workers 2)")


def _model(tmp_path: Path) -> Path:
    return mlp_file(tmp_path / "digits.safetensors", **FACTORY_KW)


def _wait_ready(url: str, proc: subprocess.Popen, deadline_s: float = 120.0) -> None:
    import httpx

    end = time.monotonic() + deadline_s
    while time.monotonic() < end and proc.poll() is None:
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        time.sleep(0.1)
    out = b""
    if proc.poll() is not None and proc.stdout is not None:
        out = proc.stdout.read()
    pytest.fail(f"the guard did not become ready: {out.decode()[-2000:]}")


@contextlib.contextmanager
def _two_worker_guard(tmp_path: Path) -> Iterator[tuple[str, str, Path]]:
    """``advguard guard serve --workers 2`` (own process group, Redis limits under a unique
    key prefix, the operator's metrics directory ``prom`` with a stale file in it); yields the
    URL, a key and that directory once both workers have started. Stopped with SIGINT."""
    model = _model(tmp_path)
    port = free_port()
    tag = f"{random.randrange(16**8):08x}"
    cfgp = tmp_path / "guard.yaml"
    cfgp.write_text(
        f"model:\n  name: digits\n  path: {model.name}\n"
        f"server:\n  port: {port}\n  workers: 2\n"
        f"limits:\n  rate: 1000\n  burst: 1000\n  budget: 100000\n"
        f"  redis_url: redis://127.0.0.1:6379/0\n  key_prefix: advguard-mp-{tag}\n"
    )
    r = CliRunner().invoke(cli_app, ["guard", "keys", "create", "mp", "-c", str(cfgp), "--json"])
    assert r.exit_code == 0, r.output
    prom = tmp_path / "prom"
    prom.mkdir(mode=0o700)
    (prom / "counter_1.db").write_bytes(b"stale")  # a previous run's: wiped by serve
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    env[server.MULTIPROC_ENV] = str(prom)
    cmd = [sys.executable, "-c", "from advguard.cli import main; main()", "guard", "serve"]
    proc = subprocess.Popen(
        [*cmd, "-c", str(cfgp)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: the workers are stopped with it
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, proc)
        # each worker makes its open-incidents gauge file when its guard is built
        end = time.monotonic() + 120
        while len(list(prom.glob("gauge_livemostrecent_*.db"))) < 2:
            assert time.monotonic() < end and proc.poll() is None, "the 2nd worker did not start"
            time.sleep(0.1)
        yield url, json.loads(r.output)["key"], prom
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate(timeout=10)
        import redis

        rc = redis.Redis(host="127.0.0.1", port=6379)
        for k in rc.scan_iter(f"advguard-mp-{tag}*"):
            rc.delete(k)
    assert b"Traceback" not in out, out.decode()[-3000:]
    # the workers' lifespan ends marked them dead: no live gauge file is left
    assert not list(prom.glob("gauge_live*.db")), sorted(os.listdir(prom))


def _per_worker_requests(prom: Path) -> dict[str, float]:
    """``advguard_guard_requests_total`` summed in each worker's own counter file."""
    return {
        f.name: sum(
            s.value
            for fam in MultiProcessCollector.merge([str(f)])
            for s in fam.samples
            if s.name == "advguard_guard_requests_total"
        )
        for f in prom.glob("counter_*.db")
    }


def test_two_workers_every_scrape_counts_every_request(tmp_path):
    _redis_or_skip()
    import httpx

    x = np.random.default_rng(0).uniform(0, 1, (2, 1, 8, 8)).astype(np.float32).tolist()
    with _two_worker_guard(tmp_path) as (url, key, prom):

        def send(n: int) -> list[int]:
            with httpx.Client(base_url=url, timeout=30) as c:  # one connection per client
                return [
                    c.post(
                        "/v1/models/digits/predict",
                        json={"inputs": x},
                        headers={"Authorization": f"Bearer {key}"},
                    ).status_code
                    for _ in range(n)
                ]

        sent = 0
        for _ in range(5):  # the kernel picks the worker of a connection: until both had some
            with ThreadPoolExecutor(8) as pool:
                codes = [c for part in pool.map(send, [N_REQUESTS // 8] * 8) for c in part]
            assert codes == [200] * N_REQUESTS
            sent += N_REQUESTS
            per_worker = _per_worker_requests(prom)
            if len(per_worker) == 2 and min(per_worker.values()) > 0:
                break
        assert "counter_1.db" not in per_worker  # the stale file did not add up
        # both workers answered requests: one worker's counters alone are not the total
        assert sum(per_worker.values()) == sent and len(per_worker) == 2, per_worker
        assert all(0 < v < sent for v in per_worker.values()), per_worker
        for _ in range(12):
            with httpx.Client(base_url=url, timeout=30) as c:  # a new connection each time
                text = c.get("/metrics").text
            totals = _samples(text, "advguard_guard_requests_total")
            assert sum(totals.values()) == sent, totals
            rows = _samples(text, "advguard_guard_input_rows_total")
            assert sum(rows.values()) == 2 * sent
            count = _samples(text, "advguard_guard_request_latency_seconds_count")
            assert sum(count.values()) == sent
