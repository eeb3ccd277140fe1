"""Read datasets from files: NumPy ``.npz``, image folders, CSV/Parquet tables.

Every loader returns a validated :class:`~advguard.data.dataset.Dataset` and
raises :class:`~advguard.errors.InputError` (or
:class:`~advguard.errors.UnsafeFileError` for pickled content) naming the file.
:func:`load_dataset` is the single entry point used by the CLI.
"""

from __future__ import annotations

import difflib
import inspect
import os
import tokenize
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl

import numpy as np

from advguard.data.builtin import BUILTIN_DATASETS, load_builtin
from advguard.data.dataset import FEATURE_TYPES, Dataset
from advguard.errors import InputError, MissingDependencyError, UnsafeFileError

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
TABULAR_SUFFIXES: tuple[str, ...] = (".csv", ".parquet", ".pq")
_CHANNELS = (1, 3, 4)

PathLike = str | os.PathLike


def _existing_file(path: PathLike, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise InputError(f"{what} file not found: '{p}'. Check the path.")
    if not p.is_file():
        raise InputError(f"{what} path '{p}' is not a file.")
    return p


def _infer_bounds(x: np.ndarray) -> tuple[float, float]:
    """(0, 1) when the data lies within it, else the data's (min, max)."""
    finite = x[np.isfinite(x)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = float(finite.min()), float(finite.max())
    if lo >= 0.0 and hi <= 1.0:
        return 0.0, 1.0
    if lo == hi:
        hi = lo + 1.0
    return lo, hi


# --------------------------------------------------------------------------- npz
def _labels_1d(y: np.ndarray, where: str) -> tuple[np.ndarray, str | None]:
    """Squeeze (N, 1) labels and decode one-hot (N, K) labels; cast whole floats."""
    note = None
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    elif y.ndim == 2 and y.shape[1] > 1:
        onehot = y.dtype.kind in "biuf" and np.isin(y, (0, 1)).all() and (y.sum(axis=1) == 1).all()
        if not onehot:
            raise InputError(
                f"{where}labels have shape {y.shape} but are not one-hot rows; give one "
                "integer class id per sample."
            )
        y, note = y.argmax(axis=1), "one-hot labels decoded with argmax"
    whole_floats = y.dtype.kind == "f" and np.isfinite(y).all() and (np.floor(y) == y).all()
    if y.dtype.kind == "b" or whole_floats:
        y = y.astype(np.int64)
    elif y.dtype.kind not in "iuf":
        raise InputError(
            f"{where}labels have dtype {y.dtype}; they must be integer class ids 0..K-1. "
            "Map string labels to integers first (or use load_tabular for tables)."
        )
    return y, note


#: Largest array (bytes, decompressed) an .npz may hold; more is refused before reading.
MAX_NPZ_ARRAY_BYTES = 16 * 1024**3
_MAX_NPY_HEADER = 10_000


def _check_npz_headers(p: Path, keys: Sequence[str], where: str) -> None:
    """Read only the ``.npy`` headers of ``keys`` in the zip and refuse, before allocating
    anything, an array whose header claims more bytes than its member holds or than
    :data:`MAX_NPZ_ARRAY_BYTES` (a small file must not make us allocate gigabytes)."""
    from numpy.lib import format as npy_format

    try:
        with zipfile.ZipFile(p) as zf:
            members = {i.filename: i for i in zf.infolist()}
            for key in keys:
                info = members.get(f"{key}.npy")
                if info is None:
                    continue  # a missing key is reported later with the available keys
                with zf.open(info) as fh:
                    version = npy_format.read_magic(fh)
                    if version == (1, 0):
                        shape, _, dtype = npy_format.read_array_header_1_0(
                            fh, max_header_size=_MAX_NPY_HEADER
                        )
                    elif version in ((2, 0), (3, 0)):
                        shape, _, dtype = npy_format.read_array_header_2_0(
                            fh, max_header_size=_MAX_NPY_HEADER
                        )
                    else:
                        raise ValueError(f"unsupported .npy format version {version}")
                    header_len = fh.tell()
                if dtype.hasobject:
                    raise UnsafeFileError(
                        f"{where}array {key!r} is a pickled object array; pickled arrays "
                        "are refused because loading them can run code. Store plain "
                        "numeric arrays (e.g. np.savez with x.astype(np.float32))."
                    )
                if any(int(d) < 0 for d in shape):
                    raise ValueError(f"negative dimension in shape {shape}")
                nbytes = int(np.prod([int(d) for d in shape], dtype=object)) * dtype.itemsize
                held = info.file_size - header_len
                if nbytes > held or nbytes > MAX_NPZ_ARRAY_BYTES:
                    limit = (
                        f"its member holds only {held} bytes"
                        if nbytes > held
                        else f"the limit is {MAX_NPZ_ARRAY_BYTES} bytes"
                    )
                    raise InputError(
                        f"{where}array {key!r} claims shape {tuple(shape)} of {dtype} "
                        f"({nbytes} bytes) but {limit}; refused before reading"
                    )
    except (InputError, UnsafeFileError):
        raise
    except (
        ValueError,
        OSError,
        EOFError,
        zipfile.BadZipFile,
        RuntimeError,
        TypeError,
        OverflowError,
        KeyError,
        SyntaxError,
        tokenize.TokenError,
    ) as exc:  # fmt: skip  (numpy parses old headers with tokenize)
        raise InputError(
            f"{where}cannot read as a NumPy .npz archive: {str(exc).splitlines()[0][:200]}"
        ) from None


def load_npz(
    path: PathLike,
    x_key: str = "x",
    y_key: str = "y",
    bounds: tuple[float, float] | None = None,
    scale: Literal["auto"] | float | None = "auto",
    channels_first: bool | Literal["auto"] = "auto",
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
) -> Dataset:
    """Load inputs and labels from a NumPy ``.npz`` archive (never unpickles).

    - ``x_key``/``y_key`` name the arrays (Keras MNIST: ``x_test``/``y_test``).
    - ``scale="auto"`` divides ``uint8`` inputs by 255 unless ``bounds`` other
      than ``(0, 1)`` are given (raw pixel space); a number divides by it;
      ``None`` leaves values as they are.
    - ``bounds=None``: ``(0, 1)`` for scaled uint8 data or data already inside
      ``[0, 1]``, otherwise the data's ``(min, max)``.
    - Output layout is channels-first: ``(N, H, W)`` becomes ``(N, 1, H, W)``.
      For 4-D inputs ``channels_first`` says how the *file* is laid out:
      ``True`` ``(N, C, H, W)`` (kept), ``False`` ``(N, H, W, C)`` (transposed),
      ``"auto"`` guesses from which axis has 1, 3 or 4 entries.
      ``(N, D)`` vectors are kept and treated as tabular.
    - ``num_classes`` defaults to ``max(y) + 1``.
    """
    p = _existing_file(path, "NPZ")
    where = f"{p}: "
    x, y = _read_npz_arrays(p, x_key, y_key, where)
    meta: dict[str, Any] = {"x_key": x_key, "y_key": y_key, "x_dtype_in_file": str(x.dtype)}
    if x.dtype.kind not in "biuf":
        raise InputError(
            f"{where}inputs {x_key!r} have dtype {x.dtype}; a numeric array is needed."
        )
    xf, factor = _scaled_inputs(x, scale, bounds, meta)
    if bounds is None:
        bounds = (0.0, 1.0) if factor == 255.0 else _infer_bounds(xf)
        meta["bounds_inferred"] = True
    xf = _channels_first_layout(xf, channels_first, meta, f"{where}inputs {x_key!r}")

    y, note = _labels_1d(np.asarray(y), where)
    if note:
        meta["labels"] = note
    if num_classes is None:
        num_classes = int(y.max()) + 1 if y.size and y.dtype.kind in "iu" else 2
        if class_names is not None:
            num_classes = max(num_classes, len(class_names))
    ds = Dataset(
        x=xf,
        y=y,
        bounds=(float(bounds[0]), float(bounds[1])),
        num_classes=num_classes,
        class_names=list(class_names) if class_names is not None else None,
        name=p.stem,
        source=str(p),
        modality="tabular" if xf.ndim == 2 else "image",
        metadata=meta,
    )
    return ds.validate()


def _check_npz_signature(p: Path, x_key: str, y_key: str, where: str) -> None:
    """Refuse pickles, bare ``.npy`` files and anything that is not a zip archive."""
    with open(p, "rb") as fh:
        head = fh.read(6)
    if head[:1] == b"\x80":  # pickle protocol >= 2 opcode
        raise UnsafeFileError(
            f"{where}the file is a pickle, which could run code when loaded; advguard "
            "refuses pickled data. Save plain numeric arrays with np.savez(path, x=x, y=y)."
        )
    if head.startswith(b"\x93NUMPY"):
        raise InputError(
            f"{where}this is a single .npy array, not an .npz archive with inputs and "
            f"labels. Save both with np.savez(path, {x_key}=x, {y_key}=y)."
        )
    if not head.startswith(b"PK"):
        raise InputError(
            f"{where}cannot read as a NumPy .npz archive (no zip signature). Save the "
            "arrays with np.savez(path, x=x, y=y)."
        )


def _read_npz_arrays(p: Path, x_key: str, y_key: str, where: str) -> tuple[np.ndarray, np.ndarray]:
    """The inputs and labels arrays of an ``.npz`` archive, read without unpickling."""
    _check_npz_signature(p, x_key, y_key, where)
    _check_npz_headers(p, (x_key, y_key), where)
    try:
        archive = np.load(p, allow_pickle=False)
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise UnsafeFileError(
                f"{where}the file holds pickled data, which could run code when loaded; "
                "advguard refuses pickles. Save plain numeric arrays with np.savez."
            ) from exc
        raise InputError(f"{where}cannot read as a NumPy .npz archive: {exc}") from exc
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise InputError(f"{where}cannot read as a NumPy .npz archive: {exc}") from exc
    if isinstance(archive, np.ndarray):
        raise InputError(
            f"{where}this is a single .npy array, not an .npz archive with inputs and "
            f"labels. Save both with np.savez(path, {x_key}=x, {y_key}=y)."
        )
    with archive:
        keys = list(archive.files)
        arrays = {}
        for role, key in (("inputs", x_key), ("labels", y_key)):
            if key not in keys:
                raise InputError(
                    f"{where}no array named {key!r} for the {role}; available keys: "
                    f"{', '.join(keys) or '(none)'}. Pass x_key=... and y_key=..."
                )
            arrays[key] = _npz_member(archive, key, where)
    return arrays[x_key], arrays[y_key]


def _npz_member(archive: Any, key: str, where: str) -> np.ndarray:
    """One array of an open archive; pickled object arrays are refused."""
    try:
        return np.asarray(archive[key])
    except ValueError as exc:
        if "pickle" in str(exc).lower() or "object" in str(exc).lower():
            raise UnsafeFileError(
                f"{where}array {key!r} is a pickled object array; pickled arrays "
                "are refused because loading them can run code. Store plain "
                "numeric arrays (e.g. np.savez with x.astype(np.float32))."
            ) from exc
        raise InputError(f"{where}cannot read array {key!r}: {exc}") from exc
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise InputError(f"{where}cannot read array {key!r}: {exc}") from exc


def _scaled_inputs(
    x: np.ndarray,
    scale: Literal["auto"] | float | None,
    bounds: tuple[float, float] | None,
    meta: dict[str, Any],
) -> tuple[np.ndarray, float | None]:
    """``x`` as float32 divided by the scale factor (``"auto"``: 255 for uint8 in [0, 1])."""
    factor: float | None = None
    if scale == "auto":
        if x.dtype == np.uint8 and (bounds is None or tuple(map(float, bounds)) == (0.0, 1.0)):
            factor = 255.0
    elif scale is not None:
        try:
            factor = float(scale)
        except (TypeError, ValueError) as exc:
            raise InputError(f"scale must be 'auto', a number or None, got {scale!r}.") from exc
        if not np.isfinite(factor) or factor <= 0:
            raise InputError(f"scale must be a positive number, got {scale!r}.")
    xf = x.astype(np.float32)
    if factor is not None and factor != 1.0:
        xf = (x.astype(np.float64) / factor).astype(np.float32)
        meta["scaled_by"] = factor
    return xf, factor


def _channels_first_layout(
    xf: np.ndarray, channels_first: bool | Literal["auto"], meta: dict[str, Any], what: str
) -> np.ndarray:
    """Inputs in ``(N, D)`` or ``(N, C, H, W)`` layout; ``meta["layout"]`` notes a change."""
    if channels_first not in (True, False, "auto"):
        raise InputError(f"channels_first must be True, False or 'auto', got {channels_first!r}.")
    if xf.ndim == 3:
        meta["layout"] = "NHW -> NCHW"
        return xf[:, None]
    if xf.ndim == 4:
        if channels_first == "auto":
            c_first, c_last = xf.shape[1] in _CHANNELS, xf.shape[3] in _CHANNELS
            square_last = xf.shape[1] == xf.shape[2]
            transpose = c_last and (not c_first or square_last)
        else:
            transpose = not channels_first
        if transpose:
            meta["layout"] = "NHWC -> NCHW"
            return np.ascontiguousarray(xf.transpose(0, 3, 1, 2))
        return xf
    if xf.ndim != 2:
        raise InputError(
            f"{what} have shape {xf.shape}; expected (N, D), (N, H, W), "
            "(N, H, W, C) or (N, C, H, W)."
        )
    return xf


# ------------------------------------------------------------------ image folder
def _size_hw(image_size: int | Sequence[int] | None) -> tuple[int, int] | None:
    if image_size is None:
        return None
    if isinstance(image_size, bool):
        raise InputError(f"image_size must be an int or (height, width), got {image_size!r}.")
    if isinstance(image_size, (int, np.integer)):
        hw = (int(image_size), int(image_size))
    else:
        try:
            values = tuple(int(v) for v in image_size)
        except (TypeError, ValueError) as exc:
            raise InputError(
                f"image_size must be an int or (height, width), got {image_size!r}."
            ) from exc
        if len(values) != 2:
            raise InputError(f"image_size must be (height, width), got {image_size!r}.")
        hw = (values[0], values[1])
    if min(hw) < 1:
        raise InputError(f"image_size must be positive, got {image_size!r}.")
    return hw


def _read_image(path: Path, size: tuple[int, int] | None, grayscale: bool) -> np.ndarray:
    """One image as float32 (C, H, W) in [0, 1]."""
    from PIL import Image

    with Image.open(path) as im:
        im.seek(0)  # first frame of animated GIF/WebP
        if im.mode.startswith("I;16") or im.mode in ("I", "F"):
            # 16-bit / 32-bit grayscale: keep the precision, scale to [0, 1].
            top = 65535.0 if im.mode.startswith("I;16") else None
            f = im.convert("I").convert("F") if im.mode != "F" else im.copy()
            if size is not None:
                f = f.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            arr = np.asarray(f, dtype=np.float32)
            if top is None:
                top = max(float(arr.max()), 1.0)
            arr = np.clip(arr / top, 0.0, 1.0)[None]
            return arr if grayscale else np.repeat(arr, 3, axis=0)
        img = im.convert("L" if grayscale else "RGB")
        if size is not None:
            img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
        arr = np.asarray(img, dtype=np.float32) / 255.0
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def load_image_folder(
    root: PathLike,
    image_size: int | tuple[int, int] | None = None,
    grayscale: bool = False,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
) -> Dataset:
    """Load ``root/<class>/<image>`` files: one subfolder per class.

    Class ids follow the sorted subfolder names (kept as ``class_names``);
    hidden entries and files with other extensions are skipped. Images are
    converted to RGB (3 channels) or, with ``grayscale``, to 1 channel, resized
    to ``image_size`` = ``(height, width)`` if given (otherwise all images must
    share one size) and returned as float32 ``(N, C, H, W)`` in ``[0, 1]``.
    ``metadata["files"]`` lists each sample's path relative to ``root``.
    """
    rootp = Path(root).expanduser()
    if not rootp.exists():
        raise InputError(f"Image folder not found: '{rootp}'. Check the path.")
    if not rootp.is_dir():
        raise InputError(f"'{rootp}' is not a directory; expected root/<class>/<image> files.")
    exts = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)
    size = _size_hw(image_size)
    class_dirs, files, labels, skipped = _image_files(rootp, exts)
    x = _read_images(files, size, grayscale)
    ds = Dataset(
        x=x,
        y=np.asarray(labels, dtype=np.int64),
        bounds=(0.0, 1.0),
        num_classes=len(class_dirs),
        class_names=[d.name for d in class_dirs],
        name=rootp.name or str(rootp),
        source=str(rootp),
        modality="image",
        metadata={
            "files": [str(f.relative_to(rootp)) for f in files],
            "skipped_files": skipped,
            "image_size": size,
            "grayscale": grayscale,
        },
    )
    return ds.validate()


def _image_files(
    rootp: Path, exts: tuple[str, ...]
) -> tuple[list[Path], list[Path], list[int], int]:
    """Class folders, image files, their labels and the number of skipped files."""

    def is_image(p: Path) -> bool:
        return p.is_file() and not p.name.startswith(".") and p.suffix.lower() in exts

    class_dirs = sorted(
        (d for d in rootp.iterdir() if d.is_dir() and not d.name.startswith(".")),
        key=lambda d: d.name,
    )
    if not class_dirs:
        loose = sum(1 for p in rootp.iterdir() if is_image(p))
        hint = (
            f" It holds {loose} images directly; move each class's images into its own subfolder."
            if loose
            else ""
        )
        raise InputError(
            f"{rootp}: no class subfolders found; expected root/<class_name>/<image> files.{hint}"
        )
    files: list[Path] = []
    labels: list[int] = []
    skipped = 0
    for cid, d in enumerate(class_dirs):
        entries = sorted(d.iterdir(), key=lambda p: p.name)
        imgs = [p for p in entries if is_image(p)]
        skipped += sum(1 for p in entries if p.is_file()) - len(imgs)
        if not imgs:
            raise InputError(
                f"{d}: class folder '{d.name}' has no images with extensions "
                f"{', '.join(exts)}. Add images or remove the folder."
            )
        files.extend(imgs)
        labels.extend([cid] * len(imgs))
    return class_dirs, files, labels, skipped


def _read_images(files: list[Path], size: tuple[int, int] | None, grayscale: bool) -> np.ndarray:
    """The images stacked as float32 ``(N, C, H, W)``; all must share one size."""
    arrays: list[np.ndarray] = []
    for f in files:
        try:
            arr = _read_image(f, size, grayscale)
        except Exception as exc:  # Pillow raises many types for bad files
            raise InputError(f"{f}: cannot read image ({type(exc).__name__}: {exc}).") from exc
        if arrays and arr.shape != arrays[0].shape:
            raise InputError(
                f"{f}: image is {arr.shape[1]}x{arr.shape[2]} (HxW) but '{files[0]}' is "
                f"{arrays[0].shape[1]}x{arrays[0].shape[2]}; all images must share one "
                "size. Pass image_size=(height, width) to resize them."
            )
        arrays.append(arr)
    return np.stack(arrays).astype(np.float32, copy=False)


# ---------------------------------------------------------------------- tabular
def _read_table(p: Path) -> Any:
    try:
        import pandas as pd
    except ImportError as exc:
        raise MissingDependencyError("pandas", "tabular", "Loading CSV/Parquet tables") from exc
    suffix = p.suffix.lower()
    try:
        if suffix == ".csv":
            return pd.read_csv(p)
        if suffix in (".parquet", ".pq"):
            try:
                import pyarrow  # noqa: F401
            except ImportError as exc:
                raise MissingDependencyError(
                    "pyarrow", "tabular", "Loading Parquet tables"
                ) from exc
            return pd.read_parquet(p)
    except MissingDependencyError:
        raise
    except pd.errors.EmptyDataError as exc:
        raise InputError(f"{p}: the file is empty (no header, no rows).") from exc
    except Exception as exc:  # parser, encoding and Arrow errors
        raise InputError(f"{p}: cannot parse as {suffix[1:]}: {type(exc).__name__}: {exc}") from exc
    raise InputError(
        f"{p}: unsupported table format '{suffix}'; use {', '.join(TABULAR_SUFFIXES)}."
    )


def _type_of(col: Any) -> str:
    from pandas.api import types as pt

    if pt.is_bool_dtype(col):
        return "binary"
    if pt.is_numeric_dtype(col):
        uniq = col.unique()
        if len(uniq) <= 2 and set(np.asarray(uniq, dtype=float).tolist()) <= {0.0, 1.0}:
            return "binary"
        return "integer" if pt.is_integer_dtype(col) else "numeric"
    return "categorical"


def load_tabular(
    path: PathLike,
    target: str,
    features: Sequence[str] | None = None,
    feature_types: Mapping[str, str] | None = None,
    bounds: tuple[float, float] | None = None,
    drop_na: bool = False,
    max_categories: int = 100,
) -> Dataset:
    """Load a CSV or Parquet table (format by suffix) for classification.

    - ``target``: the label column. Its sorted unique values (numeric order for
      numbers) become ``class_names`` (as strings) and class ids 0..K-1.
    - ``features``: columns to use (default: all but the target), in order.
    - ``feature_types``: ``{column: "numeric"|"integer"|"categorical"|"binary"}``
      overrides; otherwise inferred: text -> categorical, bool / 0-1 -> binary,
      integers -> integer, other numbers -> numeric.
    - Categorical columns are one-hot encoded as ``"column=value"`` features
      (type ``"categorical"``); ``metadata["encoding"][column]`` lists the
      categories and the encoded columns so values can be mapped back.
    - ``bounds``: default is the ``(min, max)`` over all features after encoding
      (one global pair, as the model protocol needs); ``feature_bounds`` always
      holds each feature's observed ``(min, max)``.
    - Missing values raise unless ``drop_na=True`` drops those rows (count in
      ``metadata["dropped_rows"]``). Text columns with more than
      ``max_categories`` distinct values are refused (likely ids or free text).
    """
    p = _existing_file(path, "Table")
    where = f"{p}: "
    df = _read_table(p)
    columns = [str(c) for c in df.columns]
    df.columns = columns
    features = _table_features(columns, target, features, where)
    types_in = _declared_types(feature_types, features, where)
    df, dropped = _complete_rows(df[[*features, target]], drop_na, where)
    y, order, class_names = _class_ids(df[target])
    x, names, types, encoding = _encode_features(df, features, types_in, max_categories, where)
    finite_x = np.where(np.isfinite(x), x, np.nan)
    with np.errstate(all="ignore"):
        f_lo = np.nan_to_num(np.nanmin(finite_x, axis=0), nan=0.0)
        f_hi = np.nan_to_num(np.nanmax(finite_x, axis=0), nan=0.0)
    if bounds is None:
        lo, hi = float(f_lo.min()), float(f_hi.max())
        bounds = (lo, hi if hi > lo else lo + 1.0)
    ds = Dataset(
        x=x,
        y=y,
        bounds=(float(bounds[0]), float(bounds[1])),
        num_classes=len(order),
        class_names=class_names,
        feature_names=names,
        feature_types=types,
        name=p.stem,
        source=str(p),
        modality="tabular",
        feature_bounds=np.stack([f_lo, f_hi]).astype(np.float32),
        metadata={
            "target": target,
            "columns": list(features),
            "encoding": encoding,
            "dropped_rows": dropped,
        },
    )
    return ds.validate()


def _table_features(
    columns: list[str], target: str, features: Sequence[str] | None, where: str
) -> list[str]:
    """The feature columns (default: all but the target), checked against the table."""
    if target not in columns:
        raise InputError(
            f"{where}target column {target!r} not found; columns are: {', '.join(columns)}."
        )
    if features is None:
        features = [c for c in columns if c != target]
    else:
        features = [str(f) for f in features]
        missing = [f for f in features if f not in columns]
        if missing:
            raise InputError(
                f"{where}feature columns not found: {', '.join(missing)}; columns are: "
                f"{', '.join(columns)}."
            )
        if target in features:
            raise InputError(f"{where}the target column {target!r} is also listed as a feature.")
        dupes = sorted({f for f in features if features.count(f) > 1})
        if dupes:
            raise InputError(f"{where}features listed twice: {', '.join(dupes)}.")
    if not features:
        raise InputError(f"{where}no feature columns besides the target {target!r}.")
    return features


def _declared_types(
    feature_types: Mapping[str, str] | None, features: list[str], where: str
) -> dict[str, str]:
    """The ``feature_types`` overrides, each naming a feature and an allowed type."""
    types_in = dict(feature_types or {})
    unknown = [c for c in types_in if c not in features]
    if unknown:
        raise InputError(
            f"{where}feature_types names columns that are not features: {', '.join(unknown)}."
        )
    bad_types = {c: t for c, t in types_in.items() if t not in FEATURE_TYPES}
    if bad_types:
        c, t = next(iter(bad_types.items()))
        raise InputError(
            f"{where}feature_types[{c!r}] is {t!r}; allowed: {', '.join(FEATURE_TYPES)}."
        )
    return types_in


def _complete_rows(df: Any, drop_na: bool, where: str) -> tuple[Any, int]:
    """The table without missing values (refused unless ``drop_na``) and the rows dropped."""
    n_rows = len(df)
    if n_rows == 0:
        raise InputError(f"{where}the table has a header but no data rows.")
    na = df.isna()
    dropped = 0
    if na.to_numpy().any():
        if not drop_na:
            counts = na.sum()
            missing_cols = ", ".join(f"{c} ({int(n)})" for c, n in counts.items() if n)
            first = int(np.flatnonzero(na.any(axis=1).to_numpy())[0])
            raise InputError(
                f"{where}{int(counts.sum())} missing values in columns {missing_cols}; "
                f"first at data row {first} (0-based, header excluded). Pass drop_na=True to "
                "drop those rows, or fill them in first."
            )
        df = df.dropna()
        dropped = n_rows - len(df)
        if len(df) == 0:
            raise InputError(f"{where}every row has a missing value; drop_na=True left no data.")
    return df.reset_index(drop=True), dropped


def _class_ids(t: Any) -> tuple[np.ndarray, list[Any], list[str]]:
    """Class ids of the target column, its sorted values and their names."""
    from pandas.api import types as pt

    uniq = t.unique()
    if pt.is_numeric_dtype(t) or pt.is_bool_dtype(t):
        order = sorted(uniq.tolist())
    else:
        order = sorted(uniq.tolist(), key=str)
    class_ids = {v: i for i, v in enumerate(order)}
    y = t.map(class_ids).to_numpy(dtype=np.int64)
    class_names = []
    for v in order:
        s = str(v)
        if isinstance(v, float) and v.is_integer():
            s = str(int(v))
        class_names.append(s)
    return y, order, class_names


def _encode_features(
    df: Any, features: list[str], types_in: dict[str, str], max_categories: int, where: str
) -> tuple[np.ndarray, list[str], list[str], dict[str, dict[str, Any]]]:
    """Features as float32 columns: categorical ones one-hot encoded, others checked."""
    cols: list[np.ndarray] = []
    names: list[str] = []
    types: list[str] = []
    encoding: dict[str, dict[str, Any]] = {}
    for c in features:
        col = df[c]
        kind = types_in.get(c) or _type_of(col)
        if kind == "categorical":
            block, cats, onehot_names = _one_hot(col, c, max_categories, where)
            cols.extend(block.T)
            names.extend(onehot_names)
            types.extend(["categorical"] * len(cats))
            encoding[c] = {"categories": cats, "columns": onehot_names}
            continue
        cols.append(_numeric_column(col, c, kind, where))
        names.append(c)
        types.append(kind)
    return np.stack(cols, axis=1).astype(np.float32, copy=False), names, types, encoding


def _one_hot(
    col: Any, c: str, max_categories: int, where: str
) -> tuple[np.ndarray, list[str], list[str]]:
    """One-hot block of a text column, its sorted categories and the encoded column names."""
    import pandas as pd

    values = col.astype(str)
    cats = sorted(values.unique().tolist())
    if len(cats) > max_categories:
        raise InputError(
            f"{where}column {c!r} has {len(cats)} distinct text values (more than "
            f"max_categories={max_categories}); it looks like an id or free text. "
            "Leave it out with features=[...] or raise max_categories."
        )
    onehot_names = [f"{c}={v}" for v in cats]
    codes = pd.Categorical(values, categories=cats).codes
    block = np.zeros((len(values), len(cats)), dtype=np.float32)
    block[np.arange(len(values)), codes] = 1.0
    return block, cats, onehot_names


def _numeric_column(col: Any, c: str, kind: str, where: str) -> np.ndarray:
    """A numeric, integer or binary column as float32, checked against its declared type."""
    import pandas as pd
    from pandas.api import types as pt

    if pt.is_bool_dtype(col):
        num = col.astype(np.float64)
    else:
        num = pd.to_numeric(col, errors="coerce")
        bad = np.flatnonzero(num.isna().to_numpy())
        if len(bad):
            raise InputError(
                f"{where}column {c!r} is declared {kind} but {len(bad)} values are not "
                f"numbers (first at data row {int(bad[0])}: {col.iloc[bad[0]]!r}). "
                "Declare it 'categorical' or clean the column."
            )
    arr = num.to_numpy(dtype=np.float64)
    if kind == "binary" and not np.isin(arr, (0.0, 1.0)).all():
        raise InputError(
            f"{where}column {c!r} is declared binary but holds values other than 0/1; "
            "declare it 'categorical' or 'numeric'."
        )
    if kind == "integer":
        finite = arr[np.isfinite(arr)]
        if not (np.floor(finite) == finite).all():
            raise InputError(
                f"{where}column {c!r} is declared integer but holds fractional values; "
                "declare it 'numeric'."
            )
    return arr.astype(np.float32)


# ------------------------------------------------------------------ entry point
_BOOL = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}


def _pair(text: str, key: str, cast: type) -> tuple:
    parts = [s for s in text.lower().replace("x", ",").split(",") if s.strip()]
    try:
        vals = tuple(cast(s.strip()) for s in parts)
    except ValueError as exc:
        raise InputError(f"query option {key}={text!r}: expected numbers like 0,1.") from exc
    return vals


def _query_value(key: str, text: str) -> Any:
    if key in ("drop_na", "grayscale"):
        if text.lower() not in _BOOL:
            raise InputError(f"query option {key}={text!r}: expected true or false.")
        return _BOOL[text.lower()]
    if key == "channels_first":
        if text.lower() == "auto":
            return "auto"
        if text.lower() not in _BOOL:
            raise InputError(f"query option channels_first={text!r}: expected auto, true or false.")
        return _BOOL[text.lower()]
    if key == "features":
        return [s for s in text.split(",") if s]
    if key == "bounds":
        vals = _pair(text, key, float)
        if len(vals) != 2:
            raise InputError(f"query option bounds={text!r}: expected low,high.")
        return vals
    if key == "image_size":
        vals = _pair(text, key, int)
        if len(vals) not in (1, 2):
            raise InputError(f"query option image_size={text!r}: expected H,W or HxW.")
        return vals[0] if len(vals) == 1 else vals
    if key in ("num_classes", "max_categories"):
        try:
            return int(text)
        except ValueError as exc:
            raise InputError(f"query option {key}={text!r}: expected an integer.") from exc
    if key == "scale":
        if text.lower() in ("auto", "none"):
            return None if text.lower() == "none" else "auto"
        try:
            return float(text)
        except ValueError as exc:
            raise InputError(
                f"query option scale={text!r}: expected auto, none or a number."
            ) from exc
    return text


def _call(loader: Any, args: tuple, options: dict[str, Any], spec: str) -> Dataset:
    params = inspect.signature(loader).parameters
    accepted = [n for n in params if n not in ("path", "root")]
    unknown = [k for k in options if k not in accepted]
    if unknown:
        raise InputError(
            f"{spec}: option(s) {', '.join(unknown)} not understood by {loader.__name__}; "
            f"it accepts: {', '.join(accepted)}."
        )
    return loader(*args, **options)


def load_dataset(spec: str | os.PathLike, **kwargs: Any) -> Dataset:
    """Load a dataset from one string, as given on the command line.

    - ``"digits"``, ``"breast_cancer"``, ``"wine"`` or ``"builtin:NAME"``: :func:`load_builtin`
      (a local folder with such a name is loaded as ``"./digits"``).
    - ``"file.npz"``: :func:`load_npz`.
    - ``"table.csv"`` / ``".parquet"``: :func:`load_tabular`; the target column is
      given as ``"table.csv?target=label"`` or ``target="label"``.
    - a directory: :func:`load_image_folder`.

    Options can follow a ``?`` as ``key=value`` pairs joined by ``&`` (e.g.
    ``"mnist.npz?x_key=x_test&y_key=y_test"``, ``"imgs?image_size=32x32&grayscale=1"``);
    keyword arguments are passed to the loader too and win over query options.
    """
    text = os.fspath(spec).strip()
    if not text:
        raise InputError(
            f"Empty dataset spec; give a path or one of: {', '.join(BUILTIN_DATASETS)}."
        )
    if text.lower().startswith("builtin:") or text.lower() in BUILTIN_DATASETS:
        if kwargs:
            raise InputError(
                f"builtin dataset {text!r} takes no options (got {', '.join(kwargs)})."
            )
        return load_builtin(text)

    path_text, options = text, {}
    if not Path(text).expanduser().exists() and "?" in text:
        path_text, _, query = text.rpartition("?")
        for key, value in parse_qsl(query, keep_blank_values=True, strict_parsing=False):
            options[key] = _query_value(key, value)
    options.update(kwargs)
    p = Path(path_text).expanduser()
    if not p.exists():
        close = difflib.get_close_matches(text.lower(), list(BUILTIN_DATASETS), n=1)
        hint = f" Did you mean the builtin {close[0]!r}?" if close else ""
        raise InputError(
            f"Dataset not found: '{p}' does not exist.{hint} Give an existing .npz, .csv, "
            f".parquet file or image folder, or a builtin name: {', '.join(BUILTIN_DATASETS)}."
        )
    if p.is_dir():
        return _call(load_image_folder, (p,), options, str(p))
    suffix = p.suffix.lower()
    if suffix == ".npz":
        return _call(load_npz, (p,), options, str(p))
    if suffix in TABULAR_SUFFIXES:
        target = options.pop("target", None)
        if not target:
            raise InputError(
                f"{p}: a table needs its label column: use '{p}?target=COLUMN' or target='COLUMN'."
            )
        return _call(load_tabular, (p, target), options, str(p))
    if suffix in (".pkl", ".pickle", ".joblib", ".npy"):
        if suffix == ".npy":
            raise InputError(
                f"{p}: a single .npy array has no labels; save inputs and labels together "
                "with np.savez(path, x=x, y=y)."
            )
        raise UnsafeFileError(
            f"{p}: pickle files are refused (loading them can run code). Save the data as "
            ".npz (np.savez), .csv or .parquet instead."
        )
    raise InputError(
        f"{p}: unsupported dataset file type '{suffix or '(none)'}'; use .npz, .csv, "
        ".parquet or an image folder."
    )
