"""Record types the registry returns (shared by the store, the model card and the CLI)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "AuditCheck",
    "AuditEntry",
    "GcItem",
    "GcResult",
    "PullResult",
    "ReportInfo",
    "StageEvent",
    "VerifyResult",
    "VersionInfo",
]


@dataclass
class ReportInfo:
    threat_model: str
    digest: str
    attestation: str | None
    created_at: str | None


@dataclass
class VersionInfo:
    name: str
    version: int
    format: str
    stage: str
    model_digest: str
    artifacts: dict[str, dict[str, Any]]
    input_spec: dict[str, Any]
    provenance: dict[str, Any]
    created_at: str | None
    signature: str | None
    reports: list[ReportInfo] = field(default_factory=list)
    scan: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class StageEvent:
    version: int
    from_stage: str | None
    to_stage: str
    actor: str
    ts: str | None


@dataclass
class AuditEntry:
    seq: int
    ts: str
    actor: str
    action: str
    subject: str
    details: dict[str, Any]
    prev_hash: str
    hash: str


@dataclass
class AuditCheck:
    ok: bool
    entries: int
    head: str
    broken_seq: int | None = None
    reason: str | None = None
    #: registry state (stages, digests, reports, signatures) that disagrees with the log
    state_problems: list[str] = field(default_factory=list)


@dataclass
class GcItem:
    kind: str  # "orphan" (an object no version references) | "temp" (an interrupted write)
    path: str
    size: int
    age_seconds: float
    digest: str | None = None


@dataclass
class GcResult:
    dry_run: bool
    grace_seconds: float
    removable: list[GcItem]
    kept_recent: int  # unreferenced objects/temp files younger than the grace period
    removed: int = 0
    freed_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class VerifyResult:
    ok: bool
    checked: int
    problems: list[str]
    signature: dict[str, str]  # ref -> "verified" | "unsigned" | "not checked" | error

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PullResult:
    version: VersionInfo
    out: Path
    files: list[Path]
    signature: str  # verified | unsigned | not checked (no public key)
