"""Evasion attacks. Each takes a model adapter and a batch, returns an AttackResult.

White-box (gradients): FGSM, PGD, APGD, CarliniWagnerL2, DeepFool.
Black-box (queries only): SquareAttack and SPSA (scores), HopSkipJump (labels).
The PGD-style loop they share lives in :func:`gradient_descent` (``_gradient.py``).
"""

from advguard.attacks.evasion._gradient import gradient_descent
from advguard.attacks.evasion.apgd import APGD, apgd_targeted_sweep
from advguard.attacks.evasion.cw import CarliniWagnerL2
from advguard.attacks.evasion.deepfool import DeepFool
from advguard.attacks.evasion.fgsm import FGSM
from advguard.attacks.evasion.hopskipjump import HopSkipJump
from advguard.attacks.evasion.pgd import PGD
from advguard.attacks.evasion.spsa import SPSA
from advguard.attacks.evasion.square import SquareAttack

__all__ = [
    "APGD",
    "FGSM",
    "PGD",
    "SPSA",
    "CarliniWagnerL2",
    "DeepFool",
    "HopSkipJump",
    "SquareAttack",
    "apgd_targeted_sweep",
    "gradient_descent",
]
