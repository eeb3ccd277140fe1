"""Text threat models end to end: spam/ham data, the text model file, evaluate, report, gate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from typer.testing import CliRunner

from advguard.attacks.registry import ATTACKS, build_attack
from advguard.attacks.text import edit_distance
from advguard.cli import app
from advguard.data import load_dataset
from advguard.errors import InputError
from advguard.evaluate.runner import evaluate
from advguard.evaluate.threat_model import load_threat_model, parse_threat_model
from advguard.models.text_io import load_text_model, save_text_model

runner = CliRunner()

BB_LINF = (
    "name: bb\nknowledge: black-box\nnorm: linf\nepsilons: [0.1]\nattacks: [{attack: square}]\n"
)

TEXT_TM = """
name: text-test
knowledge: black-box
norm: edits
epsilons: [2, 8]
samples: 20
sanity_samples: 8
attacks:
  - attack: char
    ops: [homoglyph, zero_width, typo]
    max_queries: 80
  - attack: word
    max_queries: 80
slos:
  - clean_accuracy >= 0.5
"""


@pytest.fixture(scope="module")
def spamham():
    data = load_dataset("spamham")
    return data.split(test_size=0.3, seed=0)


@pytest.fixture(scope="module")
def text_model(spamham, tmp_path_factory) -> tuple[Path, object]:
    train, _ = spamham
    pipe = make_pipeline(TfidfVectorizer(ngram_range=(1, 2)), LogisticRegression(C=10.0))
    pipe.fit(train.texts, train.y)
    path = tmp_path_factory.mktemp("tm") / "spam.textmodel.json"
    save_text_model(pipe, path, class_names=["ham", "spam"])
    return path, pipe


def test_spamham_is_a_text_dataset(spamham):
    data = load_dataset("spamham")
    assert data.modality == "text" and len(data) == 343 and data.num_classes == 2
    assert data.class_names == ["ham", "spam"] and data.class_counts().tolist() == [173, 170]
    assert all(isinstance(t, str) for t in data.texts)
    assert data.sha256() == load_dataset("spamham").sha256()
    train, test = spamham
    assert len(train) + len(test) == 343 and test.modality == "text"
    assert test.subset([0, 1]).texts == test.texts[:2]
    changed = data.subset(list(range(len(data))))
    changed.x[0] = changed.x[0] + "!"
    assert changed.sha256() != data.sha256()


def test_text_model_file_roundtrip_and_is_validated(text_model, spamham, tmp_path):
    path, pipe = text_model
    _, test = spamham
    loaded, info = load_text_model(path)
    assert info["class_names"] == ["ham", "spam"] and info["num_classes"] == 2
    np.testing.assert_array_equal(loaded.predict_proba(test.texts), pipe.predict_proba(test.texts))

    doc = json.loads(path.read_text())

    def broken(edit) -> Path:
        d = json.loads(json.dumps(doc))
        edit(d)
        p = tmp_path / "bad.textmodel.json"
        p.write_text(json.dumps(d))
        return p

    cases = [
        (lambda d: d.update(format="pickle"), "not an advguard text model"),
        (lambda d: d["vectorizer"]["params"].update(analyzer="os:system"), "analyzer"),
        (lambda d: d["vectorizer"]["params"].update(lowercase=1), "lowercase"),
        (lambda d: d["vectorizer"]["params"].update(token_pattern="(a+)+$"), "exactly"),
        (lambda d: d["classifier"]["coef"][0].pop(), "shape"),
        (lambda d: d["classifier"]["intercept"].__setitem__(0, float("nan")), "NaN"),
        (lambda d: d["vectorizer"]["vocabulary"].__setitem__(1, d["vectorizer"]["vocabulary"][0]),
         "repeated"),
        (lambda d: d.update(num_classes=True), "num_classes"),
    ]  # fmt: skip
    for edit, msg in cases:
        with pytest.raises(InputError, match=msg):
            load_text_model(broken(edit))
    (tmp_path / "x.textmodel.json").write_text("[" * 100_000)
    with pytest.raises(InputError, match="not a valid JSON"):
        load_text_model(tmp_path / "x.textmodel.json")


def test_text_attacks_are_registered_and_text_threat_models_validate():
    for name in ("char", "word"):
        entry = ATTACKS[name]
        assert entry.norms == ("edits",) and entry.knowledge == "black-box"
        assert "AML.T0043.001" in entry.atlas
    assert build_attack("char", norm="edits", seed=0, max_char_edits=3).attack.max_char_edits == 3
    tm = load_threat_model("text-standard")
    assert tm.is_text and tm.norm == "edits" and [s.attack for s in tm.attacks] == ["char", "word"]
    with pytest.raises(InputError, match="does not support norm edits"):
        parse_threat_model(TEXT_TM.replace("attack: word", "attack: pgd"))
    with pytest.raises(InputError, match="does not support norm linf"):
        parse_threat_model(TEXT_TM.replace("norm: edits", "norm: linf"))
    with pytest.raises(InputError, match="whole numbers"):
        parse_threat_model(TEXT_TM.replace("[2, 8]", "[2.5, 8]"))
    with pytest.raises(InputError, match="text threat model"):
        evaluate(None, np.zeros((2, 3)), np.zeros(2, dtype=int), parse_threat_model(TEXT_TM))


def test_cli_text_evaluate_report_and_gate(text_model, tmp_path):
    path, pipe = text_model
    tm = tmp_path / "text.yaml"
    tm.write_text(TEXT_TM)
    out = tmp_path / "out"
    args = ["evaluate", "--model", str(path), "--data", "spamham", "--threat-model", str(tm)]
    res = runner.invoke(app, [*args, "--out", str(out)])
    assert res.exit_code == 0, res.output
    rep = json.loads((out / "report.json").read_text())
    html = (out / "report.html").read_text()
    assert "Adversarial texts" in html and "⟨U+" in html
    assert rep["data"]["modality"] == "text" and rep["data"]["n_evaluated"] == 20
    assert rep["model"]["adapter"] == "TextClassifier" and rep["model"]["white_box"] is False
    assert rep["threat_model"]["norm"] == "edits" and rep["trustworthy"] is True
    assert [s["attack"] for s in rep["suite"]] == ["char", "word"]
    r2, r8 = rep["results"]
    assert (r2["epsilon"], r8["epsilon"]) == (2.0, 8.0)
    clean = rep["clean_accuracy"]["value"]
    assert r8["robust_accuracy"]["value"] <= r2["robust_accuracy"]["value"] <= clean
    assert r8["robust_accuracy"]["value"] < clean - 0.2  # 8 character edits evade many texts
    assert 0 < r8["perturbation"]["edits"]["mean"] <= 8
    assert {c["id"] for c in rep["sanity_checks"]} == {"text-verification", "text-larger-budget"}
    assert any(f["atlas_technique"] == "AML.T0043.001" for f in rep["findings"])
    # every kept example is a real evasion within its budget, checked here independently
    assert rep["examples"]
    for ex in rep["examples"]:
        (orig,), (adv,) = ex["x"], ex["x_adv"]
        assert 0 < edit_distance(orig, adv) <= ex["epsilon"]
        assert pipe.predict([adv])[0] != ex["label"] == pipe.predict([orig])[0]

    policy = tmp_path / "policy.yaml"
    policy.write_text("name: text-release\nslos:\n  - robust_accuracy >= 0.0 at eps 2\n")
    res = runner.invoke(
        app, ["gate", "--report", str(out / "report.json"), "--policy", str(policy)]
    )
    assert res.exit_code == 0, res.output
    policy.write_text("name: strict\nslos:\n  - robust_accuracy >= 0.99 at eps 8\n")
    res = runner.invoke(
        app, ["gate", "--report", str(out / "report.json"), "--policy", str(policy)]
    )
    assert res.exit_code == 1, res.output

    # mismatches are one-line input errors (exit 2)
    bad = runner.invoke(app, [*args[:5], "--threat-model", "quick", "--out", str(tmp_path / "b")])
    assert bad.exit_code == 2 and "use a text threat model" in " ".join(bad.output.split())
    bad = runner.invoke(app, ["evaluate", "--model", str(path), "--data", "digits", "-t", str(tm)])
    assert bad.exit_code == 2 and "give a text data set" in " ".join(bad.output.split())


def test_attack_and_redteam_refuse_text(text_model, tmp_path):
    path, _ = text_model
    res = runner.invoke(
        app, ["attack", "--model", str(path), "--data", "spamham", "--out", str(tmp_path / "a")]
    )
    assert res.exit_code == 2 and "text threat model" in " ".join(res.output.split())
    from advguard.evaluate.redteam import run_redteam
    from advguard.models.http_model import EndpointError

    # text endpoints are red-teamed (tests/test_http_text_redteam.py); a numeric threat
    # model on text data is refused before any request, an unreachable one is named
    with pytest.raises(InputError, match="spamham is text data"):
        run_redteam("http://127.0.0.1:9/predict", "spamham", parse_threat_model(BB_LINF), tmp_path)
    with pytest.raises(EndpointError, match="could not reach"):
        run_redteam(
            "http://127.0.0.1:9/predict",
            "spamham",
            "text-standard",
            tmp_path,
            retries=0,
            client_options={"proxies": {}},
        )
