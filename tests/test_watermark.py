"""Backdoor watermark (Adi et al. 2018): embedding, the binomial ownership test, and whether
the watermark survives Knockoff extraction."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from typer.testing import CliRunner

from advguard.attacks.extraction import EvalSet, knockoff
from advguard.cli import app
from advguard.defenses.watermark import (
    TriggerSet,
    embed_watermark,
    make_trigger_set,
    verify_watermark,
)
from advguard.errors import InputError
from advguard.models import TorchClassifier
from advguard.models.fit import fit
from advguard.models.zoo import mlp

SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def digits():
    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    y = d.target.astype(np.int64)
    perm = np.random.default_rng(0).permutation(len(x))
    x, y = x[perm], y[perm]
    base = x[1000:]
    rng = np.random.default_rng(1)
    noisy = np.clip(base + rng.normal(0, 0.15, base.shape), 0, 1).astype(np.float32)
    lam = rng.uniform(0.3, 0.7, (len(base), 1, 1, 1)).astype(np.float32)
    mixed = lam * base + (1 - lam) * base[rng.permutation(len(base))]
    pool = np.concatenate([base, np.roll(base, 1, axis=3), noisy, mixed])
    return (x[:700], y[:700]), (x[700:1000], y[700:1000]), pool


@pytest.fixture(scope="module")
def marked(digits):
    (tx, ty), _, _ = digits
    key = make_trigger_set(100, SHAPE, 10, kind="noise", seed=3)
    torch.manual_seed(0)
    module = embed_watermark(mlp(SHAPE, 10), tx, ty, key, epochs=60)
    return TorchClassifier(module, input_shape=SHAPE, num_classes=10), key


@pytest.fixture(scope="module")
def independent(digits):
    (tx, ty), _, _ = digits
    torch.manual_seed(1)
    return TorchClassifier(fit(mlp(SHAPE, 10), tx, ty, epochs=30, seed=1), input_shape=SHAPE,
                           num_classes=10)  # fmt: skip


def test_watermark_is_embedded_without_hurting_accuracy(digits, marked, independent):
    _, (ex, ey), _ = digits
    model, key = marked
    v = verify_watermark(model, key)
    # measured: trigger accuracy 94%, clean accuracy 97.0% (independent model 96-97%)
    assert v.verified and v.trigger_accuracy >= 0.8 and v.p_value < 1e-30
    assert model.accuracy(ex, ey) >= independent.accuracy(ex, ey) - 0.03
    w = verify_watermark(independent, key)
    assert not w.verified and w.p_value > 0.05, w  # measured p = 0.20


def test_watermark_survives_knockoff_extraction(digits, marked, independent):
    _, (ex, ey), pool = digits
    model, key = marked
    # the attacker's student starts from other weights (seed 7) and sees only its pool
    stolen = knockoff(model, pool, budget=2000, eval_set=EvalSet.from_target(model, ex, ey),
                      n_checkpoints=1, epochs=30, seed=7)  # fmt: skip
    assert stolen.fidelity >= 0.95
    v = verify_watermark(stolen.student, key)
    # measured: 29/100 trigger answers match (chance 10%), p = 9e-8
    assert v.p_value < 0.01, v
    # control: the same extraction of an unmarked model does not carry the key
    control = knockoff(independent, pool, budget=2000, n_checkpoints=1, epochs=30, seed=7)
    c = verify_watermark(control.student, key)
    assert c.p_value > 0.05, c


def test_key_round_trip_and_validation(tmp_path, marked):
    _, key = marked
    p = key.save(tmp_path / "k.npz")
    back = TriggerSet.load(p)
    np.testing.assert_array_equal(back.x, key.x)
    np.testing.assert_array_equal(back.y, key.y)
    assert back.num_classes == 10 and back.kind == "noise"
    fields = {"num_classes": np.int64(10), "kind": np.array("noise"), "seed": np.int64(0)}
    fmt = np.array("advguard-watermark-1")
    np.savez(tmp_path / "bad.npz", x=key.x, y=key.y + 10, format=fmt, **fields)
    with pytest.raises(InputError, match="labels"):
        TriggerSet.load(tmp_path / "bad.npz")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object))
    with pytest.raises(InputError):
        TriggerSet.load(tmp_path / "obj.npy")
    np.save(tmp_path / "plain.npy", key.x)
    with pytest.raises(InputError, match="single array"):
        TriggerSet.load(tmp_path / "plain.npy")


def test_cli_embed_and_verify(tmp_path, digits, independent):
    (tx, ty), _, _ = digits
    np.savez(tmp_path / "d.npz", x=tx[:400], y=ty[:400])
    wm = tmp_path / "wm"
    r = CliRunner().invoke(app, ["watermark", "embed", "--data", str(tmp_path / "d.npz"),
                                 "--out", str(wm), "--epochs", "40", "--json"])  # fmt: skip
    assert r.exit_code == 0, r.output
    summary = json.loads((wm / "watermark.json").read_text())
    assert summary["self_check"]["verified"] is True
    args = ["watermark", "verify", "--key", str(wm / "watermark.npz"), "--json"]
    r = CliRunner().invoke(app, [*args, "--model", str(wm / "model.safetensors")])
    assert r.exit_code == 0, r.output
    from advguard.models.io import save_torch

    other = save_torch(independent, tmp_path / "other.safetensors",
                       factory="advguard.models.zoo:mlp",
                       factory_kwargs={"input_shape": list(SHAPE), "num_classes": 10})  # fmt: skip
    r = CliRunner().invoke(app, [*args, "--model", str(other)])
    assert r.exit_code == 1, r.output  # not verified is a failed check
    r = CliRunner().invoke(
        app, [*args[:2], "--key", str(tmp_path / "d.npz"), "--model", str(other)]
    )
    assert r.exit_code == 2 and "Traceback" not in r.output
