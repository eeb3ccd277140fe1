"""The runtime guard: config, auth, storage, limits, edge validation, API, pipeline, forensics."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import random
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from advguard.cli import app as cli_app
from advguard.errors import InputError
from advguard.guard.app import CatchAll, create_app
from advguard.guard.auth import create_key, digest_key, rotate_key
from advguard.guard.config import load_config, parse_config
from advguard.guard.edge import read_capped
from advguard.guard.forensics import decode_payload, export_npz, fingerprint, purge
from advguard.guard.pipeline import DetectorSlot, StatefulSlot
from advguard.guard.problems import PROBLEM_BASE, Problem
from advguard.guard.storage import OutputPolicy, StoreCorrupt
from guard_helpers import (
    CountingStateful,
    MeanDetector,
    ServerThread,
    make_guard,
    pg_url,
)

PREDICT = "/v1/models/digits/predict"


@pytest.fixture(scope="module")
def digits_module(digits_split) -> torch.nn.Module:
    """A softmax regression on digits (full-batch, ~0.3 s; ~95% test accuracy): the guard's
    tests need a real model, not a strong one."""
    x, y = torch.tensor(digits_split[0]), torch.tensor(digits_split[1])
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    opt = torch.optim.Adam(module.parameters(), lr=0.05)
    for _ in range(150):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(module(x), y).backward()
        opt.step()
    return module.eval()


@pytest.fixture()
def x_digits(digits_split) -> np.ndarray:
    return digits_split[2][:6]


def test_the_test_model_is_real(digits_module, digits_split):
    x, y = torch.tensor(digits_split[2]), digits_split[3]
    with torch.no_grad():
        acc = (digits_module(x).argmax(1).numpy() == y).mean()
    assert acc > 0.9


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture()
def guard(tmp_path, digits_module):
    g = make_guard(tmp_path, digits_module)
    yield g
    g.close()


@pytest.fixture()
def client(guard):
    return TestClient(create_app(guard))


@pytest.fixture()
def key(guard) -> str:
    return create_key(guard.store, "alice", ["predict"]).key


# -- 1. config ----------------------------------------------------------------------------
GOOD_YAML = """\
model:
  name: digits
  path: model.safetensors
limits:
  rate: 5
  burst: 10
  budget: 100
detectors:
  - name: lid
    path: lid.safetensors
    bands:
      - {min: 0.7, action: review}
      - {action: reject}
fallback:
  path: other.onnx
"""


def test_config_parses_and_resolves_paths(tmp_path):
    (tmp_path / "guard.yaml").write_text(GOOD_YAML)
    cfg = load_config(tmp_path / "guard.yaml")
    assert cfg.limits.burst == 10 and cfg.detectors[0].bands[1].min is None
    assert cfg.resolve(cfg.model.path) == tmp_path / "model.safetensors"
    assert cfg.database_url == f"sqlite:///{(tmp_path / 'guard.db').resolve()}"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("limits:\n  rate: -1\n", "line 2, field 'limits.rate'"),
        ("limits:\n  rate: 1\n  brust: 3\n", "line 3, field 'limits.brust'"),
        ("edge:\n  max_batch: '12'\n", "field 'edge.max_batch'"),
        ("base_dir: /etc\n", "field 'base_dir'"),
        ("a: [1, 2\nb: 3\n", "not valid YAML: while parsing a flow sequence (line 1, column 4)"),
        (
            "detectors:\n  - name: d\n    path: d.st\n    bands: [{action: review}]\n",
            "needs a 'fallback' model",
        ),
    ],
)
def test_bad_config_is_one_line_naming_the_field(text, needle):
    with pytest.raises(InputError) as e:
        parse_config(text, "g.yaml")
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_cli_check_bad_config_exit_2(tmp_path):
    p = tmp_path / "g.yaml"
    p.write_text("server:\n  port: 99999\n")
    r = CliRunner().invoke(cli_app, ["guard", "check", str(p)])
    assert r.exit_code == 2
    assert "line 2, field 'server.port'" in r.output and "Traceback" not in r.output
    p.write_text(GOOD_YAML)
    r = CliRunner().invoke(cli_app, ["guard", "check", str(p), "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["ok"] is True


# -- 2. auth and storage ------------------------------------------------------------------
def test_keys_are_stored_hashed_and_checked(tmp_path, guard, client, x_digits):
    created = create_key(guard.store, "bob", ["predict"])
    raw = (tmp_path / "guard.db").read_bytes()
    assert created.key.encode() not in raw
    assert created.record.hash == hashlib.sha256(created.key.encode()).hexdigest()
    body = {"inputs": x_digits[:1].tolist()}
    assert client.post(PREDICT, json=body, headers=auth(created.key)).status_code == 200
    assert client.post(PREDICT, json=body, headers={"X-API-Key": created.key}).status_code == 200
    r = client.post(PREDICT, json=body)
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["type"] == PROBLEM_BASE + "unauthorized"
    wrong = created.key[:-4] + ("AAAA" if not created.key.endswith("AAAA") else "BBBB")
    assert client.post(PREDICT, json=body, headers=auth(wrong)).status_code == 401
    assert client.post(PREDICT, json=body, headers=auth("garbage")).status_code == 401
    # wrong scope
    d = client.get("/v1/decisions/" + "0" * 32, headers=auth(created.key))
    assert d.status_code == 403 and d.json()["type"] == PROBLEM_BASE + "forbidden"
    # revoked
    assert guard.store.revoke_key(created.record.key_id)
    r = client.post(PREDICT, json=body, headers=auth(created.key))
    assert r.status_code == 401 and "revoked" in r.json()["detail"]


def test_pepper_hmac_and_rotation(guard):
    pepper = b"p" * 32
    c = create_key(guard.store, "carol", ["predict", "admin"], pepper=pepper)
    assert c.record.hash == digest_key(c.key, pepper) != digest_key(c.key, None)
    new = rotate_key(guard.store, c.record.key_id, pepper=pepper)
    assert new.record.scopes == ("predict", "admin") and new.key != c.key
    assert guard.store.get_key(c.record.key_id).revoked
    with pytest.raises(InputError):
        rotate_key(guard.store, c.record.key_id, pepper=pepper)


def test_blocked_client_403(guard, client, key, x_digits):
    kid = guard.store.list_keys()[0].key_id
    guard.store.add_block(kid, "test")
    r = client.post(PREDICT, json={"inputs": x_digits[:1].tolist()}, headers=auth(key))
    assert r.status_code == 403 and r.json()["type"] == PROBLEM_BASE + "client-blocked"
    assert guard.store.remove_block(kid)
    assert client.post(
        PREDICT, json={"inputs": x_digits[:1].tolist()}, headers=auth(key)
    ).is_success


def test_rows_read_back_are_validated(guard):
    c = create_key(guard.store, "dave")
    with guard.store.engine.begin() as conn:
        conn.execute(
            guard.store.keys.update()
            .values(scopes="predict,root")
            .where(guard.store.keys.c.key_id == c.record.key_id)
        )
    with pytest.raises(StoreCorrupt, match="scopes"):
        guard.store.get_key(c.record.key_id)


def test_postgresql_store(tmp_path, digits_module, x_digits):
    url = pg_url()
    if url is None:
        pytest.skip("PostgreSQL at 127.0.0.1:5432 (db test, user postgres) is not reachable")
    prefix = f"gt{random.randrange(16**8):08x}_"
    g = make_guard(tmp_path, digits_module, cfg={"storage": {"table_prefix": prefix}}, db_url=url)
    try:
        assert g.store.engine.dialect.name == "postgresql"
        k = create_key(g.store, "pg", ["predict", "admin"])
        c = TestClient(create_app(g))
        r = c.post(PREDICT, json={"inputs": x_digits[:2].tolist()}, headers=auth(k.key))
        assert r.status_code == 200
        d = c.get(f"/v1/decisions/{r.json()['decision_id']}", headers=auth(k.key)).json()
        assert d["n_rows"] == 2 and d["key_id"] == k.record.key_id
    finally:
        g.store.drop_all()
        g.close()


# -- 4. limits ---------------------------------------------------------------------------
def test_rate_limit_429_with_headers(tmp_path, digits_module, x_digits):
    g = make_guard(tmp_path, digits_module, cfg={"limits": {"rate": 0.001, "burst": 3}})
    c = TestClient(create_app(g))
    k = create_key(g.store, "e").key
    body = {"inputs": x_digits[:1].tolist()}
    codes = [c.post(PREDICT, json=body, headers=auth(k)).status_code for _ in range(3)]
    assert codes == [200, 200, 200]
    r = c.post(PREDICT, json=body, headers=auth(k))
    assert r.status_code == 429 and r.json()["type"] == PROBLEM_BASE + "rate-limited"
    assert int(r.headers["retry-after"]) >= 1
    assert r.headers["ratelimit-limit"] == "3" and r.headers["ratelimit-remaining"] == "0"
    assert (
        'advguard_guard_rate_limited_total{limit="rate",model="digits"} 1.0'
        in c.get("/metrics").text
    )


def test_budget_counts_rows_and_refusal_spends_nothing(tmp_path, digits_module, x_digits):
    g = make_guard(tmp_path, digits_module, cfg={"limits": {"budget": 10, "burst": 100}})
    c = TestClient(create_app(g))
    k = create_key(g.store, "f").key
    r = c.post(PREDICT, json={"inputs": x_digits[:4].tolist()}, headers=auth(k))
    assert r.status_code == 200 and r.headers["ratelimit-remaining"] == "6"
    r = c.post(PREDICT, json={"inputs": x_digits[:6].tolist()}, headers=auth(k))
    assert r.headers["ratelimit-remaining"] == "0"
    r = c.post(PREDICT, json={"inputs": x_digits[:1].tolist()}, headers=auth(k))
    assert r.status_code == 429 and r.json()["type"] == PROBLEM_BASE + "budget-exhausted"
    # another key has its own budget; a too-large request spends nothing
    k2 = create_key(g.store, "g").key
    assert c.post(PREDICT, json={"inputs": x_digits[:5].tolist()}, headers=auth(k2)).is_success
    assert (
        c.post(PREDICT, json={"inputs": x_digits[:6].tolist()}, headers=auth(k2)).status_code == 429
    )
    r = c.post(PREDICT, json={"inputs": x_digits[:5].tolist()}, headers=auth(k2))
    assert r.status_code == 200 and r.headers["ratelimit-remaining"] == "0"
    # a batch larger than the whole budget can never pass: 422, not a 429 to retry
    k3 = create_key(g.store, "g3").key
    r = c.post(PREDICT, json={"inputs": np.zeros((11, 1, 8, 8)).tolist()}, headers=auth(k3))
    assert r.status_code == 422 and r.json()["type"] == PROBLEM_BASE + "batch-too-large"


def _hammer(url: str, key: str, body: dict, n_threads: int, per_thread: int) -> list[int]:
    """``n_threads`` clients posting ``per_thread`` requests each, all at once."""
    import httpx

    start = threading.Barrier(n_threads)
    limits = httpx.Limits(max_connections=n_threads, max_keepalive_connections=n_threads)
    with httpx.Client(base_url=url, timeout=60, limits=limits) as h:

        def worker(_: int) -> list[int]:
            start.wait()
            return [
                h.post(PREDICT, json=body, headers=auth(key)).status_code for _ in range(per_thread)
            ]

        with ThreadPoolExecutor(n_threads) as ex:
            return [c for codes in ex.map(worker, range(n_threads)) for c in codes]


def test_limits_exact_under_32_concurrent_clients(tmp_path, digits_module, x_digits):
    g = make_guard(
        tmp_path, digits_module, cfg={"limits": {"rate": 0.001, "burst": 20, "budget": 1000}}
    )
    k = create_key(g.store, "h").key
    with ServerThread(create_app(g)) as srv:
        codes = _hammer(srv.url, k, {"inputs": x_digits[:1].tolist()}, 32, 1)
    assert codes.count(200) == 20 and codes.count(429) == 12
    # the row budget: 3 rows a request, 50 rows -> exactly 16 answered
    (tmp_path / "b").mkdir()
    g2 = make_guard(
        tmp_path / "b", digits_module, cfg={"limits": {"rate": 1000, "burst": 1000, "budget": 50}}
    )
    k2 = create_key(g2.store, "i").key
    with ServerThread(create_app(g2)) as srv:
        codes = _hammer(srv.url, k2, {"inputs": x_digits[:3].tolist()}, 32, 1)
    assert codes.count(200) == 16 and codes.count(429) == 16


def _redis_up() -> bool:
    try:
        import redis

        return bool(redis.Redis(host="127.0.0.1", port=6379, socket_connect_timeout=1).ping())
    except Exception:
        return False


def test_two_guards_share_one_redis_limit(tmp_path, digits_module, x_digits):
    if not _redis_up():
        pytest.skip("Redis at 127.0.0.1:6379 is not reachable")
    prefix = f"advguard-test-{random.randrange(16**8):08x}"
    lim = {
        "rate": 0.001,
        "burst": 15,
        "budget": 1000,
        "redis_url": "redis://127.0.0.1:6379/0",
        "key_prefix": prefix,
    }
    # two guards, one database of keys, one Redis
    g1 = make_guard(tmp_path, digits_module, cfg={"limits": lim})
    g2 = make_guard(tmp_path, digits_module, cfg={"limits": lim})
    k = create_key(g1.store, "j").key
    try:
        with ServerThread(create_app(g1)) as s1, ServerThread(create_app(g2)) as s2:
            body = {"inputs": x_digits[:1].tolist()}
            first = _hammer(s2.url, k, body, 5, 1)  # 5 of the 15 through the second guard
            with ThreadPoolExecutor(2) as ex:
                a, b = ex.map(lambda u: _hammer(u, k, body, 16, 1), [s1.url, s2.url])
        assert first == [200] * 5
        assert (a + b).count(200) == 10 and (a + b).count(429) == 22
    finally:
        g1.limiter.reset()


# -- 5. edge validation ------------------------------------------------------------------
def test_bad_inputs_are_4xx_problems(guard, client, key, x_digits):
    h = auth(key)
    cases = [
        ({"inputs": [[1, 2], [3]]}, 422, "invalid-input"),
        ({"inputs": [["a"] * 64]}, 422, "invalid-input"),
        ({"inputs": [[None] * 64]}, 422, "invalid-input"),
        ({"inputs": [[True] * 64]}, 422, "invalid-input"),
        ({"inputs": x_digits[:1, :, :4].tolist()}, 422, "invalid-input"),
        ({"inputs": (x_digits[:1] + 2).tolist()}, 422, "invalid-input"),
        ({"inputs": []}, 422, "invalid-input"),
        ({"inputs": 3}, 422, "invalid-input"),
        ({"data": []}, 422, "invalid-input"),
        ([1, 2], 422, "invalid-input"),
        ({"inputs": np.zeros((257, 64)).tolist()}, 422, "batch-too-large"),
    ]
    for body, status, slug in cases:
        r = client.post(PREDICT, json=body, headers=h)
        assert (r.status_code, r.json()["type"]) == (status, PROBLEM_BASE + slug), body
    raw = [
        (b'{"inputs": [[NaN' + b", 0" * 63 + b"]]}", 422, "invalid-input"),
        (b'{"inputs": [[Infinity' + b", 0" * 63 + b"]]}", 422, "invalid-input"),
        (b"{not json", 400, "invalid-json"),
        (b"\xff\xfe", 400, "invalid-json"),
        (b"", 400, "invalid-json"),
        (b'{"inputs": ' + b"[" * 20 + b"]" * 20 + b"}", 400, "too-deep"),
        (b"[" * 100_000 + b"]" * 100_000, 400, "too-deep"),
    ]
    for body, status, slug in raw:
        r = client.post(PREDICT, content=body, headers={**h, "Content-Type": "application/json"})
        assert (r.status_code, r.json()["type"]) == (status, PROBLEM_BASE + slug), body[:30]
    r = client.post(PREDICT, content=b"x", headers={**h, "Content-Type": "text/plain"})
    assert r.status_code == 415
    r = client.post("/v1/models/other/predict", json={"inputs": []}, headers=h)
    assert r.status_code == 404 and r.json()["type"] == PROBLEM_BASE + "model-not-found"
    assert client.get(PREDICT).status_code == 405


def test_body_size_limit_while_streaming(tmp_path, digits_module):
    g = make_guard(tmp_path, digits_module, cfg={"edge": {"max_body_bytes": 1000}})
    c = TestClient(create_app(g))
    k = create_key(g.store, "k").key
    big = json.dumps({"inputs": np.zeros((3, 1, 8, 8)).tolist()}).encode()
    assert len(big) > 1000
    r = c.post(PREDICT, content=big, headers={**auth(k), "Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["type"] == PROBLEM_BASE + "body-too-large"

    def chunks():  # no Content-Length: the cap applies while reading
        for i in range(0, len(big), 100):
            yield big[i : i + 100]

    r = c.post(PREDICT, content=chunks(), headers={**auth(k), "Content-Type": "application/json"})
    assert r.status_code == 413


def test_read_deadline_with_injected_clock():
    t = [0.0]

    async def slow():
        yield b"a" * 10
        t[0] = 11.0  # the client stalls past the deadline
        yield b"b"

    with pytest.raises(Problem) as e:
        asyncio.run(read_capped(slow(), 1000, 10.0, clock=lambda: t[0]))
    assert e.value.status == 408

    async def stuck():
        yield b"a"
        await asyncio.sleep(60)
        yield b"b"

    with pytest.raises(Problem) as e:
        asyncio.run(read_capped(stuck(), 1000, 0.05))
    assert e.value.status == 408


def test_npy_bodies(guard, client, key, x_digits, digits_module):
    buf = io.BytesIO()
    np.save(buf, x_digits[:3])
    h = {**auth(key), "Content-Type": "application/x-npy"}
    r = client.post(PREDICT, content=buf.getvalue(), headers=h)
    assert r.status_code == 200
    assert r.json()["labels"] == guard.model.classifier.predict(x_digits[:3]).tolist()
    obj = io.BytesIO()
    np.save(obj, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    r = client.post(PREDICT, content=obj.getvalue(), headers=h)
    assert r.status_code == 422 and "object arrays" in r.json()["detail"]
    for junk in (b"\x93NUMPY garbage", b"", np.array(["x"]).tobytes()):
        assert client.post(PREDICT, content=junk, headers=h).status_code in (400, 422)
    s = io.BytesIO()
    np.save(s, np.array(["ab"] * 64).reshape(1, 1, 8, 8))
    assert client.post(PREDICT, content=s.getvalue(), headers=h).status_code == 422


def test_clip_instead_of_reject(tmp_path, digits_module, x_digits):
    g = make_guard(tmp_path, digits_module, cfg={"edge": {"out_of_bounds": "clip"}})
    c = TestClient(create_app(g))
    k = create_key(g.store, "l").key
    r = c.post(PREDICT, json={"inputs": (x_digits[:2] * 3).tolist()}, headers=auth(k))
    want = g.model.classifier.predict(np.clip(x_digits[:2] * 3, 0, 1)).tolist()
    assert r.status_code == 200 and r.json()["labels"] == want


def test_internal_errors_are_500_problems_without_details(
    tmp_path, digits_module, x_digits, caplog
):
    g = make_guard(tmp_path, digits_module, detectors=[DetectorSlot("bad", _Exploding(), [])])
    c = TestClient(CatchAll(create_app(g)), raise_server_exceptions=False)
    k = create_key(g.store, "m").key
    with caplog.at_level(logging.ERROR, logger="advguard.guard"):
        r = c.post(PREDICT, json={"inputs": x_digits[:1].tolist()}, headers=auth(k))
    assert r.status_code == 500 and r.json()["type"] == PROBLEM_BASE + "internal"
    assert "secret-detail" not in r.text and "Traceback" not in r.text
    assert "secret-detail" not in caplog.text and "RuntimeError" in caplog.text


class _Exploding:
    threshold = 0.0

    def score(self, x):
        raise RuntimeError("secret-detail")


# -- 6. API ---------------------------------------------------------------------------------
def test_v1_answers_match_the_model(guard, client, key, x_digits):
    r = client.post(PREDICT, json={"inputs": x_digits.tolist()}, headers=auth(key))
    b = r.json()
    want = guard.model.classifier.predict_proba(x_digits)
    np.testing.assert_allclose(b["probabilities"], want, atol=1e-6)
    assert b["action"] == "allow" and b["model_version"] == "digits:1"
    assert r.headers["x-decision-id"] == b["decision_id"]
    # flat rows are accepted too
    r = client.post(PREDICT, json={"inputs": x_digits.reshape(6, -1).tolist()}, headers=auth(key))
    np.testing.assert_allclose(r.json()["probabilities"], want, atol=1e-6)


def test_open_inference_protocol_v2(guard, client, key, x_digits):
    h = auth(key)
    payload = {
        "id": "req-1",
        "inputs": [
            {
                "name": "input-0",
                "shape": [1, 1, 8, 8],
                "datatype": "FP32",
                "data": x_digits[0].ravel().tolist(),
            }
        ],
    }
    r = client.post("/v2/models/digits/infer", json=payload, headers=h)
    assert r.status_code == 200
    b = r.json()
    assert b["model_name"] == "digits" and b["id"] == "req-1"
    out = {o["name"]: o for o in b["outputs"]}
    assert out["probabilities"]["shape"] == [1, 10] and out["label"]["data"] == [
        int(guard.model.classifier.predict(x_digits[:1])[0])
    ]
    np.testing.assert_allclose(
        out["probabilities"]["data"],
        guard.model.classifier.predict_proba(x_digits[:1])[0],
        atol=1e-6,
    )
    payload["inputs"][0]["shape"] = [2, 1, 8, 8]
    assert client.post("/v2/models/digits/infer", json=payload, headers=h).status_code == 422
    payload["inputs"][0]["shape"] = [1, 1, 8, 8]
    payload["inputs"][0]["datatype"] = "BYTES"
    assert client.post("/v2/models/digits/infer", json=payload, headers=h).status_code == 422
    meta = client.get("/v2/models/digits", headers=h).json()
    assert meta["inputs"][0]["shape"] == [-1, 1, 8, 8]
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 200


def test_openapi_declares_auth_and_errors(client):
    s = client.get("/openapi.json").json()
    assert {"bearerAuth", "apiKeyHeader"} <= set(s["components"]["securitySchemes"])
    assert "Problem" in s["components"]["schemas"]
    for path, method in [
        ("/v1/models/{name}/predict", "post"),
        ("/v2/models/{name}/infer", "post"),
        ("/v1/decisions/{decision_id}", "get"),
    ]:
        op = s["paths"][path][method]
        assert op["security"]
        for code in ("401", "403", "422", "500") + (("413", "429") if method == "post" else ()):
            assert code in op["responses"], (path, code)
            assert "application/problem+json" in op["responses"][code]["content"]


def test_http_classifier_and_redteam_contract_against_a_running_guard(
    tmp_path, digits_module, x_digits
):
    from advguard.models.http_model import HttpClassifier

    g = make_guard(tmp_path, digits_module)
    k = create_key(g.store, "redteam").key
    with ServerThread(CatchAll(create_app(g))) as srv:
        clf = HttpClassifier(
            f"{srv.url}{PREDICT}",
            input_shape=(1, 8, 8),
            num_classes=10,
            api_key=k,
            batch_size=4,
            retries=0,
        )
        got = clf.predict_proba(x_digits)
        bad = HttpClassifier(
            f"{srv.url}{PREDICT}",
            input_shape=(1, 8, 8),
            num_classes=10,
            api_key="agk_0000000000000000." + "A" * 43,
            retries=0,
        )
        with pytest.raises(Exception, match="401"):
            bad.predict(x_digits[:1])
    np.testing.assert_allclose(got, g.model.classifier.predict_proba(x_digits), atol=1e-5)
    assert clf.queries.forward == 6


# -- 7. pipeline and decisions --------------------------------------------------------------
def _pipeline_guard(tmp_path, digits_module, **kw):
    bands = [(0.3, "fallback"), (0.45, "review"), (0.6, "reject")]
    return make_guard(
        tmp_path,
        digits_module,
        with_fallback=True,
        detectors=[DetectorSlot("mean", MeanDetector(), bands)],
        **kw,
    )


def test_score_bands_route_rows(tmp_path, digits_module):
    g = _pipeline_guard(tmp_path, digits_module)
    c = TestClient(create_app(g))
    k = create_key(g.store, "n", ["predict", "admin"]).key
    x = np.stack([np.full((1, 8, 8), v, np.float32) for v in (0.1, 0.35, 0.5)])
    r = c.post(PREDICT, json={"inputs": x.tolist()}, headers=auth(k))
    b = r.json()
    assert r.status_code == 200 and b["row_actions"] == ["allow", "fallback", "review"]
    assert g.model.classifier.queries.forward == 1  # flagged rows never reach the primary
    assert b["action"] == "review" and b["fallback_version"] == "fallback:1"
    np.testing.assert_allclose(b["probabilities"][0], g.model.predict_proba(x[:1])[0], atol=1e-6)
    np.testing.assert_allclose(b["probabilities"][1:], g.fallback.predict_proba(x[1:]), atol=1e-6)
    rec = c.get(f"/v1/decisions/{b['decision_id']}", headers=auth(k)).json()
    assert rec["review_status"] == "pending" and rec["flagged"] and rec["forensic"]
    assert rec["scores"]["mean"] == pytest.approx([0.1, 0.35, 0.5])
    # one row above the reject band rejects the whole request, with a decision id
    x[0] = 0.9
    r = c.post(PREDICT, json={"inputs": x.tolist()}, headers=auth(k))
    assert r.status_code == 422 and r.json()["type"] == PROBLEM_BASE + "rejected"
    did = r.json()["decision_id"]
    assert r.headers["x-decision-id"] == did
    assert c.get(f"/v1/decisions/{did}", headers=auth(k)).json()["action"] == "reject"
    m = c.get("/metrics").text
    assert (
        'advguard_guard_decisions_total{action="reject",model="digits",version="digits:1"} 1.0' in m
    )
    assert c.get("/v1/decisions/nothex", headers=auth(k)).status_code == 404


def test_stateful_block_then_403(tmp_path, digits_module, x_digits):
    st = StatefulSlot("count", CountingStateful(limit=5), "block")
    g = make_guard(tmp_path, digits_module, stateful=[st])
    c = TestClient(create_app(g))
    k = create_key(g.store, "o").key
    body = {"inputs": x_digits[:3].tolist()}
    assert c.post(PREDICT, json=body, headers=auth(k)).status_code == 200
    r = c.post(PREDICT, json=body, headers=auth(k))  # 6 rows > 5: flagged, blocked
    assert r.status_code == 403 and "decision_id" in r.json()
    r = c.post(PREDICT, json=body, headers=auth(k))
    assert r.status_code == 403 and r.json()["type"] == PROBLEM_BASE + "client-blocked"
    blocks = g.store.list_blocks()
    assert len(blocks) == 1 and "count" in blocks[0].reason
    # other clients are unaffected
    k2 = create_key(g.store, "p").key
    assert c.post(PREDICT, json={"inputs": x_digits[:1].tolist()}, headers=auth(k2)).is_success


def test_stateful_review_answers_from_fallback(tmp_path, digits_module, x_digits):
    st = StatefulSlot("count", CountingStateful(limit=0), "review")
    g = make_guard(tmp_path, digits_module, stateful=[st], with_fallback=True)
    c = TestClient(create_app(g))
    k = create_key(g.store, "q").key
    b = c.post(PREDICT, json={"inputs": x_digits[:2].tolist()}, headers=auth(k)).json()
    assert b["action"] == "review"
    np.testing.assert_allclose(
        b["probabilities"], g.fallback.predict_proba(x_digits[:2]), atol=1e-6
    )
    assert [r.id for r in g.store.iter_decisions(review_status="pending")] == [b["decision_id"]]


def test_output_hardening_per_key(guard, client, x_digits):
    p = guard.model.classifier.predict_proba(x_digits[:2])
    lab = create_key(guard.store, "lab", output=OutputPolicy(mode="label")).key
    b = client.post(PREDICT, json={"inputs": x_digits[:2].tolist()}, headers=auth(lab)).json()
    assert "probabilities" not in b and "top_k" not in b and b["labels"] == p.argmax(1).tolist()
    top = create_key(guard.store, "top", output=OutputPolicy(mode="top_k", top_k=2, decimals=2)).key
    b = client.post(PREDICT, json={"inputs": x_digits[:2].tolist()}, headers=auth(top)).json()
    assert "probabilities" not in b
    assert [e["label"] for e in b["top_k"][0]] == np.argsort(-p[0])[:2].tolist()
    assert b["top_k"][0][0]["probability"] == round(float(p[0].max()), 2)
    rnd = create_key(guard.store, "rnd", output=OutputPolicy(decimals=1)).key
    b = client.post(PREDICT, json={"inputs": x_digits[:2].tolist()}, headers=auth(rnd)).json()
    assert b["probabilities"] == np.round(p, 1).tolist()


# -- 8. forensics ---------------------------------------------------------------------------
def test_encrypted_forensics_export_and_purge(tmp_path, digits_module, monkeypatch):
    from cryptography.fernet import Fernet

    fkey = Fernet.generate_key()
    monkeypatch.setenv("ADVGUARD_GUARD_FERNET_KEY", fkey.decode())
    g = _pipeline_guard(
        tmp_path, digits_module, cfg={"forensics": {"mode": "encrypted"}}, fernet=Fernet(fkey)
    )
    c = TestClient(create_app(g))
    k = create_key(g.store, "r").key
    x = np.full((2, 1, 8, 8), 0.5, np.float32)
    x[1] = 0.1
    b = c.post(PREDICT, json={"inputs": x.tolist()}, headers=auth(k)).json()
    assert c.post(PREDICT, json={"inputs": x[1:].tolist()}, headers=auth(k)).is_success
    recs = list(g.store.iter_decisions(forensic_only=True))
    assert [r.id for r in recs] == [b["decision_id"]]  # the clean request is not forensic
    rec = recs[0]
    assert rec.fingerprint == fingerprint(x) and rec.payload_encrypted
    assert x.tobytes() not in rec.payload
    np.testing.assert_array_equal(decode_payload(rec.payload, Fernet(fkey)), x)
    with pytest.raises(InputError):
        decode_payload(rec.payload, Fernet(Fernet.generate_key()))
    res = export_npz(g.store, tmp_path / "flagged.npz", since=None, fernet=Fernet(fkey))
    assert res == {"records": 1, "rows": 2, "out": str(tmp_path / "flagged.npz")}
    with np.load(tmp_path / "flagged.npz", allow_pickle=False) as z:
        np.testing.assert_array_equal(z["inputs"], x)
        assert json.loads(z["metadata"][0])["id"] == b["decision_id"]
    # CLI export through a config pointing at the same database
    cfgp = tmp_path / "guard.yaml"
    cfgp.write_text("forensics:\n  mode: encrypted\n")
    r = CliRunner().invoke(
        cli_app,
        [
            "guard",
            "export",
            "--config",
            str(cfgp),
            "--since",
            "1d",
            "--out",
            str(tmp_path / "e.npz"),
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["rows"] == 2 and fkey.decode() not in r.output
    # retention
    from datetime import timedelta

    from advguard.guard.storage import now

    assert purge(g.store, 30) == 0
    assert purge(g.store, 1, at=now() + timedelta(days=2)) == 2
    assert list(g.store.iter_decisions()) == []


def test_hash_only_and_sampling(tmp_path, digits_module, x_digits):
    g = make_guard(
        tmp_path,
        digits_module,
        cfg={
            "forensics": {"sample_rate": 0.5, "record_all_decisions": False},
            "limits": {"burst": 100},
        },
        rng=random.Random(0),
    )
    c = TestClient(create_app(g))
    k = create_key(g.store, "s").key
    for _ in range(40):
        assert c.post(PREDICT, json={"inputs": x_digits[:1].tolist()}, headers=auth(k)).is_success
    recs = list(g.store.iter_decisions())
    draws = random.Random(0)
    want = sum(draws.random() < 0.5 for _ in range(40))
    assert len(recs) == want and 5 < want < 35
    assert all(r.forensic and r.payload is None and r.reasons == ["sampled"] for r in recs)


def test_secrets_never_in_logs_metrics_or_errors(tmp_path, digits_module, x_digits, caplog):
    from cryptography.fernet import Fernet

    fkey = Fernet.generate_key()
    g = make_guard(
        tmp_path,
        digits_module,
        stateful=[StatefulSlot("count", CountingStateful(2), "block")],
        cfg={"forensics": {"mode": "encrypted"}},
        fernet=Fernet(fkey),
    )
    k = create_key(g.store, "t").key
    marker = 0.123456789
    x = x_digits[:2].copy()
    x[0, 0, 0, 0] = marker
    with caplog.at_level(logging.DEBUG), ServerThread(CatchAll(create_app(g))) as srv:
        import httpx

        with httpx.Client(base_url=srv.url) as h:
            texts = [
                h.post(PREDICT, json={"inputs": x.tolist()}, headers=auth(k)).text for _ in range(3)
            ]
            texts.append(
                h.post(PREDICT, json={"inputs": x.tolist()}, headers=auth(k[:-1] + "A")).text
            )
            texts.append(h.post(PREDICT, content=b"{bad", headers=auth(k)).text)
            texts.append(h.get("/metrics").text)
    blob = caplog.text + "".join(texts)
    assert "blocked by a stateful detector" in caplog.text  # logging did happen
    secret = k.split(".")[1]
    for s in (secret, fkey.decode(), str(marker), "0.12345"):
        assert s not in blob


# -- 9. CLI ----------------------------------------------------------------------------------
def test_cli_keys_blocks_review(tmp_path, digits_module):
    cfgp = tmp_path / "guard.yaml"
    cfgp.write_text("storage:\n  table_prefix: cli_\n")
    run = CliRunner().invoke

    def j(*args: str):
        r = run(cli_app, ["guard", *args, "--config", str(cfgp), "--json"])
        assert r.exit_code == 0, r.output
        return json.loads(r.output)

    created = j(
        "keys",
        "create",
        "ops",
        "--scope",
        "predict",
        "--scope",
        "admin",
        "--output",
        "top_k",
        "--top-k",
        "3",
    )
    assert created["key"].startswith("agk_") and created["output"]["top_k"] == 3
    listed = j("keys", "list")
    assert listed[0]["key_id"] == created["key_id"] and "key" not in listed[0]
    assert "hash" not in listed[0] and created["key"] not in json.dumps(listed)
    rotated = j("keys", "rotate", created["key_id"])
    assert rotated["replaces"] == created["key_id"] and rotated["scopes"] == ["predict", "admin"]
    assert j("keys", "revoke", rotated["key_id"])["revoked"]
    r = run(cli_app, ["guard", "keys", "revoke", rotated["key_id"], "--config", str(cfgp)])
    assert r.exit_code == 2 and "no active key" in r.output
    r = run(cli_app, ["guard", "keys", "create", "x", "--scope", "root", "--config", str(cfgp)])
    assert r.exit_code == 2 and "scopes must be among" in r.output

    kid = created["key_id"]
    assert j("blocks", "add", kid, "--reason", "abuse")["client_id"] == kid
    assert [b["client_id"] for b in j("blocks", "list")] == [kid]
    assert j("blocks", "remove", kid)["removed"] and j("blocks", "list") == []
    r = run(cli_app, ["guard", "blocks", "add", "not-an-id", "--config", str(cfgp)])
    assert r.exit_code == 2

    # a queued review (same database as the config's), approved from the CLI
    g2 = make_guard(
        tmp_path,
        digits_module,
        with_fallback=True,
        cfg={"storage": {"table_prefix": "cli_"}},
        detectors=[DetectorSlot("mean", MeanDetector(), [(0.3, "review")])],
    )
    k = create_key(g2.store, "u").key
    c = TestClient(create_app(g2))
    did = c.post(
        PREDICT, json={"inputs": np.full((1, 1, 8, 8), 0.5).tolist()}, headers=auth(k)
    ).json()["decision_id"]
    assert [r["id"] for r in j("review", "list")] == [did]
    assert j("review", "approve", did, "--note", "benign")["review_status"] == "approved"
    assert j("review", "list") == [] and [
        r["id"] for r in j("review", "list", "--status", "approved")
    ] == [did]
    assert j("purge", "--days", "0")["deleted"] == 1
    g2.close()


def test_forensic_key_file_mode(tmp_path):
    out = tmp_path / "fk"
    r = CliRunner().invoke(cli_app, ["guard", "forensic-key", "--out", str(out), "--json"])
    assert r.exit_code == 0 and out.stat().st_mode & 0o777 == 0o600
    assert out.read_text().strip() not in r.output
    r = CliRunner().invoke(cli_app, ["guard", "forensic-key", "--out", str(out)])
    assert r.exit_code == 2


def test_concurrent_decisions_all_recorded(tmp_path, digits_module, x_digits):
    g = make_guard(tmp_path, digits_module, cfg={"limits": {"burst": 1000, "rate": 1000}})
    k = create_key(g.store, "v").key
    with ServerThread(create_app(g)) as srv:
        codes = _hammer(srv.url, k, {"inputs": x_digits[:1].tolist()}, 8, 3)
    assert codes == [200] * 24 and len(list(g.store.iter_decisions())) == 24


def test_npy_header_must_match_the_data(guard, client, key):
    """A header claiming a huge shape is refused before anything is allocated."""
    from numpy.lib import format as npformat

    buf = io.BytesIO()
    np.save(buf, np.zeros((1, 1, 8, 8), np.float32))
    raw = buf.getvalue()
    h = {**auth(key), "Content-Type": "application/x-npy"}
    for body in (raw[:-4], raw + b"\0" * 4):
        r = client.post(PREDICT, content=body, headers=h)
        assert r.status_code == 422 and "does not match" in r.json()["detail"]
    lie = io.BytesIO()
    npformat.write_array_header_1_0(
        lie, {"descr": "<f4", "fortran_order": False, "shape": (10**12, 1, 8, 8)}
    )
    r = client.post(PREDICT, content=lie.getvalue() + b"\0" * 256, headers=h)
    assert r.status_code == 422 and "does not match" in r.json()["detail"]


def test_redteam_runs_through_the_guard_and_counts_agree(tmp_path, digits_module, digits_split):
    """``advguard redteam`` (Square over HttpClassifier) against a live guard: the rows the
    client says were answered are the rows the guard counted."""
    from advguard.attacks.registry import ATTACKS
    from advguard.data.dataset import Dataset
    from advguard.evaluate.redteam import run_redteam
    from advguard.evaluate.threat_model import parse_threat_model

    if "square" not in ATTACKS:
        pytest.skip("the 'square' black-box attack is not registered")
    tm = parse_threat_model(
        "name: guard-square\nknowledge: black-box\nnorm: linf\nepsilons: [0.3]\nsamples: 4\n"
        "batch_size: 4\nsanity_samples: 8\nattacks:\n  - attack: square\n    max_queries: 30\n"
    )
    _, _, x, y = digits_split
    data = Dataset(x=x[:40], y=y[:40], bounds=(0.0, 1.0), num_classes=10, name="digits")
    g = make_guard(
        tmp_path,
        digits_module,
        cfg={
            "limits": {"rate": 100000, "burst": 100000, "budget": 10**7},
            "forensics": {"record_all_decisions": False},
        },
    )
    k = create_key(g.store, "redteam").key
    with ServerThread(CatchAll(create_app(g))) as srv:
        res = run_redteam(
            f"{srv.url}{PREDICT}",
            data,
            tm,
            tmp_path / "rt",
            api_key=k,
            client_options={"proxies": {}},
        )
    answered = res.report.model["queries"]["samples_answered"]
    rows = g.metrics.rows.labels("digits", "digits:1")._value.get()
    assert answered > 0 and rows == answered
    assert k not in res.json_path.read_text()


_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=40,
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    value=_json_values,
    wrap=st.sampled_from(["v1", "v2", "raw"]),
    raw=st.binary(max_size=64),
)
def test_fuzzed_bodies_never_give_5xx(fuzz_client, value, wrap, raw):
    client, h = fuzz_client
    if wrap == "v1":
        r = client.post(PREDICT, content=json.dumps({"inputs": value}), headers=h)
    elif wrap == "v2":
        body = {
            "inputs": [
                {"name": "input-0", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": value}
            ]
        }
        r = client.post("/v2/models/digits/infer", content=json.dumps(body), headers=h)
    else:
        r = client.post(PREDICT, content=raw, headers={**h, "Content-Type": "application/x-npy"})
    assert 200 <= r.status_code < 500, r.text
    if r.status_code >= 400:
        assert r.headers["content-type"] == "application/problem+json"
        assert r.json()["type"].startswith(PROBLEM_BASE)


@pytest.fixture()
def fuzz_client(tmp_path, digits_module):
    g = make_guard(
        tmp_path,
        digits_module,
        cfg={
            "limits": {"rate": 10**6, "burst": 10**6, "budget": None},
            "forensics": {"record_all_decisions": False},
        },
    )
    k = create_key(g.store, "fuzz").key
    c = TestClient(CatchAll(create_app(g)), raise_server_exceptions=False)
    yield c, {**auth(k), "Content-Type": "application/json"}
    g.close()


def test_stalled_body_gets_408_from_a_live_server(tmp_path, digits_module):
    import socket

    g = make_guard(tmp_path, digits_module, cfg={"edge": {"read_timeout_s": 0.3}})
    k = create_key(g.store, "slow").key
    with (
        ServerThread(CatchAll(create_app(g))) as srv,
        socket.create_connection(("127.0.0.1", srv.port), timeout=30) as s,
    ):
        s.sendall(
            (
                f"POST {PREDICT} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {k}\r\n"
                'Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"inputs": ['
            ).encode()
        )
        data = b""
        while b"\r\n\r\n" not in data or b"}" not in data.split(b"\r\n\r\n", 1)[1]:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 408")
    assert json.loads(body)["type"] == PROBLEM_BASE + "request-timeout"
