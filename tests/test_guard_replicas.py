"""Two guard replicas behind one Redis (limits, budgets) and one PostgreSQL (keys, blocks,
decisions): one shared limit exactly, one forensic store, and a block made by one replica
refusing the client at the other on its very next request. Real servers at 127.0.0.1; the
test skips, saying which, when either is absent."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from advguard.guard.app import create_app
from advguard.guard.auth import create_key
from advguard.guard.pipeline import StatefulSlot
from advguard.guard.problems import PROBLEM_BASE
from guard_helpers import CountingStateful, FakeClock, ServerThread, make_guard

PREDICT = "/v1/models/digits/predict"
PG = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def _servers_or_skip() -> None:
    try:
        import redis

        redis.Redis(host="127.0.0.1", port=6379, socket_connect_timeout=1).ping()
    except Exception:
        pytest.skip("Redis at 127.0.0.1:6379 is not reachable")
    try:
        import psycopg

        psycopg.connect(
            "host=127.0.0.1 port=5432 dbname=test user=postgres", connect_timeout=2
        ).close()
    except Exception:
        pytest.skip("PostgreSQL at 127.0.0.1:5432 (db test, user postgres) is not reachable")


@pytest.fixture()
def replicas(tmp_path, digits_split):
    _servers_or_skip()
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).eval()
    tag = f"{random.randrange(16**8):08x}"
    cfg = {
        "storage": {"table_prefix": f"gr{tag}_"},
        "limits": {
            "rate": 0.001,
            "burst": 10,
            "budget": 30,
            "redis_url": "redis://127.0.0.1:6379/0",
            "key_prefix": f"advguard-replicas-{tag}",
        },
    }
    guards = []
    for _ in range(2):  # each replica caches key/block rows for auth.cache_ttl_s of its clock
        guards.append(make_guard(tmp_path, module, cfg=cfg, db_url=PG, clock=FakeClock()))
    try:
        with ServerThread(create_app(guards[0])) as a, ServerThread(create_app(guards[1])) as b:
            yield guards, a.url, b.url
    finally:
        guards[0].limiter.reset()
        guards[0].store.drop_all()
        for g in guards:
            g.close()


def _post(url: str, key: str, x: list) -> httpx.Response:
    return httpx.post(url + PREDICT, json={"inputs": x}, headers={"X-API-Key": key}, timeout=30)


def test_one_rate_limit_across_replicas(replicas, digits_split):
    guards, a, b = replicas
    key = create_key(guards[0].store, "many").key
    x = digits_split[2][:1].tolist()
    urls = [a, b] * 8  # 16 requests at once, half at each replica; burst 10
    with ThreadPoolExecutor(16) as ex:
        codes = list(ex.map(lambda u: _post(u, key, x).status_code, urls))
    assert codes.count(200) == 10 and codes.count(429) == 6


def test_budget_decisions_and_blocks_are_shared(replicas, digits_split):
    guards, a, b = replicas
    x3 = digits_split[2][:3].tolist()
    x1 = digits_split[2][:1].tolist()
    # budget: 30 rows per day, shared; 3-row batches alternate between replicas
    k = create_key(guards[0].store, "budget", ["predict", "admin"]).key
    codes = [_post(u, k, x3).status_code for u in [a, b] * 6]
    assert codes == [200] * 10 + [429] * 2
    # one forensic store: a decision made at A is read back at B
    k2 = create_key(guards[0].store, "reader", ["predict", "admin"]).key
    r = _post(a, k2, x1)
    d = httpx.get(f"{b}/v1/decisions/{r.headers['X-Decision-Id']}", headers={"X-API-Key": k2})
    assert d.status_code == 200 and d.json()["n_rows"] == 1
    # a block made by replica A (its stateful detector) refuses the client at replica B within
    # auth.cache_ttl_s (B may answer from the key and block rows it read less than that ago;
    # the block lives in the shared database). Each replica keeps its own stateful-detector
    # state (per process), so B alone has not seen enough.
    guards[0].stateful = [StatefulSlot("count", CountingStateful(4), "block")]
    k3 = create_key(guards[0].store, "attacker").key
    assert _post(b, k3, x1).status_code == 200  # B reads (and caches) k3's rows: no block
    assert _post(a, k3, x3).status_code == 200  # 3 rows seen by A
    blocked = _post(a, k3, x3)  # 6 > 4: A blocks the client
    assert blocked.json()["type"] == PROBLEM_BASE + "client-blocked"
    assert _post(a, k3, x1).status_code == 403  # at A at once (its own write)
    ttl = guards[1].cfg.auth.cache_ttl_s
    assert 0 < ttl <= 1.0
    clock_b = guards[1].controls.clock
    clock_b.advance(ttl * 0.5)
    assert _post(b, k3, x1).status_code == 200  # B's rows are younger than the TTL
    clock_b.advance(ttl * 0.5)
    at_b = _post(b, k3, x1)  # the TTL has passed since B read them: B reads the block
    assert (at_b.status_code, at_b.json()["type"]) == (403, PROBLEM_BASE + "client-blocked")
