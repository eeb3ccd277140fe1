"""DP-SGD training (Opacus, extra ``privacy``) on scikit-learn digits with a small MLP."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("opacus", reason="DP-SGD needs the 'privacy' extra (opacus)")

from advguard.cli import app
from advguard.defenses.training import dp_train, holdout_split
from advguard.errors import InputError
from advguard.models import TorchClassifier
from advguard.models.fit import fit
from advguard.models.io import load_model
from advguard.models.zoo import mlp

FACTORY = "advguard.models.zoo:mlp"
SHAPE = (1, 8, 8)


def _mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return mlp(SHAPE, 10)


def _acc(module: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    return TorchClassifier(module, input_shape=SHAPE, num_classes=10).accuracy(x, y)


@pytest.fixture(scope="module")
def dp_run(digits_split, tmp_path_factory):
    x_tr, y_tr, _, _ = digits_split
    out = tmp_path_factory.mktemp("dp")
    stages: list[tuple[str, int, int]] = []
    res = dp_train(
        _mlp(), x_tr, y_tr, target_epsilon=4.0, epochs=10, batch_size=64, lr=1.0, seed=0,
        factory=FACTORY, factory_kwargs={"input_shape": list(SHAPE), "num_classes": 10},
        out_dir=out, progress=lambda s, d, t: stages.append((s, d, t)),
    )  # fmt: skip
    return res, out, stages


def test_dp_sgd_meets_its_budget_and_learns_at_a_cost(dp_run, digits_split):
    x_tr, y_tr, x_te, y_te = digits_split
    res, _, stages = dp_run
    priv = res.manifest["privacy"]
    # the accountant calibrated the noise to the budget: spent epsilon at (not over) target
    assert 0.9 * 4.0 <= priv["epsilon"] <= 4.0 * 1.01, priv
    assert priv["noise_multiplier"] > 0.8 and priv["max_grad_norm"] == 1.0
    assert priv["delta"] < 1.0 / res.manifest["data"]["n_train"]
    assert priv["steps"] == 10 * round(1 / priv["sample_rate"])
    spent = [r["epsilon_spent"] for r in res.history]
    assert spent == sorted(spent) and spent[-1] == priv["epsilon"]  # budget grows per epoch
    # what it costs: accuracy below the same MLP trained without privacy
    # (measured: DP 92.2% vs non-private 97.7% on the 397 test digits)
    tr_idx, _ = holdout_split(len(x_tr), 0.1, 0)
    torch.manual_seed(0)
    plain = fit(mlp(SHAPE, 10), x_tr[tr_idx], y_tr[tr_idx], epochs=30, seed=0)
    dp_acc, plain_acc = _acc(res.module, x_te, y_te), _acc(plain, x_te, y_te)
    assert dp_acc >= 0.85, dp_acc
    assert plain_acc > dp_acc, (plain_acc, dp_acc)
    assert ("epoch", 10, 10) in stages and stages[-1][0] == "epoch"


def test_noise_multiplier_mode_reports_the_spent_budget(digits_split):
    x_tr, y_tr, x_te, y_te = digits_split
    kw = dict(epochs=3, batch_size=64, lr=1.0, seed=0)
    low = dp_train(_mlp(), x_tr, y_tr, noise_multiplier=0.6, **kw)
    high = dp_train(_mlp(), x_tr, y_tr, noise_multiplier=5.0, **kw)
    # more noise, less privacy spent (measured: epsilon 11.1 at sigma 0.6, 0.30 at sigma 5) ...
    assert high.manifest["privacy"]["epsilon"] < 1.0 < low.manifest["privacy"]["epsilon"]
    # ... and the noise is really added: at sigma 5 the model learns much less (77% vs 26%)
    assert _acc(high.module, x_te, y_te) < _acc(low.module, x_te, y_te) - 0.1


def test_manifest_checkpoint_reload_and_reproducibility(dp_run, digits_split):
    x_tr, y_tr, x_te, _ = digits_split
    res, out, _ = dp_run
    man = json.loads((out / "manifest.json").read_text())
    assert man["method"] == "dp-sgd" and man["status"] == "completed"
    assert man["privacy"]["epsilon"] == res.manifest["privacy"]["epsilon"]
    assert man["checkpoint"]["path"] == "model.safetensors" and "opacus" in man["versions"]
    clf = load_model(out / "model.safetensors")
    np.testing.assert_allclose(
        clf.predict_logits(x_te), res.classifier().predict_logits(x_te), rtol=1e-5, atol=1e-5
    )
    assert not any(hasattr(p, "grad_sample") for p in res.module.parameters())
    # the same seed gives the same model (noise and Poisson sampling are seeded)
    kw = dict(noise_multiplier=1.0, epochs=1, batch_size=64, seed=3)
    init = _mlp()
    a = dp_train(copy.deepcopy(init), x_tr[:600], y_tr[:600], **kw)
    b = dp_train(copy.deepcopy(init), x_tr[:600], y_tr[:600], **kw)
    for va, vb in zip(a.module.state_dict().values(), b.module.state_dict().values(), strict=True):
        assert torch.equal(va, vb)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"target_epsilon": 2.0, "noise_multiplier": 1.0}, "not both"),
        ({"target_epsilon": 0.0}, "target_epsilon"),
        ({"delta": 0.1}, "below 1/n_train"),
        ({"batch_size": 5000}, "smaller than the training set"),
        ({"max_grad_norm": -1.0}, "max_grad_norm"),
        ({"accountant": "moments"}, "accountant"),
        ({"module": torch.nn.Sequential(
            torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
            torch.nn.Linear(144, 10))}, "BatchNorm"),
    ],
)  # fmt: skip
def test_bad_inputs(digits_split, kwargs, match):
    x_tr, y_tr, _, _ = digits_split
    module = kwargs.pop("module", None) or _mlp()
    with pytest.raises(InputError, match=match):
        dp_train(module, x_tr, y_tr, epochs=1, **kwargs)


def test_cli_dp_sgd(tmp_path):
    runner = CliRunner()
    out = tmp_path / "dp"
    res = runner.invoke(
        app,
        ["train", "--defense", "dp-sgd", "--model", FACTORY, "--data", "digits",
         "--dp-epsilon", "3", "--epochs", "3", "--batch-size", "64", "--lr", "1.0",
         "--out", str(out)],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "epsilon" in res.output and (out / "model.safetensors").is_file()
    man = json.loads((out / "manifest.json").read_text())
    assert man["method"] == "dp-sgd" and man["privacy"]["epsilon"] <= 3.0 * 1.01
    # the attack budget flag is refused for DP-SGD rather than silently ignored
    bad = runner.invoke(
        app,
        ["train", "--defense", "dp-sgd", "--model", FACTORY, "--data", "digits",
         "--epsilon", "0.3", "--out", str(tmp_path / "x")],
    )  # fmt: skip
    assert bad.exit_code == 2 and "--dp-epsilon" in bad.output


def test_empty_poisson_batches_are_noise_only_steps(digits_split):
    x_tr, y_tr, _, _ = digits_split
    # expected batch 1 of 36 examples: about a third of the Poisson batches are empty
    res = dp_train(_mlp(), x_tr[:40], y_tr[:40], noise_multiplier=1.0, delta=1e-3, epochs=2,
                   batch_size=1, val_fraction=0.1, seed=0)  # fmt: skip
    assert res.manifest["privacy"]["steps"] == 2 * 36
    assert all(np.isfinite(v.numpy()).all() for v in res.module.state_dict().values())
    assert sum(r["samples"] for r in res.history) < 2 * 36 + 15  # Poisson, not fixed batches
