"""How well a backdoor works: clean accuracy and attack success rate (ASR).

ASR (Gu et al. 2017; Chen et al. 2017): the share of test inputs whose true class is not the
target (only the source class for a source-specific trigger) that the model classifies as the
target once the trigger is stamped on. Both come with exact Clopper-Pearson intervals.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from advguard.attacks.poisoning.triggers import TriggerSpec
from advguard.errors import InputError
from advguard.models.base import Classifier
from advguard.stats import proportion


def backdoor_metrics(
    model: Classifier, x_test: np.ndarray, y_test: np.ndarray, trigger_spec: TriggerSpec
) -> dict[str, Any]:
    """Clean accuracy on ``(x_test, y_test)`` and ASR of ``trigger_spec`` (dicts of
    :class:`~advguard.stats.Proportion` fields)."""
    x = np.asarray(x_test, dtype=np.float32)
    y = np.asarray(y_test).astype(np.int64)
    if len(x) == 0 or len(x) != len(y):
        raise InputError(f"need as many test labels as inputs, got {len(x)}/{len(y)}")
    pred = np.asarray(model.predict(x))
    clean = proportion(int((pred == y).sum()), len(y))
    t = trigger_spec.target
    eligible = (y == trigger_spec.source) if trigger_spec.source is not None else (y != t)
    xs = x[eligible]
    hits = int((np.asarray(model.predict(trigger_spec.apply(xs))) == t).sum()) if len(xs) else 0
    asr = proportion(hits, int(eligible.sum()))
    return {
        "clean_accuracy": clean.model_dump(),
        "attack_success_rate": asr.model_dump(),
        "target": t,
        "source": trigger_spec.source,
        "n_test": len(y),
    }
