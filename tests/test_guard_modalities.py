"""Text and tabular models behind the guard: strings in (normalized, length-capped, stored
encrypted and exported), records keyed by feature name in (checked against the feature
schema); both through the same API, OIP v2 and advguard's HTTP clients."""

from __future__ import annotations

import numpy as np
import pytest
from cryptography.fernet import Fernet
from fastapi.testclient import TestClient
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from advguard.data import load_dataset
from advguard.errors import InputError
from advguard.guard.app import create_app
from advguard.guard.auth import create_key
from advguard.guard.config import parse_config
from advguard.guard.forensics import export_npz
from advguard.guard.pipeline import Guard
from advguard.guard.problems import PROBLEM_BASE
from advguard.models import HttpClassifier, HttpTextClassifier
from advguard.models.text_io import save_text_model
from guard_helpers import ServerThread

skops = pytest.importorskip("skops.io")


@pytest.fixture(scope="module")
def spamham():
    return load_dataset("spamham").split(test_size=0.3, seed=0)


@pytest.fixture(scope="module")
def text_model_file(tmp_path_factory, spamham):
    train, _ = spamham
    pipe = make_pipeline(TfidfVectorizer(), LogisticRegression(C=10.0)).fit(train.texts, train.y)
    path = tmp_path_factory.mktemp("text") / "spam.textmodel.json"
    save_text_model(pipe, path, class_names=["ham", "spam"])
    return path, pipe


def _text_guard(tmp_path, path, extra: str = "") -> Guard:
    cfg = parse_config(f"model: {{name: spam, path: {path}}}\n{extra}", "g.yaml", tmp_path)
    return Guard.from_config(cfg)


def _post(c: TestClient, key: str, model: str, inputs) -> tuple[int, dict]:
    r = c.post(f"/v1/models/{model}/predict", json={"inputs": inputs}, headers={"X-API-Key": key})
    return r.status_code, r.json()


def test_text_model_answers_normalized_strings(tmp_path, text_model_file, spamham, monkeypatch):
    path, pipe = text_model_file
    monkeypatch.setenv("ADVGUARD_GUARD_FERNET_KEY", Fernet.generate_key().decode())
    g = _text_guard(tmp_path, path, "forensics: {mode: encrypted, sample_rate: 1.0}\n")
    try:
        key = create_key(g.store, "t").key
        c = TestClient(create_app(g))
        texts = spamham[1].texts[:6]
        status, body = _post(c, key, "spam", texts)
        assert status == 200
        np.testing.assert_allclose(body["probabilities"], pipe.predict_proba(texts), atol=1e-9)
        # a homoglyph (Cyrillic е) and a zero-width space are undone before the model sees it
        plain = "free entry win cash prize now"
        tricked = "fr\u0435\u0435 entry win c\u200bash prize now"
        _, a = _post(c, key, "spam", [plain])
        _, b = _post(c, key, "spam", [tricked])
        assert a["probabilities"] == b["probabilities"]
        assert not np.allclose(pipe.predict_proba([tricked]), pipe.predict_proba([plain])), (
            "the trick must change the raw model's answer for this test to mean anything"
        )
        # forensic export: the texts as sent (not normalized), fingerprints re-checked
        out = export_npz(g.store, tmp_path / "flagged.npz", since=None, fernet=g.fernet)
        data = np.load(out["out"], allow_pickle=False)
        assert data["inputs"].dtype.kind == "U"
        assert list(data["inputs"][-1:]) == [tricked] and out["rows"] == len(texts) + 2
    finally:
        g.close()


def test_text_model_refuses_bad_inputs(tmp_path, text_model_file):
    path, _ = text_model_file
    g = _text_guard(tmp_path, path, "edge: {max_text_chars: 50, max_batch: 4}\n")
    try:
        key = create_key(g.store, "t").key
        c = TestClient(create_app(g))
        cases = [
            ([1, 2], "invalid-input"),
            ([["nested"]], "invalid-input"),
            (["x" * 51], "invalid-input"),
            ([], "invalid-input"),
            (["a"] * 5, "batch-too-large"),
            ("just a string", "invalid-input"),
        ]
        for inputs, slug in cases:
            status, body = _post(c, key, "spam", inputs)
            assert (status, body["type"]) == (422, PROBLEM_BASE + slug), inputs
        r = c.post(
            "/v1/models/spam/predict",
            content=np.zeros((1, 3), np.float32).tobytes(),
            headers={"X-API-Key": key, "Content-Type": "application/x-npy"},
        )
        assert 400 <= r.status_code < 500
    finally:
        g.close()


def test_text_model_over_v2_and_the_http_text_client(tmp_path, text_model_file, spamham):
    path, pipe = text_model_file
    g = _text_guard(tmp_path, path)
    try:
        key = create_key(g.store, "t").key
        texts = spamham[1].texts[:5]
        c = TestClient(create_app(g))
        r = c.post(
            "/v2/models/spam/infer",
            json={"inputs": [{"name": "text", "shape": [5], "datatype": "BYTES", "data": texts}]},
            headers={"X-API-Key": key},
        )
        assert r.status_code == 200
        labels = next(o for o in r.json()["outputs"] if o["name"] == "label")["data"]
        assert labels == pipe.predict(texts).tolist()
        meta = c.get("/v2/models/spam", headers={"X-API-Key": key}).json()
        assert meta["inputs"][0]["datatype"] == "BYTES"
        with ServerThread(create_app(g)) as srv:
            remote = HttpTextClassifier(
                f"{srv.url}/v1/models/spam/predict", num_classes=2, api_key=key, retries=0
            )
            np.testing.assert_allclose(
                remote.predict_proba(texts), pipe.predict_proba(texts), atol=1e-6
            )
    finally:
        g.close()


def test_text_model_refuses_numeric_detectors(tmp_path, text_model_file):
    path, _ = text_model_file
    with pytest.raises(InputError, match="text model"):
        _text_guard(tmp_path, path, "sanitize: {quantize_bits: 4}\n")
    with pytest.raises(InputError, match="text model"):  # text features only (the default)
        _text_guard(tmp_path, path, "stateful: [{name: knn, spec: {kind: knn, features: input}}]\n")
    # a detector calibrated on a numeric model (a text one: tests/test_guard_text_input_detectors)
    import torch

    from advguard.defenses.detectors import ConfidenceDetector, save_detector
    from advguard.models import TorchClassifier

    module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    det = ConfidenceDetector(TorchClassifier(module, input_shape=(4,), num_classes=2))
    det.calibrate(torch.rand(40, 4), 0.05)
    save_detector(det, tmp_path / "det")
    with pytest.raises(InputError, match="text model"):
        _text_guard(tmp_path, path, "detectors: [{name: d, path: det}]\n")


# -- tabular ----------------------------------------------------------------------------
SCHEMA = """
name: loans
features:
  - {name: age, type: integer, low: 18, high: 100}
  - {name: income, low: 0, high: 1000000}
  - {name: has_car, type: binary}
  - {name: debt, low: 0, high: 1000000}
  - {name: color_red}
  - {name: color_blue}
one_hot_groups:
  - {name: color, features: [color_red, color_blue]}
relations:
  - {name: debt_below_income, coef: {debt: 1, income: -1}, op: "<="}
"""
NAMES = ["age", "income", "has_car", "debt", "color_red", "color_blue"]


@pytest.fixture(scope="module")
def tabular(tmp_path_factory):
    rng = np.random.default_rng(0)
    n = 400
    age = rng.integers(18, 90, n)
    income = rng.uniform(1e4, 2e5, n)
    car = rng.integers(0, 2, n)
    debt = income * rng.uniform(0, 1, n)
    red = rng.integers(0, 2, n)
    x = np.stack([age, income, car, debt, red, 1 - red], 1).astype(np.float32)
    y = (debt / income > 0.5).astype(np.int64)
    pipe = Pipeline([("s", StandardScaler()), ("m", LogisticRegression(max_iter=2000))]).fit(x, y)
    d = tmp_path_factory.mktemp("tab")
    skops.dump(pipe, d / "loans.skops")
    (d / "loans.schema.yaml").write_text(SCHEMA)
    return d, pipe, x


def _tab_guard(d) -> Guard:
    cfg = parse_config(
        "model: {name: loans, path: loans.skops, schema: loans.schema.yaml, "
        "bounds: [0.0, 1000000.0]}\n",
        "g.yaml",
        d,
    )
    return Guard.from_config(cfg)


def test_tabular_records_by_feature_name(tabular, tmp_path):
    d, pipe, x = tabular
    g = _tab_guard(d)
    try:
        key = create_key(g.store, f"k{tmp_path.name}").key
        c = TestClient(create_app(g))
        records = [dict(zip(NAMES, map(float, row), strict=True)) for row in x[:5]]
        records[0] = dict(reversed(list(records[0].items())))  # key order does not matter
        records[1]["age"] = int(records[1]["age"])
        status, body = _post(c, key, "loans", records)
        assert status == 200
        np.testing.assert_allclose(body["probabilities"], pipe.predict_proba(x[:5]), atol=1e-6)
        # rows of numbers in schema order work too (the HttpClassifier contract)
        with ServerThread(create_app(g)) as srv:
            remote = HttpClassifier(
                f"{srv.url}/v1/models/loans/predict",
                input_shape=(6,),
                num_classes=2,
                bounds=(0.0, 1e6),
                api_key=key,
                retries=0,
            )
            np.testing.assert_allclose(
                remote.predict_proba(x[:5]), pipe.predict_proba(x[:5]), atol=1e-5
            )
    finally:
        g.close()


def test_tabular_schema_violations_are_422(tabular, tmp_path):
    d, _, x = tabular
    g = _tab_guard(d)
    try:
        key = create_key(g.store, f"k{tmp_path.name}").key
        c = TestClient(create_app(g))
        good = dict(zip(NAMES, map(float, x[0]), strict=True))
        bad = {
            "unknown": {**good, "zip": 1.0},
            "lacks": {k: v for k, v in good.items() if k != "age"},
            "age": {**good, "age": 30.5},
            "car": {**good, "has_car": 0.5},
            "onehot": {**good, "color_red": 1.0, "color_blue": 1.0},
            "relation": {**good, "debt": good["income"] + 1000},
            "range": {**good, "age": 12.0},
            "string": {**good, "income": "lots"},
        }
        for why, rec in bad.items():
            status, body = _post(c, key, "loans", [rec])
            assert (status, body["type"]) == (422, PROBLEM_BASE + "invalid-input"), why
        assert _post(c, key, "loans", [good])[0] == 200
    finally:
        g.close()


def test_tabular_schema_must_match_the_model(tabular, tmp_path):
    d, _, _ = tabular
    (d / "short.yaml").write_text("features: [{name: a}, {name: b}]\n")
    cfg = parse_config("model: {name: loans, path: loans.skops, schema: short.yaml}\n", "g.yaml", d)
    with pytest.raises(InputError, match="2 features"):
        Guard.from_config(cfg)
