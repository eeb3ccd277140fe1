"""The model registry: versions, stages, reports, signatures and a hash-chained audit log.

Layout of a registry root (default ``~/.advguard/registry``, or ``$ADVGUARD_REGISTRY``)::

    <root>/registry.db              SQLite metadata (or a PostgreSQL URL instead)
    <root>/objects/sha256/ab/cdef.. content-addressed artifacts, reports, signatures

A push scans every file (:mod:`advguard.registry.scan`), writes the objects
(atomic + fsync), then commits the version row, its reports, its first stage
event and an audit entry in *one* database transaction. A crash before that
commit leaves only unreferenced objects: the version is either fully visible or
absent. Every read re-hashes the bytes.

The hash-chained audit log (append, chain check, replay) lives in
:mod:`advguard.registry.audit`, names and references (``NAME``, ``NAME:VERSION``,
``NAME@STAGE``, artifact names) in :mod:`advguard.registry.refs` and the returned records in
:mod:`advguard.registry.types`; this module re-exports their public names.
"""

from __future__ import annotations

import contextlib
import functools
import getpass
import json
import os
import random
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.engine import Connection, CursorResult, Engine
from sqlalchemy.exc import DatabaseError, IntegrityError, OperationalError

from advguard.errors import AdvguardError, InputError
from advguard.registry import audit, db
from advguard.registry.audit import GENESIS_HASH, audit_hash, canonical_json
from advguard.registry.db import STAGES
from advguard.registry.objects import (
    CollectableStore,
    CorruptObjectError,
    ObjectStore,
    StoredFile,
    digest_of_ref,
    open_object_store,
    sha256_file,
)
from advguard.registry.promotion import PromotionCheck, PromotionRefusedError, PromotionRules
from advguard.registry.refs import (
    MAX_VERSION,
    check_artifact_name,
    check_file_names,
    check_name,
    check_name_set,
    check_version,
    parse_ref,
)
from advguard.registry.scan import ScanResult, scan_files, validate_safetensors
from advguard.registry.types import (
    AuditCheck,
    AuditEntry,
    GcItem,
    GcResult,
    PullResult,
    ReportInfo,
    StageEvent,
    VerifyResult,
    VersionInfo,
)

# The audit chain lives in ``audit.py``, names and references in ``refs.py``; their public
# names stay importable from here.
__all__ = [
    "GENESIS_HASH",
    "MAX_VERSION",
    "Registry",
    "audit_hash",
    "canonical_json",
    "check_artifact_name",
    "check_name",
    "check_version",
    "default_actor",
    "default_root",
    "git_revision",
    "parse_ref",
]

Progress = Callable[[str, int, int], None]

REPORT_KIND = "advguard.robustness-report"
_RETRIES = 30
#: Artifact file names the pull writes itself (an artifact may not shadow them).
_MAX_ARTIFACTS = 1000
_MAX_REPORTS = 1000
_MAX_TEXT = 1000
#: Temporary object files older than this are left-overs of interrupted pushes.
STALE_TEMP_SECONDS = 3600.0


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


def _inserted_id(result: CursorResult[Any]) -> int:
    """The primary key of the row a single-row INSERT created."""
    key = result.inserted_primary_key
    if key is None:
        raise AdvguardError("the registry database returned no id for an inserted row")
    return int(key[0])


def _iso(ts: datetime | None) -> str | None:
    if ts is None:
        return None
    if ts.tzinfo is None:  # SQLite hands back naive datetimes (stored as UTC)
        ts = ts.replace(tzinfo=UTC)
    return ts.isoformat(timespec="seconds")


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


MAX_REPORT_BYTES = 64 << 20


def _read_report(path: Path, model_digest: str, model_name: str) -> tuple[dict[str, Any], bytes]:
    """Read a report for a push: schema-validated by :func:`advguard.evaluate.report.load_report`
    (the exact bytes that are stored), and bound to the pushed model: the report's
    ``model.sha256`` (recorded by ``advguard evaluate``) must equal ``model_digest``."""
    from advguard.evaluate.report import load_report

    p = Path(path)
    if not p.is_file():
        raise InputError(f"report {p} does not exist")
    with p.open("rb") as f:
        raw = f.read(MAX_REPORT_BYTES + 1)
    if len(raw) > MAX_REPORT_BYTES:
        raise InputError(f"report {p} is larger than {MAX_REPORT_BYTES >> 20} MiB")
    # validate the very bytes that will be stored (not a second read of a file that may change)
    with tempfile.TemporaryDirectory(prefix="advguard-report-") as tmp:
        copy = Path(tmp) / "report.json"
        copy.write_bytes(raw)
        try:
            report = load_report(copy)
        except InputError as exc:
            raise InputError(str(exc).replace(str(copy), str(p))) from None
    recorded = report.model.get("sha256") if isinstance(report.model, dict) else None
    if not isinstance(recorded, str) or not recorded:
        raise InputError(
            f"report {p} does not record the sha256 of the model it evaluated (model.sha256), "
            "so it cannot be bound to the pushed model; evaluate the model file with "
            "`advguard evaluate --model FILE`"
        )
    if recorded.lower().removeprefix("sha256:") != model_digest:
        raise InputError(
            f"report {p} is about another model: it evaluated sha256:{recorded}, but the pushed "
            f"model {model_name} has sha256:{model_digest}; attach the report of this model"
        )
    data = json.loads(raw)
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


# -- reading the database back: every value is validated --------------------------------
_FORMAT = re.compile(r"^[A-Za-z0-9+._-]{1,40}$")


def _db_text(value: Any, what: str, limit: int = _MAX_TEXT) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= limit:
        raise InputError(f"{what} is not a non-empty string of at most {limit} characters")
    if any(ord(c) < 32 for c in value):
        raise InputError(f"{what} contains control characters")
    return value


def _db_digest(value: Any, what: str) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[0-9a-f]{64}", value):
        raise InputError(f"{what} is not 64 lower-case hex characters")
    return value


def _db_ref(value: Any, what: str) -> str | None:
    if value is None:
        return None
    _db_text(value, what)
    try:
        digest_of_ref(value)
    except InputError:
        raise InputError(f"{what} does not name a sha256 object") from None
    return str(value)


def _db_int(value: Any, what: str, lo: int, hi: int = MAX_VERSION) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise InputError(f"{what} is not an integer in {lo}..{hi}")
    return value


def _db_stage(value: Any, what: str = "stage") -> str:
    if value not in STAGES:
        raise InputError(f"{what} {str(value)[:40]!r} is not one of {', '.join(STAGES)}")
    return str(value)


def _db_time(value: Any) -> str | None:
    if value is not None and not isinstance(value, datetime):
        raise InputError("a timestamp is not a date-time")
    return _iso(value)


def _db_artifacts(value: Any) -> dict[str, dict[str, Any]]:
    if not isinstance(value, dict) or not 0 < len(value) <= _MAX_ARTIFACTS:
        raise InputError(f"artifacts is not an object of 1..{_MAX_ARTIFACTS} files")
    out: dict[str, dict[str, Any]] = {}
    for name, art in value.items():
        check_artifact_name(name)
        if not isinstance(art, dict):
            raise InputError(f"artifact {name!r} is not an object")
        entry = {
            "sha256": _db_digest(art.get("sha256"), f"the sha256 of artifact {name!r}"),
            "size": _db_int(art.get("size"), f"the size of artifact {name!r}", 0),
        }
        if "format" in art:
            entry["format"] = _db_text(art["format"], f"the format of artifact {name!r}", 40)
        out[name] = entry
    check_name_set(list(out))
    return out


def _validated_version(name: str, row: Any, reps: Sequence[Any]) -> VersionInfo:
    check_name(name)
    if len(reps) > _MAX_REPORTS:
        raise InputError(f"more than {_MAX_REPORTS} reports are attached")
    artifacts = _db_artifacts(row.artifacts)
    model_digest = _db_digest(row.model_digest, "model_digest")
    if model_digest != next(iter(artifacts.values()))["sha256"]:
        raise InputError("model_digest is not the digest of the first artifact (the model)")
    fmt = row.format
    if not isinstance(fmt, str) or not _FORMAT.match(fmt):
        raise InputError("format is not a format name")
    for col in ("input_spec", "provenance"):
        if not isinstance(getattr(row, col), dict):
            raise InputError(f"{col} is not a JSON object")
    reports = []
    for r in reps:
        tm = _db_text(r.threat_model, "a report's threat model", 200)
        reports.append(
            ReportInfo(
                tm,
                _db_digest(r.report_digest, f"the digest of report {tm!r}"),
                _db_ref(r.attestation_path, f"the attestation of report {tm!r}"),
                _db_time(r.created_at),
            )
        )
    return VersionInfo(
        name=name,
        version=_db_int(row.version, "version", 1),
        format=fmt,
        stage=_db_stage(row.stage),
        model_digest=model_digest,
        artifacts=artifacts,
        input_spec=dict(row.input_spec),
        provenance=dict(row.provenance),
        created_at=_db_time(row.created_at),
        signature=_db_ref(row.signature_path, "signature_path"),
        reports=reports,
    )


def _inside(base: Path, rel: str) -> Path:
    """``base / rel`` for a validated relative name, refusing anything that leaves ``base``."""
    p = base.joinpath(*PurePosixPath(rel).parts)
    if not p.resolve().is_relative_to(base.resolve()) or p == base:
        raise InputError(f"refusing to write {rel!r} outside {base}")
    return p


def _report_model(data: Mapping[str, Any]) -> Any:
    from advguard.evaluate.report import Report

    return Report.model_validate(dict(data))


def _parse_stored_report(raw: bytes, what: str) -> dict[str, Any]:
    """A stored report read back: bounded, then validated against the report schema."""
    from pydantic import ValidationError

    from advguard.evaluate.report import Report

    if len(raw) > MAX_REPORT_BYTES:
        raise InputError(f"{what} in the registry is larger than {MAX_REPORT_BYTES >> 20} MiB")
    data = db.bounded_json_loads(raw, what=what, max_chars=MAX_REPORT_BYTES)
    try:
        return Report.model_validate(data).model_dump(mode="json")
    except ValidationError as exc:
        first = str(exc).splitlines()[0]
        raise InputError(
            f"{what} in the registry does not match the report schema ({first})"
        ) from None


def _db_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn what a damaged database raises while being read (a value SQLAlchemy cannot
    convert, an SQL error) into one :class:`InputError` line."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except AdvguardError:
            raise
        except (ValueError, TypeError, OverflowError) as exc:
            raise InputError(
                f"the registry database holds a value advguard cannot read ({exc}); it was "
                "edited outside advguard or is corrupted: restore it from a backup"
            ) from None
        except DatabaseError as exc:
            why = str(exc.orig if exc.orig is not None else exc).strip().splitlines()
            raise InputError(
                f"registry database error: {why[0] if why else type(exc).__name__}"
            ) from None

    return wrapper


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
        promotion_rules: PromotionRules | None = None,
    ) -> None:
        self.root = Path(root).expanduser() if root is not None else default_root()
        if self.root.exists() and not self.root.is_dir():
            raise InputError(f"registry root {str(self.root)!r} exists and is not a directory")
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
        self.promotion_rules = promotion_rules if promotion_rules is not None else PromotionRules()
        self.engine: Engine = db.make_engine(self.db_url)
        try:
            _retrying(lambda: db.upgrade(self.engine))
        except DatabaseError as exc:
            self.engine.dispose()
            why = str(exc.orig if exc.orig is not None else exc).strip().splitlines()
            raise InputError(
                f"cannot open the registry database {self.engine.url!r}: "
                f"{why[0] if why else type(exc).__name__}"
            ) from None
        except InputError:
            self.engine.dispose()
            raise
        except (UnicodeDecodeError, ValueError, OverflowError) as exc:  # sqlite on garbage bytes
            self.engine.dispose()
            raise InputError(
                f"cannot open the registry database {self.engine.url!r}: it is corrupt "
                f"({type(exc).__name__})"
            ) from None

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- push --------------------------------------------------------------------
    @_db_errors
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
        files = check_file_names(files)
        step = progress or (lambda stage, done, total: None)
        total = len(files) + len(reports) + 2
        self._remove_stale_temp_files()

        scans = scan_files(files, allow_pickle=allow_pickle, factory=factory)
        step("scan", 1, total)
        primary_name, primary = next(iter(files.items()))
        fmt, spec = self._format_and_spec(scans[0], primary, factory)
        spec.update(dict(input_spec or {}))
        primary_digest = sha256_file(primary)[0]
        parsed = [_read_report(Path(r), primary_digest, primary_name) for r in reports]

        artifacts: dict[str, dict[str, Any]] = {}
        for i, (fname, path) in enumerate(files.items()):
            digest, size = self.objects.put_file(path)
            artifacts[fname] = {"sha256": digest, "size": size, "format": scans[i].format}
            step("store", i + 1, total)
        model_digest = artifacts[primary_name]["sha256"]
        if model_digest != primary_digest:
            raise InputError(f"{primary} changed during the push; push again")
        key = Path(private_key) if private_key is not None else None
        signature_ref, report_rows = self._store_signed(files, parsed, key, model_digest, step)
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
        version = {
            "format": fmt,
            "artifacts": artifacts,
            "model_digest": model_digest,
            "input_spec": spec,
            "provenance": provenance,
            "signature_path": signature_ref,
        }
        number = _retrying(lambda: self._insert_version(name, version, report_rows))
        step("commit", total, total)
        info = self.get(f"{name}:{number}")
        info.scan = [s.to_dict() for s in scans]
        return info

    def _store_signed(
        self,
        files: Mapping[str, Path],
        parsed: Sequence[tuple[dict[str, Any], bytes]],
        key: Path | None,
        model_digest: str,
        step: Progress,
    ) -> tuple[str | None, list[dict[str, Any]]]:
        """Store the model signature (with a key) and the reports with their attestations."""
        total = len(files) + len(parsed) + 2
        signature_ref: str | None = None
        report_rows: list[dict[str, Any]] = []
        if key is not None:
            from advguard.registry import signing

            signature_ref = self.objects.ref(
                self.objects.put_bytes(signing.sign_model(dict(files), key))
            )
        for data, raw in parsed:
            digest = self.objects.put_bytes(raw)
            att_ref = None
            if key is not None:
                from advguard.registry import signing

                env = signing.attest_report(model_digest, data, key)
                att_ref = self.objects.ref(self.objects.put_bytes(env))
            report_rows.append(
                {"threat_model": data["threat_model"]["name"], "digest": digest, "att": att_ref}
            )
            step("store", len(files) + len(report_rows), total)
        return signature_ref, report_rows

    def _insert_version(
        self, name: str, version: dict[str, Any], report_rows: Sequence[dict[str, Any]]
    ) -> int:
        """One transaction: the next version number of ``name`` (stage candidate), its
        reports, its first stage event and the push's audit entry."""
        with self.engine.begin() as conn:
            model_id = self._model_id(conn, name, create=True)
            current = conn.execute(
                select(func.max(db.versions.c.version)).where(db.versions.c.model_id == model_id)
            ).scalar()
            number = int(current or 0) + 1
            now = _now()
            vid = _inserted_id(
                conn.execute(
                    insert(db.versions).values(
                        model_id=model_id,
                        version=number,
                        stage="candidate",
                        created_at=now,
                        **version,
                    )
                )
            )
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
            audit.append_entry(
                conn,
                self.actor,
                "push",
                f"{name}:{number}",
                {
                    "model_digest": version["model_digest"],
                    "artifacts": {k: v["sha256"] for k, v in version["artifacts"].items()},
                    "reports": [r["digest"] for r in report_rows],
                    "signed": version["signature_path"] is not None,
                    "format": version["format"],
                },
            )
            return number

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
        return _inserted_id(conn.execute(insert(db.models).values(name=name, created_at=_now())))

    def _info(self, conn: Connection, name: str, row: Any) -> VersionInfo:
        """A version row read back and validated: the database is untrusted input."""
        where = f"{name}:{row.version}" if isinstance(row.version, int) else name
        reps = conn.execute(
            select(db.reports)
            .where(db.reports.c.version_id == row.id)
            .order_by(db.reports.c.id)
            .limit(_MAX_REPORTS + 1)
        ).all()
        try:
            return _validated_version(name, row, reps)
        except (InputError, ValueError, TypeError, KeyError, AttributeError) as exc:
            raise InputError(
                f"the registry database row of {where} is invalid ({exc}); it was edited "
                "outside advguard or is corrupted: restore it from a backup"
            ) from None

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

    @_db_errors
    def get(self, ref: str) -> VersionInfo:
        """The version ``NAME`` (latest), ``NAME:VERSION`` or ``NAME@STAGE``."""
        with self.engine.connect() as conn:
            name, row = self._row(conn, ref)
            return self._info(conn, name, row)

    @_db_errors
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
                try:
                    name = check_name(m.name)
                    stages = {_db_int(v.version, "version", 1): _db_stage(v.stage) for v in vs}
                except InputError as exc:
                    raise InputError(
                        f"the registry database holds an invalid model or version row ({exc}); "
                        "it was edited outside advguard or is corrupted"
                    ) from None
                prod = [v for v, st in stages.items() if st == "production"]
                out.append(
                    {
                        "name": name,
                        "versions": len(vs),
                        "latest": max(stages),
                        "production": prod[-1] if prod else None,
                        "stages": {str(v): st for v, st in stages.items()},
                    }
                )
        return out

    @_db_errors
    def versions(self, name: str) -> list[VersionInfo]:
        with self.engine.connect() as conn:
            mid = self._model_id(conn, check_name(name))
            rows = conn.execute(
                select(db.versions)
                .where(db.versions.c.model_id == mid)
                .order_by(db.versions.c.version)
            ).all()
            return [self._info(conn, name, r) for r in rows]

    @_db_errors
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
            try:
                return [
                    StageEvent(
                        _db_int(r.version, "version", 1),
                        None if r.from_stage is None else _db_stage(r.from_stage),
                        _db_stage(r.to_stage),
                        _db_text(r.actor, "actor", 200),
                        _db_time(r.ts),
                    )
                    for r in rows
                ]
            except InputError as exc:
                raise InputError(
                    f"the registry database holds an invalid stage event ({exc}); it was "
                    "edited outside advguard or is corrupted"
                ) from None

    @_db_errors
    def report(self, info: VersionInfo, index: int) -> dict[str, Any]:
        """The stored report JSON (digest verified, validated against the report schema)."""
        rep = info.reports[index]
        raw = self.objects.read_bytes(rep.digest, name=f"report {rep.threat_model}")
        return _parse_stored_report(raw, f"report {rep.threat_model} of {info.ref}")

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
            stored = db.bounded_json_loads(raw, what="a report", max_chars=MAX_REPORT_BYTES)
            if canonical_json(predicate) != canonical_json(stored):
                raise signing.SignatureError(
                    f"attestation of report {rep.threat_model} does not match the stored report"
                )
        return "verified"

    @_db_errors
    def pull(
        self, ref: str, out: str | os.PathLike[str], *, public_key: Path | None = None
    ) -> PullResult:
        """Copy a version's files (and reports, signature, model card) into ``out``.

        The version's database row is validated (names, digests, sizes) and compared with
        the audit log before anything is written; every object is re-hashed; with
        ``public_key`` the signature and report attestations are verified too. Everything
        is written into a private staging folder (mode 0700) and moved into ``out`` only
        after all checks passed; on any failure nothing is left behind.
        """
        from advguard.registry.card import render_model_card

        info = self.get(ref)
        self.require_consistent(info)
        out = Path(out)
        if out.exists() and not out.is_dir():
            raise InputError(f"--out {str(out)!r} exists and is not a directory")
        created = not out.exists()
        out.mkdir(parents=True, exist_ok=True)
        out_real = out.resolve()
        staging = Path(tempfile.mkdtemp(prefix=".advguard-pull-", dir=out))
        written: list[Path] = []
        try:
            paths: dict[str, Path] = {}
            for fname, art in info.artifacts.items():
                dest = _inside(staging, fname)
                self.objects.copy_to(art["sha256"], dest, name=fname)
                paths[fname] = dest
            status = self._check_signature(info, paths, public_key)
            extra: dict[str, bytes] = {}
            reports = []
            for i, rep in enumerate(info.reports):
                raw = self.objects.read_bytes(rep.digest, name=f"report {rep.threat_model}")
                reports.append(_parse_stored_report(raw, f"report {rep.threat_model}"))
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
                dest = _inside(staging, rel)
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(data)
            # every check passed: move into --out, never through a link out of it
            moves = []
            for src in sorted(p for p in staging.rglob("*") if p.is_file()):
                rel = src.relative_to(staging).as_posix()
                dest = out / rel
                for parent in [out / q for q in PurePosixPath(rel).parents if str(q) != "."]:
                    if parent.is_symlink() or (parent.exists() and not parent.is_dir()):
                        raise InputError(f"refusing to pull through {parent}: not a plain folder")
                if dest.is_dir() and not dest.is_symlink():
                    raise InputError(f"refusing to pull: {dest} is a folder")
                moves.append((src, dest))
            for src, dest in moves:
                dest.parent.mkdir(parents=True, exist_ok=True)
                if not dest.parent.resolve().is_relative_to(out_real):
                    raise InputError(f"refusing to pull outside {out}: {dest}")
                os.replace(src, dest)
                written.append(dest)
        except BaseException:
            if created:
                shutil.rmtree(staging, ignore_errors=True)
                with contextlib.suppress(OSError):
                    out.rmdir()  # only if still empty
            raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return PullResult(info, out, written, status)

    def _objects_of(self, info: VersionInfo) -> list[tuple[str, str]]:
        objs = [(n, a["sha256"]) for n, a in info.artifacts.items()]
        for r in info.reports:
            objs.append((f"report {r.threat_model}", r.digest))
            if r.attestation:
                att = digest_of_ref(r.attestation)
                objs.append((f"attestation of report {r.threat_model}", att))
        if info.signature:
            objs.append(("signature bundle", digest_of_ref(info.signature)))
        return objs

    def check_objects(self, info: VersionInfo) -> None:
        """Re-hash every object of ``info``; raise :class:`CorruptObjectError` on the first
        that is missing or whose bytes changed."""
        for label, digest in self._objects_of(info):
            check = getattr(self.objects, "verify", None)
            if check is not None:
                check(digest, name=label)
            else:
                self.objects.read_bytes(digest, name=label)

    @_db_errors
    def model_card(self, ref: str, *, public_key: Path | None = None) -> tuple[VersionInfo, str]:
        """The Markdown model card of ``ref``. Refuses (raises) a version whose objects fail
        their hash or whose database row disagrees with the audit log."""
        from advguard.registry.card import render_model_card

        info = self.get(ref)
        self.require_consistent(info)
        self.check_objects(info)
        reports = [self.report(info, i) for i in range(len(info.reports))]
        status = "unsigned" if info.signature is None else "signed (not checked)"
        if public_key is not None:
            status = self.verify(info.ref, public_key=public_key).signature[info.ref]
        return info, render_model_card(info, reports, status)

    @_db_errors
    def verify(self, ref: str, *, public_key: Path | None = None) -> VerifyResult:
        """Re-hash every object of the version(s) ``ref`` names (``NAME`` = all versions);
        with ``public_key`` also verify signatures and attestations."""
        name, version, stage = parse_ref(ref)
        infos = self.versions(name) if version is None and stage is None else [self.get(ref)]
        problems: list[str] = []
        sig: dict[str, str] = {}
        checked = 0
        rows = self._audit_rows()
        chain = audit.check_chain(rows)
        if not chain.ok:
            problems.append(f"audit log broken at {chain.reason}")
        state, _ = audit.replay(rows)
        for info in infos:
            problems += audit.state_problems(info, state)
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

    def _production_stack(self, name: str) -> list[int]:
        """Versions of ``name`` that were production, oldest first, rolled-back ones popped,
        replayed from the verified audit log (not from the editable stage table): a
        promotion to production pushes the version, a rollback pops the version it
        replaced and pushes the one it restored; the top is the current production."""
        rows = self._audit_rows()
        check = audit.check_chain(rows)
        if not check.ok:
            raise InputError(
                f"the registry audit log is broken at {check.reason}; refusing to roll back "
                "(run `advguard registry audit --verify`)"
            )
        stack: list[int] = []
        for r in rows:
            subject = str(r.subject)
            if subject.rsplit(":", 1)[0] != name or ":" not in subject:
                continue
            version = int(subject.rsplit(":", 1)[1])
            d = db.bounded_json_loads(r.details, what="audit details")
            if r.action == "promote" and d.get("to") == "production":
                pass
            elif r.action == "rollback":
                if stack:
                    stack.pop()  # the version that was rolled back
            else:
                continue
            if version in stack:
                stack.remove(version)
            stack.append(version)
        return stack

    def promotion_checks(
        self,
        info: VersionInfo,
        stage: str,
        *,
        public_key: Path | None = None,
        gate_policy: Any = None,
    ) -> list[PromotionCheck]:
        """The promotion policy's checks of ``info`` for ``stage`` (empty if unguarded)."""
        rules = self.promotion_rules
        if stage not in rules.stages:
            return []
        checks: list[PromotionCheck] = []
        if rules.require_signature:
            checks.append(self._signature_check(info, public_key))
        reports: list[tuple[str, Any]] = []
        problems: list[str] = []
        for i, meta in enumerate(info.reports):
            try:
                reports.append((meta.threat_model, _report_model(self.report(info, i))))
            except InputError as exc:
                problems.append(f"report {meta.threat_model}: {exc}")
        if rules.require_report:
            if not info.reports:
                problems.append("no robustness report is attached (push with --report)")
            for tm, rep in reports:
                recorded = str(rep.model.get("sha256") or "")
                if recorded.lower().removeprefix("sha256:") != info.model_digest:
                    problems.append(
                        f"report {tm} evaluated sha256:{recorded or '(none)'}, not this model "
                        f"(sha256:{info.model_digest})"
                    )
                if not rep.trustworthy:
                    problems.append(f"report {tm} is untrustworthy (failed sanity checks)")
            ok = not problems
            msg = f"{len(reports)} trustworthy report(s) bound to this model digest"
            checks.append(PromotionCheck("report", ok, msg if ok else "; ".join(problems)))
        if rules.require_gate:
            checks.append(self._gate_check(info, reports, gate_policy))
        return checks

    def _signature_check(self, info: VersionInfo, public_key: Path | None) -> PromotionCheck:
        if info.signature is None:
            return PromotionCheck("signature", False, "not signed (push it with --key)")
        if public_key is None:
            return PromotionCheck(
                "signature", False, "signed, but no public key was given to verify it"
            )
        try:
            self.check_objects(info)
            with tempfile.TemporaryDirectory(prefix="advguard-promote-") as tmp:
                paths = {}
                for fname, art in info.artifacts.items():
                    paths[fname] = _inside(Path(tmp), fname)
                    self.objects.copy_to(art["sha256"], paths[fname], name=fname)
                self._check_signature(info, paths, public_key)
        except InputError as exc:
            return PromotionCheck("signature", False, str(exc))
        n = len(info.reports)
        return PromotionCheck("signature", True, f"signature and {n} attestation(s) verified")

    def _gate_check(
        self, info: VersionInfo, reports: Sequence[tuple[str, Any]], gate_policy: Any
    ) -> PromotionCheck:
        from advguard.registry.gate import run_gate
        from advguard.registry.policy import Policy

        if not reports:
            return PromotionCheck("gate", False, "no readable report to judge")
        policy = gate_policy if gate_policy is not None else Policy()
        try:
            prod = self.get(f"{info.name}@production")
        except InputError:
            prod = None
        failures: list[str] = []
        for tm, rep in reports:
            baseline = None
            if prod is not None and prod.ref != info.ref:
                idx = [i for i, r in enumerate(prod.reports) if r.threat_model == tm]
                if idx:
                    try:
                        baseline = _report_model(self.report(prod, idx[-1]))
                    except InputError as exc:
                        failures.append(f"{tm}: baseline report of {prod.ref} unreadable ({exc})")
                        continue
            res = run_gate(rep, policy, baseline)
            if not res.passed:
                why = ", ".join(f"{c.name} ({c.message or c.actual})" for c in res.failures)
                failures.append(f"{tm}: gate {policy.name} failed: {why}")
        if failures:
            return PromotionCheck("gate", False, "; ".join(failures))
        return PromotionCheck("gate", True, f"{len(reports)} report(s) pass gate {policy.name}")

    @_db_errors
    def promote(
        self,
        name: str,
        version: int,
        stage: str = "production",
        *,
        public_key: Path | None = None,
        gate_policy: Any = None,
        force: bool = False,
        reason: str | None = None,
    ) -> VersionInfo:
        """Move ``name:version`` to ``stage``; a previous production version is archived.

        The promotion policy (:attr:`promotion_rules`, default: production needs a verified
        signature, trustworthy reports bound to this digest and a passed gate) must hold,
        else :class:`PromotionRefusedError`. ``force=True`` with a ``reason`` overrides it;
        the override, reason and failed checks are recorded in the audit log.
        """
        if stage not in STAGES:
            raise InputError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
        ref = f"{check_name(name)}:{check_version(version)}"
        if force and (not reason or not reason.strip()):
            raise InputError('--force needs --reason "why" (it is recorded in the audit log)')
        if reason is not None:
            reason = _db_text(reason.strip(), "--reason")
        info = self.get(ref)
        if info.stage == stage:
            raise InputError(f"{ref} is already in stage {stage}")
        self.require_consistent(info)
        checks = self.promotion_checks(info, stage, public_key=public_key, gate_policy=gate_policy)
        failed = [c for c in checks if not c.passed]
        if failed and not force:
            raise PromotionRefusedError(ref, stage, failed)

        def txn() -> None:
            with self.engine.begin() as conn:
                _, row = self._row(conn, ref)
                if row.stage != info.stage or row.model_digest != info.model_digest:
                    raise InputError(f"{ref} changed while it was being checked; try again")
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
                details: dict[str, Any] = {"from": before, "to": stage, "archived": archived}
                if checks:
                    details["checks"] = {c.name: c.passed for c in checks}
                if force:
                    details["forced"] = True
                    details["reason"] = reason
                    details["overridden"] = [c.to_dict() for c in failed]
                audit.append_entry(conn, self.actor, "promote", ref, details)

        _retrying(txn)
        return self.get(ref)

    @_db_errors
    def rollback(self, name: str) -> VersionInfo:
        """Put the previous production version back into production (current -> archived).

        The production history comes from the audit log, and the current production
        version must agree with it."""
        check_name(name)
        history = self._production_stack(name)

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
                cur_info = self._info(conn, name, cur)
                if not history or history[-1] != cur_info.version:
                    raise InputError(
                        f"{name}:{cur_info.version} is production in the database, but the audit "
                        "log says otherwise; refusing to roll back (run `advguard registry "
                        "audit --verify`)"
                    )
                stack = list(history)
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
                audit.append_entry(
                    conn,
                    self.actor,
                    "rollback",
                    f"{name}:{prev.version}",
                    {"from_version": int(cur.version), "to_version": int(prev.version)},
                )
                return int(prev.version)

        return self.get(f"{name}:{_retrying(txn)}")

    # -- garbage collection ------------------------------------------------------------
    def _collectable(self) -> CollectableStore:
        if not isinstance(self.objects, CollectableStore):
            raise InputError(
                f"the object store {self.objects.url} does not support garbage collection "
                "(it implements no object_info/delete/temp_files/remove_temp)"
            )
        return self.objects

    def _remove_stale_temp_files(self, *, now: float | None = None) -> int:
        """Remove temporary object files older than :data:`STALE_TEMP_SECONDS` (partial
        writes of interrupted pushes); returns how many. Fresh ones may belong to a push
        running right now and are left alone."""
        if not isinstance(self.objects, CollectableStore):
            return 0
        t = time.time() if now is None else now
        n = 0
        for item in list(self.objects.temp_files()):
            if t - item.mtime > STALE_TEMP_SECONDS:
                self.objects.remove_temp(item)
                n += 1
        return n

    @_db_errors
    def gc(
        self,
        *,
        delete: bool = False,
        grace_seconds: float = STALE_TEMP_SECONDS,
        now: float | None = None,
    ) -> GcResult:
        """Find (and with ``delete=True`` remove) objects no version references and temporary
        files of interrupted pushes.

        Only files older than ``grace_seconds`` are removed: a push writes (or touches, when
        it reuses one) its objects before its database transaction commits, so a younger
        unreferenced object may belong to a push in progress. Every version row is
        validated first; a damaged database stops the collection rather than deleting what
        it can no longer see.
        """
        if grace_seconds < 0:
            raise InputError("the grace period must be >= 0 seconds")
        store = self._collectable()
        t = time.time() if now is None else now
        referenced: set[str] = set()
        for info in self._all_versions():
            referenced.update(d for _, d in self._objects_of(info))
        removable: list[GcItem] = []
        kept = 0
        for digest in list(store.digests()):
            if digest in referenced:
                continue
            st = store.object_info(digest)
            age = t - st.mtime
            if age > grace_seconds:
                removable.append(GcItem("orphan", st.path, st.size, age, digest))
            else:
                kept += 1
        for tmp in list(store.temp_files()):
            age = t - tmp.mtime
            if age > grace_seconds:
                removable.append(GcItem("temp", tmp.path, tmp.size, age))
            else:
                kept += 1
        res = GcResult(not delete, grace_seconds, removable, kept)
        if delete and removable:
            deleted: list[str] = []
            for item in removable:
                if item.kind == "orphan" and item.digest is not None:
                    # a push may have reused (and so touched) it since it was listed
                    try:
                        fresh = t - store.object_info(item.digest).mtime <= grace_seconds
                    except FileNotFoundError:  # removed meanwhile (another gc)
                        continue
                    if fresh:
                        res.kept_recent += 1
                        continue
                    store.delete(item.digest)
                    deleted.append(item.digest)
                else:
                    store.remove_temp(StoredFile(item.path, item.size, t - item.age_seconds))
                res.removed += 1
                res.freed_bytes += item.size

            def txn() -> None:
                with self.engine.begin() as conn:
                    audit.append_entry(
                        conn,
                        self.actor,
                        "gc",
                        "registry",
                        {
                            "removed": res.removed,
                            "freed_bytes": res.freed_bytes,
                            "orphans": sorted(deleted),
                        },
                    )

            _retrying(txn)
        return res

    # -- audit -------------------------------------------------------------------
    @_db_errors
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
                details = db.bounded_json_loads(r.details, what="audit details")
            except InputError:
                details = {"_unparsable": str(r.details)[:200]}
            out.append(
                AuditEntry(r.seq, r.ts, r.actor, r.action, r.subject, details, r.prev_hash, r.hash)
            )
        return out

    def _audit_rows(self) -> list[Any]:
        with self.engine.connect() as conn:
            return list(conn.execute(select(db.audit).order_by(db.audit.c.seq)).all())

    def _all_versions(self) -> list[VersionInfo]:
        out: list[VersionInfo] = []
        with self.engine.connect() as conn:
            for m in conn.execute(select(db.models.c.id, db.models.c.name)).all():
                rows = conn.execute(select(db.versions).where(db.versions.c.model_id == m.id)).all()
                out += [self._info(conn, m.name, r) for r in rows]
        return out

    @_db_errors
    def verify_audit(self) -> AuditCheck:
        """Recompute the hash chain (report the first entry whose link is broken), then
        replay the log and compare every version in the database with it: a stage, digest,
        report or signature changed directly in the database is reported."""
        rows = self._audit_rows()
        check = audit.check_chain(rows)
        state, problems = audit.replay(rows)
        infos = self._all_versions()
        for info in infos:
            problems += audit.state_problems(info, state)
        for ref in sorted(set(state) - {i.ref for i in infos}):
            problems.append(f"{ref} is in the audit log but missing from the database")
        check.state_problems = problems
        check.ok = check.ok and not problems
        if problems and check.reason is None:
            check.reason = problems[0]
        return check

    def require_consistent(self, info: VersionInfo) -> None:
        """Refuse a version whose row disagrees with the (intact) audit log."""
        rows = self._audit_rows()
        check = audit.check_chain(rows)
        if not check.ok:
            raise InputError(
                f"the registry audit log is broken at {check.reason}; refusing to use "
                f"{info.ref} (run `advguard registry audit --verify`)"
            )
        state, _ = audit.replay(rows)
        problems = audit.state_problems(info, state)
        if problems:
            raise InputError(f"refusing {info.ref}: {'; '.join(problems)}")
