"""What the quickstart evaluates: linf-standard's suite on fewer samples and epsilons."""

from __future__ import annotations

from pathlib import Path

import pytest

from advguard.attacks.registry import build_attack
from advguard.errors import InputError
from advguard.evaluate.job import (
    QUICKSTART_EPSILONS,
    QUICKSTART_SAMPLES,
    quickstart_threat_model,
)
from advguard.evaluate.runner import query_only
from advguard.evaluate.threat_model import load_threat_model


def _suite(tm):
    return [(a.attack, a.model_dump()) for a in tm.attacks]


def test_default_is_linf_standard_on_fewer_samples_and_epsilons():
    preset = load_threat_model("linf-standard")
    tm = quickstart_threat_model()
    assert tm.samples == QUICKSTART_SAMPLES < preset.samples
    assert list(tm.epsilons) == list(QUICKSTART_EPSILONS)
    assert set(tm.epsilons) <= set(preset.epsilons)
    # not weakened: same attacks, steps, queries, targets, sanity checks and escalation
    assert _suite(tm) == _suite(preset)
    for key in ("norm", "goal", "seed", "sanity_checks", "sanity_samples", "escalate"):
        assert getattr(tm, key) == getattr(preset, key), key


def test_full_and_explicit_overrides():
    preset = load_threat_model("linf-standard")
    full = quickstart_threat_model(full=True)
    assert full.samples == preset.samples and list(full.epsilons) == list(preset.epsilons)
    tm = quickstart_threat_model(samples=50, epsilons=[0.05, 0.3])
    assert tm.samples == 50 and list(tm.epsilons) == [0.05, 0.3]
    assert _suite(tm) == _suite(preset)


def test_other_threat_models_run_as_they_are(tmp_path: Path):
    l2 = load_threat_model("l2-standard")
    assert quickstart_threat_model("l2-standard").model_dump() == l2.model_dump()
    f = tmp_path / "tm.yaml"
    f.write_text("name: t\nnorm: linf\nepsilons: [0.2]\nsamples: 30\nattacks: [{attack: fgsm}]\n")
    tm = quickstart_threat_model(str(f))
    assert tm.samples == 30 and list(tm.epsilons) == [0.2]


def test_bad_override_is_input_error():
    with pytest.raises(InputError):
        quickstart_threat_model(epsilons=[-0.1])


@pytest.mark.parametrize(
    ("name", "expected"),
    [("square", True), ("apgd-ce", False), ("apgd-t", False), ("fgsm", False)],
)
def test_query_only_attacks(name, expected):
    # the runner runs these under torch.inference_mode; transfer attacks differentiate a
    # surrogate and must not be among them
    assert query_only(build_attack(name, norm="linf", seed=0)) is expected


def test_transfer_is_not_query_only():
    from advguard.attacks.registry import ATTACKS, SuiteAttack

    fgsm = build_attack("fgsm", norm="linf", seed=0)
    assert not query_only(SuiteAttack(ATTACKS["transfer"], fgsm.attack, {}))
