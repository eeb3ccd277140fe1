"""Training-time monitoring: the trainer records per-class loss and gradient norms, and
`compare_manifests` / `advguard data loss-drift` single out a poisoned target class."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from advguard.attacks.poisoning import label_flip
from advguard.cli import app
from advguard.defenses.training import TrainConfig, compare_manifests, load_manifest, train
from advguard.errors import InputError
from advguard.models.zoo import mlp


def _train(x: np.ndarray, y: np.ndarray, out: Path) -> dict[str, Any]:
    torch.manual_seed(0)
    cfg = TrainConfig(method="standard", epsilon=0.0, epochs=8, batch_size=64, seed=0)
    return train(mlp((1, 8, 8), 10), x, y, cfg, out_dir=out).manifest


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A clean run and a run on the same data with 10% of the rows flipped to class 3."""
    from advguard.data import load_builtin

    d = tmp_path_factory.mktemp("monitor")
    train_set, _ = load_builtin("digits").split(test_size=397, seed=0)
    _train(train_set.x, train_set.y, d / "clean")
    p = label_flip(train_set.x, train_set.y, rate=0.1, target=3, seed=0)
    _train(p.x, p.y, d / "poisoned")
    _train(train_set.x, train_set.y, d / "again")
    return {k: d / k for k in ("clean", "poisoned", "again")}


def test_manifest_records_per_class_loss_and_gradient_norms(runs: dict[str, Path]) -> None:
    m = load_manifest(runs["clean"])
    rows = m["epochs"]
    assert len(rows) == 8 and m["method"] == "standard"
    for row in rows:
        pc = row["per_class"]
        assert sum(pc["n"]) == row["samples"] == m["data"]["n_train"]
        assert len(pc["loss"]) == len(pc["grad_norm"]) == 10
        assert all(0 <= g <= np.sqrt(2) for g in pc["grad_norm"])  # ||softmax - onehot||
        assert row["grad_norm"] > 0
        # standard training at epsilon 0: the held-out robust accuracy is the clean accuracy
        assert row["val_robust_acc"] == row["val_clean_acc"]
    # the model learns: every class's loss falls from the first to the last epoch
    assert all(
        b < a
        for a, b in zip(rows[0]["per_class"]["loss"], rows[-1]["per_class"]["loss"], strict=True)
    )
    # the mean per-class loss, weighted by class counts, is the epoch's mean loss
    pc = rows[-1]["per_class"]
    weighted = sum(n * v for n, v in zip(pc["n"], pc["loss"], strict=True)) / sum(pc["n"])
    assert weighted == pytest.approx(rows[-1]["loss"], rel=1e-6)


def test_poisoned_target_class_stands_out(runs: dict[str, Path]) -> None:
    clean, pois = load_manifest(runs["clean"]), load_manifest(runs["poisoned"])
    res = compare_manifests(clean, pois)
    assert res["flagged_classes"] == [3]
    row = res["loss"][3]
    # class 3's loss rose ~0.7 nats more than the median class's, > 10 spreads
    assert row["direction"] == "up" and row["z"] > 8 and row["excess"] > 0.5
    assert max(abs(r["z"]) for r in res["loss"] if r["class"] != 3) < 4
    # the gradient norms of the flipped class move the same way
    assert res["flagged_grad_norm_classes"] == [3]
    # a rerun with the same data and seed does not drift at all
    same = compare_manifests(clean, load_manifest(runs["again"]))
    assert same["flagged_classes"] == [] and same["median_loss_change"] == 0.0
    # a stricter min_delta leaves the poisoned class unflagged
    assert compare_manifests(clean, pois, min_delta=1.0)["flagged_classes"] == []


def test_compare_validates_its_inputs(runs: dict[str, Path]) -> None:
    m = load_manifest(runs["clean"])
    with pytest.raises(InputError, match="z must be a finite number > 0"):
        compare_manifests(m, m, z=0.0)
    old = copy.deepcopy(m)
    for row in old["epochs"]:
        del row["per_class"]
    with pytest.raises(InputError, match="no per-class loss"):
        compare_manifests(old, m)
    neg = copy.deepcopy(m)
    neg["epochs"][-1]["per_class"]["loss"][0] = -1.0
    with pytest.raises(InputError, match="finite numbers >= 0"):
        compare_manifests(m, neg)
    fewer = copy.deepcopy(m)
    for row in fewer["epochs"]:
        for k in ("loss", "grad_norm", "n"):
            row["per_class"][k] = row["per_class"][k][:9]
    with pytest.raises(InputError, match="10 and 9 classes"):
        compare_manifests(m, fewer)


def test_cli_loss_drift(runs: dict[str, Path]) -> None:
    cli = CliRunner()
    res = cli.invoke(app, ["data", "loss-drift", str(runs["clean"]), str(runs["poisoned"])])
    assert res.exit_code == 1, res.output
    assert "Flagged classes: 3" in res.output
    args = ["data", "loss-drift", str(runs["clean"]), str(runs["again"] / "manifest.json")]
    res = cli.invoke(app, [*args, "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["flagged_classes"] == []
