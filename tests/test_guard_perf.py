"""The guard's per-request cost cuts keep its behaviour: the control cache (key, block,
throttle, isolation rows kept ``auth.cache_ttl_s`` on an injected clock; this process's own
changes apply at once), the JSON depth read from the bytes, one sweeper thread for the
in-memory limits, and the background writer of non-forensic decision records."""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from limits.storage import memory as limits_memory

from advguard.guard.app import create_app
from advguard.guard.auth import create_key
from advguard.guard.batching import BackgroundWriter
from advguard.guard.config import LimitsConfig
from advguard.guard.controlcache import ControlCache
from advguard.guard.edge import _depth, _text_depth, parse_json
from advguard.guard.incident import isolate_model, open_incident, throttle_client
from advguard.guard.problems import PROBLEM_BASE, Problem
from advguard.guard.ratelimit import Limiter, SweptMemoryStorage
from advguard.guard.storage import GuardStore
from guard_helpers import FakeClock, make_guard

PREDICT = "/v1/models/digits/predict"


@pytest.fixture(scope="module")
def module() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).eval()


@pytest.fixture()
def x1(digits_split) -> list[Any]:
    return digits_split[2][:1].tolist()


def _post(client: TestClient, key: str, x: list[Any]) -> Any:
    return client.post(PREDICT, json={"inputs": x}, headers={"X-API-Key": key})


# -- the control cache ------------------------------------------------------------------
def test_cache_serves_rows_for_the_ttl_then_reads_again(tmp_path):
    store = GuardStore(f"sqlite:///{tmp_path / 'g.db'}")
    other = GuardStore(f"sqlite:///{tmp_path / 'g.db'}")  # another process (CLI, replica)
    clock = FakeClock()
    cache = ControlCache(store, 1.0, clock=clock)
    kid = create_key(store, "a").record.key_id
    assert cache.client("f" * 16) is None and cache.client("f" * 16) is None
    assert cache.reads == 2  # an unknown key id is never cached (a new key works at once)
    state = cache.client(kid)
    assert state is not None and state.block is None and state.limit is None
    reads = cache.reads
    other.add_block(kid, "elsewhere")
    clock.advance(0.99)
    assert cache.client(kid).block is None and cache.reads == reads  # cached, < TTL
    clock.advance(0.01)
    assert cache.client(kid).block is not None and cache.reads == reads + 1  # TTL passed
    other.remove_block(kid)
    store.add_block(kid, "here")  # a write through this store: seen at once
    assert cache.client(kid).block.reason == "here"
    store.close()
    other.close()


def test_decision_writes_do_not_invalidate_but_control_writes_do(tmp_path, module):
    g = make_guard(tmp_path, module, clock=FakeClock())
    try:
        gen = g.store.generation
        client = TestClient(create_app(g))
        key = create_key(g.store, "a").key
        assert g.store.generation > gen  # the key insert
        gen = g.store.generation
        x = np.zeros((1, 1, 8, 8)).tolist()
        for _ in range(3):
            assert _post(client, key, x).status_code == 200
        assert g.background is not None and g.background.flush(10)
        assert g.store.generation == gen  # decision records and request reads leave it
        reads = g.controls.reads
        assert _post(client, key, x).status_code == 200
        assert g.controls.reads == reads  # key, block, throttle, isolation: no query
        assert g.background.flush(10) and len(list(g.store.iter_decisions())) == 4
    finally:
        g.close()


def test_ttl_zero_reads_every_request(tmp_path, module):
    g = make_guard(tmp_path, module, cfg={"auth": {"cache_ttl_s": 0}}, clock=FakeClock())
    try:
        client = TestClient(create_app(g))
        key = create_key(g.store, "a").key
        x = np.zeros((1, 1, 8, 8)).tolist()
        reads = g.controls.reads
        for _ in range(3):
            assert _post(client, key, x).status_code == 200
        # each request: the client's rows for auth and for the rate, the isolation
        assert g.controls.reads == reads + 9
    finally:
        g.close()


def test_incident_throttle_and_isolation_through_the_store_apply_at_once(tmp_path, module, x1):
    g = make_guard(tmp_path, module, clock=FakeClock())
    try:
        client = TestClient(create_app(g))
        created = create_key(g.store, "a")
        assert _post(client, created.key, x1).status_code == 200  # rows now cached
        inc = open_incident(g.store, "t", who="oncall").id
        throttle_client(
            g.store, inc, who="oncall", client_id=created.record.key_id, rate=0.001, burst=1
        )
        codes = [_post(client, created.key, x1).status_code for _ in range(3)]
        assert codes == [200, 429, 429]  # the throttle (burst 1) without waiting for the TTL
        isolate_model(g.store, inc, who="oncall", model="digits", mode="reject")
        other = create_key(g.store, "b").key
        r = _post(client, other, x1)
        assert r.status_code == 422 and r.json()["type"] == PROBLEM_BASE + "rejected"
    finally:
        g.close()


def test_revocation_from_another_process_within_the_ttl(tmp_path, module, x1):
    clock = FakeClock()
    g = make_guard(tmp_path, module, clock=clock)
    try:
        client = TestClient(create_app(g))
        created = create_key(g.store, "a")
        assert _post(client, created.key, x1).status_code == 200
        cli_store = GuardStore(f"sqlite:///{tmp_path / 'guard.db'}")
        assert cli_store.revoke_key(created.record.key_id)
        cli_store.close()
        assert _post(client, created.key, x1).status_code == 200  # cached rows, < TTL
        clock.advance(g.cfg.auth.cache_ttl_s)
        r = _post(client, created.key, x1)
        assert r.status_code == 401 and "revoked" in r.json()["detail"]
        # a wrong secret with a cached key id is still refused: the digest is always compared
        wrong = created.key[:-4] + ("AAAA" if not created.key.endswith("AAAA") else "BBBB")
        assert _post(client, wrong, x1).status_code == 401
    finally:
        g.close()


# -- JSON depth from the bytes ----------------------------------------------------------
def _random_json(rng: random.Random, depth: int) -> Any:
    roll = rng.random()
    if depth >= 7 or roll < 0.3:
        return rng.choice([1, -2.5, 1e-3, True, None, "a[b", "]]", "{x}", "", "q"])
    if roll < 0.65:
        return [_random_json(rng, depth + 1) for _ in range(rng.randrange(0, 4))]
    keys = ["k", "[", "}", "v"]
    return {rng.choice(keys) + str(i): _random_json(rng, depth + 1) for i in range(3)}


def test_text_depth_equals_the_walk_on_random_documents():
    rng = random.Random(0)
    checked = 0
    for _ in range(3000):
        obj = _random_json(rng, 0)
        body = json.dumps(obj, separators=(",", rng.choice([":", ": "]))).encode()
        got = _text_depth(body)
        assert got is None or got == _depth(obj, 10**6), body
        checked += got is not None
    assert checked > 2500  # the fast path answers almost every document
    escaped = json.dumps({"a": ['x\\"]]]', [[1]]]}).encode()
    assert _text_depth(escaped) is None  # an escaped quote: the walk decides
    assert _depth(json.loads(escaped), 100) == 4
    assert _text_depth(b"5") == _depth(5, 10) == 1


def test_text_depth_of_long_documents_and_strings_with_brackets():
    """Over 512 brackets the depth is summed with numpy; brackets inside strings never
    count, however many."""
    rng = random.Random(1)
    for _ in range(200):
        obj = [_random_json(rng, 1) for _ in range(rng.randrange(100, 400))]
        body = json.dumps(obj).encode()
        assert _text_depth(body) == _depth(obj, 10**6)
    wide = {"inputs": [[[0.5] * 8] * 8] * 200, "note": "[[[[{{{{" * 100}
    assert _text_depth(json.dumps(wide).encode()) == _depth(wide, 100) == 4
    assert _text_depth(b"[" + b"[1]," * 20000 + b"[1]]") == 2


def test_parse_json_still_refuses_deep_documents():
    deep = ("[" * 40 + "]" * 40).encode()
    with pytest.raises(Problem) as e:
        parse_json(deep, 32)
    assert e.value.slug == "too-deep"
    assert parse_json(("[" * 32 + "]" * 32).encode(), 32) is not None
    hidden = json.dumps({"s": "[" * 100, "t": '\\"' + "[" * 100}).encode()
    assert parse_json(hidden, 3)["s"] == "[" * 100  # brackets inside strings add no depth


# -- limits: one sweeper thread ---------------------------------------------------------
def test_memory_limits_start_no_timer_per_hit_and_stay_exact(monkeypatch):
    started = []
    real = limits_memory.threading.Timer

    def counting(*a: Any, **kw: Any) -> Any:
        started.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(limits_memory.threading, "Timer", counting)
    lim = Limiter(LimitsConfig(rate=0.001, burst=5, budget=7))
    assert isinstance(lim.storage, SweptMemoryStorage)
    assert [lim.hit_rate("c").allowed for _ in range(7)] == [True] * 5 + [False] * 2
    assert [lim.hit_budget("c", 3).allowed for _ in range(3)] == [True, True, False]
    assert len(started) <= 1  # the library's constructor; none per hit
    key = next(iter(lim.storage.events))
    lim.storage.events[key].append(limits_memory.Entry(-10.0))  # an expired entry, oldest
    n = len(lim.storage.events[key])
    lim.storage.sweep()  # the library's own expiry
    assert len(lim.storage.events[key]) == n - 1
    lim.storage.close()


# -- the background writer ---------------------------------------------------------------
class _Sink:
    def __init__(self, gate: threading.Event | None = None) -> None:
        self.groups: list[list[int]] = []
        self.gate = gate

    def write(self, items: Sequence[int]) -> None:
        if self.gate is not None:
            self.gate.wait(10)
        if 13 in items:
            raise ValueError("bad item")
        self.groups.append(list(items))


def test_background_writer_groups_isolates_failures_and_flushes():
    sink, failed = _Sink(), []
    w: BackgroundWriter[int] = BackgroundWriter(
        sink.write, lambda it, exc: failed.append((it, type(exc).__name__)), linger_s=0.05
    )
    for i in range(20):
        w.put(i)
    assert w.flush(10)
    written = sorted(i for g in sink.groups for i in g)
    assert written == [i for i in range(20) if i != 13] and failed == [(13, "ValueError")]
    assert len(sink.groups) < 20  # grouped (one linger collects the burst)
    w.close()
    with pytest.raises(RuntimeError):
        w.put(1)


def test_background_writer_queue_is_bounded():
    gate = threading.Event()
    sink = _Sink(gate)
    w: BackgroundWriter[int] = BackgroundWriter(sink.write, lambda *_: None, capacity=2)
    w.put(0)  # taken by the writer, which blocks in write()
    done = threading.Event()

    def producer() -> None:
        for i in range(1, 6):
            w.put(i)
        done.set()

    t = threading.Thread(target=producer)
    t.start()
    assert not done.wait(0.3)  # the producer waits for room: the queue holds at most 2
    gate.set()
    assert done.wait(10)
    t.join()
    assert w.flush(10) and sorted(i for g in sink.groups for i in g) == list(range(6))


def test_background_writer_put_wakes_no_thread_and_idle_writer_still_writes():
    """put() never notifies (the running writer polls every linger_s): a row queued while the
    writer idles is still written without a flush, and the writer thread ends when idle."""
    sink = _Sink()
    w: BackgroundWriter[int] = BackgroundWriter(
        sink.write, lambda *_: None, idle_s=0.5, linger_s=0.01
    )
    w.put(0)  # starts the writer thread
    deadline = time.monotonic() + 10
    while not sink.groups and time.monotonic() < deadline:
        time.sleep(0.005)
    assert sink.groups == [[0]]
    notified: list[str] = []  # notifications made by this (the producer's) thread
    cond, me = w._cond, threading.current_thread()
    real_notify_all = cond.notify_all

    def counting_notify_all() -> None:
        if threading.current_thread() is me:
            notified.append("notify_all")
        real_notify_all()

    cond.notify_all = counting_notify_all  # type: ignore[method-assign]
    for i in range(1, 4):
        w.put(i)  # the writer is running and idle: it must find these by itself
    assert notified == []
    while sum(len(g) for g in sink.groups) < 4 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert sorted(i for g in sink.groups for i in g) == [0, 1, 2, 3]
    while w._running and time.monotonic() < deadline:  # idle_s without work: the thread ends
        time.sleep(0.01)
    assert not w._running
    w.put(4)  # a new thread starts
    assert w.flush(10) and sorted(i for g in sink.groups for i in g) == [0, 1, 2, 3, 4]
    w.close()


def test_forensic_records_are_committed_before_the_answer(tmp_path, module, x1):
    cfg = {"forensics": {"sample_rate": 1.0}}  # every request forensic
    g = make_guard(tmp_path, module, cfg=cfg, clock=FakeClock())
    try:
        client = TestClient(create_app(g))
        key = create_key(g.store, "a").key
        r = _post(client, key, x1)
        rec = g.store.get_decision(r.headers["X-Decision-Id"])  # no flush: already there
        assert rec is not None and rec.forensic
        assert g.background is not None and g.background.commits == 0
    finally:
        g.close()


def test_plain_records_before_answer_and_the_decision_endpoint(tmp_path, module, x1):
    g = make_guard(
        tmp_path, module, cfg={"forensics": {"plain_records": "before-answer"}}, clock=FakeClock()
    )
    try:
        assert g.background is None
        client = TestClient(create_app(g))
        key = create_key(g.store, "a", ["predict", "admin"]).key
        r = _post(client, key, x1)
        assert g.store.get_decision(r.headers["X-Decision-Id"]) is not None
    finally:
        g.close()
    g = make_guard(tmp_path, module, clock=FakeClock())  # default: background
    try:
        client = TestClient(create_app(g))
        key = create_key(g.store, "b", ["predict", "admin"]).key
        r = _post(client, key, x1)
        d = client.get(f"/v1/decisions/{r.headers['X-Decision-Id']}", headers={"X-API-Key": key})
        assert d.status_code == 200 and d.json()["action"] == "allow"  # queued: flushed first
    finally:
        g.close()


# -- requests_total labels the version that answered --------------------------------------
def test_requests_metric_labels_the_canary_version(tmp_path):
    from advguard.guard.pipeline import DetectorSlot
    from test_guard_rollout import AlwaysFlags, build, linear, metric

    name = "advguard_guard_requests_total"
    x = np.zeros((1, 1, 8, 8)).tolist()
    g = build(tmp_path, {"rollout": {"weight": 1.0}}, canary=linear(1, "digits:2"))
    try:
        client = TestClient(create_app(g))
        key = create_key(g.store, "a").key
        for _ in range(3):
            assert _post(client, key, x).json()["model_version"] == "digits:2"
        labels = {"model": "digits", "endpoint": "v1-predict", "status": "200"}
        assert metric(g, name, version="digits:2", **labels) == 3
        assert metric(g, name, version="digits:1", **labels) == 0
    finally:
        g.close()
    flagger = [DetectorSlot("always", AlwaysFlags(), [(0.5, "reject")])]
    (tmp_path / "r").mkdir()
    g = build(
        tmp_path / "r",
        {"rollout": {"weight": 1.0}},
        canary=linear(1, "digits:2"),
        canary_detectors=flagger,
    )
    try:
        client = TestClient(create_app(g))
        key = create_key(g.store, "a").key
        assert _post(client, key, x).status_code == 422  # the canary's detector refused it
        refused = {"model": "digits", "endpoint": "v1-predict", "status": "422"}
        assert metric(g, name, version="digits:2", **refused) == 1
        assert metric(g, name, version="digits:1", **refused) == 0
    finally:
        g.close()


def test_a_failed_background_record_is_counted_and_logged(tmp_path, module, x1, caplog):
    g = make_guard(tmp_path, module, clock=FakeClock())
    try:
        client = TestClient(create_app(g))
        key = create_key(g.store, "a").key
        g.store.decisions.drop(g.store.engine)  # the table is gone: every write fails
        with caplog.at_level(logging.ERROR, logger="advguard.guard"):
            assert _post(client, key, x1).status_code == 200  # the answer does not wait
            assert g.background is not None and g.background.flush(10)
        fails = g.metrics.registry.get_sample_value(
            "advguard_guard_forensic_write_failures_total", {"model": "digits"}
        )
        assert fails == 1 and "not recorded (OperationalError)" in caplog.text
        assert key not in caplog.text
    finally:
        g.close()


def test_server_shutdown_commits_the_queued_rows(tmp_path, module, x1):
    g = make_guard(tmp_path, module, clock=FakeClock())
    try:
        assert g.background is not None
        g.background._linger_s = 60.0  # the writer would hold the row for a minute
        with TestClient(create_app(g)) as client:  # the lifespan's shutdown flushes
            key = create_key(g.store, "a").key
            r = _post(client, key, x1)
            assert r.status_code == 200
        assert g.store.get_decision(r.headers["X-Decision-Id"]) is not None
    finally:
        g.close()


# -- inline (no thread-pool hop) small requests -------------------------------------------
def test_small_requests_run_inline_with_the_same_answer(tmp_path, module, x1, monkeypatch):
    """With ``edge.inline_max_body_bytes`` a request whose body fits runs on the event loop
    (no run_in_threadpool call) and is answered, recorded and refused exactly as with the hop;
    a larger body still takes the hop."""
    import advguard.guard.app as app_mod

    hops: list[str] = []
    real_hop = app_mod.run_in_threadpool

    async def counting_hop(fn, *args, **kwargs):  # type: ignore[no-untyped-def]
        hops.append(getattr(fn, "__name__", "?"))
        return await real_hop(fn, *args, **kwargs)

    monkeypatch.setattr(app_mod, "run_in_threadpool", counting_hop)
    body_len = len(json.dumps({"inputs": x1}))
    answers = {}
    for name, limit in (("hop", 0), ("inline", body_len + 100)):
        (tmp_path / name).mkdir()
        cfg = {"edge": {"inline_max_body_bytes": limit}}
        g = make_guard(tmp_path / name, module, cfg=cfg, clock=FakeClock())
        try:
            client = TestClient(create_app(g))
            key = create_key(g.store, "a").key
            hops.clear()
            r = _post(client, key, x1)
            assert r.status_code == 200
            answers[name] = (r.json(), list(hops))
            assert g.background is not None and g.background.flush(10)
            rec = g.store.get_decision(r.headers["X-Decision-Id"])
            assert rec is not None and rec.action == "allow" and rec.n_rows == len(x1)
            bad = _post(client, key, (np.asarray(x1) + 5.0).tolist())  # out of bounds
            assert bad.status_code == 422  # validation refuses inline too
            if name == "inline":
                hops.clear()
                big = _post(client, key, x1 + x1 + x1)  # over the limit: the hop
                assert big.status_code == 200 and hops == ["admit_and_process"]
        finally:
            g.close()
    (hop_body, hop_hops), (inline_body, inline_hops) = answers["hop"], answers["inline"]
    assert hop_hops == ["admit_and_process"] and inline_hops == []
    assert inline_body["labels"] == hop_body["labels"]
    np.testing.assert_allclose(inline_body["probabilities"], hop_body["probabilities"], atol=1e-7)


def test_batched_small_requests_are_admitted_inline(tmp_path, module, x1, monkeypatch):
    """With micro-batching and ``edge.inline_max_body_bytes`` a small request is parsed,
    validated and charged on the event loop (no hop) and answered by the batch as without."""
    import advguard.guard.app as app_mod

    hops: list[str] = []
    real_hop = app_mod.run_in_threadpool

    async def counting_hop(fn, *args, **kwargs):  # type: ignore[no-untyped-def]
        hops.append(getattr(fn, "__name__", "?"))
        return await real_hop(fn, *args, **kwargs)

    monkeypatch.setattr(app_mod, "run_in_threadpool", counting_hop)
    answers = {}
    for name, limit in (("hop", 0), ("inline", 1 << 20)):
        (tmp_path / name).mkdir()
        cfg = {"edge": {"inline_max_body_bytes": limit}, "batching": {"max_batch": 4}}
        g = make_guard(tmp_path / name, module, cfg=cfg, clock=FakeClock())
        try:
            with TestClient(create_app(g)) as client:
                key = create_key(g.store, "a").key
                hops.clear()
                r = _post(client, key, x1)
                assert r.status_code == 200
                answers[name] = (r.json(), list(hops))
                assert _post(client, key, (np.asarray(x1) + 5.0).tolist()).status_code == 422
        finally:
            g.close()
    assert answers["hop"][1] == ["admit"] and answers["inline"][1] == []
    assert answers["inline"][0]["labels"] == answers["hop"][0]["labels"]
    np.testing.assert_allclose(
        answers["inline"][0]["probabilities"], answers["hop"][0]["probabilities"], atol=1e-6
    )
