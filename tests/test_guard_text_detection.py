"""Stateful detection for text models: the k-NN detector of Chen, Carlini & Wagner (2020) on
hashed character n-grams (``features: text-ngrams``, the default for a text model).

A guard serves a TF-IDF + logistic-regression spam model (``*.textmodel.json``) with the k-NN
detector (k = 5) whose threshold is calibrated on 143 spamham texts (normalized as the guard
normalizes them, per-query FPR 0.01); the other 200 texts are the benign replay (10 clients,
20 texts each, disjoint), never used in calibration. advguard's word and character attacks
query the guard over HTTP (``HttpTextClassifier``) and are stopped as configured.
Measured numbers are in docs/guard.md ("Detection for text models").
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline

from advguard.attacks.text import CharAttack, TextClassifier, WordAttack
from advguard.data.spamham import load_spamham
from advguard.defenses.transforms.text import TextNormalizer
from advguard.errors import InputError
from advguard.guard.app import create_app
from advguard.guard.auth import create_key
from advguard.guard.config import parse_config
from advguard.guard.drill import DetectionLog
from advguard.guard.pipeline import Guard
from advguard.guard.problems import PROBLEM_BASE
from advguard.guard.stateful import (
    KNNStatefulDetector,
    PRADADetector,
    TextNgramEncoder,
    build_stateful,
)
from advguard.models import HttpTextClassifier
from advguard.models.http_model import EndpointError
from advguard.models.text_io import save_text_model
from guard_helpers import ServerThread, TickClock

pytest.importorskip("skops.io")

K = 5
N_CAL = 143
CLIENTS, PER_CLIENT = 10, 20
FPR = 0.01
KNN_SPEC = {"kind": "knn", "k": K, "window": 1000, "features": "text-ngrams"}


@pytest.fixture(scope="module")
def data():
    """(texts, labels, calibration indices, replay indices): a seeded split of spamham."""
    texts, y, _ = load_spamham()
    perm = np.random.default_rng(0).permutation(len(texts))
    cal, replay = perm[:N_CAL], perm[N_CAL:]
    assert len(replay) == CLIENTS * PER_CLIENT and not set(cal) & set(replay)
    return texts, y, cal, replay


@pytest.fixture(scope="module")
def model_file(tmp_path_factory, data):
    """The model, trained on the calibration slice (the replayed and attacked texts are new)."""
    texts, y, cal, _ = data
    pipe = make_pipeline(TfidfVectorizer(), LogisticRegression(C=10.0))
    pipe.fit([texts[i] for i in cal], y[cal])
    path = tmp_path_factory.mktemp("text") / "spam.textmodel.json"
    save_text_model(pipe, path, class_names=["ham", "spam"])
    return path, pipe


@pytest.fixture(scope="module")
def threshold(data):
    """The k-NN threshold calibrated on the calibration slice only (as the guard sees it)."""
    texts, _, cal, _ = data
    norm = TextNormalizer()
    det = build_stateful(dict(KNN_SPEC))
    thr = det.calibrate([norm.normalize(texts[i]) for i in cal], FPR)
    assert det.calibration is not None and det.calibration["n_scored"] == N_CAL - K
    return thr


def _guard(tmp_path, path, thr: float, action: str = "block", spec: str = "") -> Guard:
    spec = spec or f"{{kind: knn, k: {K}, window: 1000, threshold: {thr!r}}}"
    yaml = (
        f"model: {{name: spam, path: {path}}}\n"
        "limits: {rate: 100000, burst: 100000, budget: null}\n"
        f"stateful: [{{name: knn, action: {action}, spec: {spec}}}]\n"
    )
    return Guard.from_config(parse_config(yaml, "g.yaml", tmp_path))


def test_text_ngram_features():
    enc = TextNgramEncoder()
    a = "Congratulations! You have won a free cash prize, call now to claim."
    variants = [
        a,
        a.replace("free", "complimentary"),  # a word substitution
        a.replace("claim", "c1aim"),  # a character edit
        "Are we still on for dinner at 8 tonight?",
        "",
    ]
    f = enc(variants)
    assert f.shape == (5, 1024) and f.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(f[:4], axis=1), 1.0, rtol=1e-5)
    assert not f[4].any()  # the empty text is the zero vector
    np.testing.assert_array_equal(TextNgramEncoder()(variants), f)  # nothing fitted
    d = np.linalg.norm(f[0] - f[1:4], axis=1)
    assert d[0] < 0.5 and d[1] < 0.3 and d[2] > 1.2, d  # measured 0.44, 0.26, 1.23
    # a detector on text features takes strings, and calibrates on them
    det = KNNStatefulDetector(k=2, encoder=TextNgramEncoder(64), threshold=0.5)
    assert det.takes_text and det.params()["features"] == "text-ngrams"
    v = det.observe("c", np.array([a, a + " now", a + " today!"], dtype=object))
    assert v.flagged and v.first_detection == 3 and v.score < 0.5


def test_word_attack_is_flagged_and_blocked(tmp_path, data, model_file, threshold):
    """WordAttack over HTTP: flagged at query k + 1 = 6 (the first query the detector can
    score), refused 403 client-blocked, the block persisting for that key."""
    texts, y, _, replay = data
    path, pipe = model_file
    spam = [texts[i] for i in replay if y[i] == 1 and pipe.predict([texts[i]])[0] == 1][:5]
    attack = WordAttack(max_words=3, max_queries=300, seed=0)
    offline = attack(TextClassifier(pipe), spam, [1] * len(spam))  # the same attack unguarded
    assert offline.attacked.all() and offline.success.any()
    g = _guard(tmp_path, path, threshold, "block")
    log = DetectionLog("knn", g.stateful[0].detector, TickClock())
    g.stateful[0].detector = log
    key = create_key(g.store, "attacker")
    try:
        with ServerThread(create_app(g)) as srv:
            http = _client(srv.url, key.key)
            with pytest.raises(EndpointError, match="client-blocked") as err:
                attack(http, spam, [1] * len(spam))
            assert err.value.status == 403
            with pytest.raises(EndpointError, match="client-blocked"):
                http.predict_proba(["see you at lunch"])  # the block persists
            answered = http.client.samples_answered
    finally:
        g.close()
    first = log.first(key.record.key_id)
    assert first is not None and first.query == K + 1 < 500
    assert first.score < threshold
    # answered: only the clean query of the first text; the flagged batch was refused
    assert answered == 1 < first.query
    assert int(offline.queries.sum()) > 20 * first.query  # what it would have spent


def _client(url: str, key: str) -> HttpTextClassifier:
    """The attacker's view of the guarded spam model (no retries, no proxies)."""
    return HttpTextClassifier(
        f"{url}/v1/models/spam/predict", num_classes=2, api_key=key, retries=0, proxies={}
    )


def test_char_attack_is_flagged_and_rejected(tmp_path, data, model_file, threshold):
    """CharAttack (typos, leetspeak) with the action 'reject': from the flag on, every
    request of the client is answered 422 rejected (with a decision id), none blocked."""
    texts, y, _, replay = data
    path, pipe = model_file
    spam = [texts[i] for i in replay if y[i] == 1 and pipe.predict([texts[i]])[0] == 1][5:10]
    g = _guard(tmp_path, path, threshold, "reject")
    log = DetectionLog("knn", g.stateful[0].detector, TickClock())
    g.stateful[0].detector = log
    key = create_key(g.store, "attacker")
    try:
        with ServerThread(create_app(g)) as srv:
            http = _client(srv.url, key.key)
            attack = CharAttack(ops=("typo", "leet"), max_char_edits=8, seed=0)
            with pytest.raises(EndpointError, match="rejected") as err:
                attack(http, spam, [1] * len(spam))
            assert err.value.status == 422
            answered = http.client.samples_answered
            c = TestClient(create_app(g))
            r = c.post(
                "/v1/models/spam/predict",
                json={"inputs": ["see you at lunch"]},
                headers={"X-API-Key": key.key},
            )
            assert r.status_code == 422 and r.json()["type"] == PROBLEM_BASE + "rejected"
            assert g.store.get_decision(r.json()["decision_id"]).action == "reject"
    finally:
        g.close()
    first = log.first(key.record.key_id)
    assert first is not None and first.query == K + 1 < 500
    assert answered < first.query


def test_benign_clients_trip_no_detector(tmp_path, data, model_file, threshold):
    """10 clients replay disjoint slices of 20 texts (none in the calibration slice), in
    requests of 1-4 texts: every request answered 'allow', no client flagged; the lowest
    benign k-NN score stays above the threshold."""
    texts, _, _, replay = data
    path, _ = model_file
    g = _guard(tmp_path, path, threshold, "block")
    inner = g.stateful[0].detector
    lows: dict[str, float] = {}

    class Lowest:
        def observe(self, client_id, x):
            v = inner.observe(client_id, x)
            lows[client_id] = min(lows.get(client_id, math.inf), v.score)
            return v

    g.stateful[0].detector = Lowest()
    rng = np.random.default_rng(1)
    actions, statuses = [], []
    try:
        c = TestClient(create_app(g))
        keys = [create_key(g.store, f"client-{i}") for i in range(CLIENTS)]
        for i, key in enumerate(keys):
            mine = [texts[j] for j in replay[i * PER_CLIENT : (i + 1) * PER_CLIENT]]
            pos = 0
            while pos < len(mine):
                n = int(rng.integers(1, 5))
                r = c.post(
                    "/v1/models/spam/predict",
                    json={"inputs": mine[pos : pos + n]},
                    headers={"X-API-Key": key.key},
                )
                statuses.append(r.status_code)
                actions.append(r.json().get("action"))
                pos += n
    finally:
        g.close()
    assert set(statuses) == {200} and set(actions) == {"allow"}
    flagged = [k for k in keys if inner._clients.states[k.record.key_id].detections]
    assert flagged == []
    assert len(lows) == CLIENTS and all(math.isfinite(s) for s in lows.values())
    # measured: threshold 0.952, lowest benign score 1.025 (calibration quantile 0.001: 0.954)
    assert min(lows.values()) > threshold + 0.03, (threshold, sorted(lows.values())[:3])


def test_prada_takes_text_features(tmp_path, data, model_file):
    """PRADA on a text model: its per-class sets by the model's predictions on strings."""
    texts, _, _, replay = data
    path, pipe = model_file
    g = _guard(tmp_path, path, 0.0, spec="{kind: prada, min_queries: 20, feature_dim: 256}")
    try:
        det = g.stateful[0].detector
        assert isinstance(det, PRADADetector) and det.takes_text
        assert det.params()["feature_dim"] == 256
        key = create_key(g.store, "c").key
        c = TestClient(create_app(g))
        for i in range(0, 40, 4):
            batch = [texts[j] for j in replay[i : i + 4]]
            r = c.post(
                "/v1/models/spam/predict", json={"inputs": batch}, headers={"X-API-Key": key}
            )
            assert r.status_code == 200
            assert r.json()["labels"] == pipe.predict(batch).tolist()
    finally:
        g.close()


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("{kind: knn, threshold: 1.0, features: bogus}", "unknown features 'bogus'"),
        ("{kind: knn, threshold: 1.0, features: input}", "is a text model; its queries are"),
        ("{kind: knn, threshold: 1.0, feature_dim: 8}", r"feature_dim must be an integer in"),
        ("{kind: knn, threshold: 1.0, feature_dim: true}", r"feature_dim must be an integer in"),
        ("{kind: knn, threshold: 1.0, feature_dim: 1.5}", r"feature_dim must be an integer in"),
        ("{kind: knn, threshold: 1.0, features: [text-ngrams]}", "unknown features"),
        ("{kind: prada, features: input, feature_dim: 64}", "feature_dim applies to features"),
        ("{kind: prada, features: input}", "is a text model; its queries are"),
        ("{kind: knn, threshold: 1.0, encoder: text}", "unknown key"),
    ],
)
def test_bad_text_feature_specs_are_one_line_errors(tmp_path, model_file, spec, match):
    path, _ = model_file
    with pytest.raises(InputError, match=match) as err:
        _guard(tmp_path, path, 1.0, spec=spec).close()
    assert "\n" not in str(err.value)


def test_what_a_text_model_still_refuses(tmp_path, model_file):
    path, _ = model_file
    cfg = parse_config(
        f"model: {{name: spam, path: {path}}}\nsanitize: {{quantize_bits: 4}}\n",
        "g.yaml",
        tmp_path,
    )
    with pytest.raises(InputError, match=r"quantize_bits applies to numeric inputs") as err:
        Guard.from_config(cfg)
    assert "\n" not in str(err.value)
    # (input detectors: only confidence ones calibrated on a text model, see
    # tests/test_guard_text_input_detectors.py)
    # a detector built for numeric queries refuses strings, and the other way round
    numeric = KNNStatefulDetector(k=1, threshold=1.0)
    with pytest.raises(InputError, match="queries are strings"):
        numeric.observe("c", np.array(["free cash"], dtype=object))
    text = build_stateful(dict(KNN_SPEC, threshold=1.0))
    with pytest.raises(InputError, match="1-D batch of strings"):
        text.observe("c", np.zeros((2, 3), np.float32))
    with pytest.raises(InputError, match=r"queries\[1\] is a int"):
        text.observe("c", ["free cash", 3])
    with pytest.raises(InputError, match="exclude each other"):
        build_stateful(dict(KNN_SPEC), encoder=TextNgramEncoder())
    with pytest.raises(InputError, match="feature_dim applies to features: text-ngrams only"):
        build_stateful({"kind": "knn", "feature_dim": 64})


def test_a_numeric_model_refuses_text_features(tmp_path):
    import torch

    from guard_helpers import make_guard

    spec = {"kind": "knn", "threshold": 1.0, "features": "text-ngrams"}
    with pytest.raises(InputError, match="text-ngrams embed strings; model digits takes numeric"):
        make_guard(
            tmp_path, torch.nn.Linear(64, 10), cfg={"stateful": [{"name": "k", "spec": spec}]}
        )
