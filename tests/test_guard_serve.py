"""The guard built from its YAML: models from files and the registry, detector hook points,
and ``advguard guard serve`` as a real process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import types
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
from guard_helpers import CountingStateful, MeanDetector, free_port

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
        reg.promote("digits", 1)
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
  - name: mean
    path: mean.det
    bands:
      - {{action: review}}
      - {{min: 0.9, action: reject}}
stateful:
  - name: count
    action: block
    spec: {{kind: count, limit: 4}}
"""


def test_detector_hooks_use_the_modules_when_present(tmp_path, model_file, monkeypatch):
    cfg = parse_config(DETECTOR_YAML.format(model=model_file), "g", tmp_path)
    # without the persistence / stateful modules: a clear error, not a silent guard without them
    monkeypatch.setitem(sys.modules, "advguard.guard.stateful", None)
    import advguard.defenses.detectors as dets

    if not hasattr(dets, "load_detector"):
        with pytest.raises(InputError, match="load_detector"):
            Guard.from_config(cfg)

    loaded: list[Path] = []

    def load_detector(path):
        loaded.append(Path(path))
        return MeanDetector()

    specs: list[dict] = []

    def build_stateful(spec):
        specs.append(spec)
        return CountingStateful(spec["limit"])

    monkeypatch.setattr(dets, "load_detector", load_detector, raising=False)
    with pytest.raises(InputError, match=r"advguard\.guard\.stateful"):
        Guard.from_config(cfg)
    fake = types.ModuleType("advguard.guard.stateful")
    fake.build_stateful = build_stateful  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "advguard.guard.stateful", fake)
    g = Guard.from_config(cfg)
    try:
        assert loaded[-1] == tmp_path / "mean.det" and specs == [{"kind": "count", "limit": 4}]
        assert g.detectors[0].bands == [(0.5, "review"), (0.9, "reject")]
        k = create_key(g.store, "a").key
        c = TestClient(create_app(g))
        h = {"Authorization": f"Bearer {k}"}
        x = np.full((2, 1, 8, 8), 0.2, np.float32)
        x[1] = 0.7
        b = c.post("/v1/models/digits/predict", json={"inputs": x.tolist()}, headers=h).json()
        assert b["row_actions"] == ["allow", "review"]
        r = c.post("/v1/models/digits/predict", json={"inputs": x.tolist()}, headers=h)
        assert r.status_code == 200  # 4 rows seen, not above the limit of 4
        r = c.post("/v1/models/digits/predict", json={"inputs": x.tolist()}, headers=h)
        assert r.status_code == 403 and r.json()["type"].endswith("client-blocked")
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
