"""Durability under ``kill -9``: a guard process killed 20 times while clients hammer it loses
no decision record that it acknowledged to a client (every 200 carries ``X-Decision-Id``, and
the record is committed before the answer leaves), and its SQLite store opens cleanly each
time (WAL, synchronous FULL)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from cryptography.fernet import Fernet

from advguard.guard.auth import create_key
from advguard.guard.forensics import decode_payload
from advguard.guard.storage import GuardStore
from advguard.models.io import save_torch
from advguard.models.zoo import mlp
from guard_helpers import free_port

httpx = pytest.importorskip("httpx")

KILLS = 20
CLIENTS = 4
HERE = Path(__file__).parent


def _setup(tmp_path: Path) -> tuple[Path, str, str]:
    kw = {"input_shape": [1, 8, 8], "num_classes": 10, "hidden": [16]}
    torch.manual_seed(0)
    save_torch(
        mlp(**kw),
        tmp_path / "m.safetensors",
        factory="advguard.models.zoo:mlp",
        factory_kwargs=kw,
        input_shape=(1, 8, 8),
        num_classes=10,
        bounds=(0.0, 1.0),
    )
    cfg = tmp_path / "guard.yaml"
    cfg.write_text(
        "model: {name: digits, path: m.safetensors}\n"
        "limits: {rate: 100000, burst: 100000, budget: null}\n"
        "forensics: {mode: encrypted, sample_rate: 1.0}\n"
    )
    store = GuardStore(f"sqlite:///{tmp_path / 'guard.db'}")
    key = create_key(store, "load").key
    store.close()
    return cfg, key, Fernet.generate_key().decode()


def _wait_ready(url: str, deadline_polls: int = 2400) -> None:
    for _ in range(deadline_polls):
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.025)
    pytest.fail("the guard child did not become ready")


def _client(url: str, key: str, acked: list[str], errors: list[str], stop: threading.Event):
    x = np.random.default_rng(len(acked)).uniform(0, 1, (1, 1, 8, 8)).round(3).tolist()
    with httpx.Client(timeout=5) as c:
        while not stop.is_set():
            try:
                r = c.post(
                    f"{url}/v1/models/digits/predict",
                    json={"inputs": x},
                    headers={"X-API-Key": key},
                )
            except httpx.TransportError as e:
                errors.append(type(e).__name__)
                time.sleep(0.01)
                continue
            assert r.status_code == 200, r.text
            acked.append(r.headers["X-Decision-Id"])


def test_kill_9_under_load_loses_no_acknowledged_record(tmp_path):
    cfg, key, fkey = _setup(tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "ADVGUARD_GUARD_FERNET_KEY": fkey}
    zygote = subprocess.Popen(
        [sys.executable, str(HERE / "guard_zygote.py"), str(cfg)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        cwd=tmp_path,
        text=True,
    )
    rng = random.Random(0)
    acked: list[str] = []
    errors: list[str] = []
    per_kill: list[int] = []
    try:
        for _ in range(KILLS):
            port = free_port()
            assert zygote.stdin is not None and zygote.stdout is not None
            zygote.stdin.write(f"{port}\n")
            zygote.stdin.flush()
            pid = int(zygote.stdout.readline())
            url = f"http://127.0.0.1:{port}"
            _wait_ready(url)
            mine: list[str] = []
            stop = threading.Event()
            threads = [
                threading.Thread(target=_client, args=(url, key, mine, errors, stop), daemon=True)
                for _ in range(CLIENTS)
            ]
            for t in threads:
                t.start()
            target = 5 + rng.randrange(30)  # kill at a random point of the load
            while len(mine) < target:
                time.sleep(0.002)
            os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
            stop.set()
            for t in threads:
                t.join(timeout=10)
            per_kill.append(len(mine))
            acked += mine
    finally:
        if zygote.stdin:
            zygote.stdin.close()
        zygote.wait(timeout=30)

    store = GuardStore(f"sqlite:///{tmp_path / 'guard.db'}")
    try:
        with store.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA integrity_check").scalar() == "ok"
        missing = [d for d in acked if store.get_decision(d) is None]
        assert missing == [], f"{len(missing)} of {len(acked)} acknowledged records lost"
        f = Fernet(fkey.encode())
        for d in rng.sample(acked, 20):
            rec = store.get_decision(d)
            assert rec is not None and rec.forensic and rec.payload_encrypted
            assert decode_payload(rec.payload, f).shape == (1, 1, 8, 8)
    finally:
        store.close()
    assert len(per_kill) == KILLS and sum(per_kill) == len(acked) >= KILLS * 5
    assert errors, "no request was cut by a kill: the kills did not happen under load"
