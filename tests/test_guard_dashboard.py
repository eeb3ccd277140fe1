"""The guard's built-in dashboard: the page (no secrets, CSP, no external assets), the admin
JSON it polls (metrics, flagged decisions with rendered inputs, the review queue) and, in
headless Chromium, a flagged sample appearing after an attack and being approved."""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from cryptography.fernet import Fernet
from fastapi.testclient import TestClient
from PIL import Image

from advguard.guard.app import CatchAll, create_app
from advguard.guard.auth import create_key
from advguard.guard.dashboard import CSP, image_layout, render_sample, text_row
from advguard.guard.forensics import encode_payload, fingerprint
from advguard.guard.pipeline import DetectorSlot, Guard
from advguard.guard.storage import DecisionRecord, now
from guard_helpers import MeanDetector, ServerThread, make_guard

PREDICT = "/v1/models/digits/predict"
ROOT = Path(__file__).resolve().parents[1]


def build(tmp_path: Path, mode: str = "encrypted") -> Guard:
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    return make_guard(
        tmp_path,
        module,
        cfg={"forensics": {"mode": mode}},
        detectors=[DetectorSlot("mean", MeanDetector(), [(0.5, "review"), (0.95, "reject")])],
        with_fallback=True,
        fernet=Fernet(Fernet.generate_key()) if mode == "encrypted" else None,
    )


def bright_image() -> np.ndarray:
    """An 8x8 input whose mean (0.7) is above the detector's 0.5 band: sent to review."""
    return np.linspace(0.4, 1.0, 64, dtype=np.float32).reshape(1, 1, 8, 8)


@pytest.fixture()
def setup(tmp_path: Path) -> Any:
    g = build(tmp_path)
    keys = {
        "predict": create_key(g.store, "app", ["predict"]).key,
        "admin": create_key(g.store, "ops", ["admin"]).key,
    }
    with TestClient(create_app(g)) as client:
        yield g, client, keys
    g.close()


def predict(client: Any, key: str, x: np.ndarray) -> Any:
    return client.post(PREDICT, json={"inputs": x.tolist()}, headers={"X-API-Key": key})


def test_the_page_loads_without_a_key_under_a_strict_csp(setup: Any) -> None:
    _, client, _ = setup
    page = client.get("/dashboard")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.headers["content-security-policy"] == CSP
    assert "script-src 'self';" in CSP and "unsafe-inline" not in CSP
    assert page.headers["x-frame-options"] == "DENY"
    html = page.text
    # no inline script or handler, nothing loaded from elsewhere
    assert re.findall(r"<script[^>]*>", html) == ['<script src="/dashboard/dashboard.js" defer>']
    assert not re.search(r"\son[a-z]+=", html)
    assert not re.search(r"(src|href)=\"(https?:)?//", html)
    js = client.get("/dashboard/dashboard.js")
    assert js.headers["content-type"].startswith("text/javascript")
    assert "innerHTML" not in js.text and "eval(" not in js.text
    assert "sessionStorage" in js.text and '"X-API-Key"' in js.text
    assert client.get("/dashboard/dashboard.css").headers["content-type"].startswith("text/css")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("get", "/v1/admin/summary"),
        ("get", "/v1/admin/flagged"),
        ("get", "/v1/admin/review"),
        ("post", "/v1/admin/review/" + "0" * 32 + "/approve"),
    ],
)
def test_the_json_endpoints_need_the_admin_scope(setup: Any, method: str, path: str) -> None:
    _, client, keys = setup
    call = getattr(client, method)
    assert call(path).status_code == 401
    assert call(path, headers={"X-API-Key": keys["predict"]}).status_code == 403
    ok = call(path, headers={"X-API-Key": keys["admin"]})
    assert ok.status_code == (404 if method == "post" else 200)  # no such review


def test_flagged_decisions_carry_scores_and_the_decrypted_image(setup: Any) -> None:
    _, client, keys = setup
    x = bright_image()
    r = predict(client, keys["predict"], x)
    assert r.status_code == 200 and r.json()["action"] == "review"
    assert (
        predict(client, keys["predict"], np.full((1, 1, 8, 8), 0.1, np.float32)).json()["action"]
        == "allow"
    )
    admin = {"X-API-Key": keys["admin"]}
    flagged = client.get("/v1/admin/flagged?limit=5", headers=admin).json()["decisions"]
    assert [d["id"] for d in flagged] == [r.json()["decision_id"]]  # the allowed one is not
    d = flagged[0]
    assert d["scores"]["mean"] == [pytest.approx(float(x.mean()), abs=1e-6)]
    assert d["review_status"] == "pending" and "payload" not in d
    sample = d["sample"]
    assert sample["kind"] == "image" and sample["fingerprint"] == fingerprint(x)
    prefix = "data:image/png;base64,"
    assert sample["images"][0].startswith(prefix)
    img = Image.open(io.BytesIO(base64.b64decode(sample["images"][0][len(prefix) :])))
    assert img.mode == "L" and img.size == (96, 96)  # 8x8 enlarged 12 times
    pixels = np.asarray(img)[::12, ::12]
    assert np.array_equal(pixels, np.round(x[0, 0] * 255).astype(np.uint8))
    # the counters the page shows come from the guard's registry
    summary = client.get("/v1/admin/summary", headers=admin).json()
    fam = {f["name"]: f for f in summary["metrics"]}["advguard_guard_decisions"]
    by_action = {s["labels"]["action"]: s["value"] for s in fam["samples"]}
    assert by_action == {"review": 1.0, "allow": 1.0}
    assert summary["model"] == "digits"
    assert client.get("/v1/admin/flagged?limit=1000", headers=admin).status_code == 422


def test_review_approve_and_reject_through_the_api(setup: Any) -> None:
    g, client, keys = setup
    ids = [predict(client, keys["predict"], bright_image()).json()["decision_id"] for _ in "ab"]
    admin = {"X-API-Key": keys["admin"]}
    queue = client.get("/v1/admin/review", headers=admin).json()["decisions"]
    assert {d["id"] for d in queue} == set(ids)
    r = client.post(f"/v1/admin/review/{ids[0]}/approve", headers=admin)
    assert r.json() == {"id": ids[0], "review_status": "approved"}
    r = client.post(
        f"/v1/admin/review/{ids[1]}/reject", json={"note": "adversarial"}, headers=admin
    )
    assert r.status_code == 200
    assert g.store.get_decision(ids[0]).review_status == "approved"
    rec = g.store.get_decision(ids[1])
    assert rec.review_status == "rejected" and rec.review_note == "adversarial"
    again = client.post(f"/v1/admin/review/{ids[0]}/reject", headers=admin)
    assert again.status_code == 404 and again.json()["type"].endswith("review-not-found")
    assert client.get("/v1/admin/review", headers=admin).json()["decisions"] == []
    done = client.get("/v1/admin/review?status=approved", headers=admin).json()["decisions"]
    assert [d["id"] for d in done] == [ids[0]]
    for bad in (f"/v1/admin/review/{ids[0]}/delete", "/v1/admin/review/../approve"):
        assert client.post(bad, headers=admin).status_code in (404, 422)
    long_note = client.post(
        f"/v1/admin/review/{ids[0]}/approve", json={"note": "x" * 501}, headers=admin
    )
    assert long_note.status_code == 422
    assert g.store.get_decision(ids[0]).review_status == "approved"  # unchanged


def test_hash_only_mode_shows_the_fingerprint_only(tmp_path: Path) -> None:
    g = build(tmp_path, mode="hash-only")
    key = create_key(g.store, "app", ["predict", "admin"]).key
    try:
        with TestClient(create_app(g)) as client:
            x = bright_image()
            assert predict(client, key, x).status_code == 200
            d = client.get("/v1/admin/flagged", headers={"X-API-Key": key}).json()["decisions"]
    finally:
        g.close()
    assert d[0]["sample"] == {
        "kind": "fingerprint",
        "fingerprint": fingerprint(x),
        "rows_total": 1,
        "note": "hash-only: the input was not stored",
    }


def _record(x: np.ndarray, fernet: Fernet | None, **kw: Any) -> DecisionRecord:
    data: dict[str, Any] = dict(
        id=os.urandom(16).hex(),
        ts=now(),
        key_id="0123456789abcdef",
        model="digits",
        version="digits:1",
        action="review",
        flagged=True,
        forensic=True,
        reasons=["mean:row0:review"],
        scores={"mean": [0.7]},
        fingerprint=fingerprint(x),
        n_rows=len(x),
        shape=list(x.shape),
        latency_ms=1.0,
        payload=encode_payload(x, fernet) if fernet else None,
        payload_encrypted=fernet is not None,
        review_status="pending",
    )
    data.update(kw)
    return DecisionRecord(**data)


def test_rendering_of_other_shapes_and_bad_payloads(tmp_path: Path) -> None:
    g = build(tmp_path)
    assert g.fernet is not None
    try:
        rows = np.arange(6 * 70, dtype=np.float32).reshape(6, 70) / 1000
        text = render_sample(_record(rows, g.fernet), g)
        assert text["kind"] == "text" and len(text["rows"]) == 4  # at most 4 rows shown
        assert text["rows"][0].startswith("[0, 0.001, 0.002,") and "(6 more)" in text["rows"][0]
        rgb = np.zeros((1, 3, 4, 4), np.float32)
        rgb[0, 0] = 1.0  # red
        img = render_sample(_record(rgb, g.fernet), g)
        png = Image.open(io.BytesIO(base64.b64decode(img["images"][0].split(",", 1)[1])))
        assert png.mode == "RGB" and png.getpixel((0, 0)) == (255, 0, 0)
        other = Fernet(Fernet.generate_key())
        bad = render_sample(_record(bright_image(), other), g)
        assert bad["kind"] == "fingerprint" and "does not decrypt" in bad["note"]
        swapped = _record(bright_image(), g.fernet, fingerprint="0" * 64)
        assert "does not match" in render_sample(swapped, g)["note"]
    finally:
        g.close()
    assert image_layout((1, 28, 28)) == "gray" and image_layout((3, 32, 32)) == "rgb"
    assert image_layout((28, 28)) == "gray" and image_layout((784,)) is None
    assert image_layout((5, 8, 8)) is None
    assert text_row(np.array([1.23456, -2.0])) == "[1.235, -2]"


def test_openapi_declares_the_admin_endpoints(setup: Any) -> None:
    _, client, _ = setup
    paths = client.get("/openapi.json").json()["paths"]
    for path, method in [
        ("/v1/admin/summary", "get"),
        ("/v1/admin/flagged", "get"),
        ("/v1/admin/review", "get"),
        ("/v1/admin/review/{decision_id}/{verdict}", "post"),
    ]:
        op = paths[path][method]
        assert op["security"] and "401" in op["responses"] and "403" in op["responses"]
    assert "/dashboard" not in paths


# -- in a real browser --------------------------------------------------------------------------

CHROMIUM = next(
    (
        p
        for p in ("/usr/lib/chromium/chromium", shutil.which("chromium") or "")
        if p and os.path.exists(p)
    ),
    None,
)
CHROMEDRIVER = shutil.which("chromedriver")


def _driver() -> Any:
    pytest.importorskip("selenium", reason="selenium (dev extra) is not installed")
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip(
            "chromium and chromedriver (Debian: chromium, chromium-driver) are not installed"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1400,1700",
        "--no-first-run",
        "--disable-extensions",
    ):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


HOSTILE = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script>'


def test_browser_shows_a_flagged_sample_and_approves_it(tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    g = build(tmp_path)
    predict_key = create_key(g.store, "app", ["predict"]).key
    admin_key = create_key(g.store, "ops", ["admin"]).key
    # a row written by someone else: the database is untrusted, its strings are text
    hostile = _record(bright_image(), None, reasons=[HOSTILE], review_status=None)
    g.store.add_decision(hostile)
    driver = None
    try:
        with ServerThread(CatchAll(create_app(g))) as srv:
            with httpx.Client(base_url=srv.url, timeout=30) as http:
                r = http.post(PREDICT, json={"inputs": bright_image().tolist()},
                              headers={"X-API-Key": predict_key})  # fmt: skip
            assert r.status_code == 200 and r.json()["action"] == "review"
            decision = r.json()["decision_id"]
            driver = _driver()
            wait = WebDriverWait(driver, 60)
            driver.get(f"{srv.url}/dashboard")
            wait.until(lambda d: d.find_element(By.ID, "admin-key").is_displayed())
            driver.find_element(By.ID, "admin-key").send_keys(admin_key)
            driver.find_element(By.ID, "key-save").click()
            card = f'.flagged-card[data-id="{decision}"]'
            img = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, f"{card} img"))[0]
            wait.until(lambda d: d.execute_script("return arguments[0].naturalWidth", img) == 96)
            assert "mean: 0.7000" in driver.find_element(By.CSS_SELECTOR, card).text
            # the hostile reason is shown as text and nothing of it ran
            bad = driver.find_element(By.CSS_SELECTOR, f'.flagged-card[data-id="{hostile.id}"]')
            assert HOSTILE in bad.text
            assert bad.find_elements(By.TAG_NAME, "img") == []
            assert driver.execute_script("return window.__pwned") is None
            # the key lives in this tab's sessionStorage, not in the URL
            assert admin_key not in driver.current_url
            stored = driver.execute_script("return sessionStorage.getItem('advguard-admin-key')")
            assert stored == admin_key
            counter = driver.find_element(By.CSS_SELECTOR, '[data-counter="review"] .value')
            assert counter.text == "1"
            shot = os.environ.get("ADVGUARD_DASHBOARD_SCREENSHOT")
            driver.save_screenshot(shot or str(tmp_path / "dashboard.png"))
            assert Image.open(shot or tmp_path / "dashboard.png").size[0] >= 1000
            approve = f'button.approve[data-id="{decision}"]'
            driver.find_element(By.CSS_SELECTOR, approve).click()
            wait.until(lambda d: g.store.get_decision(decision).review_status == "approved")
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, approve) == [])
            assert driver.find_element(By.ID, "notice").text.endswith("approved")
            wait.until(lambda d: "review: approved" in d.find_element(By.CSS_SELECTOR, card).text)
    finally:
        if driver is not None:
            driver.quit()
        g.close()
