"""The CLI end to end: quickstart trains, attacks and writes results; errors exit 2."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from advguard.cli import app

runner = CliRunner()


def test_quickstart_end_to_end(tmp_path):
    out = tmp_path / "report"
    res = runner.invoke(app, ["quickstart", "--out", str(out), "--epochs", "8", "--steps", "10"])
    assert res.exit_code == 0, res.output
    assert "robust accuracy" in res.output
    data = json.loads((out / "quickstart.json").read_text())
    assert data["clean_accuracy"] > 0.9
    robust = [r["pgd_robust_accuracy"] for r in data["rows"]]
    # robust accuracy falls with epsilon and the largest epsilon breaks the undefended model
    assert all(a >= b for a, b in zip(robust, robust[1:], strict=False))
    assert robust[-1] < 0.1 < data["clean_accuracy"]
    assert all(r["pgd_robust_accuracy"] <= r["fgsm_robust_accuracy"] + 1e-9 for r in data["rows"])
    assert (out / "model.safetensors").stat().st_size > 0


def test_bad_option_exits_2():
    res = runner.invoke(app, ["quickstart", "--epochs", "0"])
    assert res.exit_code == 2


def test_version():
    res = runner.invoke(app, ["version"])
    assert res.exit_code == 0 and res.output.strip()
