"""Poisoning simulation: label flipping, BadNets and blended triggers, manifests, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from advguard.attacks.poisoning import (
    PoisonManifest,
    TriggerSpec,
    blend_trigger,
    label_flip,
    patch_trigger,
    poison,
)
from advguard.cli import app
from advguard.errors import InputError

runner = CliRunner()


@pytest.fixture()
def data(digits_split):
    x, y, _, _ = digits_split
    return x, y


def test_badnets_changes_exactly_the_manifest_rows(data):
    x, y = data
    res = poison(x, y, "badnets", rate=0.05, target=2, size=2, position="top-left", seed=3)
    man = res.manifest
    assert man.n_poisoned == round(0.05 * len(y)) == 70
    changed = np.flatnonzero((res.x != x).any(axis=(1, 2, 3)) | (res.y != y))
    # a row whose patch pixels were already white is unchanged in x but relabelled in y
    assert set(changed) == set(man.indices)
    assert (res.y[man.indices] == 2).all() and (man.original_labels != 2).all()
    np.testing.assert_array_equal(man.original_labels, y[man.indices])
    # the patch: 2x2 white at (margin 1) top-left, nothing else touched
    np.testing.assert_array_equal(res.x[man.indices][:, :, 1:3, 1:3], 1.0)
    untouched = np.ones((8, 8), dtype=bool)
    untouched[1:3, 1:3] = False
    np.testing.assert_array_equal(
        res.x[man.indices][:, 0][:, untouched], x[man.indices][:, 0][:, untouched]
    )
    # the trigger re-applies to give the same rows
    np.testing.assert_array_equal(man.trigger.apply(x[man.indices]), res.x[man.indices])
    # the input arrays are not modified in place
    assert not np.shares_memory(res.x, x)


def test_poisoning_is_deterministic_per_seed(data):
    x, y = data
    a = poison(x, y, "blend", rate=0.1, target=0, seed=1)
    b = poison(x, y, "blend", rate=0.1, target=0, seed=1)
    c = poison(x, y, "blend", rate=0.1, target=0, seed=2)
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(a.manifest.indices, b.manifest.indices)
    assert not np.array_equal(a.manifest.indices, c.manifest.indices)


def test_blend_mixes_the_pattern_with_ratio_alpha(data):
    x, _ = data
    trig = blend_trigger((1, 8, 8), target=1, alpha=0.25, seed=0)
    out = trig.apply(x[:5])
    np.testing.assert_allclose(out, 0.75 * x[:5] + 0.25 * trig.pattern, atol=1e-6)
    assert trig.pattern.min() >= 0 and trig.pattern.max() <= 1


def test_source_specific_backdoor_only_poisons_the_source_class(data):
    x, y = data
    res = poison(x, y, "badnets", rate=0.05, target=0, source=7)
    assert (res.manifest.original_labels == 7).all()
    with pytest.raises(InputError, match="eligible"):
        poison(x, y, "badnets", rate=0.5, target=0, source=7)


def test_label_flip_random_and_targeted(data):
    x, y = data
    r = label_flip(x, y, rate=0.2, seed=0)
    flipped = np.flatnonzero(r.y != y)
    np.testing.assert_array_equal(flipped, r.manifest.indices)  # every chosen row changes
    assert len(flipped) == 280
    assert len(np.unique(r.y[flipped])) == 10  # random classes, not one
    np.testing.assert_array_equal(r.x, x)
    t = label_flip(x, y, rate=0.05, source=1, target=7, seed=0)
    assert (t.manifest.original_labels == 1).all() and (t.y[t.manifest.indices] == 7).all()
    assert t.manifest.trigger is None


def test_manifest_round_trip_and_validation(data, tmp_path):
    x, y = data
    res = poison(x, y, "badnets", rate=0.05, target=4, colour=0.5, style="checkerboard")
    p = res.manifest.save(tmp_path / "m.json")
    back = PoisonManifest.load(p)
    np.testing.assert_array_equal(back.indices, res.manifest.indices)
    np.testing.assert_array_equal(back.trigger.apply(x[:3]), res.manifest.trigger.apply(x[:3]))
    assert back.trigger.target == 4
    d = json.loads(p.read_text())
    d["indices"][0] = 10**6
    (tmp_path / "bad.json").write_text(json.dumps(d))
    with pytest.raises(InputError, match="out of range"):
        PoisonManifest.load(tmp_path / "bad.json")
    d = json.loads(p.read_text())
    d["trigger"]["mask"] = [[[2.0] * 8] * 8]
    (tmp_path / "bad2.json").write_text(json.dumps(d))
    with pytest.raises(InputError, match="mask"):
        PoisonManifest.load(tmp_path / "bad2.json")
    d = json.loads(p.read_text())
    d["target"] = [1]
    (tmp_path / "bad4.json").write_text(json.dumps(d))
    with pytest.raises(InputError, match="malformed"):
        PoisonManifest.load(tmp_path / "bad4.json")
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(InputError, match="not a JSON manifest"):
        PoisonManifest.load(tmp_path / "deep.json")
    (tmp_path / "bad3.json").write_text("[1, 2]")
    with pytest.raises(InputError, match="not an advguard"):
        PoisonManifest.load(tmp_path / "bad3.json")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"rate": 0.0}, "rate"),
        ({"rate": 1.5}, "rate"),
        ({"target": 10}, "target"),
        ({"size": 9}, "does not fit"),
        ({"position": (7, 7)}, "leaves"),
    ],
)
def test_bad_arguments_raise_input_errors(data, kwargs, match):
    x, y = data
    args = {"rate": 0.05, "target": 0, **kwargs}
    with pytest.raises(InputError, match=match):
        poison(x, y, "badnets", **args)


def test_trigger_spec_rejects_wrong_shapes():
    with pytest.raises(InputError):
        TriggerSpec("patch", np.zeros((1, 8, 8)), np.zeros((1, 4, 4)), 1.0, 0, (0.0, 1.0))
    t = patch_trigger((1, 8, 8), target=0)
    with pytest.raises(InputError, match="cannot be applied"):
        t.apply(np.zeros((2, 1, 9, 9), dtype=np.float32))


def test_cli_poison_writes_data_and_manifest(tmp_path):
    out = tmp_path / "poisoned.npz"
    res = runner.invoke(
        app,
        ["poison", "--data", "digits", "--attack", "badnets", "--rate", "0.05", "--target",
         "0", "--out", str(out), "--json"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["n_poisoned"] == round(0.05 * 1797)
    man = PoisonManifest.load(tmp_path / "poisoned.manifest.json")
    with np.load(out) as d:
        assert d["x"].shape == (1797, 1, 8, 8)
        assert (d["y"][man.indices] == 0).all()
        np.testing.assert_array_equal(d["trigger_mask"], man.trigger.mask)
    bad = runner.invoke(app, ["poison", "--data", "digits", "--attack", "nope", "--out", str(out)])
    assert bad.exit_code == 2 and "unknown poisoning attack" in bad.output
    bad = runner.invoke(
        app, ["poison", "--data", "digits", "--attack", "blend", "--out", str(tmp_path / "x.csv")]
    )
    assert bad.exit_code == 2


def test_feature_collision_flips_the_target_in_transfer_learning(data, digits_split):
    """Shafahi et al. 2018's transfer-learning setting: a frozen feature extractor, the last
    layer retrained on clean data plus 5 correctly labelled poisons."""
    import torch

    from advguard.attacks.poisoning import clean_label_poison
    from advguard.defenses.backdoor import penultimate_features
    from advguard.models import TorchClassifier
    from advguard.models.fit import fit
    from advguard.models.zoo import mlp

    x, y = data
    _, _, x_te, y_te = digits_split
    torch.manual_seed(0)
    clf = TorchClassifier(
        fit(mlp((1, 8, 8), 10, hidden=(256,)), x, y, epochs=30, seed=0),
        input_shape=(1, 8, 8),
        num_classes=10,
    )
    t = x_te[np.flatnonzero(y_te == 1)[0]]
    res = clean_label_poison(
        clf, x, y, t, base_class=7, n_poisons=5, steps=300, beta=0.1, lr=0.01, opacity=0.3
    )
    man = res.manifest
    np.testing.assert_array_equal(man.indices, np.arange(len(y), len(y) + 5))
    assert (res.y[man.indices] == 7).all() and (man.original_labels == 7).all()  # clean label
    np.testing.assert_array_equal(res.x[: len(y)], x)
    ft = penultimate_features(clf, t[None])
    fp = penultimate_features(clf, res.x[man.indices])
    fb = penultimate_features(clf, x[man.params["base_rows"]])
    assert np.linalg.norm(fp - ft, axis=1).max() < 0.2 * np.linalg.norm(fb - ft, axis=1).min()

    def retrain_head(xx, yy):
        f = penultimate_features(clf, xx).astype(np.float32)
        torch.manual_seed(0)
        head = fit(torch.nn.Linear(256, 10), f, yy, epochs=300, batch_size=256, lr=3e-2, seed=0)
        return int(head(torch.as_tensor(ft, dtype=torch.float32)).argmax(1))

    assert retrain_head(x, y) == 1  # without poisons the target keeps its class
    assert retrain_head(res.x, res.y) == 7
