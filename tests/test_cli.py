"""The CLI end to end: quickstart, evaluate (exit codes), attack, report compare."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from advguard.cli import app

runner = CliRunner()

QUICK_TM = """
name: cli-test
norm: linf
epsilons: [0.05, 0.2]
samples: 100
batch_size: 128
sanity_samples: 30
attacks:
  - attack: pgd
    steps: 10
slos:
  - robust_accuracy >= {threshold} at eps 0.05
"""


@pytest.fixture(scope="module")
def quickstart_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("qs") / "report"
    tm = out.parent / "tm.yaml"
    tm.write_text(QUICK_TM.format(threshold=0.01))
    res = runner.invoke(
        app, ["quickstart", "--out", str(out), "--epochs", "8", "--threat-model", str(tm)]
    )
    assert res.exit_code == 0, res.output
    return out


def test_quickstart_writes_report(quickstart_dir):
    data = json.loads((quickstart_dir / "report.json").read_text())
    assert data["kind"] == "advguard.robustness-report"
    assert data["clean_accuracy"]["value"] > 0.9
    robust = [r["robust_accuracy"]["value"] for r in data["results"]]
    assert robust[0] >= robust[1] and robust[1] < 0.2
    html = (quickstart_dir / "report.html").read_text()
    assert "data:image/png;base64," in html
    assert (quickstart_dir / "model.safetensors").stat().st_size > 0


def _evaluate(quickstart_dir, tmp_path, threshold):
    tmp_path.mkdir(parents=True, exist_ok=True)
    tm = tmp_path / "tm.yaml"
    tm.write_text(QUICK_TM.format(threshold=threshold))
    return runner.invoke(
        app,
        [
            "evaluate",
            "--model",
            str(quickstart_dir / "model.safetensors"),
            "--data",
            str(quickstart_dir / "test-data.npz"),
            "--threat-model",
            str(tm),
            "--out",
            str(tmp_path / "out"),
        ],
    )


def test_evaluate_exit_codes(quickstart_dir, tmp_path):
    ok = _evaluate(quickstart_dir, tmp_path / "a", 0.01)
    assert ok.exit_code == 0, ok.output
    assert "PASS" in ok.output
    bad = _evaluate(quickstart_dir, tmp_path / "b", 0.99)
    assert bad.exit_code == 1, bad.output
    assert "FAIL" in bad.output
    # compare: the same model twice has no regression
    a, b = tmp_path / "a" / "out" / "report.json", tmp_path / "b" / "out" / "report.json"
    cmp = runner.invoke(app, ["report", "compare", str(a), str(b)])
    assert cmp.exit_code == 0, cmp.output


def test_evaluate_bad_input_exits_2(quickstart_dir, tmp_path):
    missing = runner.invoke(
        app, ["evaluate", "--model", str(tmp_path / "nope.onnx"), "--data", "digits"]
    )
    assert missing.exit_code == 2
    assert "Traceback" not in missing.output
    tm = tmp_path / "bad.yaml"
    tm.write_text("epsilons: [0.1]\nattacks:\n  - attack: nope\n")
    res = runner.invoke(
        app,
        [
            "evaluate",
            "--model",
            str(quickstart_dir / "model.safetensors"),
            "--data",
            "digits",
            "--threat-model",
            str(tm),
        ],
    )
    assert res.exit_code == 2 and "line 3" in res.output
    pkl = tmp_path / "model.pkl"
    pkl.write_bytes(b"\x80\x04K\x01.")
    res = runner.invoke(app, ["evaluate", "--model", str(pkl), "--data", "digits"])
    assert res.exit_code == 2 and "pickle" in res.output.lower()


def test_attack_writes_npz(quickstart_dir, tmp_path):
    out = tmp_path / "adv.npz"
    res = runner.invoke(
        app,
        [
            "attack",
            "--model",
            str(quickstart_dir / "model.safetensors"),
            "--data",
            str(quickstart_dir / "test-data.npz"),
            "--out",
            str(out),
            "--attack",
            "pgd",
            "--epsilon",
            "0.2",
            "-p",
            "steps=10",
            "--samples",
            "50",
        ],
    )
    assert res.exit_code == 0, res.output
    z = np.load(out, allow_pickle=False)
    assert z["x_adv"].shape == (50, 1, 8, 8)
    assert np.abs(z["x_adv"] - z["x"]).max() <= 0.2 + 1e-6
    meta = json.loads(str(z["metadata"]))
    assert meta["attack"] == "pgd" and meta["epsilon"] == 0.2
    assert z["success"].mean() > 0.5


def test_threat_model_commands():
    res = runner.invoke(app, ["threat-model", "list"])
    assert res.exit_code == 0 and "linf-standard" in res.output
    for name in ("square", "hopskipjump", "apgd-t", "AML.T0043.001"):
        assert name in res.output
    res = runner.invoke(app, ["threat-model", "show", "quick"])
    assert res.exit_code == 0 and "attacks" in res.output


def test_version():
    res = runner.invoke(app, ["version"])
    assert res.exit_code == 0 and res.output.strip()
