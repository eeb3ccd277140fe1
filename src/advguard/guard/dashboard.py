"""The guard's built-in read-only dashboard for teams without Grafana: ``GET /dashboard``
(static HTML, JavaScript and CSS from package data; no CDN, no inline script) and the
admin-scope JSON it polls:

- ``GET /v1/admin/summary``: the guard's metrics registry as JSON (counters, histograms);
- ``GET /v1/admin/flagged?limit=20``: the most recent flagged decisions with their scores and
  their input rendered (PNG data URL for image-shaped inputs, text for others) when the guard
  holds the forensic key; the fingerprint only in hash-only mode;
- ``GET /v1/admin/review?status=pending``: the review queue;
- ``POST /v1/admin/review/{id}/approve|reject``: the same ``GuardStore.set_review`` that
  ``advguard guard review approve|reject`` calls.

The page holds no secret: its script asks for an admin key, keeps it in ``sessionStorage`` and
sends it as ``X-API-Key`` (never in a URL). Every string from the database or a request is
put into the page as text (``textContent``), never as HTML, and a Content-Security-Policy
forbids inline and foreign scripts.
"""

from __future__ import annotations

import base64
import io
import logging
import math
import re
from importlib import resources
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import Depends, FastAPI, Query
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from advguard.errors import InputError
from advguard.guard.deps import key_dependency
from advguard.guard.forensics import decode_payload, fingerprint
from advguard.guard.pipeline import Guard
from advguard.guard.problems import Problem, openapi_responses
from advguard.guard.storage import DECISION_ID_RE, DecisionRecord, KeyRecord

log = logging.getLogger("advguard.guard")

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
PAGE_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
ASSETS = {
    "dashboard.html": "text/html; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}
MAX_LIMIT = 100
ROWS_SHOWN = 4
TEXT_VALUES = 64
MIN_IMAGE_SIDE = 96
MAX_IMAGE_SIDE = 256
AUTH = ("unauthorized", "forbidden", "client-blocked", "internal", "not-ready")


def asset(name: str) -> bytes:
    return resources.files("advguard.guard").joinpath("static", name).read_bytes()


# -- samples ---------------------------------------------------------------------------------


def image_layout(shape: tuple[int, ...]) -> str | None:
    """``"gray"``/``"rgb"`` when one input of this shape is an image (C, H, W with C 1 or 3,
    or H, W), else None."""
    if len(shape) == 3 and shape[0] in (1, 3) and min(shape[1:]) >= 2:
        return "gray" if shape[0] == 1 else "rgb"
    if len(shape) == 2 and min(shape) >= 2:
        return "gray"
    return None


def png_data_url(row: np.ndarray, bounds: tuple[float, float]) -> str:
    """One image-shaped input as a PNG data URL: values mapped from ``bounds`` to 0..255,
    enlarged with nearest-neighbour steps to at least ``MIN_IMAGE_SIDE`` pixels."""
    from PIL import Image

    lo, hi = bounds
    span = hi - lo if hi > lo else 1.0
    z = np.clip((np.asarray(row, dtype=np.float64) - lo) / span, 0.0, 1.0)
    pixels = np.round(z * 255).astype(np.uint8)
    if pixels.ndim == 3:
        pixels = pixels[0] if pixels.shape[0] == 1 else np.moveaxis(pixels, 0, -1)
    img = Image.fromarray(np.ascontiguousarray(pixels), "L" if pixels.ndim == 2 else "RGB")
    side = max(img.size)
    if side < MIN_IMAGE_SIDE:
        k = math.ceil(MIN_IMAGE_SIDE / side)
        img = img.resize((img.size[0] * k, img.size[1] * k), Image.Resampling.NEAREST)
    elif side > MAX_IMAGE_SIDE:
        img.thumbnail((MAX_IMAGE_SIDE, MAX_IMAGE_SIDE))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def text_row(row: np.ndarray) -> str:
    flat = np.asarray(row, dtype=np.float64).reshape(-1)
    parts = [f"{v:.4g}" for v in flat[:TEXT_VALUES]]
    more = f", … ({flat.size - TEXT_VALUES} more)" if flat.size > TEXT_VALUES else ""
    return "[" + ", ".join(parts) + more + "]"


def render_sample(rec: DecisionRecord, guard: Guard) -> dict[str, Any]:
    """The decision's input as the page shows it; the fingerprint alone when the payload was
    not stored or cannot be read with this guard's key."""
    base: dict[str, Any] = {"fingerprint": rec.fingerprint, "rows_total": rec.n_rows}
    if rec.payload is None:
        return {**base, "kind": "fingerprint", "note": "hash-only: the input was not stored"}
    if guard.fernet is None:
        note = "the input is encrypted and this guard has no forensic key"
        return {**base, "kind": "fingerprint", "note": note}
    try:
        x = decode_payload(rec.payload, guard.fernet)
    except InputError as e:
        return {**base, "kind": "fingerprint", "note": str(e)}
    if fingerprint(x) != rec.fingerprint:
        note = "the stored input does not match its fingerprint"
        return {**base, "kind": "fingerprint", "note": note}
    rows = x[:ROWS_SHOWN]
    shape = tuple(int(d) for d in x.shape[1:])
    if image_layout(shape) is not None:
        spec = guard.model.spec
        if rec.model == guard.model.name and spec.shape == shape:
            bounds = spec.bounds
        else:
            bounds = (float(x.min()), float(x.max()))
        return {**base, "kind": "image", "images": [png_data_url(r, bounds) for r in rows]}
    return {**base, "kind": "text", "rows": [text_row(r) for r in rows]}


def decision_view(rec: DecisionRecord, guard: Guard) -> dict[str, Any]:
    out = rec.public()
    out.pop("payload_encrypted", None)
    out["sample"] = render_sample(rec, guard)
    return out


# -- the metrics registry as JSON ------------------------------------------------------------


def summary(guard: Guard) -> dict[str, Any]:
    """Every sample of the guard's metrics registry (``_created`` left out), by family."""
    families: list[dict[str, Any]] = []
    for fam in guard.metrics.collect():  # all workers' in multiprocess mode
        samples = [
            {"name": s.name, "labels": dict(s.labels), "value": s.value}
            for s in fam.samples
            if not s.name.endswith("_created") and math.isfinite(s.value)
        ]
        families.append({"name": fam.name, "type": fam.type, "samples": samples})
    m = guard.model
    return {"model": m.name, "version": m.version, "metrics": families}


# -- routes ----------------------------------------------------------------------------------


Limit = Annotated[int, Query(ge=1, le=MAX_LIMIT)]


class ReviewNote(BaseModel):
    model_config = ConfigDict(extra="forbid")
    note: str | None = Field(default=None, max_length=500)


def add_dashboard_routes(app: FastAPI, guard: Guard) -> None:
    """The page, its assets and the admin JSON endpoints it polls."""
    admin_key = key_dependency(guard, "admin")

    def page(name: str) -> Response:
        return Response(asset(name), media_type=ASSETS[name], headers=PAGE_HEADERS)

    @app.get("/dashboard", include_in_schema=False)
    def dashboard_page() -> Response:
        return page("dashboard.html")

    @app.get("/dashboard/dashboard.js", include_in_schema=False)
    def dashboard_js() -> Response:
        return page("dashboard.js")

    @app.get("/dashboard/dashboard.css", include_in_schema=False)
    def dashboard_css() -> Response:
        return page("dashboard.css")

    @app.get(
        "/v1/admin/summary",
        tags=["admin"],
        summary="The guard's metrics as JSON (admin scope)",
        responses=openapi_responses(*AUTH),
    )
    def admin_summary(key: KeyRecord = Depends(admin_key)) -> dict[str, Any]:
        return summary(guard)

    @app.get(
        "/v1/admin/flagged",
        tags=["admin"],
        summary="Most recent flagged decisions with scores and rendered inputs (admin scope)",
        responses=openapi_responses(*AUTH, "invalid-input"),
    )
    def admin_flagged(limit: Limit = 20, key: KeyRecord = Depends(admin_key)) -> dict[str, Any]:
        recs = guard.store.iter_decisions(flagged_only=True, newest_first=True, limit=limit)
        return {"decisions": [decision_view(r, guard) for r in recs]}

    @app.get(
        "/v1/admin/review",
        tags=["admin"],
        summary="Decisions queued for human review (admin scope)",
        responses=openapi_responses(*AUTH, "invalid-input"),
    )
    def admin_review(
        status: Literal["pending", "approved", "rejected"] = "pending",
        limit: Limit = 50,
        key: KeyRecord = Depends(admin_key),
    ) -> dict[str, Any]:
        recs = guard.store.iter_decisions(review_status=status, newest_first=True, limit=limit)
        return {"decisions": [decision_view(r, guard) for r in recs]}

    @app.post(
        "/v1/admin/review/{decision_id}/{verdict}",
        tags=["admin"],
        summary="Approve or reject a pending review (admin scope)",
        responses=openapi_responses(*AUTH, "invalid-input", "review-not-found"),
    )
    def admin_review_set(
        decision_id: str,
        verdict: Literal["approve", "reject"],
        body: ReviewNote | None = None,
        key: KeyRecord = Depends(admin_key),
    ) -> dict[str, Any]:
        status = "approved" if verdict == "approve" else "rejected"
        note = body.note if body is not None else None
        if not re.fullmatch(DECISION_ID_RE, decision_id) or not guard.store.set_review(
            decision_id, status, note
        ):
            raise Problem("review-not-found", "no pending review with this decision id")
        log.info("review %s %s by key %s", decision_id, status, key.key_id)
        return {"id": decision_id, "review_status": status}


__all__ = [
    "CSP",
    "add_dashboard_routes",
    "decision_view",
    "image_layout",
    "png_data_url",
    "render_sample",
    "summary",
]
