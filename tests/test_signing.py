"""Model signatures (model-signing Sigstore bundles) and DSSE robustness attestations."""

from __future__ import annotations

import base64
import hashlib
import json
import stat

import pytest

pytest.importorskip("model_signing")
pytest.importorskip("cryptography")

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import serialization as ser
from cryptography.hazmat.primitives.asymmetric import ec

from advguard.errors import InputError
from advguard.registry.signing import (
    PAYLOAD_TYPE,
    PREDICATE_TYPE,
    SignatureError,
    attest_report,
    generate_keypair,
    pae,
    sign_model,
    verify_model,
    verify_report_attestation,
)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    return generate_keypair(d / "a"), generate_keypair(d / "b")


@pytest.fixture()
def model_files(tmp_path):
    root = tmp_path / "m"
    (root / "tok").mkdir(parents=True)
    files = {
        "model.safetensors": root / "model.safetensors",
        "config.json": root / "config.json",
        "tok/vocab.txt": root / "tok" / "vocab.txt",
    }
    files["model.safetensors"].write_bytes(bytes(range(256)) * 40)
    files["config.json"].write_text('{"factory": "advguard.models.zoo:small_cnn"}')
    files["tok/vocab.txt"].write_text("a\nb\nc\n")
    return files


def test_keygen_permissions_and_curves(tmp_path):
    priv, pub = generate_keypair(tmp_path / "k")
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    key = ser.load_pem_private_key(priv.read_bytes(), None)
    assert key.curve.name == "secp256r1"
    assert ser.load_pem_public_key(pub.read_bytes()).public_numbers() == (
        key.public_key().public_numbers()
    )
    priv384, _ = generate_keypair(tmp_path / "k384", curve="P-384")
    assert ser.load_pem_private_key(priv384.read_bytes(), None).curve.name == "secp384r1"
    with pytest.raises(InputError, match="already exists"):
        generate_keypair(tmp_path / "k")
    with pytest.raises(InputError, match="unsupported curve"):
        generate_keypair(tmp_path / "k2", curve="P-521")


def test_sign_verify_round_trip(keys, model_files):
    (priv, pub), _ = keys
    bundle = sign_model(model_files, priv)
    doc = json.loads(bundle)
    assert doc["mediaType"].startswith("application/vnd.dev.sigstore.bundle")
    stmt = json.loads(base64.b64decode(doc["dsseEnvelope"]["payload"]))
    digests = {r["name"]: r["digest"] for r in stmt["predicate"]["resources"]}
    assert set(digests) == set(model_files)
    want = hashlib.sha256(model_files["config.json"].read_bytes()).hexdigest()
    assert digests["config.json"] == want
    verify_model(model_files, bundle, pub)  # does not raise


def test_flipped_byte_names_the_file(keys, model_files):
    (priv, pub), _ = keys
    bundle = sign_model(model_files, priv)
    data = bytearray(model_files["model.safetensors"].read_bytes())
    data[1234] ^= 0x01
    model_files["model.safetensors"].write_bytes(bytes(data))
    with pytest.raises(SignatureError, match=r"content changed: model\.safetensors$"):
        verify_model(model_files, bundle, pub)


def test_missing_extra_renamed_files(keys, model_files, tmp_path):
    (priv, pub), _ = keys
    bundle = sign_model(model_files, priv)
    fewer = {k: v for k, v in model_files.items() if k != "tok/vocab.txt"}
    with pytest.raises(SignatureError, match=r"missing: tok/vocab\.txt"):
        verify_model(fewer, bundle, pub)
    extra_path = tmp_path / "extra.bin"
    extra_path.write_bytes(b"\x00")
    more = {**model_files, ".gitignore": extra_path}
    with pytest.raises(SignatureError, match=r"not in the signature: \.gitignore"):
        verify_model(more, bundle, pub)
    renamed = {**fewer, "tok/vocab2.txt": model_files["tok/vocab.txt"]}
    with pytest.raises(SignatureError) as e:
        verify_model(renamed, bundle, pub)
    assert "missing: tok/vocab.txt" in str(e.value)
    assert "not in the signature: tok/vocab2.txt" in str(e.value)


def test_wrong_key_and_garbage_bundle(keys, model_files):
    (priv, _), (_, pub_b) = keys
    bundle = sign_model(model_files, priv)
    with pytest.raises(SignatureError, match=r"public key .*b/public\.pem"):
        verify_model(model_files, bundle, pub_b)
    with pytest.raises(SignatureError, match="not a JSON"):
        verify_model(model_files, b"\x00garbage", pub_b)


def test_bad_names_rejected(keys, model_files):
    (priv, _), _ = keys
    with pytest.raises(InputError, match="relative POSIX path"):
        sign_model({"../evil": model_files["config.json"]}, priv)
    with pytest.raises(InputError, match="does not exist"):
        sign_model({"a": model_files["config.json"].with_name("nope")}, priv)


REPORT = {
    "kind": "advguard.robustness-report",
    "model": {"name": "digits-cnn"},
    "clean_accuracy": {"value": 0.97, "k": 97, "n": 100},
    "results": [{"epsilon": 0.1, "robust_accuracy": {"value": 0.62, "k": 62, "n": 100}}],
}
DIGEST = "ab" * 32


def test_attestation_round_trip(keys):
    (priv, pub), _ = keys
    env = json.loads(attest_report(DIGEST, REPORT, priv))
    assert env["payloadType"] == PAYLOAD_TYPE
    pub_der = ser.load_pem_public_key(pub.read_bytes()).public_bytes(
        ser.Encoding.DER, ser.PublicFormat.SubjectPublicKeyInfo
    )
    assert env["signatures"][0]["keyid"] == hashlib.sha256(pub_der).hexdigest()
    stmt = json.loads(base64.b64decode(env["payload"]))
    assert stmt["_type"] == "https://in-toto.io/Statement/v1"
    assert stmt["predicateType"] == PREDICATE_TYPE
    assert stmt["subject"] == [{"name": "digits-cnn", "digest": {"sha256": DIGEST}}]
    # a third party verifies with plain `cryptography`: ECDSA P-256 SHA-256 over the PAE
    key = ser.load_pem_public_key(pub.read_bytes())
    body = base64.b64decode(env["payload"])
    key.verify(
        base64.b64decode(env["signatures"][0]["sig"]),
        b"DSSEv1 %d %b %d %b" % (len(PAYLOAD_TYPE), PAYLOAD_TYPE.encode(), len(body), body),
        ec.ECDSA(hashes.SHA256()),
    )
    got = verify_report_attestation(json.dumps(env).encode(), pub, "sha256:" + DIGEST)
    assert got == REPORT


def test_tampered_attestation_rejected(keys):
    (priv, pub), (_, pub_b) = keys
    raw = attest_report(DIGEST, REPORT, priv)
    env = json.loads(raw)
    stmt = json.loads(base64.b64decode(env["payload"]))
    stmt["predicate"]["results"][0]["robust_accuracy"]["value"] = 0.92  # inflate the claim
    env["payload"] = base64.b64encode(json.dumps(stmt).encode()).decode()
    with pytest.raises(SignatureError, match="edited after signing"):
        verify_report_attestation(json.dumps(env).encode(), pub, DIGEST)
    with pytest.raises(SignatureError, match="not " + "cd" * 32):
        verify_report_attestation(raw, pub, "cd" * 32)
    with pytest.raises(SignatureError, match="does not verify"):
        verify_report_attestation(raw, pub_b, DIGEST)
    env = json.loads(raw)
    env["payloadType"] = "text/plain"
    with pytest.raises(SignatureError, match="payload type"):
        verify_report_attestation(json.dumps(env).encode(), pub, DIGEST)
    with pytest.raises(InputError, match="not a SHA-256"):
        attest_report("xyz", REPORT, priv)


def test_p384_attestation(tmp_path):
    priv, pub = generate_keypair(tmp_path, curve="P-384")
    raw = attest_report(DIGEST, REPORT, priv)
    assert verify_report_attestation(raw, pub, DIGEST) == REPORT


def test_pae_matches_dsse_spec_example():
    # github.com/secure-systems-lab/dsse protocol.md test vector
    got = pae("http://example.com/HelloWorld", b"hello world")
    assert got == b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    assert pae("", b"") == b"DSSEv1 0  0 "
