"""Model extraction: Knockoff Nets (Orekondy et al. 2019) and Jacobian-based dataset
augmentation (Papernot et al. 2017) against any black-box :class:`~advguard.models.Classifier`
(``HttpClassifier`` included), with an exact query budget."""

from advguard.attacks.extraction.common import (
    BudgetedOracle,
    EvalSet,
    ExtractionResult,
    train_student,
    transfer_rate,
)
from advguard.attacks.extraction.jacobian import jacobian_augmentation
from advguard.attacks.extraction.knockoff import knockoff

__all__ = [
    "BudgetedOracle",
    "EvalSet",
    "ExtractionResult",
    "jacobian_augmentation",
    "knockoff",
    "train_student",
    "transfer_rate",
]
