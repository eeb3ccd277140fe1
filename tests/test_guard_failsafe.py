"""The guard when a store stops answering: fail closed (503, Retry-After) by default, fail
open only where configured, and recover by itself when the store is back. The outages are
real: the guard talks to the real Redis / PostgreSQL through a TCP proxy that the test cuts."""

from __future__ import annotations

import logging
import random

import pytest
import torch
from fastapi.testclient import TestClient

from advguard.guard.app import create_app
from advguard.guard.auth import create_key
from advguard.guard.problems import PROBLEM_BASE
from guard_helpers import FakeClock, make_guard
from netproxy import Proxy

PREDICT = "/v1/models/digits/predict"


def _redis_up() -> bool:
    try:
        import redis

        return bool(redis.Redis(host="127.0.0.1", port=6379, socket_connect_timeout=1).ping())
    except Exception:
        return False


def _pg_up() -> bool:
    try:
        import psycopg

        psycopg.connect(
            "host=127.0.0.1 port=5432 dbname=test user=postgres", connect_timeout=2
        ).close()
    except Exception:
        return False
    return True


@pytest.fixture(scope="module")
def module() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).eval()


@pytest.fixture()
def x(digits_split):
    return digits_split[2][:2].tolist()


def _post(c: TestClient, key: str, x) -> tuple[int, str | None, dict[str, str]]:
    r = c.post(PREDICT, json={"inputs": x}, headers={"X-API-Key": key})
    slug = r.json().get("type", "").removeprefix(PROBLEM_BASE) if r.status_code != 200 else None
    return r.status_code, slug, dict(r.headers)


def _redis_guard(tmp_path, module, proxy: Proxy, fail_open: bool):
    lim = {
        "rate": 1000.0,
        "burst": 1000,
        "budget": 5,
        "budget_period": "day",
        "redis_url": f"redis://127.0.0.1:{proxy.port}/0",
        "key_prefix": f"advguard-failsafe-{random.randrange(16**8):08x}",
        "fail_open": fail_open,
    }
    return make_guard(tmp_path, module, cfg={"limits": lim})


@pytest.mark.parametrize("fail_open", [False, True])
def test_redis_outage(tmp_path, module, x, fail_open, caplog):
    if not _redis_up():
        pytest.skip("Redis at 127.0.0.1:6379 is not reachable")
    with Proxy(6379) as proxy:
        g = _redis_guard(tmp_path, module, proxy, fail_open)
        key = create_key(g.store, "c").key
        c = TestClient(create_app(g), raise_server_exceptions=False)
        try:
            assert _post(c, key, x)[0] == 200  # 2 of 5 budget rows
            proxy.cut()
            with caplog.at_level(logging.WARNING, logger="advguard.guard"):
                outage = [_post(c, key, x) for _ in range(3)]
            if fail_open:
                # answered without limits: the 6 rows do not count against the budget
                assert [s for s, _, _ in outage] == [200, 200, 200]
                assert "fail_open" in caplog.text
            else:
                assert [(s, slug) for s, slug, _ in outage] == [(503, "dependency-unavailable")] * 3
                assert all(h["retry-after"] == "5" for _, _, h in outage)
            assert key not in caplog.text
            proxy.restore()
            back = [_post(c, key, x)[:2] for _ in range(2)]
            # recovered: 2 more rows fit the budget (4 of 5), the next batch of 2 does not
            assert back == [(200, None), (429, "budget-exhausted")]
        finally:
            if proxy._listener is None:
                proxy.restore()
            g.limiter.reset()
            g.close()


@pytest.mark.parametrize("fail_open", [False, True])
def test_database_outage(tmp_path, module, x, fail_open, caplog):
    if not _pg_up():
        pytest.skip("PostgreSQL at 127.0.0.1:5432 (db test, user postgres) is not reachable")
    prefix = f"gf{random.randrange(16**8):08x}_"
    with Proxy(5432) as proxy:
        url = f"postgresql+psycopg://postgres@127.0.0.1:{proxy.port}/test?connect_timeout=2"
        clock = FakeClock()
        g = make_guard(
            tmp_path,
            module,
            cfg={"storage": {"table_prefix": prefix}, "forensics": {"fail_open": fail_open}},
            db_url=url,
            clock=clock,
        )
        key = create_key(g.store, "c").key
        c = TestClient(create_app(g), raise_server_exceptions=False)
        try:
            assert _post(c, key, x)[0] == 200
            proxy.cut()
            # the key's rows read less than auth.cache_ttl_s ago serve until then
            clock.advance(g.cfg.auth.cache_ttl_s)
            with caplog.at_level(logging.WARNING, logger="advguard.guard"):
                s, slug, h = _post(c, key, x)
            # keys cannot be read: authentication fails closed even with forensics.fail_open
            assert (s, slug, h["retry-after"]) == (503, "dependency-unavailable", "5")
            assert "database unavailable" in caplog.text and key not in caplog.text
            r = c.get("/readyz")
            assert r.status_code == 503
            proxy.restore()
            s, slug, _ = _post(c, key, x)
            assert (s, slug) == (200, None)
            assert c.get("/readyz").status_code == 200
        finally:
            if proxy._listener is None:
                proxy.restore()
            g.store.drop_all()
            g.close()


def test_forensic_write_failure(tmp_path, module, x, caplog):
    """The record of a decision fails to commit (after authentication succeeded; here its
    table is gone): 503 by default; answered and logged with forensics.fail_open."""
    for fail_open, expected in ((False, 503), (True, 200)):
        d = tmp_path / str(fail_open)
        d.mkdir()
        # every request sampled: forensic records, committed before the answer
        cfg = {"forensics": {"fail_open": fail_open, "sample_rate": 1.0}}
        g = make_guard(d, module, cfg=cfg)
        key = create_key(g.store, f"c{fail_open}").key
        c = TestClient(create_app(g), raise_server_exceptions=False)
        g.store.decisions.drop(g.store.engine)
        with caplog.at_level(logging.WARNING, logger="advguard.guard"):
            s, slug, _ = _post(c, key, x)
        assert s == expected
        if not fail_open:
            assert slug == "dependency-unavailable"
            assert "not recorded" in caplog.text
        else:
            assert "fail_open" in caplog.text
        g.close()
