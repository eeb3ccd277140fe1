"""The guard's Prometheus metrics: what the pipeline records, the bounded per-client label,
forensic write failures, and the exposition checked by promtool."""

from __future__ import annotations

import hashlib
import shutil
import subprocess

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from advguard.guard.app import create_app
from advguard.guard.auth import create_key
from advguard.guard.metrics import STAGES, GuardMetrics, TopClients, client_label
from advguard.guard.pipeline import DetectorSlot, StatefulSlot
from guard_helpers import CountingStateful, MeanDetector, make_guard

PREDICT = "/v1/models/digits/predict"


@pytest.fixture(scope="module")
def softmax_module(digits_split) -> torch.nn.Module:
    """A softmax regression on digits (~0.3 s to fit; ~95% test accuracy)."""
    x, y = torch.tensor(digits_split[0]), torch.tensor(digits_split[1])
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    opt = torch.optim.Adam(module.parameters(), lr=0.05)
    for _ in range(150):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(module(x), y).backward()
        opt.step()
    return module.eval()


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of a Prometheus text exposition."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    want = tuple(sorted(labels.items()))
    return samples(text).get((name, want), 0.0)


def label_values(text: str, name: str, label: str) -> set[str]:
    return {dict(lab)[label] for (n, lab) in samples(text) if n == name and label in dict(lab)}


# -- the bounded per-client label ---------------------------------------------------------
def test_top_clients_keep_at_most_n_plus_one_labels_and_find_the_heavy_hitters():
    m = GuardMetrics(top_clients=20)
    rng = np.random.default_rng(0)
    heavy = [f"{i:016x}" for i in range(5)]
    light = [f"{i:016x}" for i in range(1000, 2000)]  # 1,000 clients, 1-3 queries each
    stream = [k for k in heavy for _ in range(150)]
    stream += [k for k in light for _ in range(int(rng.integers(1, 4)))]
    order = rng.permutation(len(stream))
    for i in order:
        m.count_client("digits", stream[i])
    text = m.render().decode()
    labels = label_values(text, "advguard_guard_client_queries_total", "client")
    assert len(labels) <= 21
    assert "other" in labels
    for k in heavy:  # the five heaviest clients have their own series from their first queries
        lab = client_label(k)
        assert lab in labels
        v = value(text, "advguard_guard_client_queries_total", model="digits", client=lab)
        assert 140 <= v <= 150
    # labels are hashes of key ids, never the ids themselves
    assert not any(k in text for k in heavy + light)
    assert client_label(heavy[0]) == hashlib.sha256(heavy[0].encode()).hexdigest()[:12]


def test_space_saving_replaces_a_labelled_client_only_when_clearly_heavier():
    t = TopClients(n=2, capacity=3)
    assert t.observe("a") == ("a", []) and t.observe("b") == ("b", [])
    t.observe("a")
    assert t.observe("c") == ("other", [])  # c: 1 is not more than b: 1
    assert t.observe("c") == ("c", ["b"])  # c: 2 guaranteed > b: 1
    assert t.labelled == {"a", "c"} and t.counts == {"a": 2, "b": 1, "c": 2}
    # a new client takes the sketch slot of the lightest (b, unlabelled), with its count as
    # the error: 1 + 1 = 2 estimated but 1 guaranteed, not more than a or c
    assert t.observe("d") == ("other", [])
    assert t.counts == {"a": 2, "c": 2, "d": 2} and t.errors["d"] == 1
    # a labelled client pushed out of the sketch loses its label; the free one goes to e
    assert t.observe("e") == ("e", ["a"])
    assert t.labelled == {"c", "e"} and len(t.counts) == 3


# -- what the pipeline records ------------------------------------------------------------
def test_pipeline_metrics_after_traffic(tmp_path, softmax_module):
    bands = [(0.3, "fallback"), (0.45, "review"), (0.6, "reject")]
    g = make_guard(
        tmp_path,
        softmax_module,
        with_fallback=True,
        detectors=[DetectorSlot("mean", MeanDetector(), bands)],
        stateful=[StatefulSlot("count", CountingStateful(limit=10), "review")],
        cfg={"limits": {"budget": 12}},
    )
    c = TestClient(create_app(g))
    k = create_key(g.store, "a").key
    low = np.full((4, 1, 8, 8), 0.1, np.float32)  # mean detector: score 0.1, allowed
    xs = np.stack([np.full((1, 8, 8), v, np.float32) for v in (0.1, 0.35, 0.5)])
    assert c.post(PREDICT, json={"inputs": low.tolist()}, headers=auth(k)).status_code == 200
    assert c.post(PREDICT, json={"inputs": xs.tolist()}, headers=auth(k)).status_code == 200
    xs[0] = 0.9
    assert c.post(PREDICT, json={"inputs": xs.tolist()}, headers=auth(k)).status_code == 422
    # 11 rows seen: the stateful detector (limit 10) flags the client
    r = c.post(PREDICT, json={"inputs": low[:1].tolist()}, headers=auth(k))
    assert r.status_code == 200 and r.json()["action"] == "review"
    # 11 + 3 rows > the budget of 12
    assert c.post(PREDICT, json={"inputs": low[:3].tolist()}, headers=auth(k)).status_code == 429
    assert c.post(PREDICT, content=b"{bad", headers=auth(k)).status_code == 400
    text = c.get("/metrics").text
    mv = {"model": "digits", "version": "digits:1"}
    dec = "advguard_guard_decisions_total"
    actions = {a: value(text, dec, **mv, action=a) for a in ("allow", "review", "reject")}
    assert actions == {"allow": 1, "review": 2, "reject": 1}
    flags = "advguard_guard_detector_flags_total"
    assert value(text, flags, **mv, detector="count") == 1
    assert value(text, flags, **mv, detector="mean") == 2
    assert value(text, "advguard_guard_stateful_alerts_total", model="digits",
                 detector="count", action="review") == 1  # fmt: skip
    # per-row histograms: 4 + 3 + 3 + 1 scored rows, 4 + 3 + 1 answered rows
    score = "advguard_guard_detector_score_count"
    assert value(text, score, model="digits", detector="mean") == 11
    top1 = "advguard_guard_top1_confidence_count"
    assert value(text, top1, **mv) == 8
    assert value(text, "advguard_guard_rate_limited_total", model="digits", limit="budget") == 1
    # every stage was timed once per request that reached it
    st = "advguard_guard_stage_latency_seconds_count"
    counts = {s: value(text, st, model="digits", stage=s) for s in STAGES}
    assert counts["limit"] == 6 and counts["read"] == 6 and counts["parse"] == 6
    assert counts["validate"] == 5 and counts["sanitize"] == 4 and counts["record"] == 4
    assert counts["predict"] == 3  # the rejected request is never answered
    assert value(text, "advguard_guard_client_queries_total", model="digits",
                 client=client_label(g.store.list_keys()[0].key_id)) == 6  # fmt: skip
    g.close()


def test_forensic_write_failure_is_counted_and_still_a_5xx(tmp_path, softmax_module, digits_split):
    # every request sampled: forensic records, committed before the answer (the records of
    # plain allowed requests are written in the background: tests/test_guard_perf.py)
    g = make_guard(tmp_path, softmax_module, cfg={"forensics": {"sample_rate": 1.0}})
    c = TestClient(create_app(g), raise_server_exceptions=False)
    k = create_key(g.store, "a").key
    body = {"inputs": digits_split[2][:2].tolist()}
    assert c.post(PREDICT, json=body, headers=auth(k)).status_code == 200
    g.store.decisions.drop(g.store.engine)  # the decision table is gone: a real DB failure
    r = c.post(PREDICT, json=body, headers=auth(k))
    # a database failure is a 503 (dependency-unavailable, fail closed; see guard/failsafe.py)
    assert r.status_code == 503 and "probabilities" not in r.text
    text = c.get("/metrics").text
    assert value(text, "advguard_guard_forensic_write_failures_total", model="digits") == 1
    mv = {"model": "digits", "version": "digits:1"}
    assert value(text, "advguard_guard_decisions_total", **mv, action="error") == 1
    assert value(text, "advguard_guard_decisions_total", **mv, action="allow") == 1
    assert value(text, "advguard_guard_requests_total", **mv, endpoint="v1-predict",
                 status="503") == 1  # fmt: skip
    g.close()


# -- the exposition passes promtool's lint --------------------------------------------------
PROMTOOL = shutil.which("promtool")


@pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (Debian: prometheus)")
def test_promtool_check_metrics_finds_no_problem(tmp_path, softmax_module, digits_split):
    g = make_guard(
        tmp_path,
        softmax_module,
        detectors=[DetectorSlot("mean", MeanDetector(), [(0.6, "reject")])],
        stateful=[StatefulSlot("count", CountingStateful(limit=4), "reject")],
    )
    c = TestClient(create_app(g))
    k = create_key(g.store, "a").key
    for n in (2, 3, 1):
        c.post(PREDICT, json={"inputs": digits_split[2][:n].tolist()}, headers=auth(k))
    c.post(PREDICT, content=b"[", headers=auth(k))
    c.post(PREDICT, json={"inputs": []}, headers=auth("nope"))
    g.metrics.set_drift("digits", (0.05, 0.01, -0.5))
    text = c.get("/metrics").text
    for name in ("stage_latency_seconds_bucket", "detector_score_bucket", "top1_confidence",
                 "client_queries_total", "stateful_alerts_total", "drift_input_psi"):  # fmt: skip
        assert f"advguard_guard_{name}" in text
    assert PROMTOOL is not None
    r = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), r.stdout + r.stderr
    # and promtool does catch a naming problem (a counter without _total)
    bad = "# HELP x_requests Bad.\n# TYPE x_requests counter\nx_requests 1\n"
    r = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=bad, capture_output=True, text=True, timeout=60
    )
    assert r.returncode != 0 and "_total" in r.stdout + r.stderr
    g.close()
