"""Model adapters: one protocol for white-box and black-box models."""

from advguard.models.base import (
    Classifier,
    ClassifierBase,
    QueryCounter,
    WhiteBoxClassifier,
    is_white_box,
)
from advguard.models.http_model import (
    EndpointError,
    EndpointResponseError,
    HttpClassifier,
    HttpTextClassifier,
    QueryBudgetExceeded,
)
from advguard.models.onnx_model import OnnxClassifier
from advguard.models.sklearn_model import SklearnClassifier
from advguard.models.torch_model import Normalize, TorchClassifier

__all__ = [
    "Classifier",
    "ClassifierBase",
    "EndpointError",
    "EndpointResponseError",
    "HttpClassifier",
    "HttpTextClassifier",
    "Normalize",
    "OnnxClassifier",
    "QueryBudgetExceeded",
    "QueryCounter",
    "SklearnClassifier",
    "TorchClassifier",
    "WhiteBoxClassifier",
    "is_white_box",
]
