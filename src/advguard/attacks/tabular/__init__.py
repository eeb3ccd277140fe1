"""Tabular attacks under feature constraints (immutable, monotone, integer, one-hot,
linear relations): a schema, a white-box and a black-box attack, and metrics."""

from advguard.attacks.tabular.constrained_pgd import ConstrainedPGD
from advguard.attacks.tabular.constrained_search import ConstrainedSearch
from advguard.attacks.tabular.metrics import tabular_metrics
from advguard.attacks.tabular.schema import (
    FeatureSchema,
    FeatureSpec,
    LinearRelation,
    OneHotGroup,
    load_schema,
)

__all__ = [
    "ConstrainedPGD",
    "ConstrainedSearch",
    "FeatureSchema",
    "FeatureSpec",
    "LinearRelation",
    "OneHotGroup",
    "load_schema",
    "tabular_metrics",
]
