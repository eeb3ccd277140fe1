"""Content-addressed object storage for registry artifacts (the extension point).

Objects are addressed by the SHA-256 of their bytes. :class:`LocalObjectStore`
keeps them under ``<dir>/sha256/ab/cdef...`` (first two hex digits as a fan-out
directory). Writes are atomic and durable: a temporary file in the target
directory, ``fsync``, ``os.replace``, then ``fsync`` of the directory. Every
read re-hashes the bytes and raises :class:`CorruptObjectError` on mismatch.

Other back-ends (S3, GCS, a shared file server) plug in by implementing the
:class:`ObjectStore` protocol and registering a URL scheme with
:func:`register_object_store`; :func:`open_object_store` picks the
implementation from the URL (``file://`` and plain paths are local).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable
from urllib.parse import unquote, urlparse

from advguard.atomic import atomic_path
from advguard.errors import InputError

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
#: Temporary files made by :func:`advguard.atomic.atomic_path` for an object being written.
_TEMP = re.compile(r"^\.[0-9a-f]{62}\.[A-Za-z0-9_]+\.tmp$")
_CHUNK = 1 << 20


class CorruptObjectError(InputError):
    """A stored artifact's bytes no longer match the digest it was stored under."""


@runtime_checkable
class ObjectStore(Protocol):
    """What the registry needs from an artifact store. All reads verify the digest."""

    url: str

    def put_file(self, path: Path) -> tuple[str, int]:
        """Store a file's bytes; return ``(sha256 hex, size)``. Idempotent."""
        ...

    def put_bytes(self, data: bytes) -> str:
        """Store bytes; return their sha256 hex. Idempotent."""
        ...

    def exists(self, digest: str) -> bool: ...

    def read_bytes(self, digest: str, *, name: str) -> bytes:
        """The object's bytes, verified (``name`` is used in error messages)."""
        ...

    def copy_to(self, digest: str, dest: Path, *, name: str) -> None:
        """Write the object to ``dest`` atomically, verifying its digest on the way."""
        ...

    def ref(self, digest: str) -> str:
        """A stable reference recorded in the database (e.g. a path below the root)."""
        ...

    def digests(self) -> Iterator[str]:
        """Every stored digest (for garbage collection and audits)."""
        ...


@dataclass
class StoredFile:
    """A file in the object store seen by garbage collection."""

    path: str
    size: int
    mtime: float
    digest: str | None = None  # None for a temporary file


@runtime_checkable
class CollectableStore(Protocol):
    """Optional part of an object store: what ``registry gc`` needs."""

    def digests(self) -> Iterator[str]: ...

    def object_info(self, digest: str) -> StoredFile: ...

    def delete(self, digest: str) -> None: ...

    def temp_files(self) -> Iterator[StoredFile]:
        """Partial writes left by interrupted pushes (temporary files)."""
        ...

    def remove_temp(self, item: StoredFile) -> None: ...


def check_digest(digest: str) -> str:
    d = str(digest).lower().removeprefix("sha256:")
    if not _HEX64.match(d):
        raise InputError(f"{digest!r} is not a sha256 hex digest")
    return d


def digest_of_ref(ref: str) -> str:
    """The digest inside a reference made by :meth:`ObjectStore.ref` (``.../ab/cdef...``)."""
    parts = ref.replace("\\", "/").rstrip("/").split("/")
    return check_digest(parts[-1] if len(parts[-1]) == 64 else "".join(parts[-2:]))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _mismatch(name: str, digest: str, actual: str) -> CorruptObjectError:
    return CorruptObjectError(
        f"{name} is corrupted in the registry: its content hashes to sha256 {actual[:16]}..., "
        f"but it was stored as {digest[:16]}...; the stored file changed after it was pushed "
        "(restore it from a backup or push the model again)"
    )


def atomic_write(dest: Path, chunks: Iterator[bytes]) -> str:
    """Write ``chunks`` to ``dest`` atomically and durably; return the sha256 hex written."""
    h = hashlib.sha256()
    with atomic_path(dest) as tmp, open(tmp, "wb") as f:
        for block in chunks:
            h.update(block)
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(dest.parent)
    return h.hexdigest()


def _file_chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as f:
        yield from iter(lambda: f.read(_CHUNK), b"")


def sha256_file(path: Path) -> tuple[str, int]:
    h, n = hashlib.sha256(), 0
    for block in _file_chunks(path):
        h.update(block)
        n += len(block)
    return h.hexdigest(), n


class LocalObjectStore:
    """Objects as files under ``<directory>/sha256/ab/cdef...``."""

    def __init__(self, directory: Path, *, ref_prefix: str = "objects") -> None:
        self.directory = Path(directory)
        self.url = self.directory.resolve().as_uri()
        self._prefix = ref_prefix

    def path(self, digest: str) -> Path:
        d = check_digest(digest)
        return self.directory / "sha256" / d[:2] / d[2:]

    def exists(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def _valid(self, digest: str) -> bool:
        p = self.path(digest)
        if p.is_file() and sha256_file(p)[0] == digest:
            # a reused object is fresh again: gc's grace period must not delete it while
            # the push that reuses it has not committed yet
            with contextlib.suppress(OSError):  # a read-only store: nothing to protect
                os.utime(p)
            return True
        return False

    def put_file(self, path: Path) -> tuple[str, int]:
        digest, size = sha256_file(path)
        if not self._valid(digest):
            written = atomic_write(self.path(digest), _file_chunks(path))
            if written != digest:
                self.path(digest).unlink(missing_ok=True)
                raise InputError(f"{path} changed while it was being stored; push again")
            _fsync_dir(self.path(digest).parent.parent)
        return digest, size

    def put_bytes(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        if not self._valid(digest):
            atomic_write(self.path(digest), iter([data]))
            _fsync_dir(self.path(digest).parent.parent)
        return digest

    def read_bytes(self, digest: str, *, name: str) -> bytes:
        p = self.path(digest)
        if not p.is_file():
            raise CorruptObjectError(f"{name} is missing from the registry object store ({p})")
        data = p.read_bytes()
        actual = hashlib.sha256(data).hexdigest()
        if actual != digest:
            raise _mismatch(name, digest, actual)
        return data

    def verify(self, digest: str, *, name: str) -> None:
        """Re-hash the stored object (streamed); raise :class:`CorruptObjectError` on mismatch."""
        p = self.path(digest)
        if not p.is_file():
            raise CorruptObjectError(f"{name} is missing from the registry object store ({p})")
        actual = sha256_file(p)[0]
        if actual != digest:
            raise _mismatch(name, digest, actual)

    def copy_to(self, digest: str, dest: Path, *, name: str) -> None:
        p = self.path(digest)
        if not p.is_file():
            raise CorruptObjectError(f"{name} is missing from the registry object store ({p})")
        actual = atomic_write(dest, _file_chunks(p))
        if actual != digest:
            dest.unlink(missing_ok=True)
            raise _mismatch(name, digest, actual)

    def ref(self, digest: str) -> str:
        d = check_digest(digest)
        return f"{self._prefix}/sha256/{d[:2]}/{d[2:]}"

    def digests(self) -> Iterator[str]:
        base = self.directory / "sha256"
        if not base.is_dir():
            return
        for sub in sorted(base.iterdir()):
            if not sub.is_dir():
                continue
            for f in sorted(sub.iterdir()):
                d = sub.name + f.name
                if _HEX64.match(d):
                    yield d

    # -- garbage collection (CollectableStore) ------------------------------------------
    def object_info(self, digest: str) -> StoredFile:
        p = self.path(digest)
        st = p.stat()
        return StoredFile(str(p), st.st_size, st.st_mtime, check_digest(digest))

    def delete(self, digest: str) -> None:
        self.path(digest).unlink(missing_ok=True)

    def temp_files(self) -> Iterator[StoredFile]:
        base = self.directory / "sha256"
        if not base.is_dir():
            return
        for sub in sorted(base.iterdir()):
            if not sub.is_dir() or sub.is_symlink():
                continue
            for f in sorted(sub.iterdir()):
                if _TEMP.match(f.name) and f.is_file() and not f.is_symlink():
                    st = f.stat()
                    yield StoredFile(str(f), st.st_size, st.st_mtime)

    def remove_temp(self, item: StoredFile) -> None:
        p = Path(item.path)
        base = (self.directory / "sha256").resolve()
        if p.parent.parent.resolve() != base or not _TEMP.match(p.name):
            raise InputError(f"{p} is not a temporary file of this object store")
        p.unlink(missing_ok=True)


StoreFactory = Callable[[str, Path], ObjectStore]
_SCHEMES: dict[str, StoreFactory] = {}


def register_object_store(scheme: str, factory: StoreFactory) -> None:
    """Make ``open_object_store`` build ``factory(url, registry_root)`` for ``scheme://`` URLs."""
    _SCHEMES[scheme.lower()] = factory


def open_object_store(url: str | None, root: Path) -> ObjectStore:
    """The store for ``url``: ``None`` -> ``<root>/objects``; ``file://`` or a path -> local."""
    if not url:
        return LocalObjectStore(root / "objects")
    scheme = urlparse(url).scheme.lower()
    if scheme in ("", "file") or (len(scheme) == 1 and os.name == "nt"):
        path = Path(unquote(urlparse(url).path)) if scheme == "file" else Path(url)
        return LocalObjectStore(path, ref_prefix=path.resolve().as_posix())
    if scheme in _SCHEMES:
        return _SCHEMES[scheme](url, root)
    known = ", ".join(["file", *sorted(_SCHEMES)])
    raise InputError(
        f"no object store for URL scheme {scheme!r} ({url}); known: {known}. Register one with "
        "advguard.registry.objects.register_object_store"
    )
