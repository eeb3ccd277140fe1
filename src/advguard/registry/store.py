"""The model registry: versions, stages, reports, signatures and a hash-chained audit log.

Layout of a registry root (default ``~/.advguard/registry``, or ``$ADVGUARD_REGISTRY``)::

    <root>/registry.db              SQLite metadata (or a PostgreSQL URL instead)
    <root>/objects/sha256/ab/cdef.. content-addressed artifacts, reports, signatures

A push scans every file (:mod:`advguard.registry.scan`), writes the objects
(atomic + fsync), then commits the version row, its reports, its first stage
event and an audit entry in *one* database transaction. A crash before that
commit leaves only unreferenced objects: the version is either fully visible or
absent. Every read re-hashes the bytes.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError, OperationalError

from advguard.errors import InputError
from advguard.registry import db
from advguard.registry.db import STAGES
from advguard.registry.objects import (
    CorruptObjectError,
    ObjectStore,
    digest_of_ref,
    open_object_store,
    sha256_file,
)
from advguard.registry.scan import ScanResult, scan_files, validate_safetensors

Progress = Callable[[str, int, int], None]

REPORT_KIND = "advguard.robustness-report"
GENESIS_HASH = "0" * 64
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,199}$")
_RETRIES = 30


def default_root() -> Path:
    """``$ADVGUARD_REGISTRY`` or ``~/.advguard/registry``."""
    env = os.environ.get("ADVGUARD_REGISTRY")
    return Path(env).expanduser() if env else Path.home() / ".advguard" / "registry"


def default_actor() -> str:
    """Who is acting: ``$ADVGUARD_ACTOR``, else the login name."""
    env = os.environ.get("ADVGUARD_ACTOR")
    if env:
        return env
    try:
        return getpass.getuser()
    except Exception:  # no login name (containers without passwd entry)
        return f"uid:{os.getuid()}" if hasattr(os, "getuid") else "unknown"


def _now() -> datetime:
    return datetime.now(UTC)


def _iso(ts: datetime | None) -> str | None:
    if ts is None:
        return None
    if ts.tzinfo is None:  # SQLite hands back naive datetimes (stored as UTC)
        ts = ts.replace(tzinfo=UTC)
    return ts.isoformat(timespec="seconds")


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def audit_hash(entry: Mapping[str, Any], prev_hash: str) -> str:
    """sha256 over the canonical JSON of the entry (seq, ts, actor, action, subject,
    details) followed by the previous entry's hash."""
    body = {k: entry[k] for k in ("seq", "ts", "actor", "action", "subject", "details")}
    return hashlib.sha256((canonical_json(body) + prev_hash).encode("utf-8")).hexdigest()


def git_revision(cwd: Path | None = None) -> str | None:
    """``git rev-parse HEAD`` of ``cwd`` (``+dirty`` when there are local changes), or None."""
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5
        )
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


# -- results ----------------------------------------------------------------------
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


# -- helpers ----------------------------------------------------------------------
def parse_ref(ref: str) -> tuple[str, int | None, str | None]:
    """``NAME``, ``NAME:VERSION`` or ``NAME@STAGE`` -> (name, version, stage)."""
    name, version, stage = ref, None, None
    if "@" in ref:
        name, stage = ref.rsplit("@", 1)
        if stage not in STAGES:
            raise InputError(f"unknown stage {stage!r} in {ref!r}; stages: {', '.join(STAGES)}")
    elif ":" in ref:
        name, v = ref.rsplit(":", 1)
        if not v.isdigit() or int(v) < 1:
            raise InputError(f"version in {ref!r} must be a positive integer (e.g. {name}:3)")
        version = int(v)
    check_name(name)
    return name, version, stage


def check_name(name: str) -> str:
    if not _NAME.match(name or "") or ".." in name:
        raise InputError(
            f"model name {name!r} is invalid: use letters, digits, '.', '_', '-', '/' "
            "(no ':' or '@'), at most 200 characters"
        )
    return name


def _check_file_names(files: Mapping[str, Path]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for name, path in files.items():
        parts = PurePosixPath(name).parts
        if (
            not name
            or "\\" in name
            or name.startswith("/")
            or any(p in ("", ".", "..") for p in parts)
        ):
            raise InputError(f"artifact name {name!r} must be a relative path without '..'")
        p = Path(path)
        if not p.is_file():
            raise InputError(f"model file not found: {p}")
        out[name] = p
    if not out:
        raise InputError("push needs at least one model file (--model FILE)")
    return out


def _read_report(path: Path) -> tuple[dict[str, Any], bytes]:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"report {p} does not exist")
    raw = p.read_bytes()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"report {p} is not valid JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("kind") != REPORT_KIND:
        raise InputError(f"{p} is not an advguard robustness report (kind {REPORT_KIND!r})")
    tm = data.get("threat_model")
    if not isinstance(tm, dict) or not isinstance(tm.get("name"), str):
        raise InputError(f"report {p} does not name its threat model (threat_model.name)")
    return data, raw


def _safetensors_spec(path: Path) -> dict[str, Any]:
    meta = validate_safetensors(path)
    out: dict[str, Any] = {}
    for key, value in meta.items():
        if key.startswith("advguard."):
            name = key[len("advguard.") :]
            try:
                out[name] = value if name in ("factory", "format") else json.loads(value)
            except json.JSONDecodeError:
                out[name] = value
    return out


def _retrying(fn: Callable[[], Any]) -> Any:
    """Run a write transaction, retrying on unique-constraint races and lock timeouts."""
    for attempt in range(_RETRIES):
        try:
            return fn()
        except (IntegrityError, OperationalError) as exc:
            msg = str(exc.orig if hasattr(exc, "orig") else exc).lower()
            transient = isinstance(exc, IntegrityError) or "locked" in msg or "busy" in msg
            transient = transient or "serializ" in msg or "deadlock" in msg
            if not transient or attempt == _RETRIES - 1:
                raise
            time.sleep(random.uniform(0.005, 0.05) * (1 + attempt))
    raise AssertionError("unreachable")  # pragma: no cover


def _append_audit(
    conn: Connection, actor: str, action: str, subject: str, details: Mapping[str, Any]
) -> AuditEntry:
    last = conn.execute(
        select(db.audit.c.seq, db.audit.c.hash).order_by(db.audit.c.seq.desc()).limit(1)
    ).first()
    seq, prev = (1, GENESIS_HASH) if last is None else (last.seq + 1, last.hash)
    details_json = canonical_json(dict(details))
    entry = {
        "seq": seq,
        "ts": _now().isoformat(timespec="microseconds"),
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


# -- the registry ----------------------------------------------------------------
class Registry:
    """A model registry rooted at ``root`` (metadata DB + content-addressed objects).

    ``db_url`` defaults to ``sqlite:///<root>/registry.db``; pass a
    ``postgresql+psycopg://`` URL for PostgreSQL. ``objects`` is an object-store
    URL (default ``<root>/objects``; see :mod:`advguard.registry.objects`).
    Opening runs the schema migrations (Alembic ``upgrade head``).
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        *,
        db_url: str | None = None,
        objects: str | ObjectStore | None = None,
        actor: str | None = None,
    ) -> None:
        self.root = Path(root).expanduser() if root is not None else default_root()
        self.root.mkdir(parents=True, exist_ok=True)
        self.db_url = (
            db_url
            or os.environ.get("ADVGUARD_REGISTRY_DB")
            or (f"sqlite:///{(self.root / 'registry.db').resolve()}")
        )
        self.objects: ObjectStore = (
            objects if isinstance(objects, ObjectStore) else open_object_store(objects, self.root)
        )
        self.actor = actor or default_actor()
        self.engine: Engine = db.make_engine(self.db_url)
        try:
            _retrying(lambda: db.upgrade(self.engine))
        except OperationalError as exc:
            self.engine.dispose()
            raise InputError(
                f"cannot open the registry database {self.engine.url!r}: {exc.orig}"
            ) from None

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- push --------------------------------------------------------------------
    def push(
        self,
        name: str,
        files: Path | Mapping[str, Path],
        *,
        factory: str | None = None,
        reports: Sequence[Path] = (),
        private_key: Path | None = None,
        data_hash: str | None = None,
        training_config: Mapping[str, Any] | None = None,
        code_revision: str | None = None,
        input_spec: Mapping[str, Any] | None = None,
        allow_pickle: bool = False,
        progress: Progress | None = None,
    ) -> VersionInfo:
        """Scan, store and register a new version of ``name`` (stage ``candidate``).

        ``files`` is the model file, or a mapping of stored name -> path (the
        first entry is the model; its sha256 is the version's model digest).
        ``reports`` are advguard report.json files; with ``private_key`` the
        model is signed and each report is attested against the model digest.
        """
        check_name(name)
        if isinstance(files, str | os.PathLike):
            files = {Path(files).name: Path(files)}
        files = _check_file_names(files)
        step = progress or (lambda stage, done, total: None)
        total = len(files) + len(reports) + 2

        scans = scan_files(files, allow_pickle=allow_pickle, factory=factory)
        step("scan", 1, total)
        primary_name, primary = next(iter(files.items()))
        fmt, spec = self._format_and_spec(scans[0], primary, factory)
        spec.update(dict(input_spec or {}))
        parsed = [_read_report(Path(r)) for r in reports]

        artifacts: dict[str, dict[str, Any]] = {}
        for i, (fname, path) in enumerate(files.items()):
            digest, size = self.objects.put_file(path)
            artifacts[fname] = {"sha256": digest, "size": size, "format": scans[i].format}
            step("store", i + 1, total)
        model_digest = artifacts[primary_name]["sha256"]

        signature_ref: str | None = None
        report_rows: list[dict[str, Any]] = []
        key = Path(private_key) if private_key is not None else None
        signing = None
        if key is not None:
            from advguard.registry import signing

            signature_ref = self.objects.ref(
                self.objects.put_bytes(signing.sign_model(dict(files), key))
            )
        for data, raw in parsed:
            digest = self.objects.put_bytes(raw)
            att_ref = None
            if signing is not None and key is not None:
                env = signing.attest_report(model_digest, data, key)
                att_ref = self.objects.ref(self.objects.put_bytes(env))
            report_rows.append(
                {"threat_model": data["threat_model"]["name"], "digest": digest, "att": att_ref}
            )
            step("store", len(files) + len(report_rows), total)
        # the signature covers the files as read now; they must still be what we stored
        for fname, path in files.items():
            if sha256_file(path)[0] != artifacts[fname]["sha256"]:
                raise InputError(f"{path} changed during the push; push again")

        provenance = {
            "training_data_sha256": data_hash,
            "training_config": dict(training_config) if training_config is not None else None,
            "code_revision": code_revision if code_revision is not None else git_revision(),
            "user": self.actor,
            "pushed_at": _now().isoformat(timespec="seconds"),
            "factory": spec.get("factory"),
        }

        def txn() -> int:
            with self.engine.begin() as conn:
                model_id = self._model_id(conn, name, create=True)
                current = conn.execute(
                    select(func.max(db.versions.c.version)).where(
                        db.versions.c.model_id == model_id
                    )
                ).scalar()
                number = int(current or 0) + 1
                now = _now()
                vid = conn.execute(
                    insert(db.versions).values(
                        model_id=model_id,
                        version=number,
                        format=fmt,
                        artifacts=artifacts,
                        model_digest=model_digest,
                        input_spec=spec,
                        provenance=provenance,
                        stage="candidate",
                        created_at=now,
                        signature_path=signature_ref,
                    )
                ).inserted_primary_key[0]
                for row in report_rows:
                    conn.execute(
                        insert(db.reports).values(
                            version_id=vid,
                            threat_model=row["threat_model"],
                            report_digest=row["digest"],
                            attestation_path=row["att"],
                            created_at=now,
                        )
                    )
                conn.execute(
                    insert(db.stage_events).values(
                        version_id=vid,
                        from_stage=None,
                        to_stage="candidate",
                        reason="push",
                        actor=self.actor,
                        ts=now,
                    )
                )
                _append_audit(
                    conn,
                    self.actor,
                    "push",
                    f"{name}:{number}",
                    {
                        "model_digest": model_digest,
                        "artifacts": {k: v["sha256"] for k, v in artifacts.items()},
                        "reports": [r["digest"] for r in report_rows],
                        "signed": signature_ref is not None,
                        "format": fmt,
                    },
                )
                return number

        number = _retrying(txn)
        step("commit", total, total)
        info = self.get(f"{name}:{number}")
        info.scan = [s.to_dict() for s in scans]
        return info

    @staticmethod
    def _format_and_spec(
        scan: ScanResult, path: Path, factory: str | None
    ) -> tuple[str, dict[str, Any]]:
        spec: dict[str, Any] = {}
        fmt = scan.format
        if fmt == "safetensors":
            meta = _safetensors_spec(path)
            factory = factory or meta.get("factory")
            if not factory:
                raise InputError(
                    f"{path} stores no factory; pass --factory module:callable so the "
                    "architecture can be rebuilt from the weights"
                )
            spec = {
                "shape": meta.get("input_shape"),
                "bounds": meta.get("bounds"),
                "num_classes": meta.get("num_classes"),
                "factory": factory,
                "factory_kwargs": meta.get("factory_kwargs"),
                "preprocessing": None,
            }
            fmt = "safetensors+factory"
        elif factory:
            spec["factory"] = factory
        return fmt, spec

    # -- reading ---------------------------------------------------------------------
    @staticmethod
    def _model_id(conn: Connection, name: str, *, create: bool = False) -> int:
        mid = conn.execute(select(db.models.c.id).where(db.models.c.name == name)).scalar()
        if mid is not None:
            return int(mid)
        if not create:
            raise InputError(f"no model named {name!r} in the registry (see: registry list)")
        return int(
            conn.execute(
                insert(db.models).values(name=name, created_at=_now())
            ).inserted_primary_key[0]
        )

    def _info(self, conn: Connection, name: str, row: Any) -> VersionInfo:
        reps = conn.execute(
            select(db.reports).where(db.reports.c.version_id == row.id).order_by(db.reports.c.id)
        ).all()
        return VersionInfo(
            name=name,
            version=int(row.version),
            format=row.format,
            stage=row.stage,
            model_digest=row.model_digest,
            artifacts=dict(row.artifacts),
            input_spec=dict(row.input_spec),
            provenance=dict(row.provenance),
            created_at=_iso(row.created_at),
            signature=row.signature_path,
            reports=[
                ReportInfo(r.threat_model, r.report_digest, r.attestation_path, _iso(r.created_at))
                for r in reps
            ],
        )

    def _row(self, conn: Connection, ref: str) -> tuple[str, Any]:
        name, version, stage = parse_ref(ref)
        mid = self._model_id(conn, name)
        q = select(db.versions).where(db.versions.c.model_id == mid)
        if version is not None:
            q = q.where(db.versions.c.version == version)
        elif stage is not None:
            q = q.where(db.versions.c.stage == stage)
        row = conn.execute(q.order_by(db.versions.c.version.desc()).limit(1)).first()
        if row is None:
            what = f"version {version}" if version else f"a version in stage {stage}"
            raise InputError(f"model {name!r} has no {what or 'versions'} (see: registry list)")
        return name, row

    def get(self, ref: str) -> VersionInfo:
        """The version ``NAME`` (latest), ``NAME:VERSION`` or ``NAME@STAGE``."""
        with self.engine.connect() as conn:
            name, row = self._row(conn, ref)
            return self._info(conn, name, row)

    def list_models(self) -> list[dict[str, Any]]:
        """Every model with its version count, latest version and production version."""
        out = []
        with self.engine.connect() as conn:
            for m in conn.execute(select(db.models).order_by(db.models.c.name)).all():
                vs = conn.execute(
                    select(db.versions.c.version, db.versions.c.stage)
                    .where(db.versions.c.model_id == m.id)
                    .order_by(db.versions.c.version)
                ).all()
                if not vs:
                    continue
                prod = [v.version for v in vs if v.stage == "production"]
                out.append(
                    {
                        "name": m.name,
                        "versions": len(vs),
                        "latest": vs[-1].version,
                        "production": prod[-1] if prod else None,
                        "stages": {str(v.version): v.stage for v in vs},
                    }
                )
        return out

    def versions(self, name: str) -> list[VersionInfo]:
        with self.engine.connect() as conn:
            mid = self._model_id(conn, check_name(name))
            rows = conn.execute(
                select(db.versions)
                .where(db.versions.c.model_id == mid)
                .order_by(db.versions.c.version)
            ).all()
            return [self._info(conn, name, r) for r in rows]

    def history(self, name: str) -> list[StageEvent]:
        """Stage changes of every version of ``name``, oldest first."""
        with self.engine.connect() as conn:
            mid = self._model_id(conn, check_name(name))
            rows = conn.execute(
                select(db.stage_events, db.versions.c.version)
                .join(db.versions, db.versions.c.id == db.stage_events.c.version_id)
                .where(db.versions.c.model_id == mid)
                .order_by(db.stage_events.c.id)
            ).all()
            return [
                StageEvent(r.version, r.from_stage, r.to_stage, r.actor, _iso(r.ts)) for r in rows
            ]

    def report(self, info: VersionInfo, index: int) -> dict[str, Any]:
        """The stored report JSON (digest verified)."""
        rep = info.reports[index]
        raw = self.objects.read_bytes(rep.digest, name=f"report {rep.threat_model}")
        return json.loads(raw)

    # -- pull / verify -------------------------------------------------------------
    def _check_signature(
        self, info: VersionInfo, paths: Mapping[str, Path], public_key: Path | None
    ) -> str:
        if info.signature is None:
            if public_key is not None:
                raise InputError(
                    f"{info.ref} is not signed, so it cannot be verified with a public key; "
                    "push it again with --key to sign it"
                )
            return "unsigned"
        if public_key is None:
            return "not checked (no public key given)"
        from advguard.registry import signing

        bundle = self.objects.read_bytes(digest_of_ref(info.signature), name="signature bundle")
        signing.verify_model(dict(paths), bundle, Path(public_key))
        for rep in info.reports:
            raw = self.objects.read_bytes(rep.digest, name=f"report {rep.threat_model}")
            if rep.attestation is None:
                raise signing.SignatureError(
                    f"report {rep.threat_model} of {info.ref} has no attestation"
                )
            env = self.objects.read_bytes(
                digest_of_ref(rep.attestation), name=f"attestation of report {rep.threat_model}"
            )
            predicate = signing.verify_report_attestation(env, Path(public_key), info.model_digest)
            if canonical_json(predicate) != canonical_json(json.loads(raw)):
                raise signing.SignatureError(
                    f"attestation of report {rep.threat_model} does not match the stored report"
                )
        return "verified"

    def pull(
        self, ref: str, out: str | os.PathLike[str], *, public_key: Path | None = None
    ) -> PullResult:
        """Copy a version's files (and reports, signature, model card) into ``out``.

        Every object is re-hashed; with ``public_key`` the signature and report
        attestations are verified too. Nothing is written to ``out`` unless all
        checks pass.
        """
        from advguard.registry.card import render_model_card

        info = self.get(ref)
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".advguard-pull-", dir=out))
        try:
            paths: dict[str, Path] = {}
            for fname, art in info.artifacts.items():
                dest = staging / fname
                self.objects.copy_to(art["sha256"], dest, name=fname)
                paths[fname] = dest
            status = self._check_signature(info, paths, public_key)
            extra: dict[str, bytes] = {}
            reports = []
            for i, rep in enumerate(info.reports):
                raw = self.objects.read_bytes(rep.digest, name=f"report {rep.threat_model}")
                reports.append(json.loads(raw))
                stem = f"reports/{i + 1:02d}-{re.sub(r'[^A-Za-z0-9._-]', '_', rep.threat_model)}"
                extra[f"{stem}.json"] = raw
                if rep.attestation:
                    extra[f"{stem}.intoto.json"] = self.objects.read_bytes(
                        digest_of_ref(rep.attestation), name=f"attestation {rep.threat_model}"
                    )
            if info.signature:
                extra["signature.sigstore.json"] = self.objects.read_bytes(
                    digest_of_ref(info.signature), name="signature bundle"
                )
            extra["MODEL_CARD.md"] = render_model_card(info, reports, status).encode()
            extra["version.json"] = json.dumps(info.to_dict(), indent=2).encode()
            for rel, data in extra.items():
                (staging / rel).parent.mkdir(parents=True, exist_ok=True)
                (staging / rel).write_bytes(data)
            written = []
            for src in sorted(p for p in staging.rglob("*") if p.is_file()):
                dest = out / src.relative_to(staging)
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(src, dest)
                written.append(dest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return PullResult(info, out, written, status)

    def verify(self, ref: str, *, public_key: Path | None = None) -> VerifyResult:
        """Re-hash every object of the version(s) ``ref`` names (``NAME`` = all versions);
        with ``public_key`` also verify signatures and attestations."""
        name, version, stage = parse_ref(ref)
        infos = self.versions(name) if version is None and stage is None else [self.get(ref)]
        problems: list[str] = []
        sig: dict[str, str] = {}
        checked = 0
        for info in infos:
            objs = [(f"{info.ref} {n}", a["sha256"]) for n, a in info.artifacts.items()]
            for r in info.reports:
                objs.append((f"{info.ref} report {r.threat_model}", r.digest))
                if r.attestation:
                    objs.append(
                        (f"{info.ref} attestation {r.threat_model}", digest_of_ref(r.attestation))
                    )
            if info.signature:
                objs.append((f"{info.ref} signature bundle", digest_of_ref(info.signature)))
            bad = False
            for label, digest in objs:
                checked += 1
                try:
                    self.objects.read_bytes(digest, name=label)
                except CorruptObjectError as exc:
                    problems.append(str(exc))
                    bad = True
            if bad:
                sig[info.ref] = "not checked (objects corrupted)"
                continue
            with tempfile.TemporaryDirectory(prefix="advguard-verify-") as tmp:
                paths = {}
                for fname, art in info.artifacts.items():
                    paths[fname] = Path(tmp) / fname
                    self.objects.copy_to(art["sha256"], paths[fname], name=fname)
                try:
                    sig[info.ref] = self._check_signature(
                        info, paths, public_key if info.signature else None
                    )
                except InputError as exc:
                    sig[info.ref] = f"FAILED: {exc}"
                    problems.append(f"{info.ref}: {exc}")
        return VerifyResult(not problems, checked, problems, sig)

    # -- stages ----------------------------------------------------------------------
    def _set_stage(self, conn: Connection, row: Any, stage: str, now: datetime, reason: str) -> str:
        conn.execute(update(db.versions).where(db.versions.c.id == row.id).values(stage=stage))
        conn.execute(
            insert(db.stage_events).values(
                version_id=row.id,
                from_stage=row.stage,
                to_stage=stage,
                reason=reason,
                actor=self.actor,
                ts=now,
            )
        )
        return str(row.stage)

    @staticmethod
    def _production_stack(conn: Connection, model_id: int) -> list[int]:
        """Versions that were production, oldest first, with rolled-back ones popped.

        Replays the stage events: a promotion to production pushes the version, a
        rollback pops the version it replaced; the top is the current production.
        """
        rows = conn.execute(
            select(db.stage_events.c.reason, db.stage_events.c.to_stage, db.versions.c.version)
            .join(db.versions, db.versions.c.id == db.stage_events.c.version_id)
            .where(db.versions.c.model_id == model_id)
            .order_by(db.stage_events.c.id)
        ).all()
        stack: list[int] = []
        for r in rows:
            if r.to_stage != "production":
                continue
            if r.reason == "rollback" and stack:
                stack.pop()  # the version that was rolled back
            if r.version in stack:
                stack.remove(r.version)
            stack.append(int(r.version))
        return stack

    def promote(self, name: str, version: int, stage: str = "production") -> VersionInfo:
        """Move ``name:version`` to ``stage``; a previous production version is archived."""
        if stage not in STAGES:
            raise InputError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
        ref = f"{check_name(name)}:{int(version)}"

        def txn() -> None:
            with self.engine.begin() as conn:
                _, row = self._row(conn, ref)
                if row.stage == stage:
                    raise InputError(f"{ref} is already in stage {stage}")
                now = _now()
                archived = []
                if stage == "production":
                    for old in conn.execute(
                        select(db.versions).where(
                            db.versions.c.model_id == row.model_id,
                            db.versions.c.stage == "production",
                        )
                    ).all():
                        self._set_stage(conn, old, "archived", now, "archive")
                        archived.append(int(old.version))
                before = self._set_stage(conn, row, stage, now, "promote")
                _append_audit(
                    conn,
                    self.actor,
                    "promote",
                    ref,
                    {"from": before, "to": stage, "archived": archived},
                )

        _retrying(txn)
        return self.get(ref)

    def rollback(self, name: str) -> VersionInfo:
        """Put the previous production version back into production (current -> archived)."""
        check_name(name)

        def txn() -> int:
            with self.engine.begin() as conn:
                mid = self._model_id(conn, name)
                cur = conn.execute(
                    select(db.versions).where(
                        db.versions.c.model_id == mid, db.versions.c.stage == "production"
                    )
                ).first()
                if cur is None:
                    raise InputError(f"{name} has no production version to roll back from")
                stack = self._production_stack(conn, mid)
                if stack and stack[-1] == cur.version:
                    stack.pop()
                prev = None
                while stack and prev is None:
                    prev = conn.execute(
                        select(db.versions).where(
                            db.versions.c.model_id == mid, db.versions.c.version == stack.pop()
                        )
                    ).first()
                if prev is None:
                    raise InputError(
                        f"{name}:{cur.version} has no earlier production version to roll back to"
                    )
                now = _now()
                self._set_stage(conn, cur, "archived", now, "archive")
                self._set_stage(conn, prev, "production", now, "rollback")
                _append_audit(
                    conn,
                    self.actor,
                    "rollback",
                    f"{name}:{prev.version}",
                    {"from_version": int(cur.version), "to_version": int(prev.version)},
                )
                return int(prev.version)

        return self.get(f"{name}:{_retrying(txn)}")

    # -- audit -------------------------------------------------------------------
    def audit_log(self, *, subject: str | None = None) -> list[AuditEntry]:
        q = select(db.audit).order_by(db.audit.c.seq)
        if subject is not None:
            q = q.where(
                (db.audit.c.subject == subject) | db.audit.c.subject.startswith(subject + ":")
            )
        with self.engine.connect() as conn:
            rows = conn.execute(q).all()
        out = []
        for r in rows:
            try:
                details = json.loads(r.details)
            except json.JSONDecodeError:
                details = {"_unparsable": r.details}
            out.append(
                AuditEntry(r.seq, r.ts, r.actor, r.action, r.subject, details, r.prev_hash, r.hash)
            )
        return out

    def verify_audit(self) -> AuditCheck:
        """Recompute the hash chain; report the first entry whose link is broken."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(db.audit).order_by(db.audit.c.seq)).all()
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
                details = json.loads(r.details)
            except json.JSONDecodeError:
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


def resolve_baseline(
    name: str,
    *,
    threat_model: str | None = None,
    root: str | Path | None = None,
    db_url: str | None = None,
) -> Any:
    """The robustness report of ``name``'s production version (the gate's ``production``).

    With ``threat_model`` the report for that threat model is chosen (the latest attached
    one); the report's digest is verified on read. Returns an ``evaluate.report.Report``.
    """
    from pydantic import ValidationError

    from advguard.evaluate.report import Report

    with Registry(root, db_url=db_url) as reg:
        info = reg.get(f"{name}@production")
        if not info.reports:
            raise InputError(
                f"{info.ref} is in production but has no robustness report attached; push one "
                "with `advguard registry push ... --report report.json`"
            )
        picks = [
            i
            for i, r in enumerate(info.reports)
            if threat_model is None or r.threat_model == threat_model
        ]
        if not picks:
            have = ", ".join(sorted({r.threat_model for r in info.reports}))
            raise InputError(
                f"{info.ref} has no report for threat model {threat_model!r} (it has: {have})"
            )
        data = reg.report(info, picks[-1])
    try:
        return Report.model_validate(data)
    except ValidationError as e:
        raise InputError(f"the production report of {info.ref} does not validate: {e}") from None
