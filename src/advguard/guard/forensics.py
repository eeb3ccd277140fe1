"""Forensic records: input fingerprints, encrypted payloads, export and retention.

A payload is the validated input batch as ``.npy`` bytes (``allow_pickle=False``), encrypted
with Fernet (AES-128-CBC + HMAC-SHA256, :mod:`cryptography`) under a key taken from an
environment variable or a file; in ``hash-only`` mode only its SHA-256 fingerprint is kept.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from advguard.errors import InputError
from advguard.guard.storage import GuardStore, now

if TYPE_CHECKING:  # cryptography is an optional extra (guard)
    from cryptography.fernet import Fernet

FINGERPRINT_TAG = b"advguard-guard-input-v1\n"
TEXT_TAG = b"advguard-guard-text-v1\n"
#: Most characters in one stored text payload's JSON.
MAX_TEXT_PAYLOAD = 64 * 1024 * 1024


def _text_json(x: np.ndarray) -> bytes:
    return json.dumps([str(t) for t in x.reshape(-1)], ensure_ascii=False).encode()


def fingerprint(x: np.ndarray) -> str:
    """SHA-256 of the canonical bytes of a batch: a tag, the shape, little-endian float32; for
    a batch of texts (object or unicode array) a text tag and the texts as UTF-8 JSON."""
    if x.dtype.kind in "OU":
        h = hashlib.sha256(TEXT_TAG)
        h.update(_text_json(x))
        return h.hexdigest()
    arr = np.ascontiguousarray(x, dtype="<f4")
    h = hashlib.sha256(FINGERPRINT_TAG)
    h.update(json.dumps(list(arr.shape)).encode() + b"\n")
    h.update(arr.tobytes())
    return h.hexdigest()


def load_fernet(env: str, file: Path | None) -> Fernet:
    """A :class:`cryptography.fernet.Fernet` from ``file`` or ``$env``; InputError when neither
    holds a valid key. The key itself never appears in the message."""
    from cryptography.fernet import Fernet

    if file is not None:
        if not file.is_file():
            raise InputError(f"forensic key file {file} does not exist")
        raw = file.read_bytes().strip()
        where = f"forensic key file {file}"
    else:
        value = os.environ.get(env)
        if not value:
            raise InputError(
                f"forensics.mode is 'encrypted' but ${env} is not set and no key_file is given; "
                "create a key with `advguard guard forensic-key --out FILE`"
            )
        raw = value.strip().encode()
        where = f"${env}"
    try:
        return Fernet(raw)
    except (ValueError, TypeError):
        raise InputError(
            f"{where} is not a Fernet key (32 url-safe base64-encoded bytes)"
        ) from None


def new_fernet_key(out: Path) -> Path:
    """Write a fresh Fernet key to ``out`` (mode 0600, refusing to overwrite)."""
    from cryptography.fernet import Fernet

    if out.exists():
        raise InputError(f"{out} already exists; refusing to overwrite a key")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(Fernet.generate_key() + b"\n")
    return out


def encode_payload(x: np.ndarray, fernet: Fernet) -> bytes:
    if x.dtype.kind in "OU":  # texts: tagged UTF-8 JSON
        return bytes(fernet.encrypt(TEXT_TAG + _text_json(x)))
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(x, dtype=np.float32), allow_pickle=False)
    return bytes(fernet.encrypt(buf.getvalue()))


def decode_payload(token: bytes, fernet: Fernet) -> np.ndarray:
    from cryptography.fernet import InvalidToken

    try:
        raw = fernet.decrypt(token)
    except InvalidToken:
        raise InputError("a stored payload does not decrypt with this forensic key") from None
    if raw.startswith(TEXT_TAG):
        return _decode_texts(raw[len(TEXT_TAG) :])
    try:
        arr = np.load(io.BytesIO(raw), allow_pickle=False)
    except (ValueError, OSError, EOFError):
        raise InputError("a stored payload is not a valid array") from None
    if not isinstance(arr, np.ndarray) or arr.dtype != np.float32:
        raise InputError("a stored payload is not a float32 array")
    return arr


def _decode_texts(raw: bytes) -> np.ndarray:
    from advguard import _safejson

    texts = _safejson.loads(raw, source="a stored text payload", max_bytes=MAX_TEXT_PAYLOAD)
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise InputError("a stored text payload is not a list of strings")
    return np.array(texts, dtype=np.str_)


def parse_since(text: str | None, at: datetime | None = None) -> datetime | None:
    """``7d`` / ``12h`` / ``30m`` ago, or an ISO date/time (UTC when no zone is given)."""
    if text is None:
        return None
    t = text.strip()
    at = at or now()
    units = {"d": "days", "h": "hours", "m": "minutes"}
    if t[:-1].isdigit() and t[-1:] in units:
        return at - timedelta(**{units[t[-1]]: int(t[:-1])})
    try:
        ts = datetime.fromisoformat(t)
    except ValueError:
        raise InputError(
            f"--since must be like 7d, 12h, 30m or an ISO date, got {text!r}"
        ) from None
    return ts if ts.tzinfo else ts.replace(tzinfo=now().tzinfo)


def purge(store: GuardStore, retention_days: int, at: datetime | None = None) -> int:
    """Delete decisions and payloads older than ``retention_days``; returns how many."""
    if retention_days < 0:
        raise InputError("retention must be at least 0 days")
    return store.purge((at or now()) - timedelta(days=retention_days))


def export_npz(
    store: GuardStore,
    out: Path,
    *,
    since: datetime | None,
    fernet: Fernet | None,
    model: str | None = None,
) -> dict[str, Any]:
    """Write the forensic records since ``since`` to ``out`` (.npz, no pickles).

    Arrays: ``inputs`` (rows with a stored payload, concatenated), ``record`` (the index of
    each row's record) and ``metadata`` (one JSON string per record). Records without a
    payload (hash-only mode) appear in ``metadata`` only.
    """
    from advguard.atomic import atomic_path

    metas: list[str] = []
    rows: list[np.ndarray] = []
    index: list[np.ndarray] = []
    shape: tuple[int, ...] | None = None
    for i, rec in enumerate(store.iter_decisions(since=since, forensic_only=True, model=model)):
        metas.append(json.dumps(rec.public(), sort_keys=True, default=str))
        if rec.payload is None:
            continue
        if fernet is None:
            raise InputError(
                "the records hold encrypted payloads; give the forensic key (--key-file or the "
                "environment variable) or export with --hash-only"
            )
        x = decode_payload(rec.payload, fernet)
        if fingerprint(x) != rec.fingerprint:
            raise InputError(f"record {rec.id}: the payload does not match its fingerprint")
        if shape is None:
            shape = tuple(x.shape[1:])
        elif tuple(x.shape[1:]) != shape:
            raise InputError(
                "records hold inputs of different shapes; export one model at a time (--model)"
            )
        rows.append(x)
        index.append(np.full(len(x), i, dtype=np.int64))
    inputs = np.concatenate(rows) if rows else np.zeros((0,), dtype=np.float32)
    record = np.concatenate(index) if index else np.zeros((0,), dtype=np.int64)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp, open(tmp, "wb") as f:
        np.savez(f, inputs=inputs, record=record, metadata=np.array(metas, dtype=np.str_))
    return {"records": len(metas), "rows": len(inputs), "out": str(out)}
