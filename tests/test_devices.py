"""``--device``: one parser (cpu, cuda, cuda:N, mps, auto), the same numbers on the CPU with or
without the option, a one-line error for a GPU that is not there, and, where a GPU is present,
models, attacks and training that really run on it and agree with the CPU."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from advguard.cli import app
from advguard.errors import InputError
from advguard.models import TorchClassifier
from advguard.models.devices import configure_determinism, resolve_device
from advguard.models.io import load_model, save_torch
from advguard.models.zoo import mlp, small_cnn

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (torch.cuda.is_available())")
no_cuda = pytest.mark.skipif(CUDA, reason="checks the error for a missing GPU; this host has one")


# -- the parser ---------------------------------------------------------------------------
def test_cpu_and_auto_resolve_without_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")


def test_auto_picks_the_first_gpu_when_cuda_is_there(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda:0")


@pytest.mark.parametrize("spec", ["gpu", "cuda:x", "cpu:0", "mps:1", "cuda:-1", "", "tpu"])
def test_unknown_spellings_are_refused(spec: str) -> None:
    with pytest.raises(InputError, match="device"):
        resolve_device(spec)


def test_a_non_string_is_refused() -> None:
    with pytest.raises(InputError, match="must be a string"):
        resolve_device(0)  # type: ignore[arg-type]


def test_missing_cuda_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for spec in ("cuda", "cuda:0", "cuda:3"):
        with pytest.raises(InputError, match="CUDA is not available") as err:
            resolve_device(spec)
        assert "\n" not in str(err.value)


def test_a_gpu_index_past_the_last_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(InputError, match=r"'cuda:2' is not available \(2 GPU"):
        resolve_device("cuda:2")


def test_determinism_is_a_no_op_on_the_cpu() -> None:
    before = torch.backends.cudnn.deterministic, torch.backends.cudnn.allow_tf32
    configure_determinism(torch.device("cpu"))
    assert (torch.backends.cudnn.deterministic, torch.backends.cudnn.allow_tf32) == before


def test_torch_classifier_checks_its_device(monkeypatch: pytest.MonkeyPatch) -> None:
    clf = TorchClassifier(mlp((4,), 3, hidden=(8,)), input_shape=(4,), num_classes=3, device="auto")
    assert clf.device.type == ("cuda" if CUDA else "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InputError, match="CUDA is not available"):
        TorchClassifier(mlp((4,), 3), input_shape=(4,), num_classes=3, device="cuda")


# -- loaders: torch models move, ONNX/skops stay on the CPU --------------------------------
def _saved_mlp(tmp: Path) -> Path:
    torch.manual_seed(0)
    clf = TorchClassifier(mlp((4,), 3, hidden=(8,)), input_shape=(4,), num_classes=3)
    return save_torch(
        clf,
        tmp / "m.safetensors",
        factory="advguard.models.zoo:mlp",
        factory_kwargs={"input_shape": [4], "num_classes": 3, "hidden": [8]},
    )


def test_load_model_places_torch_models(tmp_path: Path) -> None:
    path = _saved_mlp(tmp_path)
    x = np.random.default_rng(0).random((5, 4), dtype=np.float32)
    base = load_model(path).predict_logits(x)
    for spec in ("cpu", "auto"):
        m = load_model(path, device=spec)
        assert m.device.type == ("cuda" if spec == "auto" and CUDA else "cpu")
        np.testing.assert_allclose(m.predict_logits(x), base, rtol=1e-5, atol=1e-6)


def test_onnx_models_refuse_a_gpu_but_take_auto(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("onnxruntime", reason="onnxruntime (the onnx extra) is not installed")
    from advguard.models.io import export_onnx

    torch.manual_seed(0)
    clf = TorchClassifier(mlp((4,), 3, hidden=(8,)), input_shape=(4,), num_classes=3)
    path = export_onnx(clf, tmp_path / "m.onnx")
    assert load_model(path, device="cpu").num_classes == 3
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert load_model(path, device="auto").num_classes == 3  # auto: the CPU for ONNX
    with pytest.raises(InputError, match=r"device='cuda:0' does not apply to an ONNX model"):
        load_model(path, device="cuda:0")


def test_guard_config_checks_the_device() -> None:
    from pydantic import ValidationError

    from advguard.guard.config import ModelSpec

    assert ModelSpec(path="m.onnx", device="cuda:1").device == "cuda:1"
    with pytest.raises(ValidationError):
        ModelSpec(path="m.onnx", device="gpu")


# -- the CLI: same numbers on the CPU; a missing GPU is exit 2 with one line ----------------
def _data(tmp: Path) -> Path:
    rng = np.random.default_rng(0)
    p = tmp / "d.npz"
    np.savez(p, x=rng.random((40, 4), dtype=np.float32), y=rng.integers(0, 3, 40))
    return p


def _attack_args(tmp: Path, out: str) -> list[str]:
    m, d = _saved_mlp(tmp), _data(tmp)
    return ["attack", "-m", str(m), "-d", str(d), "--out", str(tmp / out), "--epsilon", "0.1"]


def test_cli_attack_gives_the_same_numbers_with_cpu_and_auto(tmp_path: Path) -> None:
    runs = {}
    for label, extra in (
        ("none", []),
        ("cpu", ["--device", "cpu"]),
        ("auto", ["--device", "auto"]),
    ):
        r = CliRunner().invoke(app, [*_attack_args(tmp_path, f"{label}.npz"), *extra])
        assert r.exit_code == 0, r.output
        runs[label] = np.load(tmp_path / f"{label}.npz")
    ref = runs["none"]
    assert ref["x_adv"].shape == (40, 4)
    tol = 1e-5 if CUDA else 0.0  # without a GPU, auto is the CPU: identical bits
    for label in ("cpu", "auto"):
        for key in ("x_adv", "success"):
            np.testing.assert_allclose(runs[label][key], ref[key], atol=tol, rtol=0)


def _evaluate(tmp: Path, out: str, extra: list[str]) -> dict[str, object]:
    tm = tmp / "tm.yaml"
    tm.write_text(
        "name: t\nnorm: linf\nepsilons: [0.05, 0.1]\nsamples: 40\nbatch_size: 20\n"
        "attacks: [{attack: pgd, steps: 5}]\nsanity_checks: false\n"
    )
    m, d = _saved_mlp(tmp), _data(tmp)
    args = ["evaluate", "-m", str(m), "-d", str(d), "-t", str(tm), "--out", str(tmp / out)]
    r = CliRunner().invoke(app, [*args, *extra])
    assert r.exit_code in (0, 1), r.output
    rep = json.loads((tmp / out / "report.json").read_text())
    return {
        "clean": rep["clean_accuracy"]["value"],
        "robust": [p["robust_accuracy"]["value"] for p in rep["results"]],
        "device": rep["environment"]["device"],
    }


def test_cli_evaluate_reports_the_same_on_cpu_with_or_without_device(tmp_path: Path) -> None:
    base = _evaluate(tmp_path, "a", [])
    cpu = _evaluate(tmp_path, "b", ["--device", "cpu"])
    assert base == cpu and base["device"] == "cpu"
    assert 0.0 <= min(base["robust"]) <= max(base["robust"]) <= base["clean"]  # type: ignore[type-var]


def _cuda_cases() -> dict[str, Callable[[Path], list[str]]]:
    """Every model-running command, with arguments that are valid apart from ``--device``."""

    def cmd(template: str) -> Callable[[Path], list[str]]:
        def build(t: Path) -> list[str]:
            return template.format(m=_saved_mlp(t), d=_data(t), t=t).split()

        return build

    return {
        "evaluate": cmd("evaluate -m {m} -d {d} --out {t}/e"),
        "attack": cmd("attack -m {m} -d {d} --out {t}/a.npz"),
        "certify": cmd("certify -m {m} -d {d} --out {t}/c"),
        "detector calibrate": cmd("detector calibrate -m {m} -d {d} --out {t}/det"),
        "guard profile": cmd("guard profile -m {m} -d {d} --out {t}/p.json"),
        "guard serve": cmd("guard serve -m {m}"),
        "data scan": cmd("data scan -m {m} -d {d}"),
        "scan (backdoor)": cmd("scan {m} -d {d}"),
        "privacy audit": cmd("privacy audit -m {m} --members {d} --non-members {d}"),
        "watermark verify": cmd("watermark verify -m {m} --key {t}/k.npz"),
        "watermark embed": cmd("watermark embed -d {d} --out {t}/w"),
        "train": cmd("train --defense pgd-at -m advguard.models.zoo:mlp -d {d} --out {t}/tr"),
        "extract": cmd("extract --target {m} -d {d} --budget 10 --out {t}/x"),
        "quickstart": cmd("quickstart --out {t}/q"),
    }


@no_cuda
@pytest.mark.parametrize("build", _cuda_cases().values(), ids=_cuda_cases().keys())
def test_cli_device_cuda_without_cuda_is_exit_2_one_line(
    build: Callable[[Path], list[str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(app, [*build(tmp_path), "--device", "cuda"])
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "CUDA is not available" in lines[0], r.stderr
    for out in ("e", "a.npz", "c", "det", "p.json", "w", "tr", "x", "q"):
        assert not (tmp_path / out).exists(), out  # refused before any work


# -- on a GPU: the model and the attack really run there and agree with the CPU -------------
@needs_cuda
def test_cuda_model_and_pgd_agree_with_the_cpu() -> None:
    from advguard.attacks.evasion.pgd import PGD

    configure_determinism(torch.device("cuda"))
    torch.manual_seed(0)
    module = small_cnn((3, 32, 32), 10)
    cpu = TorchClassifier(module, input_shape=(3, 32, 32), num_classes=10, device="cpu")
    x = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    y = torch.as_tensor(cpu.predict(x))
    ref_logits = cpu.predict_logits(x)
    attack = PGD(norm="linf", steps=10, random_start=False)
    ref = attack.run(cpu, x, y, 8 / 255)
    gpu = TorchClassifier(
        small_cnn((3, 32, 32), 10), input_shape=(3, 32, 32), num_classes=10, device="cuda"
    )
    gpu.module.load_state_dict(module.state_dict())
    assert next(gpu.module.parameters()).is_cuda and gpu.device.type == "cuda"
    np.testing.assert_allclose(gpu.predict_logits(x), ref_logits, rtol=1e-4, atol=1e-4)
    res = attack.run(gpu, x, y, 8 / 255)
    assert res.x_adv.is_cuda
    delta = (res.x_adv.cpu() - x).abs().max().item()
    assert delta <= 8 / 255 + 1e-6
    # sign steps may flip on last-bit gradient differences: most pixels and the verdicts agree
    same = torch.isclose(res.x_adv.cpu(), ref.x_adv, atol=1e-4).float().mean().item()
    assert same > 0.95, same
    agree = (res.success.cpu() == ref.success.cpu()).float().mean().item()
    assert agree >= 0.9, agree


@needs_cuda
def test_cuda_training_runs_on_the_gpu_and_tracks_the_cpu() -> None:
    from advguard.models.fit import fit

    rng = np.random.default_rng(0)
    x = rng.random((256, 1, 8, 8), dtype=np.float32)
    y = (x.reshape(256, -1).mean(1) > 0.5).astype(np.int64)
    losses: dict[str, list[float]] = {"cpu": [], "cuda": []}
    for dev in ("cpu", "cuda"):
        torch.manual_seed(0)
        module = small_cnn((1, 8, 8), 2)
        fit(module, x, y, epochs=3, batch_size=64, seed=0, device=dev,
            progress=lambda _e, _n, loss, d=dev: losses[d].append(loss))  # fmt: skip
        assert next(module.parameters()).device.type == dev
    np.testing.assert_allclose(losses["cuda"], losses["cpu"], rtol=1e-3, atol=1e-4)


@needs_cuda
def test_cli_evaluate_on_cuda_matches_the_cpu(tmp_path: Path) -> None:
    cpu = _evaluate(tmp_path, "cpu", ["--device", "cpu"])
    gpu = _evaluate(tmp_path, "gpu", ["--device", "cuda"])
    assert str(gpu["device"]).startswith("cuda")
    assert gpu["clean"] == cpu["clean"]
    # PGD's random start is drawn on the model's device: another stream, close numbers
    for a, b in zip(gpu["robust"], cpu["robust"], strict=True):  # type: ignore[call-overload]
        assert abs(a - b) <= 0.1
