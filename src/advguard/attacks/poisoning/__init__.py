"""Training-set poisoning: label flipping, BadNets and blended backdoor triggers, and clean-label
feature collision.

See :mod:`advguard.attacks.poisoning.simulate` and :mod:`advguard.attacks.poisoning.triggers`
(papers cited there). Detection lives in :mod:`advguard.defenses.backdoor`.
"""

from advguard.attacks.poisoning.clean_label import clean_label_poison, feature_collision
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
    "clean_label_poison",
    "feature_collision",
    "label_flip",
    "patch_trigger",
    "poison",
]
