"""A report's findings: the MITRE ATLAS technique an attack or goal maps to, with a severity
(its own module so that goal judging can build findings without importing the report)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

Severity = Literal["info", "low", "medium", "high"]


class Finding(BaseModel):
    model_config = ConfigDict(extra="forbid")

    atlas_technique: str
    atlas_name: str
    atlas_version: str
    epsilon: float | None
    summary: str
    severity: Severity
