"""Attack names usable in threat-model files, and how to build each one.

Each entry states the norms it supports, what the attacker needs (white-box gradients or
only queries) and the MITRE ATLAS technique it exercises.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from advguard._validate import ParameterError
from advguard.attacks.base import Attack, AttackResult
from advguard.attacks.randomness import Key
from advguard.errors import InputError
from advguard.models.base import Classifier

ATLAS_VERSION = "5.0.0"
"""ATLAS data release the technique IDs below were taken from (IDs are stable across 4.x-5.x;
the IDs and names below are also those of release 5.6.0, mitre-atlas/atlas-data
dist/ATLAS.yaml)."""

ATLAS_TECHNIQUES = {
    "AML.T0015": "Evade AI Model",
    "AML.T0043": "Craft Adversarial Data",
    "AML.T0043.000": "Craft Adversarial Data: White-Box Optimization",
    "AML.T0043.001": "Craft Adversarial Data: Black-Box Optimization",
    "AML.T0043.002": "Craft Adversarial Data: Black-Box Transfer",
    "AML.T0043.004": "Craft Adversarial Data: Insert Backdoor Trigger",
    # training-time and privacy goals (advguard.evaluate.goals)
    "AML.T0020": "Poison Training Data",
    "AML.T0018.000": "Manipulate AI Model: Poison AI Model",
    "AML.T0024": "Exfiltration via AI Inference API",
    "AML.T0024.000": "Exfiltration via AI Inference API: Infer Training Data Membership",
    "AML.T0024.002": "Exfiltration via AI Inference API: Extract AI Model",
}


@dataclass(frozen=True)
class RegisteredAttack:
    name: str
    build: Callable[..., Attack]
    norms: tuple[str, ...]
    knowledge: str  # "white-box" | "black-box"
    atlas: tuple[str, ...]
    description: str
    sweep_targets: bool = False  # untargeted goal reached by sweeping targeted runs (APGD-T)


class SuiteAttack:
    """An attack configured for one suite entry: ``run(model, x, y, epsilon, targets)``."""

    def __init__(
        self,
        entry: RegisteredAttack,
        attack: Attack,
        spec_params: dict[str, Any],
        recipe: dict[str, Any] | None = None,
    ):
        self.entry = entry
        self.attack = attack
        self.spec_params = spec_params
        self.recipe = recipe
        """``build_attack``'s arguments (name, norm, seed, params: plain data), from which
        another process rebuilds the same attack; None for an attack built otherwise."""

    @property
    def name(self) -> str:
        return self.entry.name

    def run(
        self,
        model: Classifier,
        x: torch.Tensor,
        y: torch.Tensor,
        epsilon: float,
        targets: torch.Tensor | None = None,
        *,
        sample_ids: torch.Tensor | None = None,
        stream: tuple[Key, ...] = (),
    ) -> AttackResult:
        """Run the attack; ``sample_ids``/``stream`` key its random draws per sample (see
        :meth:`Attack.__call__`)."""
        if self.entry.sweep_targets and targets is None:
            from advguard.attacks.evasion.apgd import APGD

            if not isinstance(self.attack, APGD):  # only APGD entries set sweep_targets
                raise InputError(f"attack {self.name!r} cannot sweep targets")
            return self.attack.targeted_sweep(
                model, x, y, epsilon=epsilon, sample_ids=sample_ids, stream=stream
            )
        return self.attack(
            model, x, y, epsilon=epsilon, targets=targets, sample_ids=sample_ids, stream=stream
        )

    def params(self) -> dict[str, Any]:
        return {"class": type(self.attack).__name__, **self.attack.params()}


def _apgd(loss: str) -> Callable[..., Attack]:
    def build(**kw: Any) -> Attack:
        from advguard.attacks.evasion.apgd import APGD

        return APGD(loss=loss, **kw)

    return build


def _lazy(module: str, cls: str) -> Callable[..., Attack]:
    def build(**kw: Any) -> Attack:
        import importlib

        return getattr(importlib.import_module(module), cls)(**kw)

    return build


_WB = ("AML.T0015", "AML.T0043.000")
_BB = ("AML.T0015", "AML.T0043.001")
ATTACKS: dict[str, RegisteredAttack] = {
    a.name: a
    for a in [
        RegisteredAttack(
            "fgsm",
            _lazy("advguard.attacks.evasion.fgsm", "FGSM"),
            ("linf", "l2"),
            "white-box",
            _WB,
            "Fast Gradient Sign Method (one step)",
        ),
        RegisteredAttack(
            "pgd",
            _lazy("advguard.attacks.evasion.pgd", "PGD"),
            ("linf", "l2", "l1"),
            "white-box",
            _WB,
            "Projected Gradient Descent with random start",
        ),
        RegisteredAttack(
            "apgd-ce",
            _apgd("ce"),
            ("linf", "l2"),
            "white-box",
            _WB,
            "Auto-PGD with cross-entropy loss (Croce & Hein 2020)",
        ),
        RegisteredAttack(
            "apgd-dlr",
            _apgd("dlr"),
            ("linf", "l2"),
            "white-box",
            _WB,
            "Auto-PGD with the DLR loss (Croce & Hein 2020)",
        ),
        RegisteredAttack(
            "apgd-t",
            _apgd("dlr"),
            ("linf", "l2"),
            "white-box",
            _WB,
            "targeted Auto-PGD-DLR against the top runner-up classes",
            sweep_targets=True,
        ),
        RegisteredAttack(
            "cw-l2",
            _lazy("advguard.attacks.evasion.cw", "CarliniWagnerL2"),
            ("l2",),
            "white-box",
            _WB,
            "Carlini-Wagner L2 (minimum norm)",
        ),
        RegisteredAttack(
            "deepfool",
            _lazy("advguard.attacks.evasion.deepfool", "DeepFool"),
            ("l2", "linf"),
            "white-box",
            _WB,
            "DeepFool (minimum norm)",
        ),
        RegisteredAttack(
            "transfer",
            _lazy("advguard.attacks.transfer", "TransferAttack"),
            ("linf", "l2", "l1"),
            "black-box",
            ("AML.T0015", "AML.T0043.002"),
            "Transfer: white-box attack on surrogates trained on the target's answers",
        ),
        RegisteredAttack(
            "constrained-pgd",
            _lazy("advguard.attacks.tabular.constrained_pgd", "ConstrainedPGD"),
            ("linf", "l2"),
            "white-box",
            _WB,
            "PGD under tabular feature constraints (schema)",
        ),
        RegisteredAttack(
            "constrained-search",
            _lazy("advguard.attacks.tabular.constrained_search", "ConstrainedSearch"),
            ("linf", "l2", "l1"),
            "black-box",
            ("AML.T0015", "AML.T0043.001"),
            "Black-box coordinate search under tabular feature constraints",
        ),
        RegisteredAttack(
            "square",
            _lazy("advguard.attacks.evasion.square", "SquareAttack"),
            ("linf", "l2"),
            "black-box",
            _BB,
            "Square Attack: score-based random search (Andriushchenko et al. 2020)",
        ),
        RegisteredAttack(
            "hopskipjump",
            _lazy("advguard.attacks.evasion.hopskipjump", "HopSkipJump"),
            ("l2", "linf"),
            "black-box",
            _BB,
            "HopSkipJump: decision-based (labels only), minimum norm (Chen et al. 2020)",
        ),
        RegisteredAttack(
            "spsa",
            _lazy("advguard.attacks.evasion.spsa", "SPSA"),
            ("linf", "l2"),
            "black-box",
            _BB,
            "SPSA: score-based gradient estimation with Adam (Uesato et al. 2018)",
        ),
    ]
}


# -- text attacks ---------------------------------------------------------------------------
TEXT_NORMS = ("edits",)
"""Norms of text threat models: ``edits`` = character edits (Levenshtein distance) per text."""


def _text(cls: str) -> Callable[..., Any]:
    def build(*, norm: str, seed: int, **kw: Any) -> Any:
        from advguard.attacks import text

        return getattr(text, cls)(seed=seed, **kw)

    return build


ATTACKS.update(
    {
        a.name: a
        for a in [
            RegisteredAttack(
                "char",
                _text("CharAttack"),
                TEXT_NORMS,
                "black-box",
                _BB,
                "Text: score-guided character edits (homoglyphs, invisible characters, typos)",
            ),
            RegisteredAttack(
                "word",
                _text("WordAttack"),
                TEXT_NORMS,
                "black-box",
                _BB,
                "Text: score-guided word substitutions and deletions (synonyms, obfuscations)",
            ),
        ]
    }
)


def is_text_attack(entry: RegisteredAttack) -> bool:
    """True for attacks on text (their norms are edit budgets, see ``TEXT_NORMS``)."""
    return set(entry.norms) <= set(TEXT_NORMS)


def build_attack(name: str, *, norm: str, seed: int, **params: Any) -> SuiteAttack:
    """Build a registered attack with threat-model parameters (bad ones give InputError)."""
    entry = ATTACKS.get(name)
    if entry is None:
        raise InputError(f"unknown attack {name!r}; known: {', '.join(sorted(ATTACKS))}")
    if norm not in entry.norms:
        raise InputError(f"attack {name!r} does not support norm {norm}")
    kw = dict(params)
    if name == "apgd-t":
        kw.setdefault("n_target_classes", 9)
    try:
        attack = entry.build(norm=norm, seed=seed, **kw)
    except TypeError as e:
        bad = re.search(r"unexpected keyword argument '(\w+)'", str(e))
        msg = f"bad parameters for attack {name!r}: {e}"
        raise (ParameterError(bad[1], msg) if bad else InputError(msg)) from None
    recipe = {"name": name, "norm": norm, "seed": seed, "params": dict(params)}
    return SuiteAttack(entry, attack, params, recipe)
