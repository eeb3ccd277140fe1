"""Preserved forensic records: holds against retention purges, and the export folder an
incident's evidence travels in.

The folder::

    manifest.json        format, incident, window, client, counts, and every file's SHA-256
    records.json         the decision records (never their encrypted payloads), each with the
                         name of its input file or null (hash-only mode)
    inputs/<id>.npy      the decrypted input batch of a record (float32, no pickles), checked
                         against the record's fingerprint before it is written

:func:`verify_folder` checks the manifest (every file listed, nothing else, sizes and hashes)
and :func:`load_folder` returns the inputs for triage; both treat the folder as untrusted data.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy import select

from advguard import _safejson
from advguard.errors import InputError
from advguard.guard.forensics import decode_payload, fingerprint
from advguard.guard.storage import DecisionRecord, GuardStore, now

if TYPE_CHECKING:  # cryptography is an optional extra (guard)
    from cryptography.fernet import Fernet

FORMAT = "advguard-incident-evidence/1"
MAX_RECORDS = 100_000
MAX_FILE_BYTES = 256 * 1024 * 1024
_FILE_RE = re.compile(r"^(records\.json|inputs/[0-9a-f]{32}\.npy)$")


def select_records(
    store: GuardStore,
    *,
    since: datetime,
    until: datetime | None = None,
    client_id: str | None = None,
    model: str | None = None,
) -> list[DecisionRecord]:
    """The decision records of ``[since, until)``, of ``client_id`` and ``model`` when given."""
    if until is not None and until <= since:
        raise InputError("--until must be after --since")
    out = []
    for rec in store.iter_decisions(since=since, model=model):
        if until is not None and rec.ts >= until:
            break
        if client_id is None or rec.key_id == client_id:
            out.append(rec)
        if len(out) > MAX_RECORDS:
            raise InputError(f"over {MAX_RECORDS} records match; narrow the window or the client")
    return out


def hold_records(
    store: GuardStore, incident_id: str, ids: Sequence[str], until: datetime | None
) -> int:
    """Hold ``ids`` for ``incident_id`` (a longer hold of another incident is kept)."""
    h = store.controls.holds
    with store.engine.begin() as conn:
        existing = (
            {
                r.decision_id: r.held_until
                for r in conn.execute(select(h).where(h.c.decision_id.in_(list(ids)))).all()
            }
            if ids
            else {}
        )
        for i in ids:
            if i not in existing:
                conn.execute(
                    h.insert().values(
                        decision_id=i, incident_id=incident_id, held_at=now(), held_until=until
                    )
                )
                continue
            old = existing[i]
            longest = None if old is None or until is None else max(_aware(old), until)
            conn.execute(h.update().where(h.c.decision_id == i).values(held_until=longest))
    return len(ids)


def release_holds(store: GuardStore, incident_id: str) -> int:
    """Release the holds an incident placed (the records become purgeable again)."""
    h = store.controls.holds
    with store.engine.begin() as conn:
        return int(conn.execute(h.delete().where(h.c.incident_id == incident_id)).rowcount or 0)


def _aware(ts: datetime) -> datetime:
    return ts if ts.tzinfo is not None else ts.replace(tzinfo=now().tzinfo)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _npy(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(x, dtype=np.float32), allow_pickle=False)
    return buf.getvalue()


def export_folder(
    recs: Sequence[DecisionRecord],
    out: Path,
    *,
    fernet: Fernet | None,
    incident_id: str,
    window: tuple[datetime, datetime | None],
    client_id: str | None = None,
) -> dict[str, Any]:
    """Write ``recs`` to the folder ``out`` (which must not exist or be empty); returns the
    manifest with ``manifest_sha256`` added."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"{out} exists and is not an empty folder; give a new folder")
    files: dict[str, bytes] = {}
    records = []
    rows = 0
    for rec in recs:
        entry = rec.public()
        entry["input_file"] = None
        if rec.payload is not None:
            if fernet is None:
                raise InputError(
                    "the records hold encrypted payloads; give the forensic key (the guard "
                    "config's forensics.key_file or its environment variable)"
                )
            x = decode_payload(rec.payload, fernet)
            if fingerprint(x) != rec.fingerprint:
                raise InputError(f"record {rec.id}: the payload does not match its fingerprint")
            name = f"inputs/{rec.id}.npy"
            files[name] = _npy(x)
            entry["input_file"] = name
            rows += len(x)
        records.append(entry)
    files["records.json"] = json.dumps(records, sort_keys=True, default=str, indent=1).encode()
    manifest = {
        "format": FORMAT,
        "incident": incident_id,
        "created_at": now().isoformat(),
        "window": {
            "since": window[0].isoformat(),
            "until": window[1].isoformat() if window[1] else None,
        },
        "client_id": client_id,
        "records": len(records),
        "rows": rows,
        "files": [
            {"path": p, "bytes": len(b), "sha256": _sha256(b)} for p, b in sorted(files.items())
        ],
    }
    out.mkdir(mode=0o700, parents=True, exist_ok=True)  # decrypted inputs: owner only
    (out / "inputs").mkdir(mode=0o700, exist_ok=True)
    for p, b in files.items():
        (out / p).write_bytes(b)
    raw = json.dumps(manifest, sort_keys=True, indent=1).encode()
    (out / "manifest.json").write_bytes(raw)
    return {**manifest, "manifest_sha256": _sha256(raw)}


def verify_folder(folder: Path) -> dict[str, Any]:
    """Check an evidence folder against its manifest: every listed file exists with its size
    and SHA-256, and no other file is there. Returns the manifest; InputError otherwise."""
    folder = Path(folder)
    manifest = _safejson.load_file(folder / "manifest.json", what="evidence manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise InputError(f"{folder}/manifest.json is not an {FORMAT} manifest")
    listed = manifest.get("files")
    if not isinstance(listed, list) or len(listed) > MAX_RECORDS + 1:
        raise InputError(f"{folder}/manifest.json: 'files' must be a list")
    seen = set()
    for f in listed:
        if not isinstance(f, dict) or not isinstance(f.get("path"), str):
            raise InputError(f"{folder}/manifest.json: a file entry has no path")
        path = f["path"]
        if not _FILE_RE.match(path) or path in seen:
            raise InputError(f"{folder}/manifest.json: unexpected file entry {path[:80]!r}")
        seen.add(path)
        data = _safejson.read_bytes(folder / path, what="evidence file", max_bytes=MAX_FILE_BYTES)
        if len(data) != f.get("bytes") or _sha256(data) != f.get("sha256"):
            raise InputError(f"{folder}/{path}: does not match its SHA-256 in the manifest")
    present = {"records.json"} if (folder / "records.json").exists() else set()
    inputs = folder / "inputs"
    if inputs.is_dir():
        present |= {f"inputs/{p.name}" for p in inputs.iterdir()}
    extra = sorted(present - seen)
    if extra or "records.json" not in seen:
        raise InputError(
            f"{folder}: files not in the manifest: {', '.join(extra[:3])}"
            if extra
            else f"{folder}: the manifest does not list records.json"
        )
    return dict(manifest)


def load_folder(folder: Path) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """The inputs of a verified evidence folder (rows of every record with an input file, in
    record order) and the records. InputError when no record holds inputs."""
    folder = Path(folder)
    verify_folder(folder)
    records = _safejson.load_file(
        folder / "records.json", what="evidence records", max_bytes=MAX_FILE_BYTES
    )
    if not isinstance(records, list):
        raise InputError(f"{folder}/records.json must hold a list")
    arrays: list[np.ndarray] = []
    for r in records:
        name = r.get("input_file") if isinstance(r, dict) else None
        if name is None:
            continue
        if not isinstance(name, str) or not _FILE_RE.match(name) or name == "records.json":
            raise InputError(f"{folder}/records.json: bad input_file {str(name)[:80]!r}")
        try:
            x = np.load(folder / name, allow_pickle=False)
        except (ValueError, OSError, EOFError):
            raise InputError(f"{folder}/{name}: not a valid .npy array") from None
        if x.dtype != np.float32 or x.ndim < 2 or not np.isfinite(x).all():
            raise InputError(f"{folder}/{name}: must be a finite float32 batch")
        if arrays and x.shape[1:] != arrays[0].shape[1:]:
            raise InputError(f"{folder}: the inputs have different shapes")
        arrays.append(x)
    if not arrays:
        raise InputError(
            f"{folder}: no record holds inputs (hash-only forensics keeps no payloads); "
            "triage needs forensics.mode 'encrypted'"
        )
    return np.concatenate(arrays), [r for r in records if isinstance(r, dict)]
