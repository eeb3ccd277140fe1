"""Attacks: evasion (white- and black-box), and later poisoning, extraction, inference."""

from advguard.attacks.base import Attack, AttackResult
from advguard.attacks.evasion import FGSM, PGD

__all__ = ["FGSM", "PGD", "Attack", "AttackResult"]
