"""Backdoor and poisoning defenses.

- Data scanning: :func:`spectral_signatures` (Tran et al. 2018), :func:`activation_clustering`
  (Chen et al. 2019), :func:`label_noise` (confident learning, Northcutt et al. 2021) and
  :func:`near_duplicates`, on penultimate-layer features (:func:`penultimate_features`).
- Model scanning without the training data: :func:`neural_cleanse` (Wang et al. 2019).
- Run-time input detection: :class:`StripDetector` (Gao et al. 2019).
- Measuring an attack: :func:`backdoor_metrics` (clean accuracy and attack success rate).
"""

from advguard.defenses.backdoor.data_scan import (
    ScanResult,
    activation_clustering,
    label_noise,
    near_duplicates,
    precision_recall,
    spectral_signatures,
)
from advguard.defenses.backdoor.features import last_linear, penultimate_features
from advguard.defenses.backdoor.metrics import backdoor_metrics
from advguard.defenses.backdoor.neural_cleanse import (
    NeuralCleanseResult,
    ReversedTrigger,
    anomaly_index,
    neural_cleanse,
)
from advguard.defenses.backdoor.strip import StripDetector

__all__ = [
    "NeuralCleanseResult",
    "ReversedTrigger",
    "ScanResult",
    "StripDetector",
    "activation_clustering",
    "anomaly_index",
    "backdoor_metrics",
    "label_noise",
    "last_linear",
    "near_duplicates",
    "neural_cleanse",
    "penultimate_features",
    "precision_recall",
    "spectral_signatures",
]
