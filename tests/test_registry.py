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
from dataclasses import dataclass
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
from advguard.registry.promotion import PromotionRefusedError, PromotionRules
from advguard.registry.scan import scan_file, scan_pickle_bytes
from advguard.registry.store import GENESIS_HASH, Registry, audit_hash, canonical_json

FACTORY = "advguard.models.zoo:mlp"
KWARGS = {"input_shape": [4], "num_classes": 3, "hidden": [8]}
REPO = Path(__file__).resolve().parents[1]


def _model_file(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    clf = TorchClassifier(mlp((4,), 3, hidden=(8,)), input_shape=(4,), num_classes=3)
    return save_torch(clf, path, factory=FACTORY, factory_kwargs=KWARGS)


DIGITS_FACTORY = "advguard.models.zoo:mlp"
DIGITS_KWARGS = {"input_shape": [1, 8, 8], "num_classes": 10, "hidden": [32]}


@dataclass(frozen=True)
class Evaluated:
    """A tiny digits model and the report ``advguard evaluate`` wrote about it."""

    model: Path
    report: Path
    data: dict


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory) -> Evaluated:
    """A real report: an MLP trained briefly on sklearn digits, evaluated by the CLI with the
    ``quick`` preset on 40 samples (written once per module)."""
    from advguard.data import load_builtin
    from advguard.models.fit import fit

    d = tmp_path_factory.mktemp("evaluated")
    train, _ = load_builtin("digits").split(test_size=397, seed=0)
    torch.manual_seed(0)
    module = fit(mlp((1, 8, 8), 10, hidden=(32,)), train.x, train.y, epochs=5, seed=0)
    clf = TorchClassifier(module, input_shape=(1, 8, 8), num_classes=10, bounds=(0.0, 1.0))
    model = save_torch(
        clf,
        d / "digits.safetensors",
        factory=DIGITS_FACTORY,
        factory_kwargs=DIGITS_KWARGS,
        input_shape=(1, 8, 8),
        num_classes=10,
        bounds=(0.0, 1.0),
    )
    out = d / "report"
    args = ["evaluate", "--model", str(model), "--data", "digits", "-t", "quick"]
    res = CliRunner().invoke(app, [*args, "--samples", "40", "--out", str(out)])
    assert res.exit_code == 0, res.output
    report = out / "report.json"
    return Evaluated(model, report, json.loads(report.read_text()))


def _flat_report(path: Path) -> Path:
    """The hand-made flat report the registry tests used to use: not a valid report."""
    rep = {
        "schema_version": "1.0",
        "kind": "advguard.robustness-report",
        "threat_model": {"name": "linf-standard", "norm": "linf"},
        "clean_accuracy": 0.97,
        "results": [{"epsilon": 0.1, "robust_accuracy": 0.5, "fooling_rate": 0.485}],
        "verdict": {"status": "pass", "summary": "all SLOs hold"},
        "trustworthy": True,
        "sanity_checks": [],
    }
    path.write_text(json.dumps(rep))
    return path


def _flat(output: str) -> str:
    """CLI output with rich's line wrapping undone (it wraps at the terminal width)."""
    return " ".join(output.split())


def _forge(reg: Registry, sql: str, params: tuple = ()) -> None:
    con = sqlite3.connect(reg.root / "registry.db")
    con.execute(sql, params)
    con.commit()
    con.close()


def _rehash_audit(reg: Registry, edit) -> None:
    """What an attacker with write access to the database can do: edit audit entries with
    ``edit(seq, details) -> details`` and recompute the whole hash chain."""
    con = sqlite3.connect(reg.root / "registry.db")
    rows = con.execute(
        "SELECT seq, ts, actor, action, subject, details FROM audit ORDER BY seq"
    ).fetchall()
    prev = GENESIS_HASH
    for seq, ts, actor, action, subject, details in rows:
        d = edit(seq, json.loads(details))
        entry = {"seq": seq, "ts": ts, "actor": actor, "action": action, "subject": subject}
        h = audit_hash({**entry, "details": d}, prev)
        con.execute(
            "UPDATE audit SET details = ?, prev_hash = ?, hash = ? WHERE seq = ?",
            (canonical_json(d), prev, h, seq),
        )
        prev = h
    con.commit()
    con.close()


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
def test_push_pull_verify_signed_round_trip(
    reg: Registry, tmp_path: Path, evaluated: Evaluated
) -> None:
    from advguard.registry.signing import generate_keypair

    model = evaluated.model
    priv, pub = generate_keypair(tmp_path / "keys")
    info = reg.push(
        "digits",
        model,
        reports=[evaluated.report],
        private_key=priv,
        data_hash="d" * 64,
        training_config={"epochs": 3},
    )
    assert (info.version, info.stage, info.format) == (1, "candidate", "safetensors+factory")
    assert info.input_spec["shape"] == [1, 8, 8] and info.input_spec["num_classes"] == 10
    assert info.input_spec["factory"] == DIGITS_FACTORY
    assert info.provenance["training_data_sha256"] == "d" * 64
    assert info.provenance["user"] == "alice"
    assert info.signature is not None and info.reports[0].attestation is not None
    assert info.reports[0].threat_model == "quick"

    res = reg.pull("digits:1", tmp_path / "out", public_key=pub)
    assert res.signature == "verified"
    pulled = tmp_path / "out" / "digits.safetensors"
    assert pulled.read_bytes() == model.read_bytes()
    # the pulled model computes exactly what the pushed one does
    x = torch.rand(16, 1, 8, 8)
    a = load_model(model).logits(x)
    b = load_model(pulled).logits(x)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    card = (tmp_path / "out" / "MODEL_CARD.md").read_text()
    assert "Signature:** verified" in card and "d" * 64 in card

    check = reg.verify("digits", public_key=pub)
    assert check.ok and check.checked == 4 and check.signature == {"digits:1": "verified"}
    # wrong key: the signature check fails
    _, other_pub = generate_keypair(tmp_path / "other")
    bad = reg.verify("digits:1", public_key=other_pub)
    assert not bad.ok and bad.signature["digits:1"].startswith("FAILED")


def test_model_card_shows_the_numbers_of_a_real_report(
    reg: Registry, tmp_path: Path, evaluated: Evaluated
) -> None:
    """Reports hold proportions {k, n, value, ci_low, ci_high}; the card showed "n/a"."""
    reg.push("digits", evaluated.model, reports=[evaluated.report])
    _, card = reg.model_card("digits")
    rep = evaluated.data
    clean = rep["clean_accuracy"]
    want = (
        f"{100 * clean['value']:.1f}% [{100 * clean['ci_low']:.1f}%, "
        f"{100 * clean['ci_high']:.1f}%] ({clean['k']}/{clean['n']})"
    )
    assert f"- **Clean accuracy:** {want}" in card
    assert "- **Evaluated model:** this model" in card
    for r in rep["results"]:
        ra, fr = r["robust_accuracy"], r["fooling_rate"]
        row = (
            f"| {r['epsilon']} | {100 * ra['value']:.1f}% [{100 * ra['ci_low']:.1f}%, "
            f"{100 * ra['ci_high']:.1f}%] ({ra['k']}/{ra['n']}) | {100 * fr['value']:.1f}% "
        )
        assert row in card, card
    assert "n/a" not in card.split("## Robustness")[1]
    out = CliRunner().invoke(app, ["registry", "show", "digits", "--root", str(reg.root)])
    assert out.exit_code == 0 and want in out.output


def test_push_refuses_a_report_about_another_model(
    reg: Registry, tmp_path: Path, evaluated: Evaluated
) -> None:
    other = _model_file(tmp_path / "other.safetensors")
    with pytest.raises(InputError, match="about another model") as err:
        reg.push("digits", other, reports=[evaluated.report])
    assert evaluated.data["model"]["sha256"] in str(err.value)
    assert _sha(other) in str(err.value)
    assert reg.list_models() == [] and not list(reg.objects.digests())  # nothing stored
    # the hand-made flat report does not match the report schema
    with pytest.raises(InputError, match="does not match schema"):
        reg.push("digits", evaluated.model, reports=[_flat_report(tmp_path / "flat.json")])
    # a report that records no model digest cannot be bound to the model
    data = dict(
        evaluated.data, model={k: v for k, v in evaluated.data["model"].items() if k != "sha256"}
    )
    nodigest = tmp_path / "nodigest.json"
    nodigest.write_text(json.dumps(data))
    with pytest.raises(InputError, match="does not record the sha256"):
        reg.push("digits", evaluated.model, reports=[nodigest])
    args = ["registry", "push", "digits", "--model", str(other), "--report", str(evaluated.report)]
    cli = CliRunner().invoke(app, [*args, "--root", str(reg.root)])
    assert cli.exit_code == 2 and "about another model" in _flat(cli.output)
    assert "Traceback" not in (cli.output)


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
    assert cli.exit_code == 1 and "m.safetensors" in _flat(cli.output)


def test_flipped_byte_in_report_is_caught(
    reg: Registry, tmp_path: Path, evaluated: Evaluated
) -> None:
    info = reg.push("digits", evaluated.model, reports=[evaluated.report])
    _flip_byte(reg.objects.path(info.reports[0].digest), offset=40)  # type: ignore[attr-defined]
    with pytest.raises(CorruptObjectError, match="report quick is corrupted"):
        reg.pull("digits:1", tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing left behind, not even the folder
    res = reg.verify("digits:1")
    assert not res.ok and "report quick" in res.problems[0]
    cli = CliRunner().invoke(app, ["registry", "show", "digits:1", "--root", str(reg.root)])
    assert cli.exit_code == 2 and "report quick is corrupted" in _flat(cli.output)


def test_signature_catches_swapped_object_and_db_row(reg: Registry, tmp_path: Path) -> None:
    """An attacker who replaces the weights and rewrites the digest in the database is caught
    by the audit log; one who also rewrites (and re-hashes) the audit log passes the hash
    checks but not the signature."""
    from advguard.registry.signing import SignatureError, generate_keypair

    priv, pub = generate_keypair(tmp_path / "keys")
    reg.push("digits", _model_file(tmp_path / "m.safetensors"), private_key=priv)
    evil = _model_file(tmp_path / "evil" / "m.safetensors", seed=1)
    digest, size = reg.objects.put_file(evil)
    arts = {"m.safetensors": {"sha256": digest, "size": size, "format": "safetensors"}}
    _forge(reg, "UPDATE versions SET artifacts = ?, model_digest = ?", (json.dumps(arts), digest))
    with pytest.raises(InputError, match="differs from the one recorded at push"):
        reg.pull("digits:1", tmp_path / "audit")
    assert not reg.verify_audit().ok
    _rehash_audit(
        reg, lambda seq, d: {**d, "model_digest": digest, "artifacts": {"m.safetensors": digest}}
    )
    assert reg.verify_audit().ok
    reg.pull("digits:1", tmp_path / "nokey")  # hashes and log alone cannot tell
    with pytest.raises(SignatureError, match=r"m\.safetensors"):
        reg.pull("digits:1", tmp_path / "out", public_key=pub)
    assert not (tmp_path / "out").exists()  # nothing left behind when the signature fails
    out = tmp_path / "existing"
    out.mkdir()
    with pytest.raises(SignatureError):
        reg.pull("digits:1", out, public_key=pub)
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("bad_name", ["ABS", "../../escaped", "sub/../../../escaped", "a\\b"])
def test_pull_refuses_file_names_from_the_database(
    reg: Registry, tmp_path: Path, bad_name: str
) -> None:
    """A file name stored in the database must not take the pull outside --out."""
    info = reg.push("digits", _model_file(tmp_path / "m.safetensors"))
    target = tmp_path / "victim" / "escaped"
    name = str(target) if bad_name == "ABS" else bad_name
    art = dict(info.artifacts["m.safetensors"])
    _forge(reg, "UPDATE versions SET artifacts = ?", (json.dumps({name: art}),))
    out = tmp_path / "deep" / "er" / "out"
    with pytest.raises(InputError, match="artifact name"):
        reg.pull("digits:1", out)
    assert not target.exists() and not (tmp_path / "escaped").exists()
    assert not (tmp_path / "deep" / "escaped").exists() and not out.exists()
    cli = CliRunner().invoke(
        app, ["registry", "pull", "digits:1", "--out", str(out), "--root", str(reg.root)]
    )
    assert (
        cli.exit_code == 2
        and "artifact name" in _flat(cli.output)
        and "Traceback" not in (cli.output)
    )
    assert not target.exists() and not out.exists()


@pytest.mark.parametrize(
    "name",
    [
        *("/etc/x", "../x", "a/../../x", "a//b", "./a", "a\\b", "C:x", "a\nb"),
        *("MODEL_CARD.md", "version.json", "reports/01-x.json", "x" * 256, "/".join("a" * 17)),
    ],
)
def test_push_refuses_unsafe_artifact_names(reg: Registry, tmp_path: Path, name: str) -> None:
    model = _model_file(tmp_path / "m.safetensors")
    with pytest.raises(InputError, match="artifact name"):
        reg.push("digits", {name: model})
    assert reg.list_models() == []


def test_bounded_json_loads_refuses_before_parsing() -> None:
    from advguard.registry.db import MAX_JSON_DEPTH, bounded_json_loads

    ok = "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH
    assert bounded_json_loads(ok) is not None
    with pytest.raises(InputError, match="nested 33 levels"):
        bounded_json_loads("[" * 33 + "]" * 33)
    # brackets inside strings do not count, escaped quotes do not end a string
    assert bounded_json_loads(json.dumps({"k": "[[[[" * 50 + '\\"{{'})) == {
        "k": "[[[[" * 50 + '\\"{{'
    }
    with pytest.raises(InputError, match="characters"):
        bounded_json_loads('"' + "a" * (1 << 20) + '"')
    with pytest.raises(InputError, match="not valid JSON"):
        bounded_json_loads("{")


@pytest.mark.parametrize(
    ("column", "value", "match"),
    [
        ("model_digest", "'not-a-digest'", "model_digest"),
        ("stage", "'prod'", "stage"),
        ("version", "-3", "version"),
        ("format", "'../x'", "format"),
        ("signature_path", "'objects/../../etc/passwd'", "signature_path"),
        ("artifacts", """'{"m.safetensors": {"sha256": "%s", "size": -1}}'""", "size"),
        ("artifacts", """'{"m.safetensors": {"sha256": "%s", "size": 1e400}}'""", "size"),
        ("input_spec", "'" + "[" * 5000 + "]" * 5000 + "'", "nested"),
        ("provenance", "'[1, 2]'", "provenance"),
        ("created_at", "'yesterday'", "cannot read"),
    ],
)
def test_database_values_are_validated_on_read(
    reg: Registry, tmp_path: Path, column: str, value: str, match: str
) -> None:
    info = reg.push("digits", _model_file(tmp_path / "m.safetensors"))
    if "%s" in value:
        value = value % info.model_digest
    _forge(reg, f"UPDATE versions SET {column} = {value}")
    with pytest.raises(InputError, match=match):
        reg.versions("digits")[0].artifacts  # noqa: B018
    cli = CliRunner().invoke(app, ["registry", "show", "digits", "--root", str(reg.root)])
    assert cli.exit_code == 2 and "Traceback" not in (cli.output), cli.output
    assert cli.output.count("error:") == 1


# -- crash safety and concurrency ---------------------------------------------------
_CHILD = """
import os, sys, time
from pathlib import Path
from advguard.registry import audit, store
root, model, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
db_url = sys.argv[4] if len(sys.argv) > 4 else None
if mode == "crash":
    def die(*a, **k):
        os._exit(1)  # killed after the objects are written, inside the DB transaction
    audit.append_entry = die
if mode == "midwrite":
    from advguard.registry import objects
    real_write = objects.atomic_write
    def killed_write(dest, chunks):
        def first_kb():
            yield next(iter(chunks))[:1000]
            os._exit(1)  # killed while the object's temporary file is half written
        return real_write(dest, first_kb())
    objects.atomic_write = killed_write
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
    for v in (1, 2, 3):  # no signature or report: the promotion policy is overridden
        assert reg.promote("digits", v, "production", force=True, reason="t").stage == "production"
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
    reg.promote("digits", 2, "canary")
    assert reg.verify_audit().ok and reg.verify_audit().entries == 3
    con = sqlite3.connect(reg.root / "registry.db")
    con.execute("UPDATE audit SET actor = 'mallory' WHERE seq = 2")
    con.commit()
    check = reg.verify_audit()
    assert not check.ok and check.broken_seq == 2 and "entry 2" in (check.reason or "")
    cli = CliRunner().invoke(app, ["registry", "audit", "--verify", "--root", str(reg.root)])
    assert cli.exit_code == 1 and "entry 2" in _flat(cli.output)
    con.execute("UPDATE audit SET actor = 'alice' WHERE seq = 2")  # restore, then delete one
    con.commit()
    assert reg.verify_audit().ok
    con.execute("DELETE FROM audit WHERE seq = 2")
    con.commit()
    con.close()
    check = reg.verify_audit()
    assert not check.ok and check.broken_seq == 3


def test_stage_changed_in_the_database_is_detected(reg: Registry, tmp_path: Path) -> None:
    """Moving production back to version 1 directly in the database: the audit chain is
    intact, but the stages no longer match what the log says."""
    model = _model_file(tmp_path / "m.safetensors")
    reg.push("digits", model)
    reg.push("digits", model)
    reg.promote("digits", 1, "production", force=True, reason="first release")
    reg.promote("digits", 2, "production", force=True, reason="second release")
    assert reg.verify_audit().ok and reg.verify("digits").ok
    _forge(reg, "UPDATE versions SET stage = 'production' WHERE version = 1")
    _forge(reg, "UPDATE versions SET stage = 'archived' WHERE version = 2")
    assert reg.get("digits@production").version == 1  # what a deployment would now pull
    check = reg.verify_audit()
    assert not check.ok and check.broken_seq is None
    assert any("digits:1 is in stage production" in p for p in check.state_problems)
    assert any("digits:2 is in stage archived" in p for p in check.state_problems)
    res = reg.verify("digits")
    assert not res.ok and any("audit log says archived" in p for p in res.problems)
    with pytest.raises(InputError, match="audit log says archived"):
        reg.pull("digits@production", tmp_path / "out")
    runner, root = CliRunner(), ["--root", str(reg.root)]
    cli = runner.invoke(app, ["registry", "audit", "--verify", *root])
    assert cli.exit_code == 1 and "digits:1 is in stage production" in _flat(cli.output)
    cli = runner.invoke(app, ["registry", "verify", "digits", *root])
    assert cli.exit_code == 1 and "audit log says" in _flat(cli.output)
    cli = runner.invoke(app, ["registry", "show", "digits@production", *root])
    assert cli.exit_code == 2 and "audit log says archived" in _flat(cli.output)
    # a row deleted from the database is reported too
    _forge(reg, "UPDATE versions SET stage = 'archived' WHERE version = 1")
    _forge(reg, "UPDATE versions SET stage = 'production' WHERE version = 2")
    assert reg.verify_audit().ok
    _forge(reg, "DELETE FROM stage_events WHERE version_id = 2")
    _forge(reg, "DELETE FROM versions WHERE version = 2")
    check = reg.verify_audit()
    assert not check.ok and "digits:2 is in the audit log but missing" in check.state_problems[0]


# -- promotion policy ------------------------------------------------------------------
PASSING = "name: release\nslos:\n  - clean_accuracy >= 0.5\n"
FAILING = "name: strict\nslos:\n  - robust_accuracy >= 0.99 at eps 0.1\n"


def _policy(tmp_path: Path, text: str):
    from advguard.registry.policy import load_policy

    p = tmp_path / f"policy-{abs(hash(text))}.yaml"
    p.write_text(text)
    return load_policy(p)


def test_promotion_policy_guards_production(
    reg: Registry, tmp_path: Path, evaluated: Evaluated
) -> None:
    from advguard.registry.signing import generate_keypair

    priv, pub = generate_keypair(tmp_path / "keys")
    unsigned = reg.push("digits", evaluated.model, reports=[evaluated.report])  # v1
    no_report = reg.push("digits", evaluated.model, private_key=priv)  # v2
    good = reg.push("digits", evaluated.model, reports=[evaluated.report], private_key=priv)
    passing, failing = _policy(tmp_path, PASSING), _policy(tmp_path, FAILING)

    with pytest.raises(PromotionRefusedError, match="not signed") as err:
        reg.promote("digits", unsigned.version, public_key=pub, gate_policy=passing)
    assert [c.name for c in err.value.failed] == ["signature"]
    with pytest.raises(PromotionRefusedError, match="no robustness report") as err:
        reg.promote("digits", no_report.version, public_key=pub, gate_policy=passing)
    assert {c.name for c in err.value.failed} == {"report", "gate"}
    with pytest.raises(PromotionRefusedError, match="no public key"):
        reg.promote("digits", good.version, gate_policy=passing)
    _, other_pub = generate_keypair(tmp_path / "other")
    with pytest.raises(PromotionRefusedError, match="signature"):
        reg.promote("digits", good.version, public_key=other_pub, gate_policy=passing)
    with pytest.raises(PromotionRefusedError, match=r"gate strict failed.*robust_accuracy"):
        reg.promote("digits", good.version, public_key=pub, gate_policy=failing)
    assert reg.list_models()[0]["production"] is None  # nothing was promoted
    assert [e.action for e in reg.audit_log()] == ["push"] * 3

    # canary is not guarded by default; production with everything in order is accepted
    assert reg.promote("digits", unsigned.version, "canary").stage == "canary"
    info = reg.promote("digits", good.version, public_key=pub, gate_policy=passing)
    assert info.stage == "production"
    entry = reg.audit_log()[-1]
    assert entry.details["checks"] == {"signature": True, "report": True, "gate": True}
    assert "forced" not in entry.details

    # the explicit, audited override
    with pytest.raises(InputError, match="--reason"):
        reg.promote("digits", unsigned.version, force=True)
    reg.actor = "bob"
    forced = reg.promote(
        "digits", unsigned.version, force=True, reason="hotfix, signed build follows"
    )
    assert forced.stage == "production" and reg.get("digits:3").stage == "archived"
    entry = reg.audit_log()[-1]
    assert entry.actor == "bob" and entry.details["forced"] is True
    assert entry.details["reason"] == "hotfix, signed build follows"
    assert [c["name"] for c in entry.details["overridden"]] == ["signature"]
    assert reg.verify_audit().ok


def test_promotion_policy_cli(tmp_path: Path, evaluated: Evaluated) -> None:
    runner, root = CliRunner(), ["--root", str(tmp_path / "reg")]
    keys = runner.invoke(app, ["registry", "keygen", "--out", str(tmp_path / "k")])
    assert keys.exit_code == 0, keys.output
    key, pub = str(tmp_path / "k" / "private.pem"), str(tmp_path / "k" / "public.pem")
    push = ["registry", "push", "digits", "--model", str(evaluated.model), *root]
    assert runner.invoke(app, [*push, "--report", str(evaluated.report)]).exit_code == 0
    res = runner.invoke(app, [*push, "--report", str(evaluated.report), "--key", key])
    assert res.exit_code == 0, res.output
    (tmp_path / "fail.yaml").write_text(FAILING)
    (tmp_path / "pass.yaml").write_text(PASSING)
    res = runner.invoke(app, ["registry", "promote", "digits", "1", *root, "--json"])
    assert res.exit_code == 1 and json.loads(res.output)["failed"][0]["name"] == "signature"
    gate = ["--public-key", pub, "--policy"]
    res = runner.invoke(
        app, ["registry", "promote", "digits", "2", *gate, str(tmp_path / "fail.yaml"), *root]
    )
    assert res.exit_code == 1 and "gate strict failed" in _flat(res.output)
    res = runner.invoke(
        app, ["registry", "promote", "digits", "2", *gate, str(tmp_path / "pass.yaml"), *root]
    )
    assert res.exit_code == 0 and "digits:2 is now production" in _flat(res.output)
    res = runner.invoke(app, ["registry", "promote", "digits", "1", "--force", *root])
    assert res.exit_code == 2 and "--reason" in _flat(res.output)
    res = runner.invoke(
        app, ["registry", "promote", "digits", "1", "--force", "--reason", "rollforward", *root]
    )
    assert res.exit_code == 0 and "forced" in _flat(res.output)
    log = json.loads(runner.invoke(app, ["registry", "audit", "--json", *root]).output)
    assert log[-1]["details"]["reason"] == "rollforward" and log[-1]["details"]["forced"]


def test_promotion_rules_are_configurable(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg", actor="a", promotion_rules=PromotionRules(stages=["canary"]))
    try:
        reg.push("digits", _model_file(tmp_path / "m.safetensors"))
        with pytest.raises(PromotionRefusedError):
            reg.promote("digits", 1, "canary")
        assert reg.promote("digits", 1, "production").stage == "production"
    finally:
        reg.close()


# -- garbage collection ----------------------------------------------------------------
def _age(path: Path, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


def test_gc_finds_and_removes_orphans_and_stale_temp_files(reg: Registry, tmp_path: Path) -> None:
    store = reg.objects
    assert isinstance(store, LocalObjectStore)
    info = reg.push("digits", _model_file(tmp_path / "m.safetensors"))
    orphan = store.put_bytes(b"left by a push that died before its commit" * 1000)
    fresh_orphan = store.put_bytes(b"a push in progress")
    _age(store.path(orphan), 7200)
    # a partial write of an interrupted push (the name atomic_path gives it)
    fan = store.path(orphan).parent
    stale = fan / f".{'ab' * 31}.k3j_x9.tmp"
    stale.write_bytes(b"\0" * 5000)
    _age(stale, 7200)
    fresh = fan / f".{'cd' * 31}.q1w2e3.tmp"
    fresh.write_bytes(b"\0" * 10)
    dry = reg.gc()
    assert dry.dry_run and dry.removed == 0
    assert sorted((i.kind, i.size) for i in dry.removable) == [("orphan", 42000), ("temp", 5000)]
    assert dry.kept_recent == 2
    assert store.exists(orphan) and stale.exists()
    cli = CliRunner().invoke(app, ["registry", "gc", "--json", "--root", str(reg.root)])
    assert cli.exit_code == 0 and len(json.loads(cli.output)["removable"]) == 2
    cli = CliRunner().invoke(app, ["registry", "gc", "--delete", "--root", str(reg.root)])
    assert cli.exit_code == 0 and "removed 2 file(s), freed 47000 bytes" in _flat(cli.output)
    assert not store.exists(orphan) and not stale.exists()
    assert store.exists(fresh_orphan) and fresh.exists()  # may belong to a running push
    assert reg.verify("digits").ok and store.exists(info.model_digest)
    assert reg.audit_log()[-1].action == "gc" and reg.verify_audit().ok
    # with no grace period the rest goes too, but never a referenced object
    res = reg.gc(delete=True, grace_seconds=0)
    assert res.removed == 2 and reg.verify("digits").ok


def test_gc_finds_the_partial_file_of_a_killed_push(reg: Registry, tmp_path: Path) -> None:
    model = _model_file(tmp_path / "m.safetensors")
    proc = _child(reg.root, model, "midwrite")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    store = reg.objects
    assert isinstance(store, LocalObjectStore)
    (partial,) = store.temp_files()
    assert partial.size <= 1000 and not store.exists(_sha(model))  # (unflushed bytes are lost)
    assert reg.gc().removable == []  # fresh: it could be a push in progress
    res = reg.gc(now=partial.mtime + 2 * 3600)
    assert [(i.kind, i.path) for i in res.removable] == [("temp", partial.path)]
    assert Path(partial.path).exists()  # a dry run
    reg.gc(delete=True, now=partial.mtime + 2 * 3600)
    assert list(store.temp_files()) == []
    assert reg.push("digits", model).version == 1 and reg.verify("digits").ok


def test_push_removes_stale_temp_files(reg: Registry, tmp_path: Path) -> None:
    model = _model_file(tmp_path / "m.safetensors")
    fan = reg.objects.path(_sha(model)).parent  # type: ignore[attr-defined]
    fan.mkdir(parents=True)
    stale = fan / f".{'ef' * 31}.abc123.tmp"
    stale.write_bytes(b"\0" * 100)
    _age(stale, 7200)
    fresh = fan / f".{'ef' * 31}.def456.tmp"
    fresh.write_bytes(b"\0")
    reg.push("digits", model)
    assert not stale.exists() and fresh.exists()


def test_gc_refuses_to_run_on_a_damaged_database(reg: Registry, tmp_path: Path) -> None:
    reg.push("digits", _model_file(tmp_path / "m.safetensors"))
    _forge(reg, "UPDATE versions SET artifacts = '{}'")
    with pytest.raises(InputError, match="artifacts"):
        reg.gc(delete=True, grace_seconds=0)
    assert len(list(reg.objects.digests())) == 1


# -- bad registry inputs at the CLI ----------------------------------------------------
def _one_line_error(res) -> None:
    assert res.exit_code == 2, res.output
    assert "Traceback" not in (res.output)
    assert res.exception is None or isinstance(res.exception, SystemExit)
    # one message (rich wraps it to the terminal width), no traceback
    assert res.output.strip().startswith("error:") and res.output.count("error:") == 1


def test_cli_bad_registry_inputs_exit_2(tmp_path: Path) -> None:
    runner = CliRunner()
    root = tmp_path / "reg"
    reg = Registry(root, actor="a")
    reg.push("digits", _model_file(tmp_path / "m.safetensors"))
    reg.close()
    for args in (
        ["promote", "digits", str(2**63)],
        ["promote", "digits", "99999999999999999999999"],
        ["show", "digits:99999999999999999999"],
        ["pull", f"digits:{2**63}", "--out", str(tmp_path / "o")],
    ):
        res = runner.invoke(app, ["registry", *args, "--root", str(root)])
        _one_line_error(res)
        assert "2^63" in _flat(res.output)
    # --root is an existing file
    afile = tmp_path / "afile"
    afile.write_text("x")
    res = runner.invoke(app, ["registry", "list", "--root", str(afile)])
    _one_line_error(res)
    assert "not a directory" in _flat(res.output)
    # a database stamped with a revision this advguard does not know
    con = sqlite3.connect(root / "registry.db")
    con.execute("UPDATE alembic_version SET version_num = 'ffff9999'")
    con.commit()
    con.close()
    res = runner.invoke(app, ["registry", "list", "--root", str(root)])
    _one_line_error(res)
    assert "schema revision" in _flat(res.output) and "ffff9999" in _flat(res.output)
    # a corrupt database file
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "registry.db").write_bytes(b"this is not an sqlite database" * 100)
    res = runner.invoke(app, ["registry", "list", "--root", str(bad)])
    _one_line_error(res)
    assert "cannot open the registry database" in _flat(res.output)


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
    assert cli.exit_code == 2 and "pickle" in _flat(cli.output)
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
def test_cli_push_list_show_pull_promote_rollback(tmp_path: Path, evaluated: Evaluated) -> None:
    runner = CliRunner()
    root = ["--root", str(tmp_path / "reg")]
    model, rep = evaluated.model, evaluated.report
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
    gate = ["--public-key", str(tmp_path / "k" / "public.pem")]
    for v in ("1", "2"):
        res = runner.invoke(app, ["registry", "promote", "digits", v, *gate, *root])
        assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["registry", "rollback", "digits", "--json", *root])
    assert res.exit_code == 0 and json.loads(res.output)["version"] == 1
    res = runner.invoke(app, ["registry", "show", "digits@production", *root])
    clean = evaluated.data["clean_accuracy"]["value"]
    assert "Model card: digits v1" in _flat(res.output) and f"{100 * clean:.1f}%" in _flat(
        res.output
    )
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
    assert res.exit_code == 2 and "no model named 'nope'" in _flat(res.output)


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
