"""``advguard gameday`` on a small configuration: the digits CNN behind a local guard, one
evasion attacker, the extraction attacker and a few benign clients at once."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from advguard.cli import app
from advguard.models import TorchClassifier
from advguard.models.io import save_torch


@pytest.fixture(scope="module")
def model_file(tmp_path_factory, digits_module):
    path = tmp_path_factory.mktemp("gameday") / "digits.safetensors"
    clf = TorchClassifier(digits_module, input_shape=(1, 8, 8), num_classes=10)
    return save_torch(
        clf, path, factory="advguard.models.zoo:small_cnn",
        factory_kwargs={"input_shape": [1, 8, 8], "num_classes": 10},
    )  # fmt: skip


SMALL = ["--benign-clients", "3", "--benign-queries", "150", "--attack-images", "2"]


def test_gameday_passes_and_writes_the_report(tmp_path, model_file):
    out = tmp_path / "report.html"
    args = ["gameday", "-m", str(model_file), "-d", "digits", *SMALL, "--attacks", "square"]
    r = CliRunner().invoke(app, [*args, "--extraction-budget", "600", "--json", "--out", str(out)])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["passed"] and all(c["passed"] for c in doc["checks"])
    names = [a["name"] for a in doc["attackers"]]
    assert names == ["square", "jacobian-extraction"]
    square, extraction = doc["attackers"]
    assert square["queries_to_detect"] == 51 and square["detector"] == "knn"
    assert square["queries_answered_before_block"] <= 50 and square["block_persists"]
    assert extraction["detector"] == "prada" and extraction["queries_to_detect"] < 2000
    assert doc["benign"]["clients"] == 3 and doc["benign"]["rows_answered"] == 3 * 150
    assert doc["benign"]["flagged_clients"] == 0 and doc["benign"]["errors"] == 0
    knn = doc["setup"]["detectors"]["knn"]
    assert knn["calibration"]["n_scored"] == round(0.7 * 1797) - 50  # the held-out 70%
    page = out.read_text()
    assert "advguard game day: PASSED" in page and "jacobian-extraction" in page


def test_gameday_exits_1_and_names_the_failed_check(tmp_path, model_file):
    """A threshold below the k-NN detector's first possible flag (query k + 1 = 51) fails."""
    out = tmp_path / "r.json"
    args = ["gameday", "-m", str(model_file), "--benign-clients", "1", "--benign-queries", "40",
            "--attack-images", "1", "--attacks", "square", "--no-extraction",
            "--evasion-within", "40", "--out", str(out)]  # fmt: skip
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 1, r.output
    assert "FAILED square: detected before 40 queries: first flag at query 51 (knn)" in r.stderr
    assert "Game day FAILED" in r.stdout
    doc = json.loads(out.read_text())
    failed = [c["name"] for c in doc["checks"] if not c["passed"]]
    assert failed == ["square: detected before 40 queries", "square: blocked before 40 queries"]
