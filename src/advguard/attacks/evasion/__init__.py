"""White-box evasion attacks. Each takes a model adapter and a batch, returns an AttackResult."""

from advguard.attacks.evasion.apgd import APGD, apgd_targeted_sweep
from advguard.attacks.evasion.cw import CarliniWagnerL2
from advguard.attacks.evasion.deepfool import DeepFool
from advguard.attacks.evasion.fgsm import FGSM
from advguard.attacks.evasion.pgd import PGD

__all__ = ["APGD", "FGSM", "PGD", "CarliniWagnerL2", "DeepFool", "apgd_targeted_sweep"]
