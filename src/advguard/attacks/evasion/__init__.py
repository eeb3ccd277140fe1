"""White-box evasion attacks. Each takes a model adapter and a batch, returns an AttackResult."""

from advguard.attacks.evasion.apgd import APGD, apgd_targeted_sweep
from advguard.attacks.evasion.fgsm import FGSM
from advguard.attacks.evasion.pgd import PGD

__all__ = ["APGD", "FGSM", "PGD", "apgd_targeted_sweep"]
