"""Input (per-request) detectors for text models: the confidence detector (low maximum
probability, Hendrycks & Gimpel 2017) scores a text model's strings through its
``predict_proba``, is saved as JSON + safetensors with ``"input": {"kind": "text"}`` and the
model's content digest, and runs in the guard's ``detectors:`` with bands.

A TF-IDF + logistic-regression spam model is trained on 110 spamham texts; the detector
(``max_prob``: ``1 - max_c p_c``) is calibrated at FPR 0.05 on 120 others; the remaining 113
are the benign held-out set, never used for training or calibration (every text normalized as
the guard normalizes it). Measured numbers are in docs/guard.md ("Detection for text models").
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from scipy.stats import betabinom, fisher_exact
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from typer.testing import CliRunner

from advguard.attacks.text import CharAttack, TextClassifier, WordAttack
from advguard.cli import app as cli_app
from advguard.data.spamham import load_spamham
from advguard.defenses.detectors import (
    ConfidenceDetector,
    FeatureSqueezingDetector,
    MahalanobisDetector,
    load_detector,
    model_digest,
    save_detector,
)
from advguard.defenses.transforms.text import TextNormalizer
from advguard.errors import InputError
from advguard.guard.app import create_app
from advguard.guard.auth import create_key
from advguard.guard.config import parse_config
from advguard.guard.pipeline import DetectorSlot, Guard, check_modality
from advguard.guard.problems import PROBLEM_BASE
from advguard.guard.serving import ServedModel
from advguard.models import TorchClassifier
from advguard.models.text_io import load_text_model, save_text_model

N_TRAIN, N_CAL = 110, 120
FPR = 0.05
LIMITS = "limits: {rate: 100000, burst: 100000, budget: null}\n"


@pytest.fixture(scope="module")
def data():
    """(normalized texts, labels, train, calibration and held-out indices): seeded, disjoint."""
    texts, y, _ = load_spamham()
    norm = TextNormalizer()
    texts = [norm.normalize(t) for t in texts]
    perm = np.random.default_rng(0).permutation(len(texts))
    tr, cal, held = perm[:N_TRAIN], perm[N_TRAIN : N_TRAIN + N_CAL], perm[N_TRAIN + N_CAL :]
    return texts, y, tr, cal, held


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data):
    """The model file, the detector calibrated on the calibration slice and its directory."""
    texts, y, tr, cal, _ = data
    pipe = make_pipeline(TfidfVectorizer(), LogisticRegression(C=10.0))
    pipe.fit([texts[i] for i in tr], y[tr])
    root = tmp_path_factory.mktemp("textdet")
    path = save_text_model(pipe, root / "spam.textmodel.json", class_names=["ham", "spam"])
    det = ConfidenceDetector(TextClassifier(pipe), "max_prob")
    det.calibrate([texts[i] for i in cal], FPR)
    save_detector(det, root / "det")
    return path, pipe, det, root / "det"


@pytest.fixture(scope="module")
def adversarial(data, trained):
    """Successful WordAttack and CharAttack texts from the held-out spam the model gets right
    (normalized, as the guard would see them)."""
    texts, y, _, _, held = data
    _, pipe, _, _ = trained
    model = TextClassifier(pipe)
    spam = [texts[i] for i in held if y[i] == 1 and pipe.predict([texts[i]])[0] == 1]
    norm = TextNormalizer()
    out = []
    for attack in (
        WordAttack(max_words=3, max_queries=300, seed=0),
        CharAttack(ops=("typo", "leet"), max_char_edits=8, seed=0),
    ):
        r = attack(model, spam, [1] * len(spam))
        out += [norm.normalize(a) for a, ok in zip(r.adversarial, r.success, strict=True) if ok]
    return out


def _numeric_model() -> TorchClassifier:
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    return TorchClassifier(module, input_shape=(1, 8, 8), num_classes=10)


def _one_line(e: pytest.ExceptionInfo[InputError]) -> str:
    msg = str(e.value)
    assert "\n" not in msg and msg
    return msg


def test_confidence_detector_scores_strings_and_round_trips(data, trained):
    texts, _, _, cal, held = data
    path, pipe, det, det_dir = trained
    held_texts = [texts[i] for i in held]
    s = det.score(held_texts)
    p = pipe.predict_proba(held_texts)
    np.testing.assert_array_equal(s, 1.0 - p.max(1))  # exactly the max-prob score
    arr = np.empty(len(held_texts), dtype=object)
    arr[:] = held_texts
    np.testing.assert_array_equal(det.score(arr), s)  # the guard's 1-D object batch
    ent = ConfidenceDetector(TextClassifier(pipe), "entropy").score(held_texts)
    np.testing.assert_allclose(ent, -(p * np.log(p)).sum(1), rtol=1e-12)
    assert det.takes_text and det.calibration is not None
    assert det.calibration["n"] == N_CAL and det.calibration["fpr_on_calibration_set"] <= FPR
    # the rule: k = ceil(121 * 0.95) = 115, the threshold is the 115th smallest benign score
    cal_scores = np.sort(det.score([texts[i] for i in cal]))
    assert det.threshold == cal_scores[114]

    doc = json.loads((det_dir / "detector.json").read_text())
    assert doc["input"] == {"kind": "text"} and "input_shape" not in doc
    assert doc["version"] == 1 and doc["kind"] == "confidence"
    # the digest of the model's content: the same for the file reloaded
    served, _ = load_text_model(path)
    assert doc["model_digest"] == model_digest(TextClassifier(served)) == model_digest(det.model)
    assert doc["model_digest"].startswith("text-model-sha256:")
    back = load_detector(det_dir, TextClassifier(served))
    assert back.takes_text and back.threshold == det.threshold
    np.testing.assert_array_equal(back.score(held_texts), s)
    np.testing.assert_array_equal(back.detect(held_texts), det.detect(held_texts))

    # numeric-only detectors refuse a text model; a text detector has no tensor score
    for make in (
        lambda m: FeatureSqueezingDetector(m),
        lambda m: MahalanobisDetector(m),
    ):
        with pytest.raises(InputError, match="scores numeric inputs") as e:
            make(TextClassifier(pipe))
        _one_line(e)
    with pytest.raises(InputError, match="not tensors"):
        det.score_tensor(torch.zeros(1, 3))
    with pytest.raises(InputError, match="must be a list of strings"):
        det.score("one string")


def test_guard_flags_benign_at_the_fpr_and_uncertain_texts_more(
    tmp_path, data, trained, adversarial
):
    """Served with a 'review' band: benign held-out rows are flagged at a rate within the
    split-conformal (beta-binomial) bound; attacked texts, which stop just past the decision
    boundary, are flagged far more often (measured: 4 of 113 benign, 15 of 55 attacked)."""
    texts, y, _, _, held = data
    path, _, det, det_dir = trained
    yaml = (
        f"model: {{name: spam, path: {path}}}\n"
        f"fallback: {{name: spam-fallback, path: {path}}}\n"
        + LIMITS
        + f"detectors: [{{name: conf, path: {det_dir}, bands: [{{action: review}}]}}]\n"
    )
    g = Guard.from_config(parse_config(yaml, "g.yaml", tmp_path))
    try:
        assert g.detectors[0].detector.takes_text
        c = TestClient(create_app(g))
        key = create_key(g.store, "client")

        def flags(batch: list[str]) -> list[bool]:
            out: list[bool] = []
            for i in range(0, len(batch), 5):
                r = c.post(
                    "/v1/models/spam/predict",
                    json={"inputs": batch[i : i + 5]},
                    headers={"X-API-Key": key.key},
                )
                assert r.status_code == 200, r.text
                acts = r.json()["row_actions"]
                assert set(acts) <= {"allow", "review"}
                out += [a == "review" for a in acts]
            return out

        benign = [texts[i] for i in held]
        fb = flags(benign)
        fa = flags(adversarial)
        ham = [texts[i] for i in held if y[i] == 0]
        spam = [texts[i] for i in held if y[i] == 1]
        mixed = [f"{a} {b}" for a, b in zip(ham, spam, strict=False)]
        fm = flags(mixed)
    finally:
        g.close()
    # the guard flags exactly what the detector flags offline
    assert fb == det.detect(benign).tolist() and fa == det.detect(adversarial).tolist()
    nb, na, nm = sum(fb), sum(fa), sum(fm)
    # P(flag) for each new benign text is 1 - k / (n + 1); given the calibration set the count
    # of flagged held-out texts is beta-binomial(n_test, n + 1 - k, k) (exchangeable data)
    k = math.ceil((N_CAL + 1) * (1 - FPR) - 1e-9)
    bound = betabinom(len(benign), N_CAL + 1 - k, k)
    lo, hi = bound.ppf(0.001), bound.ppf(0.999)
    print(
        f"benign {nb}/{len(benign)} (99.8% bound [{lo:g}, {hi:g}]), attacked "
        f"{na}/{len(adversarial)}, mixed ham+spam {nm}/{len(mixed)}"
    )
    assert lo <= nb <= hi, (nb, lo, hi)  # measured 4 of 113 in [0, 19]
    assert len(adversarial) >= 30 and na / len(adversarial) > 3 * nb / len(benign)
    p = fisher_exact([[na, len(adversarial) - na], [nb, len(benign) - nb]], "greater").pvalue
    assert p < 1e-3, p  # measured 15 of 55 vs 4 of 113: p = 1.5e-5
    assert nm / len(mixed) > nb / len(benign)  # measured 4 of 51


def test_reject_band_and_modality_errors(tmp_path, data, trained, adversarial):
    texts, _, _, _, held = data
    path, pipe, det, det_dir = trained
    # a 'reject' band on a text model: a flagged text is refused 422, a confident one answered
    yaml = (
        f"model: {{name: spam, path: {path}}}\n"
        + LIMITS
        + f"detectors: [{{name: conf, path: {det_dir}}}]\n"
    )
    g = Guard.from_config(parse_config(yaml, "g.yaml", tmp_path))
    try:
        c = TestClient(create_app(g))
        key = create_key(g.store, "client")
        s = det.score(adversarial)
        hit = adversarial[int(s.argmax())]
        calm = [texts[i] for i in held][int(det.score([texts[i] for i in held]).argmin())]
        r = c.post(
            "/v1/models/spam/predict", json={"inputs": [hit]}, headers={"X-API-Key": key.key}
        )
        assert r.status_code == 422 and r.json()["type"] == PROBLEM_BASE + "rejected"
        r = c.post(
            "/v1/models/spam/predict", json={"inputs": [calm]}, headers={"X-API-Key": key.key}
        )
        assert r.status_code == 200 and r.json()["action"] == "allow"
        text_model = g.model
    finally:
        g.close()

    # a numeric detector file for a text model, and the text file for a numeric model
    numeric = _numeric_model()
    ndet = ConfidenceDetector(numeric, "max_prob")
    ndet.calibrate(torch.rand(40, 1, 8, 8), FPR)
    ndir = save_detector(ndet, tmp_path / "numdet")
    with pytest.raises(InputError, match="calibrated for numeric inputs") as e:
        load_detector(ndir, TextClassifier(pipe))
    assert "text model" in _one_line(e)
    with pytest.raises(InputError, match="calibrated for a text model") as e:
        load_detector(det_dir, numeric)
    _one_line(e)
    bad = yaml.replace(str(det_dir), str(ndir))
    with pytest.raises(InputError, match="calibrated for numeric inputs") as e:
        Guard.from_config(parse_config(bad, "g.yaml", tmp_path))
    _one_line(e)
    # check_modality: a numeric detector object on a text model, a text one on a numeric model
    cfg = parse_config(LIMITS, "g.yaml", tmp_path)
    with pytest.raises(InputError, match="does not take strings") as e:
        check_modality(cfg, text_model, [DetectorSlot("n", ndet, [(0.5, "reject")])], [])
    _one_line(e)
    served_numeric = ServedModel("num", "1", numeric)
    with pytest.raises(InputError, match="does not take numeric inputs"):
        check_modality(cfg, served_numeric, [DetectorSlot("t", det, [(0.5, "reject")])], [])
    # another text model (different weights): the digest differs
    other = make_pipeline(TfidfVectorizer(), LogisticRegression(C=1.0))
    other.fit([texts[i] for i in held], [i % 2 for i in range(len(held))])
    with pytest.raises(InputError, match="model digest differs") as e:
        load_detector(det_dir, TextClassifier(other))
    _one_line(e)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        ({"input": {"kind": "image"}}, "input must be"),
        ({"input": {"kind": "text", "x": 1}}, "input must be"),
        ({"input": "text"}, "input must be"),
        ({"input_shape": [1, 8, 8]}, "exactly one of input_shape"),
        ({"input": None, "drop": "input"}, "exactly one of input_shape"),
        ({"kind": "feature-squeezing", "params": {"squeezers": []}}, "cannot be for text"),
        ({"num_classes": 1}, "num_classes"),
    ],
)
def test_tampered_text_detector_files_are_refused(tmp_path, trained, edit, match):
    _, pipe, det, _ = trained
    out = save_detector(det, tmp_path / "d")
    doc = json.loads((out / "detector.json").read_text())
    edit = dict(edit)
    drop = edit.pop("drop", None)
    doc.update(edit)
    if drop:
        del doc[drop]
    (out / "detector.json").write_text(json.dumps(doc))
    with pytest.raises(InputError, match=match) as e:
        load_detector(out, TextClassifier(pipe))
    _one_line(e)


def test_cli_calibrates_a_text_model(tmp_path, trained):
    path, pipe, _, _ = trained
    runner = CliRunner()
    out = tmp_path / "det"
    args = ["detector", "calibrate", "--model", str(path), "--data", "spamham"]
    res = runner.invoke(
        cli_app, [*args, "--kind", "max-prob", "--fpr", "0.05", "--out", str(out), "--json"]
    )
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["kind"] == "confidence" and summary["input"] == "text"
    assert summary["n_calibration"] == 274 and summary["n_heldout"] == 69  # 343, holdout 0.2
    assert summary["fpr_calibration"] <= 0.05
    assert summary["model_digest"] == model_digest(TextClassifier(pipe))
    back = load_detector(out, TextClassifier(load_text_model(path)[0]))
    assert back.takes_text and back.threshold == summary["threshold"]
    default = runner.invoke(cli_app, [*args, "--out", str(tmp_path / "e"), "--json"])
    assert default.exit_code == 0, default.output
    assert json.loads((tmp_path / "e" / "detector.json").read_text())["params"] == {
        "kind": "entropy"
    }
    for kind in ("squeeze", "mahalanobis"):
        bad = runner.invoke(cli_app, [*args, "--kind", kind, "--out", str(tmp_path / kind)])
        assert bad.exit_code == 2, bad.output
        assert "scores numeric inputs" in bad.output and "Traceback" not in bad.output
        assert not (tmp_path / kind).exists()
