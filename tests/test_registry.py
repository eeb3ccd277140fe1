"""Model registry: store round trip, tamper detection, crash safety, concurrency, stages,
audit chain, artifact scanning, CLI, and (when a PostgreSQL server binary is present) the
PostgreSQL backend."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from advguard.cli import app
from advguard.errors import InputError, UnsafeFileError
from advguard.models import TorchClassifier
from advguard.models.io import load_model, save_torch
from advguard.models.zoo import mlp
from advguard.registry.objects import CorruptObjectError, LocalObjectStore
from advguard.registry.scan import scan_file, scan_pickle_bytes
from advguard.registry.store import Registry

FACTORY = "advguard.models.zoo:mlp"
KWARGS = {"input_shape": [4], "num_classes": 3, "hidden": [8]}
REPO = Path(__file__).resolve().parents[1]


def _model_file(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    clf = TorchClassifier(mlp((4,), 3, hidden=(8,)), input_shape=(4,), num_classes=3)
    return save_torch(clf, path, factory=FACTORY, factory_kwargs=KWARGS)


def _report(path: Path, robust: float = 0.5) -> Path:
    rep = {
        "kind": "advguard.robustness-report",
        "threat_model": {"name": "linf-standard", "norm": "linf"},
        "clean_accuracy": 0.97,
        "results": [
            {"epsilon": 0.05, "robust_accuracy": 0.81, "fooling_rate": 0.165},
            {"epsilon": 0.1, "robust_accuracy": robust, "fooling_rate": 0.485},
        ],
        "verdict": {"status": "pass", "summary": "all SLOs hold"},
        "trustworthy": True,
        "sanity_checks": [{"id": "gradient-masking", "status": "pass"}],
    }
    path.write_text(json.dumps(rep))
    return path


@pytest.fixture()
def reg(tmp_path: Path):
    r = Registry(tmp_path / "reg", actor="alice")
    yield r
    r.close()


def _flip_byte(path: Path, offset: int = -1) -> None:
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


# -- round trip ---------------------------------------------------------------------
def test_push_pull_verify_signed_round_trip(reg: Registry, tmp_path: Path) -> None:
    from advguard.registry.signing import generate_keypair

    model = _model_file(tmp_path / "m.safetensors")
    priv, pub = generate_keypair(tmp_path / "keys")
    info = reg.push(
        "digits",
        model,
        reports=[_report(tmp_path / "report.json")],
        private_key=priv,
        data_hash="d" * 64,
        training_config={"epochs": 3},
    )
    assert (info.version, info.stage, info.format) == (1, "candidate", "safetensors+factory")
    assert info.input_spec["shape"] == [4] and info.input_spec["num_classes"] == 3
    assert info.input_spec["factory"] == FACTORY
    assert info.provenance["training_data_sha256"] == "d" * 64
    assert info.provenance["user"] == "alice"
    assert info.signature is not None and info.reports[0].attestation is not None

    res = reg.pull("digits:1", tmp_path / "out", public_key=pub)
    assert res.signature == "verified"
    pulled = tmp_path / "out" / "m.safetensors"
    assert pulled.read_bytes() == model.read_bytes()
    # the pulled model computes exactly what the pushed one does
    x = torch.rand(16, 4)
    a = load_model(model).logits(x)
    b = load_model(pulled).logits(x)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    card = (tmp_path / "out" / "MODEL_CARD.md").read_text()
    assert "| 0.1 | 50.0% | 48.5% |" in card and "Signature:** verified" in card
    assert "Clean accuracy:** 97.0%" in card and "d" * 64 in card

    check = reg.verify("digits", public_key=pub)
    assert check.ok and check.checked == 4 and check.signature == {"digits:1": "verified"}
    # wrong key: the signature check fails
    _, other_pub = generate_keypair(tmp_path / "other")
    bad = reg.verify("digits:1", public_key=other_pub)
    assert not bad.ok and bad.signature["digits:1"].startswith("FAILED")


def test_flipped_byte_in_artifact_is_caught(reg: Registry, tmp_path: Path) -> None:
    model = _model_file(tmp_path / "m.safetensors")
    info = reg.push("digits", model)
    store = reg.objects
    assert isinstance(store, LocalObjectStore)
    _flip_byte(store.path(info.artifacts["m.safetensors"]["sha256"]))
    with pytest.raises(CorruptObjectError, match=r"m\.safetensors is corrupted"):
        reg.pull("digits", tmp_path / "out")
    assert not (tmp_path / "out" / "m.safetensors").exists()  # nothing half-pulled
    res = reg.verify("digits")
    assert not res.ok and len(res.problems) == 1 and "m.safetensors" in res.problems[0]
    cli = CliRunner().invoke(app, ["registry", "verify", "digits", "--root", str(reg.root)])
    assert cli.exit_code == 1 and "m.safetensors" in cli.output


def test_flipped_byte_in_report_is_caught(reg: Registry, tmp_path: Path) -> None:
    info = reg.push(
        "digits", _model_file(tmp_path / "m.safetensors"), reports=[_report(tmp_path / "r.json")]
    )
    _flip_byte(reg.objects.path(info.reports[0].digest), offset=40)  # type: ignore[attr-defined]
    with pytest.raises(CorruptObjectError, match="report linf-standard is corrupted"):
        reg.pull("digits:1", tmp_path / "out")
    res = reg.verify("digits:1")
    assert not res.ok and "report linf-standard" in res.problems[0]


def test_signature_catches_swapped_object_and_db_row(reg: Registry, tmp_path: Path) -> None:
    """An attacker who replaces the weights *and* rewrites the digest in the database
    passes the hash check but not the signature."""
    from advguard.registry.signing import SignatureError, generate_keypair

    priv, pub = generate_keypair(tmp_path / "keys")
    reg.push("digits", _model_file(tmp_path / "m.safetensors"), private_key=priv)
    evil = _model_file(tmp_path / "evil" / "m.safetensors", seed=1)
    digest, size = reg.objects.put_file(evil)
    con = sqlite3.connect(reg.root / "registry.db")
    arts = {"m.safetensors": {"sha256": digest, "size": size, "format": "safetensors"}}
    con.execute("UPDATE versions SET artifacts = ?", (json.dumps(arts),))
    con.commit()
    con.close()
    reg.pull("digits:1", tmp_path / "nokey")  # hashes alone cannot tell
    with pytest.raises(SignatureError, match=r"m\.safetensors"):
        reg.pull("digits:1", tmp_path / "out", public_key=pub)


# -- crash safety and concurrency ---------------------------------------------------
_CHILD = """
import os, sys, time
from pathlib import Path
from advguard.registry import store
root, model, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
db_url = sys.argv[4] if len(sys.argv) > 4 else None
if mode == "crash":
    def die(*a, **k):
        os._exit(1)  # killed after the objects are written, inside the DB transaction
    store._append_audit = die
reg = store.Registry(root, db_url=db_url, actor="proc%d" % os.getpid())
if mode == "race":
    while not (root / "go").exists():
        time.sleep(0.005)
    for _ in range(3):
        print(reg.push("digits", model).version, flush=True)
else:
    reg.push("digits", model)
"""


def _child(root: Path, model: Path, mode: str, db_url: str | None = None) -> subprocess.Popen:
    args = [sys.executable, "-c", _CHILD, str(root), str(model), mode]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.Popen(
        [*args, *([db_url] if db_url else [])],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def test_killed_push_leaves_store_consistent(reg: Registry, tmp_path: Path) -> None:
    model = _model_file(tmp_path / "m.safetensors")
    proc = _child(reg.root, model, "crash")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    store = reg.objects
    assert isinstance(store, LocalObjectStore)
    assert store.exists(_sha(model))  # the object was written: an orphan, harmless
    assert reg.list_models() == []  # no partial version, not even the model row
    assert reg.verify_audit().entries == 0
    info = reg.push("digits", model)
    assert info.version == 1
    assert reg.verify_audit().ok and reg.verify("digits").ok


def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _race(root: Path, model: Path, db_url: str | None = None) -> list[int]:
    procs = [_child(root, model, "race", db_url) for _ in range(2)]
    time.sleep(1.0)
    (root / "go").touch()
    numbers: list[int] = []
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err
        numbers += [int(n) for n in out.split()]
    return numbers


def test_concurrent_pushes_get_distinct_versions(reg: Registry, tmp_path: Path) -> None:
    model = _model_file(tmp_path / "m.safetensors")
    numbers = _race(reg.root, model)
    assert sorted(numbers) == [1, 2, 3, 4, 5, 6]
    assert [v.version for v in reg.versions("digits")] == [1, 2, 3, 4, 5, 6]
    check = reg.verify_audit()
    assert check.ok and check.entries == 6


# -- stages and audit ----------------------------------------------------------------
def _promote_rollback_history(reg: Registry, model: Path) -> None:
    for _ in range(3):
        reg.push("digits", model)
    for v in (1, 2, 3):
        assert reg.promote("digits", v, "production").stage == "production"
    stages = {v.version: v.stage for v in reg.versions("digits")}
    assert stages == {1: "archived", 2: "archived", 3: "production"}
    assert reg.rollback("digits").version == 2
    assert reg.get("digits@production").version == 2
    assert reg.get("digits:3").stage == "archived"
    assert reg.rollback("digits").version == 1  # walks further back, does not toggle
    with pytest.raises(InputError, match="no earlier production version"):
        reg.rollback("digits")
    hist = reg.history("digits")
    assert [(e.version, e.to_stage) for e in hist[-4:]] == [
        (3, "archived"),
        (2, "production"),
        (2, "archived"),
        (1, "production"),
    ]
    assert all(e.actor == reg.actor and e.ts for e in hist)
    actions = [e.action for e in reg.audit_log()]
    assert actions == ["push"] * 3 + ["promote"] * 3 + ["rollback"] * 2
    assert reg.verify_audit().ok


def test_promote_and_rollback_history(reg: Registry, tmp_path: Path) -> None:
    _promote_rollback_history(reg, _model_file(tmp_path / "m.safetensors"))
    with pytest.raises(InputError, match="already in stage production"):
        reg.promote("digits", 1, "production")
    with pytest.raises(InputError, match="unknown stage"):
        reg.promote("digits", 1, "prod")


def test_audit_chain_tamper_is_detected(reg: Registry, tmp_path: Path) -> None:
    model = _model_file(tmp_path / "m.safetensors")
    reg.push("digits", model)
    reg.push("digits", model)
    reg.promote("digits", 2, "production")
    assert reg.verify_audit().ok and reg.verify_audit().entries == 3
    con = sqlite3.connect(reg.root / "registry.db")
    con.execute("UPDATE audit SET actor = 'mallory' WHERE seq = 2")
    con.commit()
    check = reg.verify_audit()
    assert not check.ok and check.broken_seq == 2 and "entry 2" in (check.reason or "")
    cli = CliRunner().invoke(app, ["registry", "audit", "--verify", "--root", str(reg.root)])
    assert cli.exit_code == 1 and "entry 2" in cli.output
    con.execute("UPDATE audit SET actor = 'alice' WHERE seq = 2")  # restore, then delete one
    con.commit()
    assert reg.verify_audit().ok
    con.execute("DELETE FROM audit WHERE seq = 2")
    con.commit()
    con.close()
    check = reg.verify_audit()
    assert not check.ok and check.broken_seq == 3


# -- scanning ------------------------------------------------------------------------
class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"echo pwned > {self.marker}",))


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("suffix", [".pkl", ".safetensors"])
def test_malicious_pickle_is_refused_without_loading(
    reg: Registry, tmp_path: Path, protocol: int, suffix: str
) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / f"evil{suffix}"
    evil.write_bytes(pickle.dumps(_Evil(marker), protocol=protocol))
    with pytest.raises(UnsafeFileError, match="safetensors"):
        reg.push("evil", evil)
    with pytest.raises(UnsafeFileError, match=r"posix\.system|os\.system"):
        reg.push("evil", evil, allow_pickle=True)
    assert not marker.exists()
    assert reg.list_models() == []
    cli = CliRunner().invoke(
        app, ["registry", "push", "evil", "--model", str(evil), "--root", str(reg.root)]
    )
    assert cli.exit_code == 2 and "pickle" in cli.output
    assert not marker.exists()


def test_torch_save_state_dict_needs_allow_pickle(reg: Registry, tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    torch.save(mlp((4,), 3, hidden=(8,)).state_dict(), path)
    with pytest.raises(UnsafeFileError, match=r"torch\.save archive"):
        reg.push("plain", path)
    info = reg.push("plain", path, allow_pickle=True, factory=FACTORY)
    assert info.format == "torch-zip"
    assert "torch._utils._rebuild_tensor_v2" in info.scan[0]["globals"]
    # opcode scanner: an unresolvable STACK_GLOBAL and a disallowed builtin are refused
    with pytest.raises(UnsafeFileError, match=r"builtins\.eval"):
        scan_pickle_bytes(pickle.dumps(eval, protocol=4), "x")
    assert scan_pickle_bytes(pickle.dumps([1, "a", 2.0]), "x") == []


def test_safetensors_and_onnx_validation(tmp_path: Path) -> None:
    good = _model_file(tmp_path / "m.safetensors")
    assert scan_file(good).format == "safetensors"
    data = good.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    key = next(k for k in header if k != "__metadata__")
    header[key]["data_offsets"][1] += 10**6  # points past the end of the file
    blob = json.dumps(header).encode()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(len(blob).to_bytes(8, "little") + blob + data[8 + n :])
    with pytest.raises(InputError, match="outside"):
        scan_file(bad)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x08\x07garbage that is not protobuf \xff\xff")
    with pytest.raises(InputError, match="not a valid ONNX model"):
        scan_file(junk)


# -- CLI -----------------------------------------------------------------------------
def test_cli_push_list_show_pull_promote_rollback(tmp_path: Path) -> None:
    runner = CliRunner()
    root = ["--root", str(tmp_path / "reg")]
    model = _model_file(tmp_path / "m.safetensors")
    rep = _report(tmp_path / "r.json")
    keys = runner.invoke(app, ["registry", "keygen", "--out", str(tmp_path / "k"), "--json"])
    assert keys.exit_code == 0, keys.output
    key = ["--key", str(tmp_path / "k" / "private.pem"), "--json", *root]
    for _ in range(2):
        res = runner.invoke(
            app,
            ["registry", "push", "digits", "--model", str(model), "--report", str(rep), *key],
        )
        assert res.exit_code == 0, res.output
    assert json.loads(res.output)["version"] == 2
    res = runner.invoke(app, ["registry", "list", "--json", *root])
    assert json.loads(res.output)[0]["latest"] == 2
    for v in ("1", "2"):
        assert runner.invoke(app, ["registry", "promote", "digits", v, *root]).exit_code == 0
    res = runner.invoke(app, ["registry", "rollback", "digits", "--json", *root])
    assert res.exit_code == 0 and json.loads(res.output)["version"] == 1
    res = runner.invoke(app, ["registry", "show", "digits@production", *root])
    assert "Model card: digits v1" in res.output and "50.0%" in res.output
    pub = ["--public-key", str(tmp_path / "k" / "public.pem"), "--json"]
    res = runner.invoke(
        app,
        ["registry", "pull", "digits:2", "--out", str(tmp_path / "o"), *root, *pub],
    )
    assert res.exit_code == 0 and json.loads(res.output)["signature"] == "verified"
    res = runner.invoke(app, ["registry", "audit", "--json", *root])
    assert [e["action"] for e in json.loads(res.output)] == ["push"] * 2 + ["promote"] * 2 + [
        "rollback"
    ]
    res = runner.invoke(app, ["registry", "pull", "nope", "--out", str(tmp_path / "x"), *root])
    assert res.exit_code == 2 and "no model named 'nope'" in res.output


# -- PostgreSQL ----------------------------------------------------------------------
def _pg_bin() -> Path | None:
    for d in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (d / "initdb").exists() and (d / "pg_ctl").exists():
            return d
    found = shutil.which("pg_ctl")
    return Path(found).parent if found and shutil.which("initdb") else None


@pytest.fixture()
def pg_url():
    pytest.importorskip("psycopg")
    bindir = _pg_bin()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not installed")
    prefix: list[str] = []
    if os.geteuid() == 0:
        runuser = shutil.which("runuser")
        try:
            import pwd

            pg = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the server")
        if runuser is None:
            pytest.skip("running as root without runuser to drop to the 'postgres' user")
        prefix = [runuser, "-u", "postgres", "--"]
    base = Path(tempfile.mkdtemp(prefix="advguard-pg-"))
    if prefix:
        os.chown(base, pg.pw_uid, pg.pw_gid)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = base / "data"
    run = lambda *a: subprocess.run([*prefix, *a], capture_output=True, text=True, timeout=120)  # noqa: E731
    r = run(str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
    if r.returncode != 0:
        shutil.rmtree(base, ignore_errors=True)
        pytest.skip(f"initdb failed: {r.stderr.strip()[:200]}")
    opts = f"-p {port} -k {base} -h 127.0.0.1 -c fsync=off"
    r = run(
        str(bindir / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(base / "log"), "-w", "start"
    )
    if r.returncode != 0:
        shutil.rmtree(base, ignore_errors=True)
        pytest.skip(f"pg_ctl start failed: {r.stderr.strip()[:200]}")
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(base, ignore_errors=True)


def test_postgresql_backend(pg_url: str, tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg", db_url=pg_url, actor="alice")
    try:
        assert reg.engine.dialect.name == "postgresql"
        model = _model_file(tmp_path / "m.safetensors")
        _promote_rollback_history(reg, model)
        numbers = _race(reg.root, model, pg_url)  # two processes against one server
        assert sorted(numbers) == [4, 5, 6, 7, 8, 9]
        assert reg.verify_audit().ok and reg.verify_audit().entries == 8 + 6
        assert reg.verify("digits").ok
    finally:
        reg.close()
