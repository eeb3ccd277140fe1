"""Requests generated from the guard's OpenAPI document (schemathesis): bad input is always a
4xx, never a 5xx. About 200 cases here (seeded); benchmarks/guard_schemathesis.py runs 10,000.
"""

from __future__ import annotations

import pytest
import torch

from advguard.guard.app import create_app
from advguard.guard.auth import create_key
from advguard.guard.pipeline import DetectorSlot
from guard_helpers import MeanDetector, fuzz_guard_api, make_guard

pytest.importorskip("schemathesis")

CFG = {"limits": {"rate": 1e6, "burst": 10_000_000, "budget": 1_000_000_000}}


def fuzz_target(tmp_path):
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).eval()
    # a detector with review and reject bands, so generated inputs reach every decision
    det = DetectorSlot("mean", MeanDetector(), [(0.5, "review"), (0.8, "reject")])
    g = make_guard(tmp_path, module, cfg=CFG, detectors=[det], with_fallback=True)
    key = create_key(g.store, "fuzz", ("predict", "admin")).key
    return g, key


def test_generated_requests_never_get_a_5xx(tmp_path):
    g, key = fuzz_target(tmp_path)
    try:
        counts, failures = fuzz_guard_api(create_app(g), key, examples_per_operation=30)
    finally:
        g.close()
    assert failures == []
    total = sum(counts.values())
    assert total >= 150
    statuses = {s for (_op, s) in counts}
    # the generated cases reach the model (200) and the refusals alike
    assert {200, 401, 404, 422} <= statuses
    assert counts.get(("POST /v1/models/{name}/predict", 200), 0) > 0
    assert counts.get(("POST /v2/models/{name}/infer", 200), 0) > 0
