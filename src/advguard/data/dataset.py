"""The in-memory dataset every loader returns.

A :class:`Dataset` holds inputs ``x`` (float32, ``(N, *input_shape)``) in the
model's raw input space together with their explicit ``bounds``, integer labels
``y`` and enough provenance (``name``, ``source``, :meth:`Dataset.sha256`) to say
in a report exactly what was evaluated.

Loaders always call :meth:`Dataset.validate`; call it yourself when you build a
``Dataset`` by hand. It raises :class:`~advguard.errors.InputError` with a
message that says what is wrong, how much of it, where it first occurs and how
to fix it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np

from advguard.errors import InputError

Modality = Literal["image", "tabular", "text"]
#: Longest text (characters) a text data set may hold per sample.
MAX_TEXT_CHARS = 100_000
FEATURE_TYPES: tuple[str, ...] = ("numeric", "integer", "categorical", "binary")


@dataclass(eq=False, repr=False)
class Dataset:
    """Inputs, labels and their declared value range.

    ``feature_bounds`` (tabular only, optional) is a ``(2, D)`` float32 array:
    row 0 the per-feature low, row 1 the per-feature high. The global
    ``bounds`` pair is what model adapters and attacks use; the per-feature
    pair lets tabular attacks stay within each column's realistic range.
    ``metadata`` records how the data was read and transformed (scaling,
    one-hot ``encoding``, layout changes...).

    Text data (``modality="text"``): ``x`` is a 1-D object array of ``str`` (a list of
    strings is converted), one text per sample; ``bounds`` is not used for text (pass
    e.g. ``(0.0, 1.0)``); :attr:`texts` gives them as a list.
    """

    x: np.ndarray
    y: np.ndarray
    bounds: tuple[float, float]
    num_classes: int
    class_names: list[str] | None = None
    feature_names: list[str] | None = None
    feature_types: list[str] | None = None
    name: str = "dataset"
    source: str = ""
    modality: Modality | None = None
    feature_bounds: np.ndarray | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.modality == "text" or (
            isinstance(self.x, list | tuple) and self.x and isinstance(self.x[0], str)
        ):
            items = list(self.x) if not isinstance(self.x, np.ndarray) else self.x.tolist()
            self.x = np.empty(len(items), dtype=object)
            self.x[:] = items
            self.modality = "text"
        self.x = np.asarray(self.x)
        if self.x.dtype.kind == "f" and self.x.dtype != np.float32:
            self.x = self.x.astype(np.float32)
        self.y = np.asarray(self.y)
        if self.y.dtype.kind in "iub" and self.y.dtype != np.int64:
            self.y = self.y.astype(np.int64)
        if self.modality is None:
            self.modality = "tabular" if self.x.ndim == 2 else "image"
        if self.feature_bounds is not None:
            self.feature_bounds = np.asarray(self.feature_bounds, dtype=np.float32)
        if self.class_names is not None:
            self.class_names = [str(c) for c in self.class_names]
        if self.feature_names is not None:
            self.feature_names = [str(c) for c in self.feature_names]
        if self.feature_types is not None:
            self.feature_types = list(self.feature_types)

    # ------------------------------------------------------------------ basics
    @property
    def texts(self) -> list[str]:
        """The samples of a text data set as a list of strings."""
        if self.modality != "text":
            raise InputError(f"{self._where()}is {self.modality} data, not text")
        return [str(t) for t in self.x.tolist()]

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input, e.g. ``(1, 28, 28)`` or ``(30,)``."""
        return tuple(int(s) for s in self.x.shape[1:])

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, n={len(self)}, input_shape={self.input_shape}, "
            f"num_classes={self.num_classes}, bounds={self.bounds}, "
            f"modality={self.modality!r}, source={self.source!r})"
        )

    def class_counts(self) -> np.ndarray:
        """Number of samples per class id (length ``num_classes``)."""
        return np.bincount(self.y, minlength=self.num_classes)

    # ------------------------------------------------------------ sub-setting
    def subset(self, idx: Any) -> Dataset:
        """A new dataset with the samples ``idx`` (indices, slice or boolean mask).

        Arrays are copied; metadata is copied shallowly; ``num_classes`` and names
        are kept even if a class no longer occurs.
        """
        try:
            x, y = self.x[idx], self.y[idx]
        except IndexError as exc:
            raise InputError(f"{self._where()}invalid subset index: {exc}") from exc
        if x.ndim != self.x.ndim:  # a single integer index
            x, y = x[None], np.atleast_1d(y)
        if len(x) == 0:
            raise InputError(f"{self._where()}subset selects no samples; pass at least one index.")
        return replace(
            self,
            x=np.array(x, dtype=object if self.modality == "text" else np.float32, copy=True),
            y=np.array(y, copy=True),
            metadata=dict(self.metadata),
        )

    def split(
        self, test_size: float | int = 0.2, seed: int = 0, stratify: bool = True
    ) -> tuple[Dataset, Dataset]:
        """Shuffle and split into ``(train, test)``; deterministic for a given seed.

        ``test_size`` is a fraction in (0, 1) or a number of samples. With
        ``stratify`` each class keeps its proportion in both parts.
        """
        from sklearn.model_selection import train_test_split

        n = len(self)
        if isinstance(test_size, bool) or not isinstance(test_size, (int, float, np.number)):
            raise InputError(f"test_size must be a fraction or a count, got {test_size!r}.")
        if isinstance(test_size, (int, np.integer)):
            if not 1 <= test_size < n:
                raise InputError(
                    f"{self._where()}test_size={test_size} samples is out of range; "
                    f"it must be between 1 and {n - 1} for {n} samples."
                )
            test_size = int(test_size)
        elif not 0.0 < float(test_size) < 1.0:
            raise InputError(
                f"test_size={test_size} is out of range; give a fraction strictly "
                "between 0 and 1 (e.g. 0.2) or a number of samples."
            )
        try:
            train_idx, test_idx = train_test_split(
                np.arange(n),
                test_size=test_size,
                random_state=seed,
                shuffle=True,
                stratify=self.y if stratify else None,
            )
        except ValueError as exc:
            raise InputError(
                f"{self._where()}cannot split {n} samples with test_size={test_size}"
                f"{' (stratified)' if stratify else ''}: {exc}. "
                "Use a larger test_size, or stratify=False if some classes are tiny."
            ) from exc
        info = {"test_size": test_size, "seed": seed, "stratify": stratify}
        train, test = self.subset(train_idx), self.subset(test_idx)
        train.metadata["split"] = {"part": "train", **info}
        test.metadata["split"] = {"part": "test", **info}
        return train, test

    # -------------------------------------------------------------- provenance
    def sha256(self) -> str:
        """Hex digest of x and y (values, shapes, dtypes): the same data gives the
        same digest on every platform and run; any changed value changes it."""
        if self.modality == "text":
            h = hashlib.sha256(b"advguard-text-dataset-v1\n")
            for t in self.x.tolist():
                b = str(t).encode("utf-8")
                h.update(len(b).to_bytes(8, "little") + b)
            h.update(np.ascontiguousarray(self.y, dtype="<i8").tobytes())
            return h.hexdigest()
        x = np.ascontiguousarray(self.x, dtype="<f4")
        y = np.ascontiguousarray(self.y, dtype="<i8")
        header = json.dumps(
            {
                "x_shape": list(x.shape),
                "x_dtype": "<f4",
                "y_shape": list(y.shape),
                "y_dtype": "<i8",
            },
            sort_keys=True,
        )
        h = hashlib.sha256(b"advguard-dataset-v1\n")
        h.update(header.encode("utf-8"))
        h.update(x.data.cast("B"))
        h.update(y.data.cast("B"))
        return h.hexdigest()

    # -------------------------------------------------------------- validation
    def _where(self) -> str:
        src = f" ({self.source})" if self.source and self.source != self.name else ""
        return f"Dataset '{self.name}'{src}: "

    def validate(self) -> Dataset:
        """Check everything an attack or evaluation relies on; return ``self``.

        Raises :class:`InputError` for: no samples, x/y length or shape problems,
        non-float x, NaN/Inf in x, values outside ``bounds``, non-integer,
        negative or too large labels, fewer than 2 classes, and names/types/
        per-feature bounds that do not match the data.
        """
        # num_classes and bounds first: later messages refer to them.
        self._validate_header()
        if self.modality == "text":
            self._validate_text()
            return self._validate_labels()
        self._validate_shapes()
        self._validate_values()
        return self._validate_labels()

    def _validate_header(self) -> None:
        """``num_classes``, ``bounds`` (normalised to floats) and ``modality``."""
        w = self._where()
        if isinstance(self.num_classes, bool) or not isinstance(
            self.num_classes, (int, np.integer)
        ):
            raise InputError(f"{w}num_classes must be an integer, got {self.num_classes!r}.")
        if self.num_classes < 2:
            raise InputError(
                f"{w}num_classes is {self.num_classes}, but a classifier needs at least "
                "2 classes. Check the label column / class folders: the data seems to "
                "hold a single class."
            )
        try:
            lo, hi = (float(b) for b in self.bounds)
        except (TypeError, ValueError) as exc:
            raise InputError(
                f"{w}bounds must be a (low, high) pair of numbers, got {self.bounds!r}."
            ) from exc
        if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
            raise InputError(
                f"{w}bounds must be finite with low < high, got ({lo}, {hi}). "
                "Pass e.g. bounds=(0.0, 1.0)."
            )
        self.bounds = (lo, hi)
        if self.modality not in ("image", "tabular", "text"):
            raise InputError(
                f"{w}modality must be 'image', 'tabular' or 'text', got {self.modality!r}."
            )

    def _validate_shapes(self) -> None:
        """Non-empty ``x`` of shape ``(N, *input_shape)`` and one label per sample."""
        w, x, y = self._where(), self.x, self.y
        if x.ndim == 0 or len(x) == 0:
            raise InputError(
                f"{w}the dataset is empty (0 samples). Check the file, the keys/columns "
                "selected, or whether drop_na removed every row."
            )
        if x.ndim < 2:
            raise InputError(
                f"{w}x must have shape (N, *input_shape), got {x.shape}. "
                "For one feature per sample use x.reshape(-1, 1)."
            )
        if y.ndim != 1:
            hint = " One-hot labels: use y.argmax(axis=1)." if y.ndim == 2 else ""
            raise InputError(
                f"{w}y must be a 1-D array of N integer labels, got shape {y.shape}.{hint}"
            )
        if len(x) != len(y):
            raise InputError(
                f"{w}x has {len(x)} samples but y has {len(y)} labels; they must match one "
                f"to one (check that x and y come from the same split)."
            )
        if any(s == 0 for s in x.shape[1:]):
            raise InputError(f"{w}input shape {self.input_shape} has an empty dimension.")

    def _validate_values(self) -> None:
        """Float inputs, all finite and inside ``bounds``."""
        w, x = self._where(), self.x
        lo, hi = self.bounds
        if x.dtype.kind != "f":
            raise InputError(
                f"{w}x must be a float32 array, got dtype {x.dtype}. Convert and scale it "
                "into the bounds first, e.g. x.astype(np.float32) / 255 for uint8 images."
            )
        flat = x.reshape(len(x), -1)
        finite = np.isfinite(flat)
        if not finite.all():
            bad = ~finite
            n_nan = int(np.isnan(flat).sum())
            n_inf = int(bad.sum()) - n_nan
            rows = np.flatnonzero(bad.any(axis=1))
            col = int(np.flatnonzero(bad[rows[0]])[0])
            raise InputError(
                f"{w}x contains {int(bad.sum())} non-finite values ({n_nan} NaN, {n_inf} Inf) "
                f"in {len(rows)} samples; first at sample {int(rows[0])}"
                f"{self._feature_label(col)}. Remove or impute those samples "
                "(for tables: load_tabular(..., drop_na=True) or fill them)."
            )
        outside = (flat < lo) | (flat > hi)
        if outside.any():
            rows = np.flatnonzero(outside.any(axis=1))
            col = int(np.flatnonzero(outside[rows[0]])[0])
            raise InputError(
                f"{w}{int(outside.sum())} values in {len(rows)} samples lie outside the "
                f"declared bounds ({lo:g}, {hi:g}): found min {float(flat.min()):g}, max "
                f"{float(flat.max()):g}; first at sample {int(rows[0])}"
                f"{self._feature_label(col)}. Declare bounds that cover the data "
                f"(bounds=({float(flat.min()):g}, {float(flat.max()):g})) or rescale x "
                "(e.g. uint8 pixels / 255 for bounds (0, 1))."
            )

    def _validate_text(self) -> None:
        w, x, y = self._where(), self.x, self.y
        if x.ndim != 1 or len(x) == 0:
            raise InputError(
                f"{w}text data must be a non-empty 1-D list of strings, got shape {x.shape}."
            )
        if y.ndim != 1 or len(x) != len(y):
            raise InputError(f"{w}{len(x)} texts but labels of shape {y.shape}; give one per text.")
        for i, t in enumerate(x.tolist()):
            if not isinstance(t, str):
                raise InputError(f"{w}text {i} is a {type(t).__name__}, not a string.")
            if len(t) > MAX_TEXT_CHARS:
                raise InputError(f"{w}text {i} has {len(t)} characters (most {MAX_TEXT_CHARS}).")
        if self.feature_names is not None or self.feature_bounds is not None:
            raise InputError(f"{w}text data has no feature_names or feature_bounds.")

    def _validate_labels(self) -> Dataset:
        w, y = self._where(), self.y
        if y.dtype.kind not in "iu":
            if y.dtype.kind == "f":
                frac = np.flatnonzero(~np.isfinite(y) | (np.floor(y) != y))
                if len(frac):
                    raise InputError(
                        f"{w}labels must be integer class ids; {len(frac)} labels are not "
                        f"whole numbers (first at index {int(frac[0])}: {y[frac[0]]!r}). "
                        "Map them to 0..K-1 (for string/float targets use load_tabular)."
                    )
                raise InputError(
                    f"{w}labels must have an integer dtype, got {y.dtype}; "
                    "convert them with y.astype(np.int64)."
                )
            raise InputError(
                f"{w}labels must be integer class ids, got dtype {y.dtype}. Map them to "
                "0..K-1 first (load_tabular does this for a string target column)."
            )
        neg = np.flatnonzero(y < 0)
        if len(neg):
            raise InputError(
                f"{w}{len(neg)} labels are negative (first at index {int(neg[0])}: "
                f"{int(y[neg[0]])}); class ids must be 0..{self.num_classes - 1}."
            )
        big = np.flatnonzero(y >= self.num_classes)
        if len(big):
            raise InputError(
                f"{w}{len(big)} labels are >= num_classes={self.num_classes} (max label "
                f"{int(y.max())}, first at index {int(big[0])}); class ids must be "
                f"0..{self.num_classes - 1}. Pass num_classes={int(y.max()) + 1} or fix "
                "the labels."
            )

        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise InputError(
                f"{w}{len(self.class_names)} class_names given for num_classes="
                f"{self.num_classes}; give one name per class."
            )
        if self.modality != "text":
            self._validate_features()
        return self

    def _validate_features(self) -> None:
        w = self._where()
        n_feat = int(np.prod(self.x.shape[1:]))
        if self.feature_names is not None and len(self.feature_names) != n_feat:
            raise InputError(
                f"{w}{len(self.feature_names)} feature_names for {n_feat} features; "
                "give one name per column of x."
            )
        if self.feature_types is not None:
            if len(self.feature_types) != n_feat:
                raise InputError(
                    f"{w}{len(self.feature_types)} feature_types for {n_feat} features; "
                    "give one type per column of x."
                )
            wrong = [i for i, t in enumerate(self.feature_types) if t not in FEATURE_TYPES]
            if wrong:
                raise InputError(
                    f"{w}feature_types[{wrong[0]}] is {self.feature_types[wrong[0]]!r}; "
                    f"allowed: {', '.join(FEATURE_TYPES)}."
                )
        if self.feature_bounds is not None:
            fb = self.feature_bounds
            if fb.shape != (2, n_feat):
                raise InputError(
                    f"{w}feature_bounds must have shape (2, {n_feat}) (row 0 low, row 1 "
                    f"high), got {fb.shape}."
                )
            inverted = np.flatnonzero(~(fb[0] <= fb[1]))
            if len(inverted):
                raise InputError(
                    f"{w}feature_bounds low > high for {len(inverted)} features (first: "
                    f"{self._feature_label(int(inverted[0]), force=True)[2:]})."
                )

    def _feature_label(self, col: int, force: bool = False) -> str:
        if force or (self.modality == "tabular" and self.x.ndim == 2):
            if self.feature_names is not None and col < len(self.feature_names):
                return f", feature {self.feature_names[col]!r}"
            return f", feature {col}"
        return ""
