"""The adaptive inline rule (advguard.guard.inline): small requests run on the event loop by
default; a model whose inline runs average over ``edge.inline_max_ms`` (on the injected
clock) takes the thread pool, and a probe brings it back once it is fast again; records that
must precede the answer are committed in the thread pool; a stale isolation row is never read
on the loop."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy.exc import OperationalError
from typer.testing import CliRunner

from advguard.cli import app as cli_app
from advguard.errors import InputError
from advguard.guard.app import create_app
from advguard.guard.auth import create_key
from advguard.guard.config import GuardConfig, parse_config
from advguard.guard.inline import InlineGate
from advguard.guard.pipeline import DetectorSlot
from guard_helpers import FakeClock, MeanDetector, make_guard

PREDICT = "/v1/models/digits/predict"


class SlowLinear(torch.nn.Module):
    """A linear digits model whose every forward pass takes ``delay_s`` on the fake clock."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
        self.clock = clock
        self.delay_s = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.clock.advance(self.delay_s)
        return self.net(x)


@pytest.fixture()
def hops(monkeypatch) -> list[str]:
    """The names of the functions the prediction routes hand to the thread pool."""
    import advguard.guard.app as app_mod

    seen: list[str] = []
    real = app_mod.run_in_threadpool

    async def counting(fn, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(getattr(fn, "__name__", "?"))
        return await real(fn, *args, **kwargs)

    monkeypatch.setattr(app_mod, "run_in_threadpool", counting)
    return seen


def _post(client: TestClient, key: str, x: Any) -> Any:
    return client.post(PREDICT, json={"inputs": x}, headers={"X-API-Key": key})


def _run(gate: InlineGate, clock: FakeClock, ms: float, model: str = "m") -> bool:
    """One request of ``model`` taking ``ms`` if the gate lets it run inline."""
    if not gate.admit(model):
        return False
    t0 = gate.start()
    clock.advance(ms / 1000.0)
    gate.record(model, t0)
    return True


# -- the gate alone ------------------------------------------------------------------------
def test_gate_sends_a_slow_model_to_the_pool_and_a_probe_brings_it_back():
    clock = FakeClock()
    switches: list[tuple[str, bool]] = []
    gate = InlineGate(
        0.002, clock=clock, probe_every=4, on_switch=lambda m, i: switches.append((m, i))
    )
    assert all(_run(gate, clock, 1.0) for _ in range(20))
    assert gate.state("m").ewma_s == pytest.approx(0.001)
    assert _run(gate, clock, 50.0)  # one long pause: clamped to 2x the bound, stays inline
    assert not gate.state("m").pooled and gate.state("m").ewma_s == pytest.approx(0.0013)
    for _ in range(30):
        assert _run(gate, clock, 1.0)
    # the model got slower (3 ms, 1.5x the bound): a few requests later it takes the pool
    n = 0
    while not gate.state("m").pooled:
        assert _run(gate, clock, 3.0)
        n += 1
    assert 3 <= n <= 10 and switches == [("m", False)]
    # in the pool: every 4th request probes; a slow probe doubles the interval
    assert [_run(gate, clock, 3.0) for _ in range(4)] == [False, False, False, True]
    assert gate.state("m").pooled and gate.state("m").failed_probes == 1
    assert [_run(gate, clock, 1.0) for _ in range(8)] == [False] * 7 + [True]  # fast probe
    assert not gate.state("m").pooled and switches == [("m", False), ("m", True)]
    assert all(_run(gate, clock, 1.0) for _ in range(5))
    assert gate.state("m").ewma_s == pytest.approx(0.001)


def test_gate_first_slow_run_backoff_cap_other_models_and_off():
    clock = FakeClock()
    gate = InlineGate(0.002, clock=clock, probe_every=2, max_backoff=4)
    assert _run(gate, clock, 100.0)  # nothing known: inline, then at once to the pool
    assert gate.state("m").pooled
    assert _run(gate, clock, 1.0, model="other")  # per model
    pattern = [_run(gate, clock, 100.0) for _ in range(2 + 4 + 8 + 8 + 8)]
    probes = [i for i, ran in enumerate(pattern) if ran]
    assert probes == [1, 5, 13, 21, 29]  # every 2, 4, then 8 requests (4x at most)
    assert gate.state("m").inline == 1 + 5 and gate.state("m").pool == 30 - 5
    off = InlineGate(0.0, clock=clock)
    assert not off.enabled and not _run(off, clock, 0.0)
    with pytest.raises(ValueError):
        InlineGate(0.002, clock=clock, probe_every=0)


def test_a_run_counts_its_cpu_time_or_a_quarter_of_its_wall_time():
    wall, cpu = FakeClock(), FakeClock()
    gate = InlineGate(0.002, clock=wall, cpu_clock=cpu)
    t0 = gate.start()
    wall.advance(0.003)  # descheduled for 2 of 3 ms: counts its 1 ms of CPU
    cpu.advance(0.001)
    assert gate.sample(t0) == pytest.approx(0.001)
    t0 = gate.start()
    wall.advance(0.012)  # waited 11 ms on the loop (a lock, the GIL): a quarter counts
    cpu.advance(0.001)
    assert gate.sample(t0) == pytest.approx(0.003)
    gate.record("m", t0)
    assert gate.state("m").pooled  # first run over the bound


# -- configuration -------------------------------------------------------------------------
def test_inline_is_the_default_and_its_settings_are_validated(tmp_path):
    edge = GuardConfig().edge
    assert edge.inline_max_body_bytes == 65536 and edge.inline_max_ms == 5.0
    cfg = parse_config("edge: {inline_max_ms: 0.5, inline_max_body_bytes: 1024}\n")
    assert cfg.edge.inline_max_ms == 0.5
    for text, field in (
        ("edge: {inline_max_ms: -1}\n", "edge.inline_max_ms"),
        ("edge: {inline_max_ms: 5000}\n", "edge.inline_max_ms"),
        ("edge: {inline_max_ms: fast}\n", "edge.inline_max_ms"),
        ("edge: {inline_max_body_bytes: -1}\n", "edge.inline_max_body_bytes"),
    ):
        with pytest.raises(InputError) as e:
            parse_config(text, "g.yaml")
        assert f"field '{field}'" in str(e.value) and "\n" not in str(e.value)
    p = tmp_path / "g.yaml"
    p.write_text("edge:\n  inline_max_ms: -2\n")
    r = CliRunner().invoke(cli_app, ["guard", "check", str(p)])
    assert r.exit_code == 2 and "line 2, field 'edge.inline_max_ms'" in r.output
    assert "Traceback" not in r.output


@pytest.mark.parametrize(
    "cfg", [{"edge": {"inline_max_ms": 0}}, {"edge": {"inline_max_body_bytes": 0}}]
)
def test_zero_disables_inline(tmp_path, digits_module, digits_split, hops, cfg):
    g = make_guard(tmp_path, digits_module, cfg=cfg, clock=FakeClock())
    try:
        assert not g.inline.enabled
        client = TestClient(create_app(g))
        key = create_key(g.store, "a").key
        for _ in range(3):
            assert _post(client, key, digits_split[2][:1].tolist()).status_code == 200
        assert hops == ["admit_and_process"] * 3
    finally:
        g.close()


# -- the guard -------------------------------------------------------------------------------
def test_a_slow_model_takes_the_thread_pool_until_a_probe_finds_it_fast(
    tmp_path, digits_split, hops
):
    clock = FakeClock()
    module = SlowLinear(clock).eval()
    g = make_guard(tmp_path, module, clock=clock)  # defaults: inline up to 64 KiB and 2 ms
    g.inline.probe_every = 4
    x = digits_split[2][:2].tolist()
    try:
        client = TestClient(create_app(g))
        key = create_key(g.store, "a").key
        answers = []

        def post() -> None:
            r = _post(client, key, x)
            assert r.status_code == 200
            answers.append(r.json()["probabilities"])

        post()
        assert hops == []  # fast: inline
        m = g.metrics.registry.get_sample_value
        assert m("advguard_guard_inline", {"model": "digits"}) == 1.0
        module.delay_s = 0.010  # 5x the bound: a few inline runs send the model to the pool
        n = 0
        while not g.inline.state("digits").pooled:
            post()
            n += 1
        assert n == 7 and hops == []  # 0.4, 0.76, ... 2.09 ms: each run counts 4 ms at most
        for _ in range(3):
            post()
        assert hops == ["admit_and_process"] * 3  # off the event loop
        assert m("advguard_guard_inline", {"model": "digits"}) == 0.0
        assert m("advguard_guard_inline_run_seconds", {"model": "digits"}) > 0.002
        module.delay_s = 0.0  # fast again: the 4th request is a probe on the loop
        post()
        post()
        assert hops == ["admit_and_process"] * 3 and not g.inline.state("digits").pooled
        assert m("advguard_guard_inline", {"model": "digits"}) == 1.0
        assert m("advguard_guard_inline_switches_total", {"model": "digits", "to": "pool"}) == 1
        assert m("advguard_guard_inline_switches_total", {"model": "digits", "to": "loop"}) == 1
        for a in answers[1:]:  # the same answer on the loop and in the pool
            np.testing.assert_allclose(a, answers[0], atol=1e-7)
    finally:
        g.close()


def test_records_before_the_answer_are_committed_in_the_thread_pool(
    tmp_path, digits_module, digits_split, hops
):
    """A forensic record (here: every request sampled, and a rejected one) is committed in
    the thread pool before the answer or the refusal leaves; the pipeline ran on the loop."""
    g = make_guard(
        tmp_path,
        digits_module,
        cfg={"forensics": {"sample_rate": 1.0}},
        detectors=[DetectorSlot("mean", MeanDetector(), [(0.9, "reject")])],
        clock=FakeClock(),
    )
    try:
        client = TestClient(create_app(g))
        key = create_key(g.store, "a").key
        r = _post(client, key, digits_split[2][:1].tolist())
        assert r.status_code == 200 and hops == ["commit_records"]
        rec = g.store.get_decision(r.headers["X-Decision-Id"])  # committed, no flush
        assert rec is not None and rec.forensic and rec.action == "allow"
        bad = _post(client, key, np.ones((1, 1, 8, 8)).tolist())
        assert bad.status_code == 422 and bad.json()["type"].endswith("rejected")
        assert hops == ["commit_records"] * 2
        rec = g.store.get_decision(bad.headers["X-Decision-Id"])
        assert rec is not None and rec.action == "reject" and rec.flagged
    finally:
        g.close()


@pytest.mark.parametrize("fail_open", [False, True])
def test_a_failed_record_commit_after_an_inline_run(
    tmp_path, digits_module, digits_split, hops, fail_open
):
    cfg = {"forensics": {"sample_rate": 1.0, "fail_open": fail_open}}
    g = make_guard(tmp_path, digits_module, cfg=cfg, clock=FakeClock())
    try:
        client = TestClient(create_app(g))
        key = create_key(g.store, "a").key

        def down(_records: Any) -> None:
            raise OperationalError("INSERT", {}, Exception("database is locked"))

        g.recorder._write = down
        r = _post(client, key, digits_split[2][:1].tolist())
        assert hops == ["commit_records"]
        if fail_open:
            assert r.status_code == 200
        else:
            assert r.status_code == 503 and r.json()["type"].endswith("dependency-unavailable")
        fails = g.metrics.registry.get_sample_value(
            "advguard_guard_forensic_write_failures_total", {"model": "digits"}
        )
        assert fails == 1
    finally:
        g.close()


def test_a_stale_isolation_row_is_read_in_the_thread_pool(
    tmp_path, digits_module, digits_split, hops
):
    clock = FakeClock()
    g = make_guard(tmp_path, digits_module, clock=clock)
    x = digits_split[2][:1].tolist()
    try:
        client = TestClient(create_app(g))
        key = create_key(g.store, "a").key
        assert _post(client, key, x).status_code == 200
        assert hops == []  # the authentication hop read the isolation row too
        g.controls._isolation.items.clear()  # expired (the client's rows are still cached)
        reads = g.controls.reads
        assert _post(client, key, x).status_code == 200
        assert hops == ["admit_and_process"] and g.controls.reads == reads + 1
        assert _post(client, key, x).status_code == 200
        assert hops == ["admit_and_process"]  # cached again: inline
        clock.advance(1.5)  # every row expired: the authentication hop reads both again
        assert _post(client, key, x).status_code == 200
        assert hops == ["admit_and_process"]
    finally:
        g.close()


def test_bodies_over_the_limit_take_the_pool(tmp_path, digits_module, digits_split, hops):
    x = digits_split[2][:1].tolist()
    limit = len(json.dumps({"inputs": x})) + 50
    g = make_guard(
        tmp_path, digits_module, cfg={"edge": {"inline_max_body_bytes": limit}}, clock=FakeClock()
    )
    try:
        client = TestClient(create_app(g))
        key = create_key(g.store, "a").key
        assert _post(client, key, x).status_code == 200 and hops == []
        assert _post(client, key, x + x).status_code == 200
        assert hops == ["admit_and_process"]
    finally:
        g.close()


def test_a_slow_batched_admission_takes_the_thread_pool(
    tmp_path, digits_module, digits_split, hops
):
    """With micro-batching the admission (parse, validation, budget) runs on the loop under
    the same rule: made slow, it moves to the thread pool; the batch answers the same."""
    clock = FakeClock()
    cfg = {"batching": {"max_batch": 4, "max_wait_ms": 0}}
    g = make_guard(tmp_path, digits_module, cfg=cfg, clock=clock)
    real_validate = g.validate
    delay = {"s": 0.0}

    def slow_validate(raw: Any, model: Any) -> np.ndarray:
        clock.advance(delay["s"])
        return real_validate(raw, model)

    g.validate = slow_validate  # type: ignore[method-assign]
    x = digits_split[2][:1].tolist()
    try:
        with TestClient(create_app(g)) as client:
            key = create_key(g.store, "a").key
            first = _post(client, key, x)
            assert first.status_code == 200 and hops == []
            delay["s"] = 0.050
            n = 0
            while not g.inline.state("digits").pooled:
                assert _post(client, key, x).status_code == 200
                n += 1
            assert n == 7 and hops == []
            r = _post(client, key, x)
            assert r.status_code == 200 and hops == ["admit"]
            np.testing.assert_allclose(
                r.json()["probabilities"], first.json()["probabilities"], atol=1e-6
            )
    finally:
        g.close()
