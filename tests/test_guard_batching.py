"""Micro-batching and group commit in the guard (guard/batching.py): fewer model calls and
commits, the same answers as unbatched, errors kept per request, max_wait by an injected
clock."""

from __future__ import annotations

import asyncio
import itertools
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from advguard.errors import InputError
from advguard.guard.app import create_app
from advguard.guard.auth import create_key
from advguard.guard.batching import BatchResult, GroupCommit, MicroBatcher, plan
from advguard.guard.config import GuardConfig, parse_config
from advguard.guard.pipeline import DetectorSlot, Guard
from advguard.guard.serving import ServedModel
from advguard.guard.storage import GuardStore
from advguard.models import TorchClassifier
from guard_helpers import MeanDetector, ServerThread

PREDICT = "/v1/models/digits/predict"
#: A pixel value no digit has: the flaky model and detector fail on rows holding it.
POISON = 0.123456


@pytest.fixture(scope="module")
def module(digits_split) -> torch.nn.Module:
    x, y = torch.tensor(digits_split[0]), torch.tensor(digits_split[1])
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    opt = torch.optim.Adam(m.parameters(), lr=0.05)
    for _ in range(100):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
    return m.eval()


class Counting:
    """A classifier that counts its calls and fails on any batch holding a POISON pixel."""

    def __init__(self, inner: TorchClassifier) -> None:
        self.inner = inner
        self.input_shape, self.bounds, self.num_classes = (1, 8, 8), (0.0, 1.0), 10
        self.calls: list[int] = []
        self.lock = threading.Lock()

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        with self.lock:
            self.calls.append(len(x))
        if np.any(np.isclose(x, POISON)):
            raise RuntimeError("poisoned batch")
        return self.inner.predict_proba(x)


class PoisonDetector(MeanDetector):
    def score(self, x: np.ndarray) -> np.ndarray:
        if np.any(np.isclose(x, POISON)):
            raise RuntimeError("poisoned batch")
        return super().score(x)


def build(tmp_path, module, cfg: dict[str, Any], *, detector: bool = False) -> Guard:
    config = GuardConfig.model_validate(cfg)
    store = GuardStore(f"sqlite:///{tmp_path / 'guard.db'}")
    clf = Counting(TorchClassifier(module, input_shape=(1, 8, 8), num_classes=10))
    model = ServedModel("digits", "digits:1", clf)  # type: ignore[arg-type]
    slots = [DetectorSlot("mean", PoisonDetector(), [(0.55, "reject")])] if detector else []
    return Guard(config, store=store, model=model, detectors=slots)


LIMITS = {"limits": {"rate": 1e6, "burst": 100_000, "budget": None}}


# -- plan: when a batch is due (pure, explicit times) -------------------------------------
def test_plan_waits_until_the_oldest_has_waited_max_wait():
    assert plan([], [], 0.0, max_rows=8, max_wait_s=0.002) == (0, float("inf"))
    k, wait = plan([10.0, 10.001], [1, 1], 10.0015, max_rows=8, max_wait_s=0.002)
    assert k == 0 and wait == pytest.approx(0.0005)
    assert plan([10.0, 10.001], [1, 1], 10.002, max_rows=8, max_wait_s=0.002) == (2, 0.0)


def test_plan_runs_a_full_batch_at_once_and_never_splits_a_request():
    assert plan([0.0] * 3, [3, 3, 2], 0.0, max_rows=8, max_wait_s=1.0) == (3, 0.0)
    # the third request would overflow: the first two run now, the third waits
    assert plan([0.0] * 3, [3, 3, 3], 0.0, max_rows=8, max_wait_s=1.0) == (2, 0.0)
    # a request larger than max_rows runs alone
    assert plan([0.0, 0.0], [20, 1], 0.0, max_rows=8, max_wait_s=1.0) == (1, 0.0)


# -- the async batcher ----------------------------------------------------------------------
def test_batcher_coalesces_concurrent_requests_and_honours_max_wait_by_its_clock():
    now = [0.0]
    seen: list[list[int]] = []

    def run(items: list[int]) -> list[BatchResult]:
        seen.append(list(items))
        return [
            BatchResult(error=ValueError("odd")) if i % 2 else BatchResult(i * 10) for i in items
        ]

    async def main() -> None:
        b = MicroBatcher(run, max_rows=4, max_wait_s=0.002, clock=lambda: now[0])
        # four one-row requests fill a batch: it runs at once, whatever the clock says
        res = await asyncio.gather(*(b.submit(i, 1) for i in range(4)), return_exceptions=True)
        assert res[0] == 0 and res[2] == 20
        assert isinstance(res[1], ValueError) and isinstance(res[3], ValueError)
        assert seen == [[0, 1, 2, 3]]
        # one request: not due while the injected clock stands still ...
        task = asyncio.ensure_future(b.submit(6, 1))
        for _ in range(20):
            await asyncio.sleep(0.003)
        assert not task.done() and b.batches == 1
        now[0] += 0.002  # ... due once it has waited max_wait
        assert await task == 60
        assert seen == [[0, 1, 2, 3], [6]] and b.batches == 2 and b.requests == 5

    asyncio.run(main())


# -- group commit -----------------------------------------------------------------------------
def test_group_commit_shares_transactions_and_isolates_a_bad_item():
    written: list[int] = []
    gate = threading.Event()

    def write(items):
        gate.wait(5)  # the first transaction holds until all 16 threads are queued
        if -1 in items:
            raise ValueError("bad row")
        written.extend(items)

    gc: GroupCommit[int] = GroupCommit(write)
    errors: dict[int, BaseException | None] = {}

    def one(i: int) -> None:
        errors[i] = gc.add_many([i])[0]

    threads = [threading.Thread(target=one, args=(i,)) for i in [*range(15), -1]]
    for t in threads:
        t.start()
    while len(gc._queue) < 15:
        threading.Event().wait(0.001)
    gate.set()
    for t in threads:
        t.join(10)
    assert sorted(written) == list(range(15))
    assert isinstance(errors[-1], ValueError)
    assert all(errors[i] is None for i in range(15))
    # first writer alone, then the other 15 together (failed because of -1), then one by one
    assert gc.commits < 1 + 1 + 15 + 16


# -- the guard, end to end over HTTP ------------------------------------------------------
def _post_all(url: str, key: str, bodies: list[np.ndarray]) -> list[httpx.Response]:
    def post(x: np.ndarray) -> httpx.Response:
        with httpx.Client(timeout=60) as c:
            return c.post(
                url + PREDICT,
                json={"inputs": x.tolist()},
                headers={"Authorization": f"Bearer {key}"},
            )

    with ThreadPoolExecutor(len(bodies)) as ex:
        return list(ex.map(post, bodies))


def _unbatched(tmp_path, module, bodies, detector: bool) -> list[tuple[int, Any]]:
    g = build(tmp_path / "plain", module, LIMITS, detector=detector)
    key = create_key(g.store, "k").key
    c = TestClient(create_app(g))
    out = []
    for x in bodies:
        r = c.post(PREDICT, json={"inputs": x.tolist()}, headers={"Authorization": f"Bearer {key}"})
        out.append((r.status_code, r.json()))
    g.close()
    return out


@pytest.mark.parametrize("detector", [False, True])
def test_batched_answers_equal_unbatched_with_fewer_model_calls(
    tmp_path, module, digits_split, detector
):
    (tmp_path / "plain").mkdir()
    x = digits_split[2]
    rows = [1, 2, 1, 3, 1]  # 8 rows: exactly one full batch
    starts = np.cumsum([0, *rows])
    bodies = [x[a:b] for a, b in itertools.pairwise(starts)]
    if detector:  # a bright request: the detector rejects it, the others are answered
        bodies[1] = np.clip(bodies[1] + 0.6, 0, 1).astype(np.float32)
    expected = _unbatched(tmp_path, module, bodies, detector)
    # max_wait far away: only the 8th row can start the batch (a deterministic trigger)
    g = build(tmp_path, module, {**LIMITS, "batching": {"max_batch": 8, "max_wait_ms": 30_000}},
              detector=detector)  # fmt: skip
    key = create_key(g.store, "k").key
    with ServerThread(create_app(g)) as srv:
        got = _post_all(srv.url, key, bodies)
    clf = g.model.classifier
    assert g.batcher is not None and g.batcher.batches == 1 and g.batcher.requests == 5
    assert clf.calls == [8 - (2 if detector else 0)]  # type: ignore[attr-defined]
    for r, (status, body) in zip(got, expected, strict=True):
        assert r.status_code == status
        b = r.json()
        if status == 200:
            assert b["labels"] == body["labels"]
            np.testing.assert_allclose(b["probabilities"], body["probabilities"], atol=1e-6)
            assert b["row_actions"] == body["row_actions"]
            # every request has its own decision record
            assert g.store.get_decision(b["decision_id"]).n_rows == len(b["labels"])
        else:
            assert b["type"] == body["type"]
    assert expected[1][0] == (422 if detector else 200)
    g.close()


def test_an_error_in_one_request_does_not_fail_the_others(tmp_path, module, digits_split):
    x = digits_split[2]
    bodies = [x[i : i + 1].copy() for i in range(4)]
    bodies[2][0, 0, 0, 0] = POISON  # the model and the detector fail on this one
    g = build(tmp_path, module, {**LIMITS, "batching": {"max_batch": 4, "max_wait_ms": 30_000}},
              detector=True)  # fmt: skip
    key = create_key(g.store, "k").key
    with ServerThread(create_app(g)) as srv:
        got = _post_all(srv.url, key, bodies)
    assert [r.status_code for r in got] == [200, 200, 500, 200]
    assert got[2].json()["type"].endswith(":internal")
    assert g.batcher is not None and g.batcher.batches == 1
    g.close()


def test_batching_config_is_validated_and_off_by_default():
    assert GuardConfig().batching is None
    cfg = parse_config("batching: {max_batch: 16, max_wait_ms: 1}\n")
    assert cfg.batching is not None and cfg.batching.max_batch == 16
    with pytest.raises(InputError, match=r"batching\.max_batch"):
        parse_config("batching: {max_batch: 0}\n")
    with pytest.raises(InputError, match=r"batching\.speed"):
        parse_config("batching: {speed: 2}\n")


def test_batching_through_the_test_client_answers_single_requests(tmp_path, module, digits_split):
    # max_wait 0: each request runs as soon as it is alone (TestClient runs one at a time)
    g = build(tmp_path, module, {**LIMITS, "batching": {"max_batch": 32, "max_wait_ms": 0}})
    key = create_key(g.store, "k").key
    c = TestClient(create_app(g))
    x = digits_split[2][:3]
    r = c.post(PREDICT, json={"inputs": x.tolist()}, headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200 and len(r.json()["labels"]) == 3
    r2 = c.post(PREDICT, json={"inputs": [[2.0] * 64]}, headers={"Authorization": f"Bearer {key}"})
    assert r2.status_code == 422  # validation still happens per request, before the batch
    assert g.batcher is not None and g.batcher.batches == 1
    g.close()


# -- found by the HTTP benchmark --------------------------------------------------------------
def test_a_client_that_disconnects_mid_body_is_a_4xx_not_an_internal_error():
    from starlette.requests import ClientDisconnect

    from advguard.guard.edge import read_capped
    from advguard.guard.problems import Problem

    async def chunks():
        yield b'{"inputs": '
        raise ClientDisconnect()

    with pytest.raises(Problem) as e:
        asyncio.run(read_capped(chunks(), 1024, 10.0))
    assert e.value.status == 400
