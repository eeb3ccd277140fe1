"""The trainers and TorchClassifier leave the caller's module as they found it (device,
train/eval flags, frozen parameters); TrainConfig is the core API behind the keywords."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from advguard.defenses.training import TrainConfig, adversarial_train
from advguard.defenses.training.strategies import METHODS, STRATEGIES
from advguard.defenses.training.trainer import train
from advguard.errors import InputError
from advguard.models import TorchClassifier
from advguard.models.zoo import mlp, small_cnn

KW = dict(epsilon=0.1, epochs=1, batch_size=64, steps=2, eval_steps=2, seed=0)


@pytest.fixture(scope="module")
def data(digits_split):
    x_tr, y_tr, _, _ = digits_split
    return x_tr[:300], y_tr[:300]


def _cnn() -> torch.nn.Module:
    torch.manual_seed(0)
    return small_cnn((1, 8, 8), 10)


@pytest.mark.parametrize("method", METHODS)
def test_frozen_first_layer_stays_frozen_and_unchanged(data, method):
    x, y = data
    module = _cnn()
    module[0].requires_grad_(False)
    before = copy.deepcopy(module.state_dict())
    adversarial_train(module, x, y, method=method, **KW)
    assert not any(p.requires_grad for p in module[0].parameters())
    assert all(p.requires_grad for p in module[2].parameters())
    assert torch.equal(module[0].weight, before["0.weight"])
    assert torch.equal(module[0].bias, before["0.bias"])
    assert not torch.equal(module[2].weight, before["2.weight"])  # the rest did train


def test_device_and_mode_flags_unchanged(data):
    x, y = data
    module = _cnn()  # a fresh module is in train mode
    res = adversarial_train(module, x, y, **KW)
    assert res.module is module
    assert all(m.training for m in module.modules())
    assert {p.device for p in module.parameters()} == {torch.device("cpu")}
    assert res.manifest["config"]["device"] == "cpu"
    module.eval()
    adversarial_train(module, x, y, **KW)
    assert not any(m.training for m in module.modules())
    assert all(p.requires_grad for p in module.parameters())  # nothing frozen afterwards


def test_flags_restored_after_a_failed_run(data):
    x, y = data
    module = _cnn()
    with pytest.raises(InputError, match="num_classes"):
        adversarial_train(module, x, y, num_classes=7, **KW)
    assert all(m.training for m in module.modules())


def test_device_cpu_works_and_unavailable_cuda_is_one_line(data):
    x, y = data
    ref = adversarial_train(_cnn(), x, y, **KW)
    res = adversarial_train(_cnn(), x, y, device="cpu", **KW)
    for a, b in zip(
        ref.module.state_dict().values(), res.module.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the unavailable-device error cannot be provoked")
    with pytest.raises(InputError) as exc:
        adversarial_train(_cnn(), x, y, device="cuda", **KW)
    assert "not available" in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(InputError, match="device must be"):
        adversarial_train(_cnn(), x, y, device="no-such-device", **KW)


def test_all_frozen_module_is_refused(data):
    x, y = data
    module = _cnn().requires_grad_(False)
    with pytest.raises(InputError, match="no trainable parameters"):
        adversarial_train(module, x, y, **KW)


def test_train_with_config_equals_keyword_api(data):
    x, y = data
    cfg = TrainConfig(method="trades", **KW)
    a = train(_cnn(), x, y, cfg)
    b = adversarial_train(_cnn(), x, y, method="trades", **KW)
    for va, vb in zip(a.module.state_dict().values(), b.module.state_dict().values(), strict=True):
        assert torch.equal(va, vb)
    assert [r["loss"] for r in a.history] == [r["loss"] for r in b.history]
    assert a.manifest["config"] == b.manifest["config"]
    # validation fills in the derived fields once and is idempotent
    v = cfg.validated()
    assert v.step_size == pytest.approx(2.5 * 0.1 / 2) and v.detect_co is False
    assert v.validated() == v
    assert dataclasses.asdict(v)["ramp_epochs"] == 0
    with pytest.raises(InputError, match="unknown method"):
        TrainConfig(method="nope").validated()
    with pytest.raises(InputError, match="mix"):
        TrainConfig(mix=1.5).validated()


def test_strategy_registry_names_the_methods():
    assert set(METHODS) == set(STRATEGIES) == {"pgd-at", "trades", "fast-at", "standard"}
    cfg = TrainConfig(method="pgd-at", epsilon=0.1, steps=2).validated()
    for name, make in STRATEGIES.items():
        assert make(dataclasses.replace(cfg, method=name)).name == name


def test_torch_classifier_restores_flags_and_never_freezes(data):
    x, _ = data
    torch.manual_seed(0)
    module = torch.nn.Sequential(mlp((1, 8, 8), 10), torch.nn.Dropout(0.5))
    clf = TorchClassifier(module, input_shape=(1, 8, 8), num_classes=10)
    assert all(m.training for m in module.modules())  # construction changes nothing
    assert all(p.requires_grad for p in module.parameters())
    xb = torch.tensor(x[:16])
    first, second = clf.logits(xb), clf.logits(xb)
    assert torch.equal(first, second)  # eval mode during the call: dropout off
    g = clf.loss_gradient(xb, torch.zeros(16, dtype=torch.long))
    assert g.shape == xb.shape and float(g.abs().sum()) > 0
    assert all(p.grad is None for p in module.parameters())  # gradients w.r.t. inputs only
    assert all(m.training for m in module.modules())  # restored after each call
    assert all(p.requires_grad for p in module.parameters())
    module.eval()
    clf.logits(xb)
    assert not any(m.training for m in module.modules())


def test_dp_train_respects_frozen_layer_and_flags(data):
    pytest.importorskip("opacus", reason="DP-SGD needs the 'privacy' extra (opacus)")
    from advguard.defenses.training import dp_train

    x, y = data
    torch.manual_seed(0)
    module = mlp((1, 8, 8), 10)
    module[1].requires_grad_(False)
    before = copy.deepcopy(module.state_dict())
    dp_train(module, x, y, epochs=1, batch_size=32, noise_multiplier=1.0, seed=0)
    assert not any(p.requires_grad for p in module[1].parameters())
    assert torch.equal(module[1].weight, before["1.weight"])
    assert not torch.equal(module[5].weight, before["5.weight"])
    assert all(m.training for m in module.modules())
    assert {p.device for p in module.parameters()} == {torch.device("cpu")}
