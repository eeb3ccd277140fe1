"""Adversarial training on 8x8 digits: what it buys (robust accuracy), what it costs (clean
accuracy), TRADES' trade-off, catastrophic-overfitting detection, checkpoints and the CLI."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from advguard.attacks.evasion.pgd import PGD
from advguard.cli import app
from advguard.defenses.training import (
    adversarial_train,
    data_sha256,
    detect_catastrophic_overfitting,
    load_manifest,
)
from advguard.errors import InputError
from advguard.models import TorchClassifier
from advguard.models.io import load_model
from advguard.models.zoo import small_cnn

EPS = 0.1
FACTORY = "advguard.models.zoo:small_cnn"
FACTORY_KW = {"input_shape": [1, 8, 8], "num_classes": 10}


def _cnn(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)  # the initial weights are the caller's; fix them for repeatability
    return small_cnn((1, 8, 8), 10)


def _robust(module: torch.nn.Module, x: np.ndarray, y: np.ndarray, eps: float = EPS):
    """(clean acc, PGD-20 robust acc) with advguard's own PGD on held-out digits."""
    clf = TorchClassifier(module, input_shape=(1, 8, 8), num_classes=10)
    res = PGD(steps=20, seed=0)(clf, torch.tensor(x), torch.tensor(y), epsilon=eps)
    return clf.accuracy(x, y), float((clf.predict(res.x_adv) == y).mean())


@pytest.fixture(scope="module")
def pgd_at_run(digits_split, tmp_path_factory):
    x_tr, y_tr, _, _ = digits_split
    out = tmp_path_factory.mktemp("pgd_at")
    stages: list[tuple[str, int, int]] = []
    res = adversarial_train(
        _cnn(),
        x_tr,
        y_tr,
        method="pgd-at",
        epsilon=EPS,
        epochs=8,
        batch_size=64,
        steps=5,
        eval_steps=5,
        seed=0,
        factory=FACTORY,
        factory_kwargs=FACTORY_KW,
        out_dir=out,
        progress=lambda s, d, t: stages.append((s, d, t)),
    )
    return res, out, stages


def test_pgd_at_raises_robust_accuracy(pgd_at_run, digits_module, digits_split):
    _, _, x_te, y_te = digits_split
    res, _, stages = pgd_at_run
    base_clean, base_rob = _robust(digits_module, x_te, y_te)
    at_clean, at_rob = _robust(res.module, x_te, y_te)
    # measured: undefended ~99% clean / 52-56% robust; PGD-AT 97.5% clean / 82.1% robust
    assert at_rob >= base_rob + 0.15, (base_rob, at_rob)
    # the cost: clean accuracy may drop, but by at most a few points on digits at eps 0.1
    assert at_clean >= base_clean - 0.05, (base_clean, at_clean)
    assert at_clean < 1.0
    # progress went through the callback, never stdout
    assert ("train", 8 * 20, 8 * 20) in stages and ("epoch", 8, 8) in stages


def test_manifest_and_checkpoint_reload(pgd_at_run, digits_split):
    x_tr, y_tr, x_te, _ = digits_split
    res, out, _ = pgd_at_run
    man = load_manifest(out)
    assert man == json.loads((out / "manifest.json").read_text())
    assert man["method"] == "pgd-at" and man["status"] == "completed"
    assert man["data"]["sha256"] == data_sha256(x_tr, y_tr)["sha256"]
    assert man["data"]["n_train"] + man["data"]["n_val"] == len(x_tr)
    assert man["config"]["epsilon"] == EPS and man["seed"] == 0
    assert len(man["epochs"]) == 8
    best = max(man["epochs"], key=lambda r: r["val_robust_acc"])
    assert man["best_epoch"] == best["epoch"]
    assert man["best_val_robust_acc"] == best["val_robust_acc"]
    assert man["versions"]["torch"] == torch.__version__ and man["total_time_s"] > 0
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left
    # reload through the generic loader (factory from the safetensors metadata)
    clf = load_model(out / "model.safetensors")
    ref = res.classifier().predict_logits(x_te)
    np.testing.assert_allclose(clf.predict_logits(x_te), ref, rtol=1e-5, atol=1e-5)


def test_deterministic_for_a_seed(digits_split):
    x_tr, y_tr, _, _ = digits_split
    kw = dict(method="trades", epsilon=EPS, epochs=1, steps=2, eval_steps=2, seed=3)
    init = _cnn()
    a = adversarial_train(copy.deepcopy(init), x_tr[:300], y_tr[:300], **kw)
    b = adversarial_train(copy.deepcopy(init), x_tr[:300], y_tr[:300], **kw)
    c = adversarial_train(copy.deepcopy(init), x_tr[:300], y_tr[:300], **{**kw, "seed": 4})
    for (ka, va), (kb, vb) in zip(
        a.module.state_dict().items(), b.module.state_dict().items(), strict=True
    ):
        assert ka == kb and torch.equal(va, vb)
    assert a.history[0]["loss"] == b.history[0]["loss"] != c.history[0]["loss"]


def test_trades_beta_trades_clean_for_robust(digits_split):
    x_tr, y_tr, x_te, y_te = digits_split
    out = {}
    for beta in (0.1, 6.0):
        res = adversarial_train(
            _cnn(),
            x_tr,
            y_tr,
            method="trades",
            beta=beta,
            epsilon=EPS,
            epochs=6,
            batch_size=64,
            steps=3,
            eval_steps=5,
            seed=0,
        )
        out[beta] = _robust(res.module, x_te, y_te)
    # measured: beta 0.1 -> 96.2% clean / 63.5% robust; beta 6 -> 97.2% clean / 80.4% robust
    assert out[6.0][1] >= out[0.1][1] + 0.08, out
    assert out[0.1][0] >= 0.93 and out[6.0][0] >= 0.9, out


def test_co_detector_on_metric_sequences():
    healthy = [(0.30, 0.35), (0.45, 0.50), (0.52, 0.58), (0.55, 0.60), (0.50, 0.57)]
    best = None
    for pgd, fgsm in healthy:
        assert detect_catastrophic_overfitting(pgd, fgsm, best) is None
        best = pgd if best is None else max(best, pgd)
    # Wong et al.'s signature: PGD accuracy collapses while FGSM accuracy soars
    why = detect_catastrophic_overfitting(0.02, 0.90, best)
    assert why is not None and "dropped" in why
    why = detect_catastrophic_overfitting(0.01, 0.85, None)
    assert why is not None and "FGSM" in why
    # a 19-point dip is noise, a 21-point one is a collapse
    assert detect_catastrophic_overfitting(0.36, 0.40, 0.55) is None
    assert detect_catastrophic_overfitting(0.34, 0.40, 0.55) is not None
    # a model that is simply not robust yet (both accuracies low) is not flagged
    assert detect_catastrophic_overfitting(0.03, 0.06, None) is None


def test_fast_at_normal_run_no_co(digits_split, digits_module):
    x_tr, y_tr, x_te, y_te = digits_split
    res = adversarial_train(
        _cnn(),
        x_tr,
        y_tr,
        method="fast-at",
        epsilon=EPS,
        epochs=6,
        batch_size=64,
        eval_steps=5,
        seed=0,
    )
    man = res.manifest
    assert man["co_events"] == [] and man["stop_reason"] == "completed all epochs"
    assert man["config"]["fast_alpha"] == 1.25 and man["config"]["detect_co"] is True
    assert all("co_probe_pgd_acc" in r for r in man["epochs"])
    _, base_rob = _robust(digits_module, x_te, y_te)
    clean, rob = _robust(res.module, x_te, y_te)
    # measured: 97.7% clean / 77.8% robust vs 52-56% undefended
    assert rob >= base_rob + 0.15 and clean >= 0.9, (base_rob, rob, clean)


def test_fast_at_collapse_is_detected_and_rolled_back(pgd_at_run, digits_split):
    """Fine-tuning a robust model with a destructive fast-AT setting (no random init,
    alpha = 2 eps, lr 0.05) wrecks robustness; the detector stops and restores."""
    x_tr, y_tr, x_te, _ = digits_split
    start = copy.deepcopy(pgd_at_run[0].module)
    before = TorchClassifier(copy.deepcopy(start), input_shape=(1, 8, 8), num_classes=10)
    res = adversarial_train(
        start,
        x_tr,
        y_tr,
        method="fast-at",
        epsilon=EPS,
        epochs=3,
        batch_size=64,
        lr=0.05,
        fast_alpha=2.0,
        random_init=False,
        co_check_every=2,
        eval_steps=10,
        seed=0,
    )
    man = res.manifest
    assert man["stop_reason"] == "catastrophic-overfitting", man["epochs"]
    (event,) = man["co_events"]
    # measured: probe PGD accuracy 79.3% before, 11.4% after two destructive batches
    assert event["pgd_acc"] < man["co_initial_probe"]["pgd_acc"] - 0.2
    assert event["rolled_back_to_epoch"] is None  # collapsed within epoch 1: initial weights
    np.testing.assert_array_equal(res.classifier().predict(x_te), before.predict(x_te))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "free-at"}, "unknown method"),
        ({"epsilon": -0.1}, "epsilon"),
        ({"epochs": 0}, "epochs"),
        ({"val_fraction": 0.0}, "val_fraction"),
        ({"norm": "l1"}, "not supported"),
        ({"mix": 1.5}, "mix"),
        ({"ramp_epochs": 5, "epochs": 2}, "ramp_epochs"),
        ({"y": np.arange(10)}, "labels must lie"),
        ({"x": np.full((10, 1, 8, 8), 2.0, np.float32)}, "outside bounds"),
        ({"x": np.zeros((10, 1, 7, 7), np.float32)}, "cannot process"),
        ({"y": np.zeros(9, np.int64)}, "one label per input"),
    ],
)
def test_bad_inputs(kwargs, match):
    x = kwargs.pop("x", np.zeros((10, 1, 8, 8), np.float32))
    y = kwargs.pop("y", np.arange(10) % 3)
    if "labels must lie" in match:
        y = y + 5
    with pytest.raises(InputError, match=match):
        adversarial_train(_cnn(), x, y, epochs=kwargs.pop("epochs", 1), **kwargs)
    with pytest.raises(InputError, match=r"nn\.Module"):
        adversarial_train("not a module", x, y)  # type: ignore[arg-type]


def test_cli_train_end_to_end(tmp_path):
    runner = CliRunner()
    out = tmp_path / "run"
    res = runner.invoke(
        app,
        [
            "train",
            "--defense",
            "fast-at",
            "--model",
            FACTORY,
            "--data",
            "digits",
            "--epsilon",
            "0.1",
            "--epochs",
            "2",
            "--eval-samples",
            "50",
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "robust" in res.output and (out / "model.safetensors").is_file()
    man = json.loads((out / "manifest.json").read_text())
    assert man["method"] == "fast-at" and len(man["epochs"]) == 2
    clf = load_model(out / "model.safetensors")
    assert clf.input_shape == (1, 8, 8) and clf.num_classes == 10
    # the saved model is accepted by `advguard evaluate`
    ev = runner.invoke(
        app,
        [
            "evaluate",
            "--model",
            str(out / "model.safetensors"),
            "--data",
            "digits",
            "--threat-model",
            "quick",
            "--samples",
            "10",
            "--out",
            str(tmp_path / "report"),
        ],
    )
    assert ev.exit_code in (0, 1), ev.output
    assert (tmp_path / "report" / "report.json").is_file()
    # fine-tuning from the written safetensors works too
    res2 = runner.invoke(
        app,
        ["train", "--defense", "pgd-at", "--model", str(out / "model.safetensors"),
         "--data", "digits", "--epsilon", "0.1", "--epochs", "1", "--steps", "2",
         "--eval-samples", "50", "--out", str(tmp_path / "ft")],
    )  # fmt: skip
    assert res2.exit_code == 0, res2.output
    bad = runner.invoke(
        app,
        ["train", "--defense", "nope", "--model", FACTORY, "--data", "digits", "--out",
         str(tmp_path / "x")],
    )  # fmt: skip
    assert bad.exit_code == 2 and "unknown" in bad.output


class _Crash(Exception):
    pass


def test_resume_after_crash_matches_uninterrupted_run(digits_split, tmp_path):
    x_tr, y_tr, _, _ = digits_split
    x, y = x_tr[:400], y_tr[:400]
    kw = dict(method="fast-at", epsilon=EPS, epochs=3, batch_size=64, eval_steps=3, seed=1)
    init = _cnn()
    ref = adversarial_train(copy.deepcopy(init), x, y, out_dir=tmp_path / "ref", **kw)
    assert not (tmp_path / "ref" / "resume-state.json").exists()  # a finished run cleans up

    def crash_in_epoch_2(stage: str, done: int, total: int) -> None:
        if stage == "train" and done == 8:  # 6 batches per epoch: batch 2 of epoch 2
            raise _Crash

    out = tmp_path / "crashed"
    with pytest.raises(_Crash):
        adversarial_train(copy.deepcopy(init), x, y, out_dir=out, progress=crash_in_epoch_2, **kw)
    state = json.loads((out / "resume-state.json").read_text())
    assert state["epochs_done"] == 1 and (out / "resume-state.safetensors").is_file()
    # a different configuration or different data cannot resume this run
    with pytest.raises(InputError, match=r"configuration differs.*epsilon"):
        adversarial_train(_cnn(), x, y, out_dir=out, resume=True, **{**kw, "epsilon": 0.2})
    with pytest.raises(InputError, match="data differ"):
        adversarial_train(_cnn(), x[:-1], y[:-1], out_dir=out, resume=True, **kw)
    # resuming (from fresh weights: the saved ones are loaded) gives the uninterrupted result
    res = adversarial_train(_cnn(seed=9), x, y, out_dir=out, resume=True, **kw)
    assert res.manifest["resumed_from_epoch"] == 1
    assert [r["loss"] for r in res.history] == [r["loss"] for r in ref.history]
    for (ka, va), (kb, vb) in zip(
        ref.module.state_dict().items(), res.module.state_dict().items(), strict=True
    ):
        assert ka == kb and torch.equal(va, vb)
    assert not (out / "resume-state.json").exists()
    with pytest.raises(InputError, match="needs out_dir"):
        adversarial_train(_cnn(), x, y, resume=True, **kw)
