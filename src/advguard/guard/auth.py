"""API keys: 32 random bytes from :mod:`secrets`, shown once, stored only as a digest.

A key reads ``agk_<key id>.<secret>``: the 16-hex-digit key id is public (it names the client
in logs, decisions, blocks and limits); the secret is 32 random bytes, base64url. The database
holds ``HMAC-SHA256(pepper, key)`` when the server has a pepper, else ``SHA-256(key)``;
verification compares digests with :func:`hmac.compare_digest`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from advguard.errors import InputError
from advguard.guard.storage import SCOPES, BlockRecord, GuardStore, KeyRecord, OutputPolicy

KEY_RE = re.compile(r"^agk_([0-9a-f]{16})\.([A-Za-z0-9_-]{43})$")
_DUMMY = "0" * 64


def load_pepper(env: str, file: Path | None) -> bytes | None:
    """The server pepper from ``file`` or the environment variable ``env`` (None: none)."""
    if file is not None:
        if not file.is_file():
            raise InputError(f"pepper file {file} does not exist")
        data = file.read_bytes().strip()
        if len(data) < 16:
            raise InputError(f"pepper file {file} holds fewer than 16 bytes")
        return data
    value = os.environ.get(env)
    if value is None or value == "":
        return None
    if len(value) < 16:
        raise InputError(f"the pepper in ${env} must be at least 16 characters")
    return value.encode()


def digest_key(key: str, pepper: bytes | None) -> str:
    data = key.encode("ascii", errors="replace")
    if pepper:
        return hmac.new(pepper, data, hashlib.sha256).hexdigest()
    return hashlib.sha256(data).hexdigest()


def new_key() -> tuple[str, str]:
    """(key id, full key); the secret part is 32 bytes from :func:`secrets.token_bytes`."""
    key_id = secrets.token_hex(8)
    secret = base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()
    return key_id, f"agk_{key_id}.{secret}"


@dataclass
class CreatedKey:
    """A new key: ``key`` is shown once and never stored."""

    record: KeyRecord
    key: str

    def to_dict(self) -> dict[str, object]:
        return {**self.record.public(), "key": self.key}


def check_scopes(scopes: Sequence[str]) -> tuple[str, ...]:
    out = tuple(dict.fromkeys(s.strip() for s in scopes if s.strip()))
    bad = [s for s in out if s not in SCOPES]
    if bad or not out:
        raise InputError(
            f"scopes must be among {', '.join(SCOPES)}, got {', '.join(bad) or 'none'}"
        )
    return out


def create_key(
    store: GuardStore,
    name: str,
    scopes: Sequence[str] = ("predict",),
    *,
    pepper: bytes | None = None,
    output: OutputPolicy | None = None,
) -> CreatedKey:
    if not name or len(name) > 200:
        raise InputError("a key name is 1 to 200 characters")
    key_id, key = new_key()
    rec = store.add_key(key_id, name, digest_key(key, pepper), check_scopes(scopes), output)
    return CreatedKey(rec, key)


def rotate_key(store: GuardStore, key_id: str, *, pepper: bytes | None = None) -> CreatedKey:
    """A new key with the old one's name, scopes and output policy; the old one is revoked."""
    old = store.get_key(key_id)
    if old is None or old.revoked:
        raise InputError(f"no active key with id {key_id!r}")
    created = create_key(store, old.name, old.scopes, pepper=pepper, output=old.output)
    store.revoke_key(key_id)
    return created


class AuthError(Exception):
    """Authentication failed: ``status`` 401 (no/bad/revoked key) or 403 (scope, blocked)."""

    def __init__(self, status: int, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.kind = kind
        self.detail = detail


def key_id_of(presented: str | None) -> str | None:
    """The key id of a well-formed key (None: none or malformed)."""
    m = KEY_RE.match(presented) if presented else None
    return m.group(1) if m else None


def extract_key(authorization: str | None, x_api_key: str | None) -> str | None:
    if x_api_key:
        return x_api_key.strip()
    if authorization:
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    return None


def authenticate(
    store: GuardStore,
    presented: str | None,
    scope: str,
    *,
    pepper: bytes | None,
    lookup: Callable[[str], tuple[KeyRecord | None, BlockRecord | None]] | None = None,
) -> KeyRecord:
    """The key's record if ``presented`` is a valid, unrevoked key with ``scope``, the client
    is not blocked; else :class:`AuthError`. Messages never repeat the presented key.
    ``lookup(key_id)`` reads the key and its active block (default: from ``store``)."""
    if not presented:
        raise AuthError(401, "unauthorized", "an API key is required (Authorization: Bearer)")
    m = KEY_RE.match(presented)
    read = lookup or store.get_key_and_block
    rec, block = read(m.group(1)) if m else (None, None)
    expected = rec.hash if rec is not None else _DUMMY
    ok = hmac.compare_digest(expected, digest_key(presented, pepper))
    if rec is None or not ok:
        raise AuthError(401, "unauthorized", "the API key is not valid")
    if rec.revoked:
        raise AuthError(401, "unauthorized", "the API key was revoked")
    if scope not in rec.scopes:
        raise AuthError(403, "forbidden", f"the API key lacks the scope {scope!r}")
    if block is not None:
        raise AuthError(403, "client-blocked", "this client is blocked")
    return rec
