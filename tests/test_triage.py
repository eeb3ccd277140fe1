"""Incident triage on real inputs: PGD examples crafted on an attacker's surrogate (extracted
from the model's answers) against shifted benign digits. The library reaches different
verdicts; the CLI preserves a client's records from a real guard, triages them and writes the
report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from advguard.attacks import PGD
from advguard.cli import app as cli_app
from advguard.data import load_dataset
from advguard.guard import incident as inc
from advguard.guard.triage import render_html, train_surrogate, triage
from advguard.models import TorchClassifier
from advguard.models.fit import fit
from advguard.models.io import save_torch
from advguard.models.zoo import mlp

pytest.importorskip("cryptography")

KW = {"input_shape": [1, 8, 8], "num_classes": 10, "hidden": [64]}


def _clf(module: torch.nn.Module) -> TorchClassifier:
    return TorchClassifier(module, input_shape=(1, 8, 8), num_classes=10)


@pytest.fixture(scope="module")
def world() -> dict[str, Any]:
    """A digits MLP (the served model), a linear fallback, reference data, and two incidents'
    inputs: PGD (eps 0.2, 20 steps) on an attacker's extracted surrogate, and benign digits
    under a brightness/contrast shift with noise."""
    torch.set_num_threads(1)
    d = load_dataset("digits")
    x, y = d.x.astype(np.float32), d.y.astype(np.int64)
    perm = np.random.default_rng(0).permutation(len(x))
    x, y = x[perm], y[perm]
    torch.manual_seed(0)
    model = _clf(fit(mlp((1, 8, 8), 10, hidden=(64,)), x[:1000], y[:1000], epochs=15, seed=0))
    torch.manual_seed(3)
    linear = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    fallback = _clf(fit(linear, x[:1000], y[:1000], epochs=15, seed=3))
    attacker = train_surrogate(model, x[1000:1300], epochs=30, seed=1)
    xs, ys = x[1300:1420], y[1300:1420]
    adv = PGD(steps=20, seed=0)(attacker, torch.tensor(xs), torch.tensor(ys), epsilon=0.2)
    rng = np.random.default_rng(1)
    shifted = np.clip(xs * 0.8 + 0.15 + rng.normal(0, 0.05, xs.shape), 0, 1).astype(np.float32)
    return {
        "model": model,
        "fallback": fallback,
        "reference": x[:400],
        "reference_labels": y[:400],
        "adv": adv.x_adv.numpy(),
        "adv_fooled_model": float(np.mean(model.predict(adv.x_adv.numpy()) != ys)),
        "shifted": shifted,
        "xs": xs,
        "calibration": x[1420:1600],
    }


def test_attack_and_drift_get_different_verdicts(world):
    w = world
    from advguard.defenses.detectors.scores import ConfidenceDetector

    surrogate = train_surrogate(w["model"], w["reference"], epochs=30, seed=2)
    confidence = ConfidenceDetector(w["model"], "max_prob")
    confidence.calibrate(w["calibration"], fpr=0.05)
    kw = {
        "detectors": [("confidence", confidence)],
        "model": w["model"],
        "surrogate": surrogate,
        "fallback": w["fallback"],
        "reference": w["reference"],
        "reference_labels": w["reference_labels"],
    }
    attack = triage(w["adv"], **kw)
    drift = triage(w["shifted"], **kw)
    clean = triage(w["xs"], **kw)
    assert w["adv_fooled_model"] > 0.2  # the PGD examples transfer to the served model
    assert attack.verdict == "attack", attack.reasons
    assert drift.verdict == "drift", drift.reasons
    assert clean.verdict == "inconclusive"  # no attack signal and no shift
    # the numbers behind the verdicts
    assert attack.brittleness["inputs"] >= 0.5 > 0.2 >= drift.brittleness["inputs"]
    assert attack.brittleness["reference"] < 0.15
    assert attack.transfer["rate"] >= 0.5 and attack.transfer["surrogate_error_rate"] >= 0.25
    assert drift.drift["psi_major_share"] > 0.5 and drift.drift["ks_rejected_share"] > 0.5
    assert clean.drift["psi_major_share"] < 0.1
    assert set(attack.models) == {"model", "surrogate", "fallback"}
    flags = {k: r.detectors["confidence"]["flag_rate"] for k, r in (("a", attack), ("d", drift))}
    assert flags["a"] > 0.3 > 0.2 > flags["d"]  # the transferred examples are low-confidence
    assert attack.detectors["confidence"]["reference_flag_rate"] < 0.2
    page = render_html(attack, title="<script>x</script>")
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert page.count("data:image/png;base64,") == 8


def test_cli_triage_of_a_preserved_client(world, tmp_path):
    from cryptography.fernet import Fernet

    from advguard.guard.app import create_app
    from advguard.guard.auth import create_key
    from advguard.guard.config import load_config
    from advguard.guard.pipeline import Guard

    w = world
    save_torch(
        w["model"],
        tmp_path / "model.safetensors",
        factory="advguard.models.zoo:mlp",
        factory_kwargs=KW,
    )
    (tmp_path / "fernet.key").write_bytes(Fernet.generate_key())
    cfgp = tmp_path / "guard.yaml"
    cfgp.write_text(
        "model: {name: digits, path: model.safetensors}\n"
        "limits: {rate: 1000, burst: 1000}\n"
        "forensics: {mode: encrypted, key_file: fernet.key, sample_rate: 1.0}\n"
    )
    g = Guard.from_config(load_config(cfgp))
    try:
        c = TestClient(create_app(g))
        mallory = create_key(g.store, "mallory", ["predict"])
        benign = create_key(g.store, "bob", ["predict"])
        for batch, key in ((w["adv"], mallory), (w["xs"], benign)):
            for i in range(0, len(batch), 40):
                r = c.post(
                    "/v1/models/digits/predict",
                    json={"inputs": batch[i : i + 40].tolist()},
                    headers={"Authorization": f"Bearer {key.key}"},
                )
                assert r.status_code == 200
        iid = inc.open_incident(g.store, "odd answers", who="alice").id
    finally:
        g.close()
    out = tmp_path / "triage"
    r = CliRunner().invoke(
        cli_app,
        [
            "incident",
            "triage",
            "--incident",
            iid,
            "--since",
            "1h",
            "--client",
            mallory.record.key_id,
            "--reference",
            "digits",
            "--reference-samples",
            "400",
            "--out",
            str(out),
            "--who",
            "alice",
            "-c",
            str(cfgp),
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["verdict"] == "attack" and res["n_inputs"] == len(w["adv"])
    manifest = json.loads((out / "evidence" / "manifest.json").read_text())
    assert manifest["client_id"] == mallory.record.key_id and manifest["rows"] == len(w["adv"])
    html = (out / "triage.html").read_text()
    assert "Verdict: ATTACK" in html and "<script" not in html
    assert json.loads((out / "triage.json").read_text())["verdict"] == "attack"
    db = ["--database-url", f"sqlite:///{tmp_path / 'guard.db'}"]
    status = json.loads(
        CliRunner().invoke(cli_app, ["incident", "status", iid, "--json", *db]).stdout
    )
    actions = [a["action"] for a in status["actions"]]
    assert actions == ["open", "preserve", "triage"]
    assert status["actions"][2]["details"]["verdict"] == "attack"
    assert status["actions"][1]["details"]["held"] == 3
    # the evidence folder is reusable: triage it again, from the folder alone
    r = CliRunner().invoke(
        cli_app,
        [
            "incident",
            "triage",
            "--evidence",
            str(out / "evidence"),
            "--reference",
            "digits",
            "--reference-samples",
            "400",
            "--out",
            str(tmp_path / "again"),
            "-c",
            str(cfgp),
        ],
    )
    assert r.exit_code == 0 and "ATTACK" in r.stdout, r.output
    assert Path(tmp_path / "again" / "triage.html").is_file()
