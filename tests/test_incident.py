"""Incident response: the incident record and its action log, the actions (block, throttle,
isolate, preserve, rollback) through the library, the admin API and the CLI, evidence export,
and the runbook generator. Triage has its own file (tests/test_triage.py)."""

from __future__ import annotations

import hashlib
import json
import threading
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from advguard.cli import app as cli_app
from advguard.errors import InputError
from advguard.guard import incident as inc
from advguard.guard.app import create_app
from advguard.guard.auth import create_key
from advguard.guard.forensics import fingerprint, purge
from advguard.guard.preserve import hold_records, load_folder, release_holds, verify_folder
from advguard.guard.storage import DecisionRecord, GuardStore, now
from guard_helpers import make_guard, pg_url

cryptography = pytest.importorskip("cryptography")
from cryptography.fernet import Fernet  # noqa: E402


def _module(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _x(n: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 1, 8, 8), dtype=np.float32)


def _record(store: GuardStore, client: str, age_days: float, i: int) -> str:
    x = _x(1, i)
    rec = DecisionRecord(
        id=hashlib.sha256(f"{client}{i}".encode()).hexdigest()[:32],
        ts=now() - timedelta(days=age_days),
        key_id=client,
        model="digits",
        version="digits:1",
        action="allow",
        flagged=False,
        forensic=True,
        reasons=[],
        scores={},
        fingerprint=fingerprint(x),
        n_rows=1,
        shape=list(x.shape),
        latency_ms=1.0,
    )
    store.add_decision(rec)
    return rec.id


@pytest.fixture()
def store(tmp_path):
    s = GuardStore(f"sqlite:///{tmp_path / 'g.db'}")
    yield s
    s.close()


# -- the record and its log ----------------------------------------------------------------
def test_open_actions_status_and_close(store):
    a, b = "a" * 16, "b" * 16
    i = inc.open_incident(store, "scraping from one key", who="alice", severity="sev2")
    inc.block_client(store, i.id, who="alice", client_id=a, reason="scraper", ttl_s=600)
    inc.throttle_client(store, i.id, who="bob", client_id=b, rate=0.5, burst=2)
    inc.isolate_model(store, i.id, who="bob", model="digits", mode="reject")
    status = inc.incident_status(store, i.id)
    log = status["actions"]
    assert [x["action"] for x in log] == ["open", "block-client", "throttle-client", "isolate"]
    assert [x["seq"] for x in log] == sorted(x["seq"] for x in log)
    assert [x["who"] for x in log] == ["alice", "alice", "bob", "bob"]
    assert log[1]["target"] == a and log[1]["details"]["expires_at"] is not None
    assert log[2]["details"]["rate"] == 0.5 and log[2]["details"]["burst"] == 2
    # the actions are live in the store the guard reads
    assert status["log"] == {"ok": True, "entries": 4, "first_bad_seq": None}
    assert store.get_block(a) is not None
    assert store.client_limit(b).rate == 0.5
    assert store.isolation("digits").mode == "reject"
    assert inc.count_open(store) == 1
    closed = inc.close_incident(store, i.id, who="alice", summary="blocked the scraper")
    assert closed.status == "closed" and closed.closed_by == "alice"
    assert inc.count_open(store) == 0
    assert inc.incident_status(store, i.id)["actions"][-1]["action"] == "close"
    with pytest.raises(inc.IncidentClosed):
        inc.block_client(store, i.id, who="alice", client_id=b)
    with pytest.raises(inc.IncidentNotFound):
        inc.get_incident(store, "0" * 16)
    with pytest.raises(InputError, match="who must be"):
        inc.open_incident(store, "x", who="al ice")


def test_an_edited_log_entry_breaks_the_chain(store):
    i = inc.open_incident(store, "t", who="alice")
    inc.add_note(store, i.id, who="alice", text="client a looks fine")
    inc.add_note(store, i.id, who="bob", text="blocked nobody")
    other = inc.open_incident(store, "u", who="carol")  # chains are per incident
    assert inc.verify_log(store, i.id)["ok"] and inc.verify_log(store, other.id)["ok"]
    t = store.controls.actions
    second = inc.actions_of(store, i.id)[1]
    with store.engine.begin() as conn:
        conn.execute(t.update().where(t.c.seq == second.seq).values(details={"text": "edited"}))
    assert inc.verify_log(store, i.id) == {"ok": False, "entries": 3, "first_bad_seq": second.seq}
    with store.engine.begin() as conn:
        conn.execute(
            t.update().where(t.c.seq == second.seq).values(details={"text": "client a looks fine"})
        )
        conn.execute(t.delete().where(t.c.seq == second.seq))
    third = inc.actions_of(store, i.id)[1]
    assert inc.verify_log(store, i.id)["first_bad_seq"] == third.seq  # a removed entry shows
    assert inc.verify_log(store, other.id)["ok"]


def test_corrupt_rows_are_not_trusted(store):
    i = inc.open_incident(store, "t", who="alice")
    with store.engine.begin() as conn:
        conn.execute(store.controls.incidents.update().values(severity="sev9"))
        conn.execute(
            store.controls.client_limits.insert().values(
                client_id="c" * 16, rate=-1.0, burst=1, reason="r", created_at=now()
            )
        )
    from advguard.guard.storage import StoreCorrupt

    with pytest.raises(StoreCorrupt, match="severity"):
        inc.get_incident(store, i.id)
    with pytest.raises(StoreCorrupt, match="rate"):
        store.client_limit("c" * 16)


# -- preserve: holds and export --------------------------------------------------------------
def test_purge_skips_preserved_records(store):
    a, b = "a" * 16, "b" * 16
    old_a = [_record(store, a, 40, i) for i in range(3)]
    old_b = [_record(store, b, 40, i) for i in range(4)]
    new = _record(store, b, 1, 99)
    i = inc.open_incident(store, "t", who="alice")
    act = inc.preserve(store, i.id, who="alice", since=now() - timedelta(days=45), client_id=a)
    assert act.details["held"] == 3
    assert purge(store, 30) == 4  # b's four old records go, a's three are held
    left = {r.id for r in store.iter_decisions()}
    assert left == {*old_a, new} and not left & set(old_b)
    # a hold that ended no longer protects; a released one neither
    other = inc.open_incident(store, "u", who="alice")
    old_c = _record(store, "c" * 16, 40, 7)
    assert hold_records(store, other.id, [old_c], now() - timedelta(seconds=1)) == 1
    assert purge(store, 30) == 1
    assert release_holds(store, i.id) == 3
    assert purge(store, 30) == 3
    assert {r.id for r in store.iter_decisions()} == {new}


def test_export_manifest_hashes_verify(tmp_path):
    fkey = Fernet.generate_key()
    g = make_guard(
        tmp_path,
        _module(),
        cfg={"forensics": {"mode": "encrypted", "sample_rate": 1.0}},
        fernet=Fernet(fkey),
    )
    try:
        c = TestClient(create_app(g))
        k = create_key(g.store, "mallory", ["predict"])
        sent = [_x(2, s) for s in range(3)]
        for x in sent:
            r = c.post(
                "/v1/models/digits/predict", json={"inputs": x.tolist()}, headers=auth(k.key)
            )
            assert r.status_code == 200
        i = inc.open_incident(g.store, "t", who="alice")
        out = tmp_path / "evidence"
        act = inc.preserve(
            g.store,
            i.id,
            who="alice",
            since=now() - timedelta(hours=1),
            client_id=k.record.key_id,
            out=out,
            fernet=Fernet(fkey),
        )
    finally:
        g.close()
    e = act.details["export"]
    assert (e["records"], e["rows"]) == (3, 6)
    raw = (out / "manifest.json").read_bytes()
    assert hashlib.sha256(raw).hexdigest() == e["manifest_sha256"]
    manifest = verify_folder(out)
    for f in manifest["files"]:
        assert hashlib.sha256((out / f["path"]).read_bytes()).hexdigest() == f["sha256"]
    x, recs = load_folder(out)
    np.testing.assert_array_equal(x, np.concatenate(sent))
    assert {r["key_id"] for r in recs} == {k.record.key_id}
    # one flipped byte, or one extra file, and the folder no longer verifies
    victim = out / manifest["files"][0]["path"]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 1
    victim.write_bytes(bytes(data))
    with pytest.raises(InputError, match="SHA-256"):
        verify_folder(out)
    data[-1] ^= 1
    victim.write_bytes(bytes(data))
    verify_folder(out)
    (out / "inputs" / "extra.npy").write_bytes(b"x")
    with pytest.raises(InputError, match="not in the manifest"):
        verify_folder(out)


# -- throttle and isolate act on the pipeline ------------------------------------------------
def test_throttle_really_limits_that_client(tmp_path):
    g = make_guard(tmp_path, _module(), cfg={"limits": {"rate": 100, "burst": 100}})
    try:
        c = TestClient(create_app(g))
        slow = create_key(g.store, "slow", ["predict"])
        fast = create_key(g.store, "fast", ["predict"])
        i = inc.open_incident(g.store, "t", who="alice")
        inc.throttle_client(
            g.store, i.id, who="alice", client_id=slow.record.key_id, rate=0.01, burst=3
        )

        def codes(key: str, n: int) -> list[int]:
            body = {"inputs": _x(1).tolist()}
            return [
                c.post("/v1/models/digits/predict", json=body, headers=auth(key)).status_code
                for _ in range(n)
            ]

        assert codes(slow.key, 6) == [200, 200, 200, 429, 429, 429]
        assert codes(fast.key, 10) == [200] * 10
        r = c.post(
            "/v1/models/digits/predict", json={"inputs": _x(1).tolist()}, headers=auth(slow.key)
        )
        assert r.headers["RateLimit-Policy"] == "3;w=300"
        inc.throttle_client(g.store, i.id, who="alice", client_id=slow.record.key_id, clear=True)
        assert codes(slow.key, 5) == [200] * 5
    finally:
        g.close()


def test_isolate_routes_to_fallback_then_rejects(tmp_path):
    g = make_guard(tmp_path, _module(0), with_fallback=True)
    try:
        c = TestClient(create_app(g))
        k = create_key(g.store, "u", ["predict"]).key
        x = _x(3)
        want_model = g.model.predict_proba(x)
        want_fb = g.fallback.predict_proba(x)  # type: ignore[union-attr]
        assert not np.allclose(want_model, want_fb)

        def ask() -> Any:
            return c.post("/v1/models/digits/predict", json={"inputs": x.tolist()}, headers=auth(k))

        r = ask().json()
        assert r["action"] == "allow"
        np.testing.assert_allclose(r["probabilities"], want_model, rtol=1e-5, atol=1e-6)
        i = inc.open_incident(g.store, "t", who="alice")
        inc.isolate_model(
            g.store, i.id, who="alice", model="digits", mode="fallback", has_fallback=True
        )
        r = ask().json()
        assert r["action"] == "fallback" and r["row_actions"] == ["fallback"] * 3
        assert r["fallback_version"] == "fallback:1"
        np.testing.assert_allclose(r["probabilities"], want_fb, rtol=1e-5, atol=1e-6)
        rec = g.store.get_decision(r["decision_id"])
        assert rec is not None and "isolated:fallback" in rec.reasons
        inc.isolate_model(g.store, i.id, who="alice", model="digits", mode="reject")
        resp = ask()
        assert resp.status_code == 422 and resp.json()["type"].endswith(":rejected")
        inc.isolate_model(g.store, i.id, who="alice", model="digits", mode="off")
        assert ask().json()["action"] == "allow"
    finally:
        g.close()


# -- admin API -----------------------------------------------------------------------------------
def test_admin_api_records_the_key_id_as_who(tmp_path):
    g = make_guard(tmp_path, _module())
    try:
        c = TestClient(create_app(g))
        admin = create_key(g.store, "ops", ["admin"])
        user = create_key(g.store, "u", ["predict"])
        h = auth(admin.key)
        assert (
            c.post("/v1/admin/incidents", json={"title": "x"}, headers=auth(user.key)).status_code
            == 403
        )
        r = c.post("/v1/admin/incidents", json={"title": "probing", "severity": "sev1"}, headers=h)
        assert r.status_code == 201
        iid = r.json()["id"]
        base = f"/v1/admin/incidents/{iid}/actions"
        uid = user.record.key_id
        assert c.post(f"{base}/block-client", json={"client_id": uid}, headers=h).status_code == 200
        r = c.post(
            f"{base}/throttle-client", json={"client_id": uid, "rate": 1, "burst": 1}, headers=h
        )
        assert r.status_code == 200
        r = c.post(f"{base}/isolate", json={"model": "digits", "mode": "fallback"}, headers=h)
        assert r.status_code == 422  # no fallback model in this guard
        r = c.post(f"{base}/preserve", json={"since": "1h"}, headers=h)
        assert r.status_code == 200 and r.json()["details"]["held"] == 0
        r = c.post(f"{base}/block-client", json={"client_id": "nothex"}, headers=h)
        assert r.status_code == 422
        r = c.post(f"/v1/admin/incidents/{iid}/notes", json={"text": "<b>seen</b>"}, headers=h)
        assert r.status_code == 200 and r.json()["details"] == {"text": "<b>seen</b>"}
        status = c.get(f"/v1/admin/incidents/{iid}", headers=h).json()
        assert [a["action"] for a in status["actions"]] == [
            "open",
            "block-client",
            "throttle-client",
            "preserve",
            "note",
        ]
        assert {a["who"] for a in status["actions"]} == {admin.record.key_id}
        assert admin.key not in json.dumps(status)
        # the blocked client is refused
        assert (
            c.post(
                "/v1/models/digits/predict", json={"inputs": _x(1).tolist()}, headers=auth(user.key)
            ).status_code
            == 403
        )
        r = c.get("/v1/admin/incidents/" + "0" * 16, headers=h)
        assert r.status_code == 404 and r.json()["type"].endswith(":incident-not-found")
        r = c.post(f"/v1/admin/incidents/{iid}/close", json={"summary": "done"}, headers=h)
        assert r.status_code == 200
        r = c.post(f"{base}/block-client", json={"client_id": uid}, headers=h)
        assert r.status_code == 409 and r.json()["type"].endswith(":incident-closed")
        metrics = c.get("/metrics").text
        assert "advguard_guard_incidents_open 0.0" in metrics
    finally:
        g.close()


# -- rollback ------------------------------------------------------------------------------------
class _FakeGuard:
    """A tiny HTTP endpoint standing in for the guard's reload route."""

    def __init__(self, status: int = 200) -> None:
        self.seen: list[tuple[str, str | None]] = []
        outer = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                outer.seen.append((self.path, self.headers.get("Authorization")))
                body = json.dumps(
                    {"reloaded": True} if status == 200 else {"title": "Forbidden"}
                ).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a: Any) -> None:
                pass

        self.srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.srv.server_address[1]}"
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.srv.shutdown()
        self.srv.server_close()


def _registry_with_two_releases(tmp_path: Path) -> Any:
    from advguard.models import TorchClassifier
    from advguard.models.io import save_torch
    from advguard.models.zoo import mlp
    from advguard.registry.store import Registry

    reg = Registry(tmp_path / "reg", actor="alice")
    for seed in (0, 1):
        torch.manual_seed(seed)
        clf = TorchClassifier(mlp((4,), 3, hidden=(8,)), input_shape=(4,), num_classes=3)
        kw = {"input_shape": [4], "num_classes": 3, "hidden": [8]}
        path = save_torch(
            clf,
            tmp_path / f"m{seed}.safetensors",
            factory="advguard.models.zoo:mlp",
            factory_kwargs=kw,
        )
        v = reg.push("digits", path).version
        reg.promote("digits", v, "production", force=True, reason="release")
    return reg


def test_rollback_then_reload_call(store, tmp_path):
    reg = _registry_with_two_releases(tmp_path)
    fake = _FakeGuard()
    try:
        i = inc.open_incident(store, "bad release", who="alice")
        act = inc.rollback(
            store,
            i.id,
            who="alice",
            registry=reg,
            name="digits",
            reload=lambda n: inc.request_reload(fake.url, "s3cret-admin", n),
        )
        assert reg.get("digits@production").version == 1
        assert (act.details["from_version"], act.details["to_version"]) == (2, 1)
        assert act.details["reloaded"] and act.details["reload"]["answer"] == {"reloaded": True}
        assert fake.seen == [("/v1/admin/models/digits/reload", "Bearer s3cret-admin")]
        assert "s3cret" not in json.dumps(inc.incident_status(store, i.id))
        # no earlier version: refused, nothing appended
        with pytest.raises(InputError, match="no earlier production version"):
            inc.rollback(store, i.id, who="alice", registry=reg, name="digits")
        assert len(inc.actions_of(store, i.id)) == 2
    finally:
        fake.close()
        reg.close()
    refusing = _FakeGuard(status=403)
    try:
        with pytest.raises(InputError, match=r"HTTP 403 \(Forbidden\)"):
            inc.request_reload(refusing.url, "k", "digits")
    finally:
        refusing.close()


# -- CLI -------------------------------------------------------------------------------------
def _cli(*args: str) -> Any:
    r = CliRunner().invoke(cli_app, list(args))
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    return r


def test_cli_open_act_status(tmp_path):
    db = ["--database-url", f"sqlite:///{tmp_path / 'g.db'}"]
    r = _cli("incident", "open", "probing", "--who", "carol", "--json", *db)
    assert r.exit_code == 0, r.output
    iid = json.loads(r.stdout)["id"]
    r = _cli("incident", "block-client", iid, "a" * 16, "--who", "carol", "--json", *db)
    assert r.exit_code == 0 and json.loads(r.stdout)["action"] == "block-client"
    r = _cli(
        "incident",
        "throttle-client",
        iid,
        "b" * 16,
        "--rate",
        "0.5",
        "--burst",
        "2",
        "--who",
        "carol",
        "--json",
        *db,
    )
    assert r.exit_code == 0, r.output
    r = _cli("incident", "isolate", iid, "digits", "--mode", "reject", "--who", "dave", *db)
    assert r.exit_code == 0, r.output
    r = _cli(
        "incident",
        "rollback",
        iid,
        "digits",
        "--registry-root",
        str(tmp_path / "reg"),
        "--who",
        "dave",
        *db,
    )
    assert r.exit_code == 2  # the registry has no production version of digits
    r = _cli("incident", "note", iid, "rollback needs the registry", "--who", "dave", *db)
    assert r.exit_code == 0, r.output
    r = _cli("incident", "status", iid, "--json", *db)
    log = json.loads(r.stdout)["actions"]
    assert [(a["action"], a["who"]) for a in log] == [
        ("open", "carol"),
        ("block-client", "carol"),
        ("throttle-client", "carol"),
        ("isolate", "dave"),
        ("note", "dave"),
    ]
    r = _cli("incident", "list", "--status", "open", "--json", *db)
    assert [x["id"] for x in json.loads(r.stdout)] == [iid]
    r = _cli("incident", "close", iid, "--summary", "done", "--who", "carol", *db)
    assert r.exit_code == 0


@pytest.mark.parametrize(
    "args",
    [
        ["incident", "status", "nothex"],
        ["incident", "status", "0" * 16],
        ["incident", "open", "t", "--severity", "sev9", "--who", "x"],
        ["incident", "open", "t", "--who", "bad name"],
        ["incident", "block-client", "0" * 16, "zz", "--who", "x"],
        ["incident", "throttle-client", "0" * 16, "a" * 16, "--who", "x"],
        ["incident", "isolate", "0" * 16, "digits", "--mode", "sideways", "--who", "x"],
        ["incident", "preserve", "0" * 16, "--since", "yesterday", "--who", "x"],
        ["incident", "list", "--status", "maybe"],
        ["incident", "triage", "--reference", "digits"],
        ["incident", "triage", "--reference", "digits", "--evidence", "e", "--since", "1h"],
        ["incident", "triage", "--reference", "digits", "--incident", "0" * 16, "--since", "1h"],
        ["incident", "rollback", "0" * 16, "digits", "--guard-url", "http://x", "--who", "x"],
    ],
    ids=lambda a: "-".join(a[1:3]),
)
def test_cli_bad_input_is_one_line_exit_2(args, tmp_path, monkeypatch):
    monkeypatch.delenv("ADVGUARD_GUARD_ADMIN_KEY", raising=False)
    r = _cli(*args, "--database-url", f"sqlite:///{tmp_path / 'g.db'}")
    assert "Traceback" not in r.output
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr


# -- runbook ---------------------------------------------------------------------------------
def test_runbook_has_the_real_commands_and_matches_alert_links(tmp_path):
    from advguard.observe.slo import compile_rules, load_slo_file

    root = Path(__file__).resolve().parents[1]
    slo_file = root / "docs" / "ops" / "slo.yaml"
    cfgp = tmp_path / "guard.yaml"
    cfgp.write_text(
        "model: {name: digits-cnn, registry: {model_name: digits}}\n"
        "fallback: {path: fb.safetensors}\n"
        "limits: {rate: 5, burst: 10}\n"
        "detectors: [{name: lid, path: lid.safetensors, bands: [{min: 0.7, action: review}, "
        "{action: reject}]}]\n"
    )
    out = tmp_path / "runbooks"
    r = _cli(
        "runbook",
        "generate",
        "--model",
        "digits-cnn",
        "-c",
        str(cfgp),
        "--slo",
        str(slo_file),
        "--threat-model",
        "quick",
        "--out",
        str(out),
        "--json",
    )
    assert r.exit_code == 0, r.output
    paths = [Path(p) for p in json.loads(r.stdout)["runbooks"]]
    text = (out / "digits-cnn.md").read_text()
    c = str(cfgp)
    for cmd in (
        f'advguard incident open "<what you see>" --severity sev2 --model digits-cnn -c {c}',
        f'advguard incident block-client $INC <key id> --reason "<why>" -c {c}',
        f"advguard incident throttle-client $INC <key id> --rate 0.5 --burst 1 --ttl 3600 -c {c}",
        f"advguard incident isolate $INC digits-cnn --mode fallback -c {c}",
        f"advguard incident rollback $INC digits --guard-url http://127.0.0.1:8080 -c {c}",
        f"advguard incident preserve $INC --since 2h --client <key id> --out evidence/ -c {c}",
        f'advguard incident close $INC --summary "<what happened>" -c {c}',
    ):
        assert cmd in text, cmd
    assert "`lid` (review/reject)" in text and "advguard-page" in text
    assert 'slo:digits_flag_rate:error_ratio_rate1h{model="digits-cnn"}' in text
    assert "quick" in text  # the threat model section
    # every alert's runbook_url (model substituted) names a generated page
    spec = load_slo_file(slo_file)
    base = spec.alerting.runbook_base_url.rstrip("/") + "/"
    urls = {
        rule["annotations"]["runbook_url"].replace("{{ $labels.model }}", "digits-cnn")
        for group in compile_rules(spec)["groups"]
        for rule in group["rules"]
        if "alert" in rule
    }
    pages = {base + p.relative_to(out).as_posix().removesuffix(".md") for p in paths}
    assert urls <= pages and len(urls) == 5
    page = (out / "digits_flag_rate" / "digits-cnn.md").read_text()
    assert page.startswith("# Runbook: digits-cnn (alert: SLO digits_flag_rate)")
    first = page.index("### SLO")
    assert page[first:].startswith("### SLO `digits_flag_rate`")


def test_postgresql_incident_tables():
    import random

    url = pg_url()
    if url is None:
        pytest.skip("PostgreSQL at 127.0.0.1:5432 (db test, user postgres) is not reachable")
    s = GuardStore(url, table_prefix=f"gi{random.randrange(16**8):08x}_")
    try:
        a = "a" * 16
        held = [_record(s, a, 40, i) for i in range(2)]
        gone = _record(s, "b" * 16, 40, 5)
        i = inc.open_incident(s, "pg", who="alice")
        inc.throttle_client(s, i.id, who="alice", client_id=a, rate=2.0, burst=4)
        inc.preserve(s, i.id, who="alice", since=now() - timedelta(days=41), client_id=a)
        assert purge(s, 30) == 1
        assert {r.id for r in s.iter_decisions()} == set(held) and gone not in held
        assert s.client_limit(a).burst == 4
        log = inc.actions_of(s, i.id)
        assert [x.action for x in log] == ["open", "throttle-client", "preserve"]
        assert log[0].seq < log[1].seq < log[2].seq
    finally:
        s.drop_all()
        s.close()


@pytest.mark.parametrize("case", ["other-model", "missing-config", "bad-slo"])
def test_runbook_bad_input_is_one_line_exit_2(case, tmp_path):
    cfgp = tmp_path / "guard.yaml"
    cfgp.write_text("model: {name: digits, path: m.safetensors}\n")
    slo = tmp_path / "slo.yaml"
    slo.write_text("version: 1\nslos: []\n")
    args = {
        "other-model": ["--model", "other", "-c", str(cfgp)],
        "missing-config": ["--model", "digits", "-c", str(tmp_path / "nope.yaml")],
        "bad-slo": ["--model", "digits", "-c", str(cfgp), "--slo", str(slo)],
    }[case]
    r = _cli("runbook", "generate", *args, "--out", str(tmp_path / "rb"))
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert not (tmp_path / "rb").exists()


def test_cli_rollback_reloads_the_served_name(tmp_path, monkeypatch):
    reg = _registry_with_two_releases(tmp_path)
    reg.close()
    cfgp = tmp_path / "guard.yaml"
    cfgp.write_text("model: {name: digits-cnn, registry: {model_name: digits}}\n")
    fake = _FakeGuard()
    monkeypatch.setenv("ADVGUARD_GUARD_ADMIN_KEY", "adm1n-secret")
    try:
        r = _cli("incident", "open", "bad release", "--who", "erin", "--json", "-c", str(cfgp))
        iid = json.loads(r.stdout)["id"]
        r = _cli(
            "incident",
            "rollback",
            iid,
            "digits",
            "--registry-root",
            str(tmp_path / "reg"),
            "--guard-url",
            fake.url,
            "--who",
            "erin",
            "--json",
            "-c",
            str(cfgp),
        )
        assert r.exit_code == 0, r.output
        d = json.loads(r.stdout)["details"]
        assert (d["from_version"], d["to_version"], d["reloaded"]) == (2, 1, True)
        assert fake.seen == [("/v1/admin/models/digits-cnn/reload", "Bearer adm1n-secret")]
        assert "adm1n" not in r.stdout
    finally:
        fake.close()
