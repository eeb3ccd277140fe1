"""Sign models and robustness reports with an elliptic-curve key pair.

Two artefacts, two standard formats:

* **Model signatures** are Sigstore bundles made by the OpenSSF ``model-signing`` package
  (offline, key-based): a DSSE-signed in-toto statement whose predicate lists the SHA-256
  digest of every file of the model. Verification names each file that changed, is missing
  or is extra.
* **Robustness attestations** bind an advguard report to a model digest: an in-toto
  Statement v1 (predicate type :data:`PREDICATE_TYPE`, predicate = the report JSON) signed as
  a DSSE envelope with ECDSA (P-256/SHA-256, or P-384/SHA-384 for a P-384 key).

See ``docs/signing.md``. Needs the ``sign`` extra: ``pip install 'advguard[sign]'``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import itertools
import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from advguard.errors import InputError, MissingDependencyError

PREDICATE_TYPE = "https://advguard.dev/attestation/robustness-report/v1"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
CURVES = ("P-256", "P-384")
_MODEL_DIR = "model"  # name of the staging directory (the bundle's subject name)
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class SignatureError(InputError):
    """A signature, bundle or attestation does not verify (tampered, wrong key, malformed)."""


# ----------------------------------------------------------------------------- keys
def _crypto() -> Any:
    try:
        from cryptography.hazmat.primitives.asymmetric import ec
    except ImportError:
        raise MissingDependencyError("cryptography", "sign", "signing") from None
    return ec


def generate_keypair(directory: Path, *, curve: str = "P-256") -> tuple[Path, Path]:
    """Write ``private.pem`` (PKCS#8, mode 0600) and ``public.pem`` (SPKI) into ``directory``.

    Refuses to overwrite an existing key. Returns ``(private_path, public_path)``.
    """
    ec = _crypto()
    from cryptography.hazmat.primitives import serialization as ser

    curves = {"P-256": ec.SECP256R1, "P-384": ec.SECP384R1}
    if curve not in curves:
        raise InputError(f"unsupported curve {curve!r}; use one of {', '.join(CURVES)}")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    priv, pub = d / "private.pem", d / "public.pem"
    for p in (priv, pub):
        if p.exists():
            raise InputError(f"{p} already exists; refusing to overwrite a key (remove it first)")
    key = ec.generate_private_key(curves[curve]())
    pem = key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption())
    fd = os.open(priv, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    os.chmod(priv, 0o600)  # O_CREAT's mode is filtered by the umask; be explicit
    pub.write_bytes(
        key.public_key().public_bytes(ser.Encoding.PEM, ser.PublicFormat.SubjectPublicKeyInfo)
    )
    return priv, pub


def _read_key_file(path: Path, what: str) -> bytes:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{what} {str(p)!r} does not exist (create one with generate_keypair)")
    return p.read_bytes()


def _load_private(path: Path) -> Any:
    ec = _crypto()
    from cryptography.hazmat.primitives import serialization as ser

    data = _read_key_file(path, "private key")
    try:
        key = ser.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise InputError(f"{path}: not an unencrypted PEM private key ({e})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name not in (
        "secp256r1",
        "secp384r1",
    ):
        raise InputError(f"{path}: need an EC P-256 or P-384 private key")
    return key


def _load_public(path: Path) -> Any:
    ec = _crypto()
    from cryptography.hazmat.primitives import serialization as ser

    data = _read_key_file(path, "public key")
    try:
        key = ser.load_pem_public_key(data)
    except ValueError as e:
        raise InputError(f"{path}: not a PEM public key ({e})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in (
        "secp256r1",
        "secp384r1",
    ):
        raise InputError(f"{path}: need an EC P-256 or P-384 public key")
    return key


def key_id(public_key: Any) -> str:
    """``sha256`` (hex) of the public key's DER SubjectPublicKeyInfo: the DSSE ``keyid``."""
    from cryptography.hazmat.primitives import serialization as ser

    der = public_key.public_bytes(ser.Encoding.DER, ser.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


# ----------------------------------------------------------------------------- model files
def _model_signing() -> tuple[Any, Any, Any]:
    try:
        from model_signing import hashing, signing, verifying
    except ImportError:
        raise MissingDependencyError("model-signing", "sign", "model signing") from None
    return hashing, signing, verifying


def _hashing_config(hashing: Any) -> Any:
    # Hash every staged file: no implicit ignores (.git*), so an extra file is always caught.
    return hashing.Config().set_ignored_paths(paths=[], ignore_git_paths=False)


def _check_files(files: Mapping[str, Path]) -> dict[str, Path]:
    if not files:
        raise InputError("no files to sign; pass a mapping of relative name -> path")
    out: dict[str, Path] = {}
    for name, path in files.items():
        pp = PurePosixPath(name)
        if (
            not name
            or "\\" in name
            or pp.is_absolute()
            or any(part in ("", ".", "..") for part in name.split("/"))
        ):
            raise InputError(
                f"file name {name!r} must be a relative POSIX path without '.' or '..' parts"
            )
        p = Path(path)
        if not p.is_file():
            raise InputError(f"file {name!r} ({p}) does not exist or is not a regular file")
        out[name] = p
    names = sorted(out)
    for a, b in itertools.pairwise(names):
        if b.startswith(a + "/"):
            raise InputError(f"file name {a!r} is also used as a directory by {b!r}")
    return out


def _stage(files: dict[str, Path], root: Path) -> Path:
    model = root / _MODEL_DIR
    model.mkdir()
    for name, src in files.items():
        dst = model / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst)  # cheap for big weights; we only ever read it
        except OSError:
            shutil.copyfile(src, dst)
    return model


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sign_model(files: dict[str, Path], private_key: Path) -> bytes:
    """Sign the files of a model (``relative name -> path``); returns a Sigstore bundle (JSON).

    The bundle is a DSSE envelope over an in-toto statement listing each file's SHA-256.
    """
    checked = _check_files(files)
    _load_private(private_key)  # clear errors before model-signing sees the key
    hashing, signing, _ = _model_signing()
    with tempfile.TemporaryDirectory(prefix="advguard-sign-") as tmp:
        model = _stage(checked, Path(tmp))
        sig = Path(tmp) / "model.sig"
        cfg = signing.Config().use_elliptic_key_signer(private_key=str(private_key))
        cfg.set_hashing_config(_hashing_config(hashing)).sign(model, sig)
        return sig.read_bytes()


def _bundle_manifest(bundle: bytes) -> dict[str, str]:
    """``name -> sha256`` from a model-signing bundle's statement (read after verification)."""
    try:
        env = json.loads(bundle)["dsseEnvelope"]
        stmt = json.loads(base64.b64decode(env["payload"]))
        return {r["name"]: r["digest"] for r in stmt["predicate"]["resources"]}
    except (ValueError, KeyError, TypeError) as e:
        raise SignatureError(f"model signature bundle has no readable manifest ({e})") from None


def verify_model(files: dict[str, Path], bundle: bytes, public_key: Path) -> None:
    """Check ``files`` against a bundle from :func:`sign_model`; raise :class:`SignatureError`.

    The message names every file whose content changed, that is missing, or that is extra,
    or says the bundle was not signed by ``public_key``.
    """
    checked = _check_files(files)
    _load_public(public_key)
    try:
        parsed = json.loads(bundle)
    except (ValueError, UnicodeDecodeError):
        raise SignatureError("model signature is not a JSON Sigstore bundle") from None
    if not isinstance(parsed, dict) or "dsseEnvelope" not in parsed:
        raise SignatureError("model signature is not a Sigstore bundle with a DSSE envelope")
    hashing, _, verifying = _model_signing()
    with tempfile.TemporaryDirectory(prefix="advguard-verify-") as tmp:
        model = _stage(checked, Path(tmp))
        sig = Path(tmp) / "model.sig"
        sig.write_bytes(bundle)
        cfg = verifying.Config().use_elliptic_key_verifier(public_key=str(public_key))
        try:
            cfg.set_hashing_config(_hashing_config(hashing)).verify(model, sig)
        except Exception as e:  # model-signing raises ValueError and sigstore/protobuf errors
            msg = str(e)
            if not msg.startswith("Signature mismatch"):
                raise SignatureError(
                    f"model signature does not verify with public key {public_key}: "
                    f"{msg.strip() or type(e).__name__} (signed by another key, or tampered)"
                ) from None
            # The envelope's signature checked out, so its manifest is authentic: name files.
            signed = _bundle_manifest(bundle)
            changed = sorted(
                n for n in checked if n in signed and _sha256_file(checked[n]) != signed[n]
            )
            missing = sorted(set(signed) - set(checked))
            extra = sorted(set(checked) - set(signed))
            parts = [
                f"{what}: {', '.join(names)}"
                for what, names in (
                    ("content changed", changed),
                    ("missing", missing),
                    ("not in the signature", extra),
                )
                if names
            ]
            raise SignatureError(
                "model files do not match the signature; " + ("; ".join(parts) or msg)
            ) from None


# ----------------------------------------------------------------------------- DSSE
def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 Pre-Authentication Encoding of ``payload`` (what is actually signed)."""
    t = payload_type.encode()
    return b"DSSEv1 %d %b %d %b" % (len(t), t, len(payload), payload)


def _hash_for(key: Any) -> Any:
    from cryptography.hazmat.primitives import hashes

    return hashes.SHA384() if key.curve.name == "secp384r1" else hashes.SHA256()


def _b64decode(s: Any) -> bytes:
    if not isinstance(s, str):
        raise ValueError("not a base64 string")
    s2 = s.replace("-", "+").replace("_", "/")  # DSSE accepts standard or URL-safe base64
    return base64.b64decode(s2 + "=" * (-len(s2) % 4), validate=True)


def _normalise_digest(model_digest: str) -> str:
    d = str(model_digest).lower().removeprefix("sha256:")
    if not _HEX64.match(d):
        raise InputError(
            f"model digest {model_digest!r} is not a SHA-256 hex digest (64 hex characters)"
        )
    return d


def attest_report(model_digest: str, report: dict, private_key: Path) -> bytes:
    """Sign ``report`` as a robustness claim about the model with ``model_digest`` (sha256).

    Returns a DSSE envelope (JSON bytes) over an in-toto Statement v1 whose predicate is the
    report and whose predicate type is :data:`PREDICATE_TYPE`.
    """
    from cryptography.hazmat.primitives.asymmetric import ec

    digest = _normalise_digest(model_digest)
    if hasattr(report, "model_dump"):  # accept a pydantic Report as well as its JSON dict
        report = report.model_dump(mode="json")
    if not isinstance(report, dict):
        raise InputError("the report to attest must be a JSON object (dict)")
    key = _load_private(private_key)
    raw_model = report.get("model")
    model = raw_model if isinstance(raw_model, dict) else {}
    name = str(model.get("name") or model.get("path") or "model")
    statement = {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": name, "digest": {"sha256": digest}}],
        "predicateType": PREDICATE_TYPE,
        "predicate": report,
    }
    try:
        payload = json.dumps(statement, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise InputError(f"the report is not JSON-serialisable ({e})") from None
    body = payload.encode()
    sig = key.sign(pae(PAYLOAD_TYPE, body), ec.ECDSA(_hash_for(key)))
    envelope = {
        "payloadType": PAYLOAD_TYPE,
        "payload": base64.b64encode(body).decode(),
        "signatures": [{"keyid": key_id(key.public_key()), "sig": base64.b64encode(sig).decode()}],
    }
    return json.dumps(envelope, indent=2).encode()


def verify_report_attestation(envelope: bytes, public_key: Path, model_digest: str) -> dict:
    """Verify an envelope from :func:`attest_report`; return the report (the predicate).

    Checks the ECDSA signature over the DSSE PAE, the payload type, the statement and
    predicate types and that a subject has ``model_digest``; raises :class:`SignatureError`.
    """
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric import ec

    digest = _normalise_digest(model_digest)
    key = _load_public(public_key)
    try:
        env = json.loads(envelope)
        payload_type = env["payloadType"]
        body = _b64decode(env["payload"])
        sigs = [(s.get("keyid", ""), _b64decode(s["sig"])) for s in env["signatures"]]
    except (ValueError, KeyError, TypeError, AttributeError, binascii.Error) as e:
        raise SignatureError(f"attestation is not a valid DSSE envelope ({e})") from None
    if payload_type != PAYLOAD_TYPE:
        raise SignatureError(
            f"attestation payload type is {payload_type!r}, expected {PAYLOAD_TYPE!r}"
        )
    message = pae(payload_type, body)
    ok = False
    for _, sig in sigs:
        try:
            key.verify(sig, message, ec.ECDSA(_hash_for(key)))
            ok = True
            break
        except InvalidSignature:
            continue
    if not ok:
        raise SignatureError(
            f"attestation signature does not verify with public key {public_key} "
            "(the report was edited after signing, or it was signed by another key)"
        )
    try:
        stmt = json.loads(body)
    except ValueError:
        raise SignatureError("attestation payload is not JSON") from None
    if not isinstance(stmt, dict) or stmt.get("_type") != STATEMENT_TYPE:
        raise SignatureError(f"attestation is not an in-toto statement ({STATEMENT_TYPE})")
    if stmt.get("predicateType") != PREDICATE_TYPE:
        raise SignatureError(
            f"attestation predicate type is {stmt.get('predicateType')!r}, "
            f"expected {PREDICATE_TYPE!r}"
        )
    subjects = stmt.get("subject") or []
    digests = [
        str((s.get("digest") or {}).get("sha256", "")).lower()
        for s in subjects
        if isinstance(s, dict)
    ]
    if digest not in digests:
        raise SignatureError(
            f"attestation is about model sha256 {', '.join(digests) or '(none)'}, "
            f"not {digest}: it does not apply to this model"
        )
    predicate = stmt.get("predicate")
    if not isinstance(predicate, dict):
        raise SignatureError("attestation predicate is not a JSON object")
    return predicate
