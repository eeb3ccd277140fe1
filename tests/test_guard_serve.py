"""The guard built from its YAML: models from files and the registry, detector hook points,
and ``advguard guard serve`` as a real process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

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
from advguard.guard.pipeline import Guard
from advguard.models.io import load_model, save_torch
from advguard.models.zoo import mlp
from guard_helpers import free_port

FACTORY_KW = {"input_shape": [1, 8, 8], "num_classes": 10, "hidden": [16]}


@pytest.fixture()
def model_file(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "digits.safetensors"
    save_torch(
        mlp(**FACTORY_KW),
        path,
        factory="advguard.models.zoo:mlp",
        factory_kwargs=FACTORY_KW,
        input_shape=(1, 8, 8),
        num_classes=10,
        bounds=(0.0, 1.0),
    )
    return path


def _x(n: int = 3) -> np.ndarray:
    return np.random.default_rng(0).uniform(0, 1, (n, 1, 8, 8)).astype(np.float32)


def test_from_config_with_a_model_file(tmp_path, model_file):
    cfg = parse_config(f"model:\n  name: digits\n  path: {model_file.name}\n", "g", tmp_path)
    g = Guard.from_config(cfg)
    try:
        assert g.model.version.startswith("sha256:") and g.model.spec.shape == (1, 8, 8)
        k = create_key(g.store, "a").key
        c = TestClient(create_app(g))
        r = c.post(
            "/v1/models/digits/predict",
            json={"inputs": _x().tolist()},
            headers={"Authorization": f"Bearer {k}"},
        )
        want = load_model(model_file).predict_proba(_x())
        np.testing.assert_allclose(r.json()["probabilities"], want, atol=1e-6)
        assert (tmp_path / "guard.db").is_file()
    finally:
        g.close()


def test_from_config_with_a_registry_version(tmp_path, model_file):
    from advguard.registry.store import Registry

    root = tmp_path / "reg"
    with Registry(root) as reg:
        reg.push("digits", model_file)
        reg.push("digits", model_file)
        reg.promote("digits", 1, force=True, reason="unsigned test model")
    text = f"model:\n  name: d\n  registry:\n    model_name: digits\n    root: {root}\n"
    g = Guard.from_config(parse_config(text, "g", tmp_path))
    try:
        assert g.model.version == "digits:1"
        np.testing.assert_allclose(
            g.model.predict_proba(_x()), load_model(model_file).predict_proba(_x()), atol=1e-6
        )
    finally:
        g.close()
    bad = text.replace("model_name: digits", "model_name: nothing")
    with pytest.raises(InputError, match="nothing"):
        Guard.from_config(parse_config(bad, "g", tmp_path))


def test_encrypted_mode_needs_a_key(tmp_path, model_file, monkeypatch):
    monkeypatch.delenv("ADVGUARD_GUARD_FERNET_KEY", raising=False)
    text = f"model:\n  path: {model_file}\nforensics:\n  mode: encrypted\n"
    with pytest.raises(InputError, match="ADVGUARD_GUARD_FERNET_KEY"):
        Guard.from_config(parse_config(text, "g", tmp_path))
    monkeypatch.setenv("ADVGUARD_GUARD_FERNET_KEY", "not-a-key-at-all")
    with pytest.raises(InputError) as e:
        Guard.from_config(parse_config(text, "g", tmp_path))
    assert "not-a-key-at-all" not in str(e.value)


DETECTOR_YAML = """\
model:
  name: digits
  path: {model}
fallback:
  path: {model}
detectors:
  - name: entropy
    path: entropy.det
    bands:
      - {{action: review}}
stateful:
  - name: knn
    action: block
    spec: {{kind: knn, k: 2, threshold: 0.05}}
"""


def test_saved_detector_and_stateful_knn_in_the_guard(tmp_path, model_file):
    """A detector calibrated and saved by advguard (JSON + safetensors) scores every row, its
    threshold is the review band; a client repeating one query is blocked by the stateful
    k-NN detector (Chen et al. 2020) while another client is not."""
    from sklearn.datasets import load_digits

    from advguard.defenses.detectors import calibrate_detector, load_detector, save_detector

    digits = load_digits()
    xs = (digits.images / 16.0).astype(np.float32)[:, None]
    clf = load_model(model_file)
    det, _ = calibrate_detector(clf, xs[:300], digits.target[:300], "entropy", fpr=0.2)
    save_detector(det, tmp_path / "entropy.det")
    cfg = parse_config(DETECTOR_YAML.format(model=model_file), "g", tmp_path)
    g = Guard.from_config(cfg)
    try:
        reference = load_detector(tmp_path / "entropy.det", clf)
        assert g.detectors[0].bands == [(pytest.approx(reference.threshold), "review")]
        c = TestClient(create_app(g))
        h1 = {"Authorization": f"Bearer {create_key(g.store, 'a').key}"}
        h2 = {"Authorization": f"Bearer {create_key(g.store, 'b').key}"}
        x = xs[300:340]
        body = c.post("/v1/models/digits/predict", json={"inputs": x.tolist()}, headers=h2)
        assert body.status_code == 200
        want = ["review" if s > reference.threshold else "allow" for s in reference.score(x)]
        assert body.json()["row_actions"] == want and "review" in want and "allow" in want
        codes = []
        for _ in range(4):  # the same image again and again: distance 0 to its neighbours
            r = c.post("/v1/models/digits/predict", json={"inputs": x[:1].tolist()}, headers=h1)
            codes.append(r.status_code)
        assert codes[:2] == [200, 200] and codes[-1] == 403, codes
        r = c.post("/v1/models/digits/predict", json={"inputs": x[5:6].tolist()}, headers=h2)
        assert r.status_code == 200  # the other client is not blocked
    finally:
        g.close()


@pytest.mark.slow
def test_serve_command_end_to_end(tmp_path, model_file):
    """``advguard guard serve`` in its own process on a free port; keys from the CLI."""
    cfgp = tmp_path / "guard.yaml"
    port = free_port()
    cfgp.write_text(f"model:\n  name: digits\n  path: {model_file.name}\nserver:\n  port: {port}\n")
    r = CliRunner().invoke(cli_app, ["guard", "keys", "create", "e2e", "-c", str(cfgp), "--json"])
    key = json.loads(r.output)["key"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from advguard.cli import main; main()",
            "guard",
            "serve",
            "-c",
            str(cfgp),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    import httpx

    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(1200):
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the guard did not become ready")
        assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
        res = httpx.post(
            f"{url}/v1/models/digits/predict",
            json={"inputs": _x().tolist()},
            headers={"Authorization": f"Bearer {key}"},
        )
        assert res.status_code == 200
        want = load_model(model_file).predict_proba(_x())
        np.testing.assert_allclose(res.json()["probabilities"], want, atol=1e-6)
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    assert key.split(".")[1] not in out.decode()


def test_serve_refuses_bad_setups(tmp_path, model_file):
    run = CliRunner().invoke
    r = run(cli_app, ["guard", "serve", "--model", str(model_file), "--workers", "2"])
    assert r.exit_code == 2 and "redis" in r.output.lower()
    r = run(cli_app, ["guard", "serve", "--model", str(tmp_path / "x.pkl")])
    assert r.exit_code == 2 and "pickle" in r.output
    r = run(cli_app, ["guard", "serve", "--model", str(model_file), "--model-name", "m"])
    assert r.exit_code == 2 and "not both" in r.output


def test_worker_processes_rebuild_the_same_guard(tmp_path, model_file, monkeypatch):
    """``--workers N`` hands the validated config to each worker through the environment."""
    from advguard.guard import server

    cfg = parse_config(
        f"model:\n  name: digits\n  path: {model_file.name}\nlimits:\n  burst: 7\n", "g", tmp_path
    )
    monkeypatch.setenv(server.CONFIG_ENV, server.dump_config(cfg))
    again = server.load_config_json(server.dump_config(cfg))
    assert again.model_dump() == cfg.model_dump() and again.base_dir == tmp_path
    app = server.app_from_env()
    guard = app.app.state.guard
    try:
        assert guard.cfg.limits.burst == 7 and guard.model.name == "digits"
        k = create_key(guard.store, "w").key
        r = TestClient(app).post(
            "/v1/models/digits/predict",
            json={"inputs": _x(1).tolist()},
            headers={"Authorization": f"Bearer {k}"},
        )
        assert r.status_code == 200
    finally:
        guard.close()
    cfg.server.workers = 2
    with pytest.raises(InputError, match="redis"):
        server.check_workers(cfg)
