"""Ownership watermarks: a backdoor trigger set embedded in training (Adi et al. 2018) and a
binomial ownership test on a suspect model's answers."""

from advguard.defenses.watermark.backdoor import (
    TriggerSet,
    Verification,
    embed_watermark,
    make_trigger_set,
    verify_watermark,
)

__all__ = ["TriggerSet", "Verification", "embed_watermark", "make_trigger_set", "verify_watermark"]
