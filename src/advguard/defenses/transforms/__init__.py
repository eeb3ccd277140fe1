"""Input transforms applied before a model (e.g. text normalization in ``text``).

Image transforms (``image``) work on torch batches ``(N, C, H, W)`` and plug into any adapter
through :class:`TransformedClassifier`; see docs/transforms-and-detectors.md.
"""

from advguard.defenses.transforms.base import InputTransform, TransformedClassifier, bpda
from advguard.defenses.transforms.image import (
    BitDepthReduction,
    GaussianNoise,
    JpegCompression,
    MedianSmoothing,
)
from advguard.defenses.transforms.text import NormalizedTextClassifier, TextNormalizer

__all__ = [
    "BitDepthReduction",
    "GaussianNoise",
    "InputTransform",
    "JpegCompression",
    "MedianSmoothing",
    "NormalizedTextClassifier",
    "TextNormalizer",
    "TransformedClassifier",
    "bpda",
]
