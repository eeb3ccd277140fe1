"""RFC 9457 problem details: every error the guard answers is ``application/problem+json`` with
a stable ``type`` URI, a title and a detail; never a stack trace, a key or a payload."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

PROBLEM_BASE = "urn:advguard:guard:problem:"
MEDIA_TYPE = "application/problem+json"

#: slug -> (status, title). The slugs (and so the ``type`` URIs) are stable.
PROBLEMS: dict[str, tuple[int, str]] = {
    "bad-request": (400, "Malformed request"),
    "invalid-json": (400, "Body is not valid JSON"),
    "too-deep": (400, "JSON nested too deeply"),
    "unauthorized": (401, "Missing or invalid API key"),
    "forbidden": (403, "API key lacks the required scope"),
    "client-blocked": (403, "Client is blocked"),
    "not-found": (404, "Not found"),
    "model-not-found": (404, "No such model"),
    "decision-not-found": (404, "No such decision"),
    "review-not-found": (404, "No pending review with this decision id"),
    "incident-not-found": (404, "No such incident"),
    "incident-closed": (409, "Incident is closed"),
    "method-not-allowed": (405, "Method not allowed"),
    "request-timeout": (408, "Request body not received in time"),
    "reload-failed": (409, "Model reload failed; the served model is unchanged"),
    "rollout-conflict": (409, "Rollout change not possible"),
    "body-too-large": (413, "Request body too large"),
    "unsupported-media-type": (415, "Unsupported content type"),
    "invalid-input": (422, "Input does not match the model's input specification"),
    "batch-too-large": (422, "Too many inputs in one request"),
    "rejected": (422, "Request rejected by the guard policy"),
    "rate-limited": (429, "Request rate limit exceeded"),
    "budget-exhausted": (429, "Query budget exhausted"),
    "internal": (500, "Internal error"),
    "not-ready": (503, "Service not ready"),
    "dependency-unavailable": (503, "A store the guard depends on does not answer"),
}


class ProblemModel(BaseModel):
    """The problem document (also declared in the OpenAPI schema)."""

    model_config = ConfigDict(extra="allow")
    type: str
    title: str
    status: int
    detail: str
    instance: str | None = None


class Problem(Exception):
    """Raise to answer with a problem document."""

    def __init__(
        self,
        slug: str,
        detail: str,
        *,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.slug = slug
        self.status, self.title = PROBLEMS[slug]
        self.detail = detail
        self.headers = headers or {}
        self.extra = extra
        #: The model version that refused the request (a canary's), for the request metrics;
        #: never part of the body.
        self.model_version: str | None = None

    def body(self, instance: str | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "type": PROBLEM_BASE + self.slug,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        }
        if instance:
            out["instance"] = instance
        out.update(self.extra)
        return out


def openapi_responses(*slugs: str) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries (problem+json) for the statuses of ``slugs``."""
    out: dict[int | str, dict[str, Any]] = {}
    for slug in slugs:
        status, title = PROBLEMS[slug]
        entry = out.setdefault(
            status,
            {
                "description": title,
                "content": {MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}},
            },
        )
        if entry["description"] != title and title not in entry["description"]:
            entry["description"] += f"; {title}"
    return out
