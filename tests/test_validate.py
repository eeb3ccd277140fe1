"""One validation module (advguard._validate), its upper bounds, and threat-model attack
parameters validated at parse time (usage error, exit 2, with the line)."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from advguard import _validate as check
from advguard.attacks import APGD, PGD, SquareAttack
from advguard.attacks.evasion.cw import CarliniWagnerL2
from advguard.cli import app
from advguard.errors import InputError
from advguard.evaluate.threat_model import load_threat_model, parse_threat_model

runner = CliRunner()


@pytest.mark.parametrize("bad", [2.5, True, False, "3", None, 3.0])
def test_integers_are_ints_not_bools_or_floats(bad):
    with pytest.raises(check.ParameterError, match=r"^steps must be an integer") as e:
        check.steps("steps", bad)
    assert e.value.param == "steps" and "\n" not in str(e.value)


def test_integer_ranges_and_limits():
    assert check.integer("k", np.int64(4), low=1, high=4) == 4
    with pytest.raises(InputError, match=r"k must be an integer >= 1, got 0"):
        check.integer("k", 0, low=1)
    with pytest.raises(InputError, match=r"k must be an integer <= 4"):
        check.integer("k", 5, high=4)
    assert check.steps("steps", 100_000) == 100_000
    with pytest.raises(InputError, match=r"steps=100,001 is over the limit of 100,000"):
        check.steps("steps", 100_001)
    assert check.steps("steps", 10**12, allow_large=True) == 10**12
    for fn, limit in (
        (check.restarts, 1_000),
        (check.queries, 10_000_000),
        (check.samples, 10_000_000),
    ):
        fn("n", limit)
        with pytest.raises(InputError, match="allow_large"):
            fn("n", limit + 1)


def test_numbers_choices_flags():
    assert check.number("rho", 0.5, low=0, high=1, low_open=True, high_open=True) == 0.5
    for bad in (float("nan"), float("inf"), True, "0.5", None):
        with pytest.raises(InputError, match=r"^rho must be"):
            check.number("rho", bad)
    with pytest.raises(InputError, match=r"rho must be in \(0, 1\), got 1"):
        check.number("rho", 1, low=0, high=1, low_open=True, high_open=True)
    with pytest.raises(InputError, match=r"lr must be > 0"):
        check.positive("lr", 0.0)
    assert check.choice("loss", "ce", ("ce", "dlr")) == "ce"
    with pytest.raises(InputError, match="unknown loss 'x'; use one of ce, dlr"):
        check.choice("loss", "x", ("ce", "dlr"))
    with pytest.raises(InputError, match="random_start must be true or false"):
        check.flag("random_start", 1)


def test_attacks_share_one_rule():
    """PGD(steps=2.5) used to be accepted while APGD(steps=2.5) was refused."""
    for cls in (PGD, APGD, CarliniWagnerL2):
        for bad in (2.5, True, 0, 10**12):
            with pytest.raises(InputError, match="steps"):
                cls(steps=bad)
    with pytest.raises(InputError, match="max_queries"):
        SquareAttack(max_queries=10**9)
    assert PGD(steps=200_000, allow_large=True).steps == 200_000
    assert "allow_large" not in PGD().params()


TM = """name: t
epsilons: [0.1]
samples: 20
attacks:
  - attack: fgsm
  - attack: pgd
    restarts: 1
    steps: {steps}
"""


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        ("abc", "steps must be an integer"),
        ("1000000000000", "over the limit"),
        ("0", "steps must be an integer >= 1"),
    ],
)
def test_threat_model_attack_parameters_checked_at_parse_time(steps, message):
    with pytest.raises(InputError, match=message) as e:
        parse_threat_model(TM.format(steps=steps), "tm.yaml")
    assert "line 8, field 'attacks.1.steps'" in str(e.value)


def test_threat_model_unknown_parameter_and_samples_limit():
    with pytest.raises(InputError, match=r"line 7, field 'attacks.1.stepz'.*stepz") as e:
        parse_threat_model(TM.format(steps=5).replace("restarts", "stepz"), "tm.yaml")
    assert "unexpected keyword" in str(e.value)
    with pytest.raises(InputError, match=r"line 3, field 'samples'.*over the limit"):
        parse_threat_model(TM.format(steps=5).replace("samples: 20", "samples: 20000000"))


def test_allow_large_in_file_and_on_load(tmp_path):
    big = TM.format(steps=200_000)
    tm = parse_threat_model(big + "allow_large: true\n")
    assert tm.allow_large and tm.attacks[1].params["allow_large"] is True
    path = tmp_path / "tm.yaml"
    path.write_text(big)
    with pytest.raises(InputError, match="over the limit"):
        load_threat_model(path)
    tm = load_threat_model(path, allow_large=True)
    assert tm.attacks[1].params == {"restarts": 1, "steps": 200_000, "allow_large": True}
    # overrides re-validate (and keep the lifted limits)
    assert tm.with_overrides(samples=30).attacks[1].params["steps"] == 200_000


@pytest.mark.parametrize("command", ["evaluate", "attack", "show"])
def test_bad_attack_parameter_is_a_usage_error_everywhere(command, tmp_path):
    path = tmp_path / "tm.yaml"
    path.write_text(TM.format(steps="abc"))
    common = ["--model", str(tmp_path / "missing.safetensors"), "--data", "digits"]
    args = {
        "evaluate": ["evaluate", *common, "--threat-model", str(path)],
        "attack": ["attack", *common, "--out", str(tmp_path / "a.npz"), "-p", "steps=abc"],
        "show": ["threat-model", "show", str(path)],
    }[command]
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    assert "steps must be an integer, got 'abc'" in res.output
    assert "Traceback" not in res.output


def test_cli_allow_large_lifts_the_limit(tmp_path):
    args = [
        "attack",
        "--model",
        str(tmp_path / "missing.safetensors"),
        "--data",
        "digits",
        "--out",
        str(tmp_path / "a.npz"),
        "-p",
        "steps=200000",
    ]
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and "allow-large" in res.output
    res = runner.invoke(app, [*args, "--allow-large"])
    # past the parameter check: now the (missing) model file is the problem
    assert res.exit_code == 2 and "over the limit" not in res.output


def test_attack_progress_starts_at_zero(digits_model, digits_split, tmp_path):
    """The CLI's progress bar is shown before the first (possibly long) batch finishes."""
    from advguard.attacks.export import attack_dataset
    from advguard.data import Dataset

    _, _, x, y = digits_split
    ticks: list[tuple[int, int]] = []
    ds = Dataset(x=x[:10], y=y[:10], num_classes=10, bounds=(0.0, 1.0))
    attack_dataset(
        digits_model,
        ds,
        tmp_path / "a.npz",
        attack="fgsm",
        epsilon=0.1,
        progress=lambda d, n: ticks.append((d, n)),
    )
    assert ticks[0] == (0, 10) and ticks[-1] == (10, 10)
