"""Drift signals: the reference profile (built, saved, validated on load), the sliding window's
incremental counts, PSI and confidence z-scores on real shifted traffic, and the gauges."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from advguard.cli import app as cli_app
from advguard.errors import InputError
from advguard.guard.app import create_app
from advguard.guard.auth import create_key
from advguard.guard.config import parse_config
from advguard.guard.drift import (
    DriftMonitor,
    build_profile,
    features,
    load_profile,
    n_features,
    psi,
    save_profile,
)
from advguard.guard.pipeline import Guard
from advguard.guard.serving import ServedModel
from advguard.guard.storage import GuardStore
from advguard.models import TorchClassifier
from advguard.models.io import save_torch
from advguard.models.zoo import mlp


@pytest.fixture(scope="module")
def clf(digits_split) -> TorchClassifier:
    """A softmax regression on digits (~95% test accuracy)."""
    x, y = torch.tensor(digits_split[0]), torch.tensor(digits_split[1])
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    opt = torch.optim.Adam(module.parameters(), lr=0.05)
    for _ in range(150):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(module(x), y).backward()
        opt.step()
    return TorchClassifier(module.eval(), input_shape=(1, 8, 8), num_classes=10)


@pytest.fixture(scope="module")
def profile(clf, digits_split):
    return build_profile(clf, digits_split[0][:1000])


def _stream(mon: DriftMonitor, clf: TorchClassifier, x: np.ndarray) -> tuple[float, ...]:
    for i in range(0, len(x), 7):
        b = x[i : i + 7]
        mon.update(b, clf.predict_proba(b))
    return mon.current()


def test_same_traffic_is_stable_and_shifted_traffic_drifts(clf, profile, digits_split):
    x_new = digits_split[0][1000:]  # 400 rows the profile has not seen
    assert len(profile.features) == n_features((1, 8, 8)) == 18
    psi_in, psi_pred, z = _stream(DriftMonitor(profile, window=400), clf, x_new)
    assert psi_in < 0.1 and psi_pred < 0.1 and abs(z) < 3
    bright = np.clip(x_new + 0.2, 0, 1)
    psi_in, _, z = _stream(DriftMonitor(profile, window=400), clf, bright)
    assert psi_in > 0.25 and z < -5  # brighter digits: the model is much less sure
    noisy = np.clip(x_new + np.random.default_rng(0).normal(0, 0.15, x_new.shape), 0, 1)
    psi_in, _, z = _stream(DriftMonitor(profile, window=400), clf, noisy.astype(np.float32))
    assert psi_in > 0.25 and abs(z) > 5


def test_window_counts_are_the_last_rows_exactly(profile):
    rng = np.random.default_rng(1)
    mon = DriftMonitor(profile, window=50, min_rows=10)
    xs, ps = [], []
    for _ in range(40):
        n = int(rng.integers(1, 23))
        x = rng.uniform(0, 1, (n, 1, 8, 8)).astype(np.float32)
        p = rng.dirichlet(np.ones(10), n)
        mon.update(x, p)
        xs.append(x)
        ps.append(p)
        last_x = np.concatenate(xs)[-50:]
        last_p = np.concatenate(ps)[-50:]
        idx = mon._bin(features(last_x, (1, 8, 8)))
        for j in range(idx.shape[1]):
            want = np.bincount(idx[:, j], minlength=mon.inputs.counts.shape[1])
            np.testing.assert_array_equal(mon.inputs.counts[j], want)
        want_pred = np.bincount(last_p.argmax(1), minlength=10)
        np.testing.assert_array_equal(mon.preds.counts[0], want_pred)
        assert mon.conf_sum == pytest.approx(last_p.max(1).sum())
    # the gauges are the PSI formula over those counts
    psi_in, psi_pred, z = mon.signals()
    per_feature = [
        psi(np.asarray(f.proportions), mon.inputs.counts[j, : len(f.proportions)] / 50)
        for j, f in enumerate(profile.features)
    ]
    assert psi_in == pytest.approx(np.mean(per_feature))
    assert psi_pred == pytest.approx(psi(np.asarray(profile.class_prior), want_pred / 50))
    mean = last_p.max(1).mean()
    assert z == pytest.approx(
        (mean - profile.confidence_mean) / (profile.confidence_std / np.sqrt(50))
    )


def test_too_few_rows_give_nan_and_refused_rows_count_as_inputs_only(profile):
    mon = DriftMonitor(profile, window=100, min_rows=20)
    x = np.full((15, 1, 8, 8), 0.2, np.float32)
    mon.update(x, None)
    assert all(np.isnan(v) for v in mon.current())
    mon.update(x, None)
    psi_in, psi_pred, z = mon.current()  # 30 input rows, no answered rows
    assert psi_in > 0.25 and np.isnan(psi_pred) and np.isnan(z)


def test_profile_round_trip_and_validation(tmp_path, profile):
    path = save_profile(profile, tmp_path / "p.json")
    assert load_profile(path) == profile
    doc = json.loads(path.read_text())

    def bad(mutate, needle: str) -> None:
        d = json.loads(json.dumps(doc))
        mutate(d)
        p = tmp_path / "bad.json"
        p.write_text(json.dumps(d))
        with pytest.raises(InputError, match=needle):
            load_profile(p)

    bad(lambda d: d["features"][0]["proportions"].__setitem__(0, 0.9), "sum to 1")
    bad(lambda d: d["features"][1]["edges"].reverse(), "increasing")
    bad(lambda d: d["features"].pop(), "18 drift features")
    bad(lambda d: d["class_prior"].pop(), "class")
    bad(lambda d: d.update(confidence_mean=1.5), "confidence_mean")
    bad(lambda d: d.update(format="pickle"), "format")
    bad(lambda d: d.update(code="os.system"), "code")
    (tmp_path / "nan.json").write_text(path.read_text().replace("0.0", "NaN", 1))
    with pytest.raises(InputError, match="NaN"):
        load_profile(tmp_path / "nan.json")
    (tmp_path / "deep.json").write_text("[" * 100 + "]" * 100)
    with pytest.raises(InputError, match="nested"):
        load_profile(tmp_path / "deep.json")


def _guard_yaml(tmp_path, clf, profile_path, window=200) -> Guard:
    text = f"drift:\n  profile: {profile_path.name}\n  window: {window}\n  min_rows: 20\n"
    cfg = parse_config(text, "g.yaml", tmp_path)
    store = GuardStore(f"sqlite:///{tmp_path / 'g.db'}")
    return Guard.from_config(cfg, model=ServedModel("digits", "digits:1", clf), store=store)


def test_guard_exposes_the_drift_gauges(tmp_path, clf, profile, digits_split):
    g = _guard_yaml(tmp_path, clf, save_profile(profile, tmp_path / "profile.json"))
    assert g.drift is not None and g.drift.window == 200
    c = TestClient(create_app(g))
    k = create_key(g.store, "a").key
    x = np.clip(digits_split[2][:60] + 0.2, 0, 1)
    for i in range(0, 60, 10):
        r = c.post(
            "/v1/models/digits/predict",
            json={"inputs": x[i : i + 10].tolist()},
            headers={"Authorization": f"Bearer {k}"},
        )
        assert r.status_code == 200
    text = c.get("/metrics").text
    psi_in, psi_pred, z = g.drift.current()
    assert psi_in > 0.25 and z < -3
    assert f'advguard_guard_drift_input_psi{{model="digits"}} {psi_in!r}' in text
    assert f'advguard_guard_drift_prediction_psi{{model="digits"}} {psi_pred!r}' in text
    assert f'advguard_guard_drift_confidence_zscore{{model="digits"}} {z!r}' in text
    g.close()


def test_a_profile_for_another_model_is_refused(tmp_path, clf, digits_split):
    other = TorchClassifier(mlp((64,), 10, hidden=(4,)), input_shape=(64,), num_classes=10)
    prof = build_profile(other, digits_split[0][:200].reshape(200, 64))
    with pytest.raises(InputError, match="drift profile is for inputs"):
        _guard_yaml(tmp_path, clf, save_profile(prof, tmp_path / "p.json"))
    with pytest.raises(InputError, match="needs at least 100 rows"):
        build_profile(clf, digits_split[0][:50])


def test_cli_profile_writes_a_profile_the_guard_loads(tmp_path):
    kw = {"input_shape": [1, 8, 8], "num_classes": 10, "hidden": [16]}
    torch.manual_seed(0)
    model = save_torch(
        mlp(**kw),
        tmp_path / "m.safetensors",
        factory="advguard.models.zoo:mlp",
        factory_kwargs=kw,
        input_shape=(1, 8, 8),
        num_classes=10,
        bounds=(0.0, 1.0),
    )
    out = tmp_path / "profile.json"
    args = ["guard", "profile", "-m", str(model), "-d", "digits", "--out", str(out)]
    r = CliRunner().invoke(cli_app, [*args, "--samples", "300", "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["rows"] == 300 and summary["features"] == 18
    p = load_profile(out)
    assert p.n_reference == 300 and p.model_digest == summary["model_digest"]
    assert len(p.model_digest or "") == 64
