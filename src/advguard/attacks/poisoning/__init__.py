"""Training-set poisoning: label flipping, BadNets and blended backdoor triggers.

See :mod:`advguard.attacks.poisoning.simulate` and :mod:`advguard.attacks.poisoning.triggers`
(papers cited there). Detection lives in :mod:`advguard.defenses.backdoor`.
"""

from advguard.attacks.poisoning.simulate import (
    ATTACKS,
    PoisonManifest,
    PoisonResult,
    backdoor,
    label_flip,
    poison,
)
from advguard.attacks.poisoning.triggers import TriggerSpec, blend_trigger, patch_trigger

__all__ = [
    "ATTACKS",
    "PoisonManifest",
    "PoisonResult",
    "TriggerSpec",
    "backdoor",
    "blend_trigger",
    "label_flip",
    "patch_trigger",
    "poison",
]
