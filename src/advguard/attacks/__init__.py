"""Attacks: evasion (white- and black-box), and later poisoning, extraction, inference."""

from advguard.attacks.base import Attack, AttackResult
from advguard.attacks.evasion import (
    APGD,
    FGSM,
    PGD,
    SPSA,
    CarliniWagnerL2,
    DeepFool,
    HopSkipJump,
    SquareAttack,
)

__all__ = [
    "APGD",
    "FGSM",
    "PGD",
    "SPSA",
    "Attack",
    "AttackResult",
    "CarliniWagnerL2",
    "DeepFool",
    "HopSkipJump",
    "SquareAttack",
]
