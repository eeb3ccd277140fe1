"""The registry's hash-chained audit log: appending entries, checking the chain and
replaying it to the state every version should be in."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.engine import Connection

from advguard.errors import InputError
from advguard.registry import db
from advguard.registry.db import STAGES
from advguard.registry.types import AuditCheck, AuditEntry, VersionInfo

__all__ = [
    "GENESIS_HASH",
    "append_entry",
    "audit_hash",
    "canonical_json",
    "check_chain",
    "replay",
    "state_problems",
]

GENESIS_HASH = "0" * 64


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def audit_hash(entry: Mapping[str, Any], prev_hash: str) -> str:
    """sha256 over the canonical JSON of the entry (seq, ts, actor, action, subject,
    details) followed by the previous entry's hash."""
    body = {k: entry[k] for k in ("seq", "ts", "actor", "action", "subject", "details")}
    return hashlib.sha256((canonical_json(body) + prev_hash).encode("utf-8")).hexdigest()


def append_entry(
    conn: Connection, actor: str, action: str, subject: str, details: Mapping[str, Any]
) -> AuditEntry:
    """Append one entry linked to the last one, inside the caller's transaction."""
    last = conn.execute(
        select(db.audit.c.seq, db.audit.c.hash).order_by(db.audit.c.seq.desc()).limit(1)
    ).first()
    seq, prev = (1, GENESIS_HASH) if last is None else (last.seq + 1, last.hash)
    details_json = canonical_json(dict(details))
    entry = {
        "seq": seq,
        "ts": datetime.now(UTC).isoformat(timespec="microseconds"),
        "actor": actor,
        "action": action,
        "subject": subject,
        "details": json.loads(details_json),
    }
    digest = audit_hash(entry, prev)
    conn.execute(
        insert(db.audit).values(
            seq=seq,
            ts=entry["ts"],
            actor=actor,
            action=action,
            subject=subject,
            details=details_json,
            prev_hash=prev,
            hash=digest,
        )
    )
    return AuditEntry(**entry, prev_hash=prev, hash=digest)


def check_chain(rows: Sequence[Any]) -> AuditCheck:
    """Recompute the hash chain over the audit rows; report the first broken link."""
    prev = GENESIS_HASH
    for i, r in enumerate(rows, start=1):
        where = f"entry {r.seq} ({r.action} {r.subject} by {r.actor} at {r.ts})"
        if r.seq != i:
            return AuditCheck(False, len(rows), prev, r.seq, f"{where}: expected seq {i}")
        if r.prev_hash != prev:
            return AuditCheck(
                False,
                len(rows),
                prev,
                r.seq,
                f"{where}: prev_hash does not link to entry {i - 1}",
            )
        try:
            details = db.bounded_json_loads(r.details, what="audit details")
        except InputError:
            return AuditCheck(False, len(rows), prev, r.seq, f"{where}: details are not JSON")
        entry = {
            "seq": r.seq,
            "ts": r.ts,
            "actor": r.actor,
            "action": r.action,
            "subject": r.subject,
            "details": details,
        }
        if audit_hash(entry, prev) != r.hash or canonical_json(details) != r.details:
            return AuditCheck(
                False, len(rows), prev, r.seq, f"{where}: content does not match its hash"
            )
        prev = r.hash
    return AuditCheck(True, len(rows), prev)


def replay(rows: Sequence[Any]) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """What the audit log says every version is: its stage (replaying push, promote and
    rollback) and what was pushed (model digest, artifact digests, reports, signed)."""
    state: dict[str, dict[str, Any]] = {}
    problems: list[str] = []

    def move(ref: str, stage: Any, seq: int) -> None:
        if ref not in state:
            problems.append(f"audit entry {seq} moves {ref}, which was never pushed")
        elif stage not in STAGES:
            problems.append(f"audit entry {seq} moves {ref} to unknown stage {stage!r}")
        else:
            state[ref]["stage"] = stage

    for r in rows:
        try:
            d = db.bounded_json_loads(r.details, what="audit details")
            subject = str(r.subject)
            name = subject.rsplit(":", 1)[0]
            if r.action == "push":
                state[subject] = {
                    "stage": "candidate",
                    "model_digest": d["model_digest"],
                    "artifacts": d["artifacts"],
                    "reports": d["reports"],
                    "signed": d["signed"],
                }
            elif r.action == "promote":
                move(subject, d["to"], r.seq)
                for v in d.get("archived", []):
                    move(f"{name}:{int(v)}", "archived", r.seq)
            elif r.action == "rollback":
                move(f"{name}:{int(d['from_version'])}", "archived", r.seq)
                move(subject, "production", r.seq)
        except (InputError, KeyError, TypeError, ValueError, AttributeError):
            problems.append(f"audit entry {r.seq} ({r.action} {r.subject}) is malformed")
    return state, problems


def state_problems(info: VersionInfo, state: Mapping[str, dict[str, Any]]) -> list[str]:
    """Where a version's database row disagrees with the audit log."""
    logged = state.get(info.ref)
    if logged is None:
        return [f"{info.ref} is in the database but its push is not in the audit log"]
    out = []
    if logged["stage"] != info.stage:
        out.append(
            f"{info.ref} is in stage {info.stage} in the database, but the audit log says "
            f"{logged['stage']} (the stage was changed outside advguard)"
        )
    if logged["model_digest"] != info.model_digest:
        out.append(f"{info.ref}: model digest differs from the one recorded at push")
    if logged["artifacts"] != {k: v["sha256"] for k, v in info.artifacts.items()}:
        out.append(f"{info.ref}: artifacts differ from those recorded at push")
    if logged["reports"] != [r.digest for r in info.reports]:
        out.append(f"{info.ref}: attached reports differ from those recorded at push")
    if bool(logged["signed"]) != (info.signature is not None):
        out.append(f"{info.ref}: signature presence differs from what was recorded at push")
    return out
