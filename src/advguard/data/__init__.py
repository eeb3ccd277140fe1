"""Datasets: one validated in-memory :class:`Dataset` from builtins, ``.npz``
archives, image folders or CSV/Parquet tables.

>>> ds = load_dataset("digits")                      # builtin (scikit-learn, no download)
>>> ds = load_dataset("mnist.npz?x_key=x_test&y_key=y_test")
>>> ds = load_dataset("adult.csv", target="income")
>>> train, test = ds.split(0.2, seed=0)
"""

from advguard.data.builtin import BUILTIN_DATASETS, load_builtin
from advguard.data.dataset import FEATURE_TYPES, Dataset
from advguard.data.loaders import (
    IMAGE_EXTENSIONS,
    load_dataset,
    load_image_folder,
    load_npz,
    load_tabular,
)

__all__ = [
    "BUILTIN_DATASETS",
    "FEATURE_TYPES",
    "IMAGE_EXTENSIONS",
    "Dataset",
    "load_builtin",
    "load_dataset",
    "load_image_folder",
    "load_npz",
    "load_tabular",
]
