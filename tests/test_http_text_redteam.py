"""HttpTextClassifier against a live local text server, and `advguard redteam` on text data."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from typer.testing import CliRunner

from advguard.attacks.text import TextClassifier, as_text_classifier
from advguard.cli import app
from advguard.data import load_dataset
from advguard.errors import InputError
from advguard.evaluate.text_runner import evaluate_text
from advguard.evaluate.threat_model import parse_threat_model
from advguard.models import HttpTextClassifier
from advguard.models.http_model import EndpointError, QueryBudgetExceeded
from http_server import ModelServer

runner = CliRunner()

TEXT_TM = """
name: text-http
knowledge: black-box
norm: edits
epsilons: [2, 8]
samples: 20
sanity_samples: 8
attacks:
  - attack: char
    ops: [homoglyph, zero_width, typo]
    max_queries: 40
  - attack: word
    max_queries: 40
slos:
  - clean_accuracy >= 0.5
"""


@pytest.fixture(scope="module")
def spamham():
    return load_dataset("spamham").split(test_size=0.3, seed=0)


@pytest.fixture(scope="module")
def pipe(spamham):
    train, _ = spamham
    model = make_pipeline(TfidfVectorizer(ngram_range=(1, 2)), LogisticRegression(C=10.0))
    return model.fit(train.texts, train.y)


@pytest.fixture()
def server(pipe):
    with ModelServer(pipe.predict_proba, text=True) as srv:
        yield srv


@pytest.fixture()
def no_proxy(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(var, raising=False)


def client(url: str, **kw: Any) -> HttpTextClassifier:
    return HttpTextClassifier(url, num_classes=2, proxies={}, backoff=0.01, seed=0, **kw)


def test_text_client_matches_local_model_and_counts(server, pipe, spamham):
    _, test = spamham
    texts = test.texts[:30]
    remote = client(server.url, batch_size=8, class_names=["ham", "spam"])
    assert as_text_classifier(remote) is remote  # the text attacks' model interface
    np.testing.assert_allclose(remote.predict_proba(texts), pipe.predict_proba(texts), atol=1e-12)
    np.testing.assert_array_equal(remote.predict(texts[:5]), pipe.predict(texts[:5]))
    assert remote.queries.forward == remote.usage()["samples_answered"] == server.samples == 35
    assert server.requests == remote.usage()["requests_sent"] == 4 + 1
    assert remote.class_names == ["ham", "spam"]
    info = remote.describe()
    assert info["modality"] == "text" and "flatten" not in info
    assert remote.predict_proba([]).shape == (0, 2) and server.samples == 35


def test_text_client_logits_field_and_budget(pipe, spamham):
    _, test = spamham
    texts = test.texts[:10]
    with ModelServer(
        pipe.predict_log_proba, text=True, input_field="texts", output_field="scores"
    ) as srv:
        remote = client(
            srv.url, output="logits", input_field="texts", output_field="scores", query_budget=12
        )
        np.testing.assert_allclose(remote.predict_proba(texts), pipe.predict_proba(texts))
        with pytest.raises(QueryBudgetExceeded, match="10 of 12 samples already answered"):
            remote.predict_proba(texts[:3])
        assert srv.samples == 10 and srv.requests == 1 and remote.remaining_budget == 2


def test_text_client_validation_and_contract_errors(server):
    remote = client(server.url, retries=0)
    with pytest.raises(InputError, match="list of strings"):
        remote.predict_proba("one text")
    with pytest.raises(InputError, match=r"texts\[1\] is a int"):
        remote.predict_proba(["ok", 3])  # type: ignore[list-item]
    with pytest.raises(InputError, match="numeric inputs"):
        HttpTextClassifier(server.url, num_classes=2, input_shape=(3,))
    with pytest.raises(InputError, match="class_names"):
        HttpTextClassifier(server.url, num_classes=2, class_names=["a"])
    wrong = client(server.url, retries=0, input_field="x")
    with pytest.raises(EndpointError, match="'x' holding a list of strings"):
        wrong.predict_proba(["hello"])
    assert server.samples == 0


def _redteam_args(url: str, tmp_path, *extra: str) -> list[str]:
    tm = tmp_path / "text.yaml"
    tm.write_text(TEXT_TM)
    out = tmp_path / "out"
    args = ["redteam", "--url", url, "--data", "spamham", "--threat-model", str(tm)]
    return [*args, "--out", str(out), "--samples", "20", *extra]


def test_cli_redteam_text_end_to_end(server, pipe, tmp_path, no_proxy):
    res = runner.invoke(app, _redteam_args(server.url, tmp_path, "--batch-size", "16"))
    assert res.exit_code in (0, 1), res.output
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert rep["data"]["modality"] == "text" and rep["data"]["n_evaluated"] == 20
    assert rep["model"]["modality"] == "text" and rep["model"]["endpoint"] == server.url
    assert rep["model"]["adapter"] == "HttpTextClassifier"
    q = rep["model"]["queries"]
    assert q["samples_answered"] == server.samples > 20  # clean pass + attack queries
    assert q["requests_sent"] == server.requests and q["query_budget"] is None
    assert rep["model"]["query_budget_exhausted"] is False
    assert [r["epsilon"] for r in rep["results"]] == [2.0, 8.0]
    for r in rep["results"]:
        assert set(r["perturbation"]) == {"edits", "words"}
        edits = r["perturbation"]["edits"]
        if r["fooling_rate"]["k"]:
            assert 1 <= edits["median"] <= r["epsilon"] and 1 <= edits["mean"] <= r["epsilon"]
        assert {a["attack"] for a in r["per_attack"]} == {"char", "word"}
    fooled = rep["results"][-1]["fooling_rate"]["value"]
    assert fooled is not None and fooled > 0  # the attacks do evade through HTTP
    assert {c["id"] for c in rep["sanity_checks"]} == {"text-verification", "text-larger-budget"}
    assert f"Endpoint answered {server.samples} samples" in " ".join(res.output.split())
    # the same evaluation of the same model run locally gives the same numbers and queries
    data = load_dataset("spamham")
    local = evaluate_text(TextClassifier(pipe), data.texts, data.y, parse_threat_model(TEXT_TM))
    assert local.model["queries"]["forward"] == server.samples
    assert [r.robust_accuracy.value for r in local.results] == [
        r["robust_accuracy"]["value"] for r in rep["results"]
    ]


@pytest.mark.parametrize("budget", [20, 27])
def test_cli_redteam_text_budget_is_hard(server, tmp_path, no_proxy, budget):
    # the text-standard preset: the budget stops it right after the clean pass
    args = ["redteam", "--url", server.url, "--data", "spamham", "-t", "text-standard"]
    args += ["--out", str(tmp_path / "out"), "--samples", "20", "--query-budget", str(budget)]
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    line = " ".join(res.output.split())
    assert f"query budget of {budget} texts ran out" in line and "Traceback" not in res.output
    assert f"({server.samples} answered" in line
    assert 20 <= server.samples <= budget  # the clean pass fits; the budget is never exceeded
    if budget == 20:
        assert server.samples == 20  # stopped exactly at the budget
    assert not (tmp_path / "out" / "report.json").exists()


def test_cli_redteam_text_threat_model_on_numeric_data(server, tmp_path, no_proxy):
    args = ["redteam", "--url", server.url, "--data", "digits", "--threat-model", "text-standard"]
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "out")])
    assert res.exit_code == 2, res.output
    assert "text threat model" in res.output and "digits is image data" in res.output
    assert len(res.output.strip().splitlines()) == 1 and server.requests == 0


def test_cli_redteam_text_refuses_numeric_options(server, tmp_path, no_proxy):
    res = runner.invoke(app, _redteam_args(server.url, tmp_path, "--input-shape", "1,8,8"))
    assert res.exit_code == 2 and "input_shape describe numeric inputs" in res.output
    assert server.requests == 0


def test_text_client_shares_retries_and_response_limits(server):
    waits: list[float] = []
    remote = client(server.url, retries=2, sleep=waits.append, max_response_bytes=65536)
    server.fail_500 = 2
    assert remote.predict_proba(["free entry to win cash"]).shape == (1, 2)
    assert server.requests == 3 and len(waits) == 2 and remote.usage()["retries"] == 2
    server.nested = 40
    with pytest.raises(EndpointError, match="nested 41 levels deep, over the limit of 32"):
        remote.predict_proba(["hi"])
    server.nested = 0
    server.stream_bytes = 1024 * 1024
    with pytest.raises(EndpointError, match="more than 65536 bytes"):
        remote.predict_proba(["hi"])
    server.closing.set()
    assert remote.queries.forward == 1  # failed answers count nothing
