"""Rollout of model versions in the guard: weighted and sticky canary routing, shadow mode,
per-version metrics, automatic rollback on an SLO breach (count and time windows), the admin
API, and hot swaps (in flight and under load against a real uvicorn server)."""

from __future__ import annotations

import logging
import random
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from advguard.errors import InputError
from advguard.guard.app import create_app
from advguard.guard.auth import create_key
from advguard.guard.config import GuardConfig, parse_config
from advguard.guard.pipeline import DetectorSlot, Guard
from advguard.guard.problems import PROBLEM_BASE, Problem
from advguard.guard.serving import ServedModel
from advguard.guard.storage import GuardStore
from advguard.models import TorchClassifier
from guard_helpers import ServerThread

NO_LIMITS = {"rate": 1e6, "burst": 10**6, "budget": None}


def linear(seed: int, version: str) -> ServedModel:
    torch.manual_seed(seed)
    module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    clf = TorchClassifier(module, input_shape=(1, 8, 8), num_classes=10)
    return ServedModel("digits", version, clf)


class Broken:
    """A classifier whose predictions fail (a canary that raises)."""

    def __init__(self, model: ServedModel) -> None:
        self.inner = model.classifier
        self.input_shape, self.num_classes = model.classifier.input_shape, 10
        self.bounds = model.classifier.bounds

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        raise RuntimeError("canary is broken")


class AlwaysFlags:
    """A detector flagging every row (score 1 above threshold 0.5)."""

    threshold = 0.5

    def score(self, x: np.ndarray) -> np.ndarray:
        return np.ones(len(x))


def build(tmp_path: Path, cfg: dict[str, Any] | None = None, **kw: Any) -> Guard:
    base = {"limits": NO_LIMITS, "forensics": {"record_all_decisions": False}}
    config = GuardConfig.model_validate({**base, **(cfg or {})})
    store = GuardStore(f"sqlite:///{tmp_path / 'guard.db'}")
    return Guard(config, store=store, model=linear(0, "digits:1"), **kw)


def xs(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 1, (n, 1, 8, 8)).astype(np.float32)


def metric(g: Guard, name: str, **labels: str) -> float:
    v = g.metrics.registry.get_sample_value(name, labels)
    return 0.0 if v is None else float(v)


def run(g: Guard, key: Any, x: np.ndarray) -> tuple[str, Any]:
    """One request through the pipeline: ('ok', outcome) or (problem slug, exception)."""
    try:
        return "ok", g.process(key, g.model, x, time.perf_counter())
    except Problem as p:
        return p.slug, p
    except RuntimeError as e:
        return "error", e


# -- routing --------------------------------------------------------------------------------
def test_weight_quarter_routes_the_seeded_share(tmp_path):
    g = build(tmp_path, {"rollout": {"weight": 0.25, "seed": 7}}, canary=linear(1, "digits:2"))
    key = create_key(g.store, "a").record
    x = xs(1)
    versions = [run(g, key, x)[1].model.version for _ in range(400)]
    draws = random.Random(7)
    want = sum(draws.random() < 0.25 for _ in range(400))
    assert versions.count("digits:2") == want == 112
    assert versions.count("digits:1") == 400 - want
    assert metric(g, "advguard_guard_routed_requests_total", model="digits",
                  version="digits:2", role="canary") == want  # fmt: skip
    assert metric(g, "advguard_guard_decisions_total", model="digits",
                  version="digits:2", action="allow") == want  # fmt: skip
    # the canary's answers are the canary model's
    out = next(o for o in (run(g, key, x)[1] for _ in range(20)) if o.model.version == "digits:2")
    np.testing.assert_allclose(out.probabilities, linear(1, "c").predict_proba(x), atol=1e-6)
    # an injected rng routes by its draws; weight 0 sends everything to production
    g.rollout.rng = random.Random(1)
    draws = random.Random(1)
    got = [run(g, key, x)[1].model.version for _ in range(40)]
    assert got == ["digits:2" if draws.random() < 0.25 else "digits:1" for _ in range(40)]
    g.rollout.set_canary(weight=0.0)
    assert all(run(g, key, x)[1].model.version == "digits:1" for _ in range(50))
    g.close()


def test_sticky_routing_keeps_each_client_on_one_version(tmp_path):
    g = build(
        tmp_path,
        {"rollout": {"weight": 0.5, "sticky": True, "seed": 3}},
        canary=linear(1, "digits:2"),
    )
    keys = [create_key(g.store, f"k{i}").record for i in range(40)]
    x = xs(1)
    seen = {k.key_id: {run(g, k, x)[1].model.version for _ in range(5)} for k in keys}
    assert all(len(v) == 1 for v in seen.values())
    assert {"digits:1", "digits:2"} == set().union(*seen.values())  # both versions serve
    g.close()
    # the hash splits key ids by the weight (4000 ids: a binomial's 6 sigma is 0.047)
    from advguard.guard.rollout import _unit_hash

    u = [_unit_hash(3, f"{i:08x}") for i in range(4000)]
    assert abs(sum(x < 0.5 for x in u) / 4000 - 0.5) < 0.05
    assert abs(sum(x < 0.1 for x in u) / 4000 - 0.1) < 0.03


# -- shadow ---------------------------------------------------------------------------------
def nudged(scale: float, version: str) -> ServedModel:
    """Production's weights plus N(0, scale) noise: a canary that mostly agrees."""
    m = linear(0, version)
    torch.manual_seed(9)
    with torch.no_grad():
        for prm in m.classifier.module.parameters():  # type: ignore[attr-defined]
            prm.add_(torch.randn_like(prm) * scale)
    return m


def test_shadow_never_changes_answers_and_records_agreement(tmp_path):
    canary = nudged(0.1, "digits:2")
    g = build(tmp_path, {"rollout": {"weight": 1.0, "mode": "shadow"}}, canary=canary)
    key = create_key(g.store, "a").record
    prod = linear(0, "p")
    agree = rows = 0
    for i in range(30):
        x = xs(4, seed=i)
        out = run(g, key, x)[1]
        assert out.model.version == "digits:1"
        np.testing.assert_allclose(out.probabilities, prod.predict_proba(x), atol=1e-6)
        a, b = prod.predict_proba(x).argmax(1), canary.predict_proba(x).argmax(1)
        agree, rows = agree + int((a == b).sum()), rows + 4
    g.rollout.drain()
    st = g.rollout.status()["shadow"]
    assert st["requests"] == 30 and st["rows"] == 120 and st["errors"] == 0
    assert st["rows_agree"] == agree and st["agreement_rate"] == pytest.approx(agree / 120)
    assert agree == 74  # the nudged canary disagrees on 46 of the 120 rows
    assert metric(g, "advguard_guard_shadow_rows_total", model="digits", version="digits:2",
                  outcome="disagree") == 120 - agree  # fmt: skip
    assert metric(g, "advguard_guard_routed_requests_total", model="digits",
                  version="digits:2", role="shadow") == 30  # fmt: skip
    g.close()


def test_a_failing_shadow_never_reaches_the_client_and_is_rolled_back(tmp_path):
    bad = linear(1, "digits:2")
    bad.classifier = Broken(bad)  # type: ignore[assignment]
    cfg = {"rollout": {"weight": 1.0, "mode": "shadow", "rollback": {"min_requests": 5}}}
    g = build(tmp_path, cfg, canary=bad)
    key = create_key(g.store, "a").record
    for i in range(12):
        status, out = run(g, key, xs(2, seed=i))
        assert status == "ok" and out.model.version == "digits:1"
        g.rollout.drain()
    st = g.rollout.status()
    # 5 shadow errors breach max_error_rate 0.05; after that nothing is mirrored
    assert st["shadow"]["errors"] == 5 and st["rolled_back"] == "error_rate" and st["weight"] == 0
    assert metric(g, "advguard_guard_rollbacks_total", model="digits", reason="error_rate") == 1
    g.close()


# -- rollback -------------------------------------------------------------------------------
class _Collect(logging.Handler):
    """Records of one logger, collected on the logger itself: independent of the root
    logger's configuration, propagation and of what other tests in the worker did to them."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_a_flagging_canary_is_rolled_back_and_a_healthy_one_is_not(tmp_path, monkeypatch):
    # import-linter's run (test_architecture) disables the loggers existing at that moment,
    # and other tests may raise their levels: collect on the logger itself
    logger = logging.getLogger("advguard.guard")
    monkeypatch.setattr(logger, "disabled", False)
    # setLevel, not a plain attribute: it also clears the loggers' cached level decisions,
    # which a test that raised a level earlier in the worker may have left behind
    monkeypatch.setattr(logger, "level", logger.level)  # restored after the test...
    logger.setLevel(logging.WARNING)
    collect = _Collect()
    logger.addHandler(collect)
    try:
        _flagging_and_healthy_canaries(tmp_path, collect)
    finally:
        logger.removeHandler(collect)


def _flagging_and_healthy_canaries(tmp_path, collect: _Collect) -> None:
    flagger = [DetectorSlot("always", AlwaysFlags(), [(0.5, "reject")])]
    cfg = {
        "rollout": {
            "weight": 0.5,
            "seed": 11,
            "rollback": {"window_requests": 50, "min_requests": 10, "max_flag_rate": 0.2},
        }
    }
    g = build(tmp_path, cfg, canary=linear(1, "digits:2"), canary_detectors=flagger)
    key = create_key(g.store, "a").record
    results = [run(g, key, xs(1)) for _ in range(100)]
    rejected = [s for s, _ in results if s == "rejected"]
    # all 10 canary requests were flagged (422); the 10th rolled the canary back
    assert len(rejected) == 10
    st = g.rollout.status()
    assert st["weight"] == 0.0 and st["rolled_back"] == "flag_rate"
    assert st["canary"]["window"] == {"requests": 10, "flag_rate": 1.0, "error_rate": 0.0}
    assert metric(g, "advguard_guard_rollbacks_total", model="digits", reason="flag_rate") == 1
    assert sum("rolled back (flag_rate)" in r.getMessage() for r in collect.records) == 1
    ev = g.rollout.events.list("digits")
    assert [e.kind for e in ev] == ["rollback"] and ev[0].canary_version == "digits:2"
    assert ev[0].detail["weight_before"] == 0.5 and "1.000 > 0.2" in ev[0].detail["detail"]
    assert all(s == "ok" for s, _ in results[-20:])
    g.close()

    (tmp_path / "h").mkdir()
    healthy = build(tmp_path / "h", cfg, canary=linear(1, "digits:2"))
    key = create_key(healthy.store, "a").record
    results = [run(healthy, key, xs(1)) for _ in range(200)]
    st = healthy.rollout.status()
    assert all(s == "ok" for s, _ in results) and st["rolled_back"] is None
    assert st["weight"] == 0.5 and st["canary"]["window"]["requests"] == 50
    assert healthy.rollout.events.list("digits") == []
    healthy.close()


def test_a_raising_canary_breaches_the_error_rate(tmp_path):
    bad = linear(1, "digits:2")
    bad.classifier = Broken(bad)  # type: ignore[assignment]
    cfg = {"rollout": {"weight": 0.5, "seed": 2, "rollback": {"min_requests": 8}}}
    g = build(tmp_path, cfg, canary=bad)
    key = create_key(g.store, "a").record
    results = [run(g, key, xs(1))[0] for _ in range(60)]
    assert results.count("error") == 8 and results.count("ok") == 52
    assert g.rollout.status()["rolled_back"] == "error_rate"
    g.close()


def test_flag_ratio_against_production_baseline(tmp_path):
    cfg = {"rollout": {"rollback": {"min_requests": 10, "max_flag_ratio": 2.0}}}
    g = build(tmp_path, cfg, canary=linear(1, "digits:2"))
    g.rollout.set_canary(weight=0.5)
    for i in range(20):  # production flags 3 in 20 requests
        g.rollout.observe("production", i < 3, False)
    for i in range(10):  # canary: 3 in 10 = 0.30 <= 2 x 0.15
        g.rollout.observe("canary", i < 3, False)
    assert g.rollout.status()["rolled_back"] is None
    g.rollout.observe("canary", True, False)  # 4 in 11 = 0.364 > 0.30
    assert g.rollout.status()["rolled_back"] == "flag_ratio"
    g.close()


def test_time_window_uses_the_injected_clock(tmp_path):
    cfg = {
        "rollout": {
            "weight": 0.5,
            "rollback": {"window_s": 10, "min_requests": 5, "max_error_rate": 0.5},
        }
    }
    g = build(tmp_path, cfg, canary=linear(1, "digits:2"))
    t = [0.0]
    g.rollout.clock = lambda: t[0]
    for _ in range(4):
        g.rollout.observe("canary", False, True)  # 4 errors, fewer than min_requests
    t[0] = 100.0  # they leave the 10 s window
    for e in (False, False, False, True, True):
        g.rollout.observe("canary", False, e)
    assert g.rollout.status()["canary"]["window"]["error_rate"] == pytest.approx(0.4)
    g.rollout.observe("canary", False, True)  # 3 / 6 = 0.5, not above
    assert g.rollout.status()["rolled_back"] is None
    g.rollout.observe("canary", False, True)  # 4 / 7
    assert g.rollout.status()["rolled_back"] == "error_rate"
    g.close()


def test_rollout_config_is_validated(tmp_path):
    with pytest.raises(InputError, match=r"rollout\.weight"):
        parse_config("rollout:\n  weight: 1.5\n", "g.yaml", tmp_path)
    with pytest.raises(InputError, match=r"rollout\.rollback\.max_error_rate"):
        parse_config("rollout:\n  rollback:\n    max_error_rate: 2\n", "g.yaml", tmp_path)
    with pytest.raises(InputError, match=r"rollout\.mode"):
        parse_config("rollout:\n  mode: blue-green\n", "g.yaml", tmp_path)
    cfg = parse_config("rollout:\n  weight: 0.1\n  mode: shadow\n", "g.yaml", tmp_path)
    assert cfg.rollout.weight == 0.1 and cfg.rollout.rollback.window_requests == 200


# -- hot swap -------------------------------------------------------------------------------
class Gate:
    """A classifier that waits for ``release`` before answering (a request held in flight)."""

    def __init__(self, model: ServedModel) -> None:
        self.inner = model.classifier
        self.input_shape, self.num_classes = model.classifier.input_shape, 10
        self.bounds = model.classifier.bounds
        self.entered, self.release = threading.Event(), threading.Event()

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        self.entered.set()
        assert self.release.wait(10)
        return np.asarray(self.inner.predict_proba(x))


def test_a_request_in_flight_finishes_on_the_model_it_started_with(tmp_path):
    g = build(tmp_path)
    old = g.model
    gate = Gate(old)
    old.classifier = gate  # type: ignore[assignment]
    key = create_key(g.store, "a").record
    x = xs(2)
    got: list[Any] = []
    t = threading.Thread(target=lambda: got.append(run(g, key, x)))
    t.start()
    assert gate.entered.wait(10)
    g.rollout.swap_model(linear(5, "digits:2"))  # swapped while the request is in predict
    assert run(g, key, x)[1].model.version == "digits:2"
    gate.release.set()
    t.join(10)
    status, out = got[0]
    assert status == "ok" and out.model.version == "digits:1"
    np.testing.assert_allclose(out.probabilities, linear(0, "p").predict_proba(x), atol=1e-6)
    assert g.model.version == "digits:2" and g.rollout.models.generation == 2
    # a model of another input shape is refused; the served one stays
    torch.manual_seed(0)
    other = TorchClassifier(
        torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 10)),
        input_shape=(1, 4, 4),
        num_classes=10,
    )
    with pytest.raises(InputError, match="restart"):
        g.rollout.swap_model(ServedModel("digits", "digits:3", other))
    assert g.model.version == "digits:2"
    g.close()


def _admin_setup(tmp_path: Path) -> tuple[Guard, TestClient, dict[str, str], dict[str, str]]:
    g = build(tmp_path, canary=linear(1, "digits:2"))
    admin = {"Authorization": f"Bearer {create_key(g.store, 'ops', ['admin']).key}"}
    user = {"Authorization": f"Bearer {create_key(g.store, 'u', ['predict']).key}"}
    return g, TestClient(create_app(g)), admin, user


def test_admin_rollout_api(tmp_path):
    g, c, admin, user = _admin_setup(tmp_path)
    url = "/v1/admin/models/digits/rollout"
    assert c.get(url, headers=user).status_code == 403
    assert c.get("/v1/admin/models/other/rollout", headers=admin).status_code == 404
    r = c.get(url, headers=admin)
    assert r.status_code == 200 and r.json()["canary"]["version"] == "digits:2"
    assert r.json()["weight"] == 0.0
    r = c.post(url, json={"weight": 1, "mode": "canary"}, headers=admin)
    assert r.status_code == 200 and r.json()["weight"] == 1.0
    p = c.post("/v1/models/digits/predict", json={"inputs": xs(1).tolist()}, headers=user)
    assert p.json()["model_version"] == "digits:2"
    for bad in ({"weight": 1.5}, {"weight": "half"}, {"mode": "blue"}, {"colour": 1}):
        r = c.post(url, json=bad, headers=admin)
        assert r.status_code == 422 and r.json()["type"] == PROBLEM_BASE + "invalid-input"
    r = c.post(url, json={"rollback": True}, headers=admin)
    assert r.json()["weight"] == 0.0 and r.json()["rolled_back"] == "manual"
    assert metric(g, "advguard_guard_rollbacks_total", model="digits", reason="manual") == 1
    p = c.post("/v1/models/digits/predict", json={"inputs": xs(1).tolist()}, headers=user)
    assert p.json()["model_version"] == "digits:1"
    r = c.get(url, headers=admin)
    assert [e["kind"] for e in r.json()["events"]] == ["rollback", "set"]
    text = c.get("/metrics").text
    assert (
        'advguard_guard_routed_requests_total{model="digits",role="canary",version="digits:2"} 1.0'
        in text
    )
    g.close()


def test_admin_rollout_conflicts_are_409(tmp_path):
    g = build(tmp_path)
    admin = {"Authorization": f"Bearer {create_key(g.store, 'ops', ['admin']).key}"}
    c = TestClient(create_app(g))
    r = c.post("/v1/admin/models/digits/rollout", json={"weight": 0.5}, headers=admin)
    assert r.status_code == 409 and r.json()["type"] == PROBLEM_BASE + "rollout-conflict"
    # no configured source to reload from (the model was handed over as an object)
    r = c.post("/v1/admin/models/digits/reload", headers=admin)
    assert r.status_code == 409 and r.json()["type"] == PROBLEM_BASE + "reload-failed"
    assert g.model.version == "digits:1"
    g.close()


# -- reload from the registry under load ----------------------------------------------------
FACTORY_KW = {"input_shape": [1, 8, 8], "num_classes": 10, "hidden": [8]}


def _model_file(path: Path, seed: int) -> Path:
    from advguard.models.io import save_torch
    from advguard.models.zoo import mlp

    torch.manual_seed(seed)
    save_torch(
        mlp(**FACTORY_KW),
        path,
        factory="advguard.models.zoo:mlp",
        factory_kwargs=FACTORY_KW,
        input_shape=(1, 8, 8),
        num_classes=10,
        bounds=(0.0, 1.0),
    )
    return path


def test_hot_reload_under_load_drops_nothing(tmp_path):
    import httpx

    from advguard.models.io import load_model
    from advguard.registry.store import Registry

    root = tmp_path / "reg"
    files = [_model_file(tmp_path / f"m{i}.safetensors", seed=i) for i in (1, 2)]
    x = xs(2)
    expect = {f"digits:{i + 1}": load_model(f).predict_proba(x) for i, f in enumerate(files)}
    with Registry(root) as reg:
        for f in files:
            reg.push("digits", f)
        reg.promote("digits", 1, force=True, reason="test")
    text = (
        f"model:\n  name: digits\n  registry:\n    model_name: digits\n    root: {root}\n"
        "limits: {rate: 1000000, burst: 1000000, budget: null}\n"
        "forensics: {record_all_decisions: false}\n"
    )
    g = Guard.from_config(parse_config(text, "g.yaml", tmp_path))
    admin = {"Authorization": f"Bearer {create_key(g.store, 'ops', ['admin']).key}"}
    user = {"Authorization": f"Bearer {create_key(g.store, 'u').key}"}
    body = {"inputs": x.tolist()}
    stop = threading.Event()
    answers: list[tuple[int, str | None, Any]] = []
    lock = threading.Lock()

    def client() -> None:
        with httpx.Client(base_url=srv.url, timeout=30) as h:
            while not stop.is_set():
                try:
                    r = h.post("/v1/models/digits/predict", json=body, headers=user)
                    j = r.json()
                    got = (r.status_code, j.get("model_version"), j.get("probabilities"))
                except (httpx.HTTPError, ValueError) as e:  # counted as a failure
                    got = (-1, type(e).__name__, None)
                with lock:
                    answers.append(got)

    def wait_answers(n: int) -> None:
        for _ in range(6000):  # bounded: 60 s of polling at most
            if len(answers) >= n:
                return
            time.sleep(0.01)
        raise AssertionError(f"only {len(answers)} answers, waited for {n}")

    with ServerThread(create_app(g)) as srv, httpx.Client(base_url=srv.url, timeout=30) as h:
        threads = [threading.Thread(target=client) for _ in range(6)]
        for t in threads:
            t.start()
        versions = []
        for i, v in enumerate((2, 1, 2, 1)):
            wait_answers(30 * (i + 1))  # traffic on every version in between
            with Registry(root) as reg:
                reg.promote("digits", v, force=True, reason="test")
            r = h.post("/v1/admin/models/digits/reload", headers=admin)
            assert r.status_code == 200, r.text
            versions.append((r.json()["previous_version"], r.json()["version"]))
        wait_answers(len(answers) + 30)
        stop.set()
        for t in threads:
            t.join(30)
        after = [h.post("/v1/models/digits/predict", json=body, headers=user) for _ in range(10)]
    g.close()
    assert versions == [
        ("digits:1", "digits:2"),
        ("digits:2", "digits:1"),
        ("digits:1", "digits:2"),
        ("digits:2", "digits:1"),
    ]
    assert len(answers) >= 150
    assert all(s == 200 for s, _, _ in answers), {s for s, _, _ in answers}
    seen = {v for _, v, _ in answers}
    assert seen == {"digits:1", "digits:2"}
    for _, v, p in answers:  # every answer comes from the version it names
        np.testing.assert_allclose(p, expect[v], atol=1e-5)
    assert all(r.json()["model_version"] == "digits:1" for r in after)
    np.testing.assert_allclose(after[-1].json()["probabilities"], expect["digits:1"], atol=1e-5)


def test_cli_rollout_commands_over_the_admin_api(tmp_path):
    import json

    from typer.testing import CliRunner

    from advguard.cli import app as cli_app

    g, _, admin, _user = _admin_setup(tmp_path)
    env = {"OPS_KEY": admin["Authorization"].split()[1]}
    runner = CliRunner()
    with ServerThread(create_app(g)) as srv:
        base = ["guard", "rollout"]
        opts = ["--url", srv.url, "--key-env", "OPS_KEY", "--json"]

        def cli(*args: str) -> Any:
            return runner.invoke(cli_app, [*base, *args, *opts], env=env)

        r = cli("set", "digits", "--weight", "0.3", "--mode", "shadow")
        assert r.exit_code == 0, r.output
        st = json.loads(r.stdout)
        assert st["weight"] == 0.3 and st["mode"] == "shadow"
        assert json.loads(cli("status", "digits").stdout)["canary"]["version"] == "digits:2"
        r = cli("rollback", "digits")
        assert json.loads(r.stdout)["rolled_back"] == "manual" and g.rollout.weight == 0.0
        # refusals are one line and exit 2: a weight out of range, no source to reload from
        for args in (("set", "digits", "--weight", "2"), ("reload", "digits")):
            r = cli(*args)
            assert r.exit_code == 2 and r.stderr.startswith("error: the guard answered")
            assert len(r.stderr.strip().splitlines()) == 1
        r = runner.invoke(cli_app, [*base, "status", "digits", *opts], env={"OPS_KEY": "wrong"})
        assert r.exit_code == 2 and "401" in r.stderr
    g.close()


def test_registry_poll_swaps_in_a_promoted_version(tmp_path):
    from advguard.registry.store import Registry

    root = tmp_path / "reg"
    with Registry(root) as reg:
        for i in (1, 2):
            reg.push("digits", _model_file(tmp_path / f"m{i}.safetensors", seed=i))
        reg.promote("digits", 1, force=True, reason="test")
    text = f"model:\n  name: digits\n  registry:\n    model_name: digits\n    root: {root}\n"
    g = Guard.from_config(parse_config(text, "g.yaml", tmp_path))
    assert g.rollout.poll_once() == []  # the stage still holds the served version
    with Registry(root) as reg:
        reg.promote("digits", 2, force=True, reason="test")
    assert g.rollout.poll_once() == ["production"] and g.model.version == "digits:2"
    assert g.rollout.poll_once() == []
    g.close()
    # the background poller does the same on its own
    g = Guard.from_config(
        parse_config(text + "rollout:\n  poll_interval_s: 0.05\n", "g.yaml", tmp_path)
    )
    assert g.model.version == "digits:2"
    with Registry(root) as reg:
        reg.promote("digits", 1, force=True, reason="test")
    for _ in range(1000):  # bounded: at most 10 s of waiting
        if g.model.version == "digits:1":
            break
        time.sleep(0.01)
    assert g.model.version == "digits:1"
    assert [e.reason for e in g.rollout.events.list("digits")][:1] == ["production"]
    g.close()


def test_canary_from_the_config_file_and_its_reload(tmp_path):
    from advguard.models.io import file_sha256, load_model

    prod = _model_file(tmp_path / "prod.safetensors", seed=1)
    can = _model_file(tmp_path / "canary.safetensors", seed=2)
    text = (
        "model: {name: digits, path: prod.safetensors}\n"
        "rollout:\n  canary: {path: canary.safetensors}\n  weight: 1.0\n"
    )
    g = Guard.from_config(parse_config(text, "g.yaml", tmp_path))
    key = create_key(g.store, "a").record
    x = xs(3)
    out = run(g, key, x)[1]
    assert out.model.name == "digits"  # reported under the production model's name
    assert out.model.version == f"sha256:{file_sha256(can)[:12]}"
    np.testing.assert_allclose(out.probabilities, load_model(can).predict_proba(x), atol=1e-6)
    assert g.model.version == f"sha256:{file_sha256(prod)[:12]}"
    # a new canary file, reloaded: the next request gets it
    _model_file(can, seed=3)
    g.reload_model("digits", "canary")
    out = run(g, key, x)[1]
    assert out.model.version == f"sha256:{file_sha256(can)[:12]}"
    np.testing.assert_allclose(out.probabilities, load_model(can).predict_proba(x), atol=1e-6)
    with pytest.raises(Problem, match="serves the model"):
        g.reload_model("other")
    g.close()
    # a canary with another input spec is refused at start-up
    torch.manual_seed(0)
    from advguard.models.io import save_torch
    from advguard.models.zoo import mlp

    kw = {"input_shape": [1, 4, 4], "num_classes": 10, "hidden": [8]}
    save_torch(mlp(**kw), can, factory="advguard.models.zoo:mlp", factory_kwargs=kw,
               input_shape=(1, 4, 4), num_classes=10, bounds=(0.0, 1.0))  # fmt: skip
    with pytest.raises(InputError, match="restart"):
        Guard.from_config(parse_config(text, "g.yaml", tmp_path)).close()


# -- micro-batching with a canary ---------------------------------------------------------------
def _batch(g: Guard, key: Any, n: int, seed: int = 0) -> list[Any]:
    """``n`` one-row requests through one micro-batch (what the batcher runs): each result's
    value (an outcome) or error."""
    from advguard.guard.batching import BatchItem, process_batch

    items = [BatchItem(key, g.model, xs(1, seed=seed + i), time.perf_counter()) for i in range(n)]
    return [r.error if r.error is not None else r.value for r in process_batch(g, items)]


class CountingModel:
    """Wraps a served model's classifier: records the size of each predict call."""

    def __init__(self, model: ServedModel) -> None:
        self.inner = model.classifier
        self.input_shape, self.num_classes = (1, 8, 8), 10
        self.bounds = model.classifier.bounds
        self.calls: list[int] = []

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        self.calls.append(len(x))
        return self.inner.predict_proba(x)


def test_batching_routes_each_request_and_runs_each_version_as_one_group(tmp_path):
    cfg = {"batching": {"max_batch": 64}, "rollout": {"weight": 0.25, "seed": 7}}
    prod, canary = linear(0, "digits:1"), linear(1, "digits:2")
    prod.classifier = CountingModel(prod)  # type: ignore[assignment]
    canary.classifier = CountingModel(canary)  # type: ignore[assignment]
    config = GuardConfig.model_validate({"limits": NO_LIMITS, **cfg})
    store = GuardStore(f"sqlite:///{tmp_path / 'guard.db'}")
    g = Guard(config, store=store, model=prod, canary=canary)
    key = create_key(g.store, "a").record
    out = _batch(g, key, 40)
    draws = random.Random(7)
    want = ["digits:2" if draws.random() < 0.25 else "digits:1" for _ in range(40)]
    assert [o.model.version for o in out] == want and want.count("digits:2") == 15
    # one model call per version for the whole batch; each answer is its version's
    assert prod.classifier.calls == [25] and canary.classifier.calls == [15]  # type: ignore[attr-defined]
    for i, o in enumerate(out):
        ref = linear(1 if o.model.version == "digits:2" else 0, "r")
        np.testing.assert_allclose(o.probabilities, ref.predict_proba(xs(1, seed=i)), atol=1e-6)
    assert metric(g, "advguard_guard_routed_requests_total", model="digits",
                  version="digits:2", role="canary") == 15  # fmt: skip
    assert g.rollout.status()["canary"]["window"]["requests"] == 15
    g.close()


def test_batching_uses_the_canarys_detectors_and_rolls_a_flagging_canary_back(tmp_path):
    flagger = [DetectorSlot("always", AlwaysFlags(), [(0.5, "reject")])]
    cfg = {
        "batching": {"max_batch": 64},
        "rollout": {
            "weight": 0.5,
            "seed": 11,
            "rollback": {"window_requests": 50, "min_requests": 10, "max_flag_rate": 0.2},
        },
    }
    g = build(tmp_path, cfg, canary=linear(1, "digits:2"), canary_detectors=flagger)
    key = create_key(g.store, "a").record
    out = _batch(g, key, 40)
    draws = random.Random(11)
    to_canary = [draws.random() < 0.5 for _ in range(40)]
    # the canary's rows were rejected by its own detector, production's were answered
    for hit, o in zip(to_canary, out, strict=True):
        if hit:
            assert isinstance(o, Problem) and o.slug == "rejected"
            assert o.model_version == "digits:2"
        else:
            assert o.model.version == "digits:1" and o.action == "allow"
    st = g.rollout.status()
    assert sum(to_canary) >= 10 and st["weight"] == 0.0 and st["rolled_back"] == "flag_rate"
    # after the rollback every request of the next batch goes to production
    assert all(o.model.version == "digits:1" for o in _batch(g, key, 20, seed=100))
    g.close()


def test_batching_in_shadow_mode_answers_from_production_and_mirrors(tmp_path):
    canary = nudged(0.1, "digits:2")
    cfg = {"batching": {"max_batch": 64}, "rollout": {"weight": 1.0, "mode": "shadow"}}
    g = build(tmp_path, cfg, canary=canary)
    key = create_key(g.store, "a").record
    out = _batch(g, key, 30)
    prod = linear(0, "p")
    assert all(o.model.version == "digits:1" for o in out)
    for i, o in enumerate(out):
        np.testing.assert_allclose(o.probabilities, prod.predict_proba(xs(1, seed=i)), atol=1e-6)
    g.rollout.drain()
    st = g.rollout.status()["shadow"]
    x = np.concatenate([xs(1, seed=i) for i in range(30)])
    agree = int((prod.predict_proba(x).argmax(1) == canary.predict_proba(x).argmax(1)).sum())
    assert st["requests"] == 30 and st["rows"] == 30 and st["rows_agree"] == agree < 30
    g.close()


def test_batching_with_a_canary_through_the_http_api(tmp_path):
    cfg = {"batching": {"max_batch": 8, "max_wait_ms": 1}, "rollout": {"weight": 0.5, "seed": 5}}
    g = build(tmp_path, cfg, canary=linear(1, "digits:2"))
    key = create_key(g.store, "a").key
    with TestClient(create_app(g)) as client:
        got = set()
        for i in range(20):
            r = client.post(
                "/v1/models/digits/predict",
                json={"inputs": xs(1, seed=i).tolist()},
                headers={"Authorization": f"Bearer {key}"},
            )
            assert r.status_code == 200
            got.add(r.json()["model_version"])
    assert got == {"digits:1", "digits:2"}
    g.close()
