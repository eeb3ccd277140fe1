"""advguard.data: loaders, validation messages, split and provenance hash."""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from advguard.data import (
    BUILTIN_DATASETS,
    Dataset,
    load_builtin,
    load_dataset,
    load_image_folder,
    load_npz,
    load_tabular,
)
from advguard.errors import InputError, UnsafeFileError

MNIST = Path("/work/shared/datasets/mnist.npz")


def _ds(**kw) -> Dataset:
    rng = np.random.default_rng(0)
    base = dict(
        x=rng.random((20, 1, 4, 4), dtype=np.float32),
        y=np.arange(20) % 2,
        bounds=(0.0, 1.0),
        num_classes=2,
        name="toy",
        source="toy.npz",
    )
    base.update(kw)
    return Dataset(**base)


# ----------------------------------------------------------------- validation
def test_valid_dataset_basics():
    ds = _ds().validate()
    assert len(ds) == 20 and ds.input_shape == (1, 4, 4) and ds.modality == "image"
    assert ds.x.dtype == np.float32 and ds.y.dtype == np.int64
    assert ds.class_counts().tolist() == [10, 10]
    assert "toy" in repr(ds) and "n=20" in repr(ds)


@pytest.mark.parametrize(
    ("kw", "needles"),
    [
        ({"x": np.zeros((0, 3), np.float32), "y": np.zeros(0, np.int64)}, ["empty", "0 samples"]),
        ({"y": np.zeros(19, np.int64)}, ["20 samples", "19 labels"]),
        ({"y": np.zeros((20, 2), np.int64)}, ["1-D", "(20, 2)", "argmax"]),
        ({"x": np.zeros(20, np.float32)}, ["shape (N, *input_shape)", "reshape"]),
        ({"x": np.zeros((20, 3), np.uint8)}, ["float32", "uint8", "/ 255"]),
        ({"num_classes": 1, "y": np.zeros(20, np.int64)}, ["at least 2 classes"]),
        ({"bounds": (1.0, 0.0)}, ["low < high"]),
        ({"y": np.full(20, 0.5)}, ["whole numbers", "first at index 0"]),
        ({"y": np.arange(20, dtype=np.float64) % 2}, ["integer dtype", "astype"]),
        ({"class_names": ["a", "b", "c"]}, ["3 class_names", "num_classes=2"]),
    ],
)
def test_validation_errors(kw, needles):
    with pytest.raises(InputError) as err:
        _ds(**kw).validate()
    msg = str(err.value)
    assert "toy" in msg and "toy.npz" in msg  # names the dataset and its source
    for needle in needles:
        assert needle in msg, msg


def test_validation_nan_inf_count_and_first_index():
    x = np.zeros((10, 3), np.float32)
    x[4, 1] = np.nan
    x[7, 0] = np.inf
    x[7, 2] = -np.inf
    ds = _ds(x=x, y=np.arange(10) % 2, feature_names=["a", "b", "c"])
    with pytest.raises(InputError, match="non-finite") as err:
        ds.validate()
    msg = str(err.value)
    assert "3 non-finite values (1 NaN, 2 Inf) in 2 samples" in msg
    assert "first at sample 4, feature 'b'" in msg and "drop_na=True" in msg


def test_validation_out_of_bounds_reports_range():
    x = np.full((6, 1, 2, 2), 0.5, np.float32)
    x[3, 0, 1, 1] = 255.0
    x[5, 0, 0, 0] = -1.0
    with pytest.raises(InputError) as err:
        _ds(x=x, y=np.arange(6) % 2).validate()
    msg = str(err.value)
    assert "2 values in 2 samples lie outside the declared bounds (0, 1)" in msg
    assert "min -1, max 255" in msg and "first at sample 3" in msg and "/ 255" in msg


def test_validation_labels_negative_and_too_large():
    y = np.arange(20) % 2
    y[6] = -1
    with pytest.raises(InputError, match=r"1 labels are negative \(first at index 6: -1\)"):
        _ds(y=y).validate()
    y = np.arange(20) % 2
    y[[3, 9]] = 5
    with pytest.raises(InputError) as err:
        _ds(y=y).validate()
    msg = str(err.value)
    assert "2 labels are >= num_classes=2" in msg and "first at index 3" in msg
    assert "num_classes=6" in msg


def test_validation_tabular_names_types_feature_bounds():
    x = np.zeros((4, 2), np.float32)
    y = np.array([0, 1, 0, 1])
    with pytest.raises(InputError, match="1 feature_names for 2 features"):
        _ds(x=x, y=y, feature_names=["a"]).validate()
    with pytest.raises(InputError, match="allowed: numeric"):
        _ds(x=x, y=y, feature_types=["numeric", "text"]).validate()
    with pytest.raises(InputError, match=r"shape \(2, 2\)"):
        _ds(x=x, y=y, feature_bounds=np.zeros((2, 3))).validate()


# ----------------------------------------------------------- subset / split / hash
def test_subset_and_split_stratified_deterministic():
    ds = load_builtin("wine")
    sub = ds.subset([0, 5, 7])
    assert len(sub) == 3 and sub.num_classes == 3 and sub.feature_names == ds.feature_names
    assert np.array_equal(sub.x[1], ds.x[5])
    assert len(ds.subset(np.arange(len(ds)) < 10)) == 10
    with pytest.raises(InputError, match="no samples"):
        ds.subset([])

    tr, te = ds.split(0.25, seed=3)
    tr2, te2 = ds.split(0.25, seed=3)
    assert len(tr) + len(te) == len(ds) and len(te) == 45
    assert np.array_equal(te.x, te2.x) and np.array_equal(tr.y, tr2.y)
    assert set(tr.metadata["split"].items()) >= {("part", "train"), ("seed", 3)}
    # stratified: class proportions preserved to within one sample per class
    expected = ds.class_counts() * 0.25
    assert np.all(np.abs(te.class_counts() - expected) <= 1)
    _, te_other = ds.split(0.25, seed=4)
    assert not np.array_equal(te.y, te_other.y) or not np.array_equal(te.x, te_other.x)
    # train and test are disjoint and together are the whole set
    all_rows = np.concatenate([tr.x, te.x])
    assert len(np.unique(all_rows, axis=0)) == len(np.unique(ds.x, axis=0))


def test_split_errors():
    ds = _ds()
    with pytest.raises(InputError, match="strictly between 0 and 1"):
        ds.split(1.5)
    with pytest.raises(InputError, match="between 1 and 19"):
        ds.split(20)
    y = np.zeros(20, np.int64)
    y[0] = 1  # one sample of class 1: cannot stratify
    with pytest.raises(InputError, match="stratify=False"):
        _ds(y=y).split(0.2)
    _, te = _ds(y=y).split(0.2, stratify=False)
    assert len(te) == 4


def test_sha256_stable_and_sensitive():
    a, b = _ds(), _ds()
    assert a.sha256() == b.sha256()
    assert len(a.sha256()) == 64
    assert load_builtin("digits").sha256() == load_builtin("digits").sha256()
    b.x[7, 0, 2, 3] += 1e-3
    assert a.sha256() != b.sha256()
    c = _ds()
    c.y[0] = 1 - c.y[0]
    assert a.sha256() != c.sha256()
    d = _ds(x=a.x.reshape(20, 16))  # same bytes, different shape
    assert a.sha256() != d.sha256()


# ------------------------------------------------------------------------- npz
def test_load_npz_uint8_grayscale(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (12, 5, 6), dtype=np.uint8)
    y = (np.arange(12) % 3).astype(np.uint8)
    p = tmp_path / "imgs.npz"
    np.savez_compressed(p, x_test=x, y_test=y)
    ds = load_npz(p, x_key="x_test", y_key="y_test")
    assert ds.x.shape == (12, 1, 5, 6) and ds.x.dtype == np.float32
    assert ds.y.dtype == np.int64 and ds.y.tolist() == y.tolist()
    assert ds.bounds == (0.0, 1.0) and ds.num_classes == 3 and ds.modality == "image"
    assert np.allclose(ds.x[:, 0] * 255.0, x)
    assert ds.name == "imgs" and ds.source == str(p)
    # raw pixel space when asked for
    raw = load_npz(p, x_key="x_test", y_key="y_test", bounds=(0, 255))
    assert raw.x.max() > 1.0 and raw.bounds == (0.0, 255.0)


def test_load_npz_layouts_and_labels(tmp_path):
    rng = np.random.default_rng(2)
    nhwc = rng.random((8, 6, 6, 3)).astype(np.float32)
    onehot = np.eye(4, dtype=np.float32)[np.arange(8) % 4]
    p = tmp_path / "nhwc.npz"
    np.savez(p, x=nhwc, y=onehot)
    ds = load_npz(p)
    assert ds.x.shape == (8, 3, 6, 6)
    assert np.array_equal(ds.x[2, 1], nhwc[2, :, :, 1])
    assert ds.y.tolist() == (np.arange(8) % 4).tolist() and ds.num_classes == 4
    assert "NHWC" in ds.metadata["layout"]

    nchw = rng.random((8, 3, 5, 7)).astype(np.float64)
    p2 = tmp_path / "nchw.npz"
    np.savez(p2, x=nchw, y=(np.arange(8) % 2).astype(np.float64).reshape(-1, 1))
    ds2 = load_npz(p2, num_classes=3, class_names=["a", "b", "c"])
    assert ds2.x.shape == (8, 3, 5, 7) and ds2.x.dtype == np.float32
    assert ds2.y.dtype == np.int64 and ds2.num_classes == 3

    wide = rng.normal(size=(10, 4)).astype(np.float32) * 5
    p3 = tmp_path / "vec.npz"
    np.savez(p3, x=wide, y=np.arange(10) % 2)
    ds3 = load_npz(p3)
    assert ds3.modality == "tabular" and ds3.input_shape == (4,)
    assert ds3.bounds == (float(wide.min()), float(wide.max()))


def test_load_npz_errors(tmp_path):
    p = tmp_path / "keras.npz"
    np.savez(p, x_train=np.zeros((2, 2, 2)), y_train=np.zeros(2))
    with pytest.raises(InputError) as err:
        load_npz(p)
    msg = str(err.value)
    assert str(p) in msg and "'x'" in msg and "x_train, y_train" in msg and "x_key=" in msg

    with pytest.raises(InputError, match="file not found"):
        load_npz(tmp_path / "missing.npz")

    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"this is not a zip file")
    with pytest.raises(InputError, match=r"bad\.npz.*cannot read"):
        load_npz(bad)

    nan = tmp_path / "nan.npz"
    xs = np.zeros((4, 3), np.float32)
    xs[2, 1] = np.nan
    np.savez(nan, x=xs, y=np.array([0, 1, 0, 1]))
    with pytest.raises(InputError, match=r"nan\.npz.*1 NaN.*first at sample 2"):
        load_npz(nan)

    frac = tmp_path / "frac.npz"
    np.savez(frac, x=np.zeros((3, 2), np.float32), y=np.array([0.0, 1.5, 1.0]))
    with pytest.raises(InputError, match="first at index 1"):
        load_npz(frac)

    mism = tmp_path / "mism.npz"
    np.savez(mism, x=np.zeros((3, 2), np.float32), y=np.array([0, 1]))
    with pytest.raises(InputError, match="3 samples but y has 2 labels"):
        load_npz(mism)


def test_load_npz_refuses_pickles(tmp_path):
    p = tmp_path / "obj.npz"
    obj = np.empty(3, dtype=object)
    obj[:] = [np.zeros(2), "a", {"b": 1}]
    np.savez(p, x=obj, y=np.arange(3))
    with pytest.raises(UnsafeFileError, match="pickled arrays are refused") as err:
        load_npz(p)
    assert str(p) in str(err.value)
    assert isinstance(err.value, ValueError)

    raw = tmp_path / "raw.npz"
    raw.write_bytes(pickle.dumps({"x": [1, 2]}))
    with pytest.raises(UnsafeFileError, match="pickled data"):
        load_npz(raw)


@pytest.mark.skipif(not MNIST.exists(), reason=f"{MNIST} not present (optional shared data)")
def test_load_npz_keras_mnist():
    ds = load_npz(MNIST, x_key="x_test", y_key="y_test")
    assert ds.x.shape == (10000, 1, 28, 28) and ds.x.dtype == np.float32
    assert ds.bounds == (0.0, 1.0) and ds.num_classes == 10
    assert abs(float(ds.x.mean()) - 0.1325) < 1e-3
    assert ds.class_counts()[1] == 1135
    same = load_dataset(f"{MNIST}?x_key=x_test&y_key=y_test")
    assert same.sha256() == ds.sha256()


# --------------------------------------------------------------- image folder
def _write_images(root: Path, spec: dict[str, int], size=(6, 5), mode="RGB") -> None:
    rng = np.random.default_rng(3)
    for cls, n in spec.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            shape = (size[0], size[1], 3) if mode == "RGB" else size
            arr = rng.integers(0, 256, shape, dtype=np.uint8)
            Image.fromarray(arr, mode=mode).save(root / cls / f"img{i}.png")


def test_load_image_folder_roundtrip(tmp_path):
    root = tmp_path / "pets"
    _write_images(root, {"dog": 3, "cat": 2})
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    ds = load_image_folder(root)
    assert ds.x.shape == (5, 3, 6, 5) and ds.x.dtype == np.float32
    assert ds.class_names == ["cat", "dog"] and ds.y.tolist() == [0, 0, 1, 1, 1]
    assert ds.bounds == (0.0, 1.0) and ds.x.min() >= 0.0 and ds.x.max() <= 1.0
    assert ds.metadata["skipped_files"] == 1
    first = np.asarray(Image.open(root / "cat" / "img0.png"), dtype=np.float32) / 255
    assert np.allclose(ds.x[0], first.transpose(2, 0, 1))

    gray = load_image_folder(root, image_size=(4, 3), grayscale=True)
    assert gray.x.shape == (5, 1, 4, 3)
    via_spec = load_dataset(f"{root}?image_size=4x3&grayscale=true")
    assert via_spec.sha256() == gray.sha256()


def test_load_image_folder_errors(tmp_path):
    root = tmp_path / "mixed"
    _write_images(root, {"a": 2, "b": 1})
    _write_images(tmp_path / "other", {"b": 1}, size=(7, 7))
    odd = root / "b" / "odd.png"
    (tmp_path / "other" / "b" / "img0.png").rename(odd)
    with pytest.raises(InputError) as err:
        load_image_folder(root)
    msg = str(err.value)
    assert "odd.png" in msg and "7x7" in msg and "6x5" in msg and "image_size=" in msg
    assert load_image_folder(root, image_size=8).x.shape == (4, 3, 8, 8)

    (root / "b" / "broken.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(InputError, match=r"broken\.png: cannot read image"):
        load_image_folder(root, image_size=8)

    empty = tmp_path / "empty_cls"
    _write_images(empty, {"x": 1})
    (empty / "y").mkdir()
    with pytest.raises(InputError, match="class folder 'y' has no images"):
        load_image_folder(empty)

    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (2, 2)).save(flat / "a.png")
    with pytest.raises(InputError, match=r"no class subfolders.*1 images directly"):
        load_image_folder(flat)

    single = tmp_path / "single"
    _write_images(single, {"only": 2})
    with pytest.raises(InputError, match="at least 2 classes"):
        load_image_folder(single)

    with pytest.raises(InputError, match="not found"):
        load_image_folder(tmp_path / "nope")


# --------------------------------------------------------------------- tabular
def _table() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "age": [25, 40, 31, 58, 22, 47],
            "income": [1.5, 3.25, 2.0, 4.75, 0.5, 3.0],
            "color": ["red", "blue", "red", "green", "blue", "red"],
            "member": [True, False, True, True, False, False],
            "label": ["yes", "no", "no", "yes", "no", "yes"],
        }
    )


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_load_tabular_roundtrip(tmp_path, suffix):
    p = tmp_path / f"people{suffix}"
    df = _table()
    df.to_csv(p, index=False) if suffix == ".csv" else df.to_parquet(p, index=False)
    ds = load_tabular(p, target="label")
    assert ds.modality == "tabular" and ds.x.shape == (6, 6) and ds.x.dtype == np.float32
    assert ds.feature_names == [
        "age",
        "income",
        "color=blue",
        "color=green",
        "color=red",
        "member",
    ]
    assert ds.feature_types == ["integer", "numeric", *["categorical"] * 3, "binary"]
    assert ds.class_names == ["no", "yes"] and ds.y.tolist() == [1, 0, 0, 1, 0, 1]
    assert ds.bounds == (0.0, 58.0)
    assert ds.feature_bounds.shape == (2, 6)
    assert ds.feature_bounds[:, 0].tolist() == [22.0, 58.0]
    assert ds.feature_bounds[:, 1].tolist() == [0.5, 4.75]
    assert ds.metadata["encoding"]["color"]["categories"] == ["blue", "green", "red"]
    assert ds.x[:, 2:5].sum(axis=1).tolist() == [1.0] * 6
    assert ds.x[3, 3] == 1.0  # row 3 is green
    assert ds.x[:, 5].tolist() == [1, 0, 1, 1, 0, 0]

    sel = load_tabular(p, target="age", features=["income"], bounds=(0, 10))
    assert sel.x.shape == (6, 1) and sel.num_classes == 6 and sel.bounds == (0.0, 10.0)
    assert sel.class_names == ["22", "25", "31", "40", "47", "58"]


def test_load_tabular_feature_types_and_drop_na(tmp_path):
    p = tmp_path / "t.csv"
    df = _table()
    df.loc[2, "income"] = np.nan
    df.to_csv(p, index=False)
    with pytest.raises(InputError) as err:
        load_tabular(p, target="label")
    msg = str(err.value)
    assert "t.csv" in msg and "1 missing values" in msg and "income (1)" in msg
    assert "first at data row 2" in msg and "drop_na=True" in msg
    ds = load_tabular(p, target="label", drop_na=True, feature_types={"age": "categorical"})
    assert len(ds) == 5 and ds.metadata["dropped_rows"] == 1
    assert "age=25" in ds.feature_names and ds.metadata["encoding"]["age"]["columns"][0] == "age=22"

    with pytest.raises(InputError, match="declared binary"):
        load_tabular(p, target="label", drop_na=True, feature_types={"income": "binary"})
    with pytest.raises(InputError, match=r"declared numeric.*not numbers"):
        load_tabular(p, target="label", drop_na=True, feature_types={"color": "numeric"})
    with pytest.raises(InputError, match="allowed: numeric"):
        load_tabular(p, target="label", drop_na=True, feature_types={"age": "text"})


def test_load_tabular_errors(tmp_path):
    p = tmp_path / "t.csv"
    _table().to_csv(p, index=False)
    with pytest.raises(InputError) as err:
        load_tabular(p, target="target")
    msg = str(err.value)
    assert "t.csv" in msg and "'target' not found" in msg and "age, income, color" in msg
    with pytest.raises(InputError, match="feature columns not found: zip"):
        load_tabular(p, target="label", features=["age", "zip"])

    inf = tmp_path / "inf.csv"
    pd.DataFrame({"a": [1.0, np.inf, 2.0], "t": [0, 1, 0]}).to_csv(inf, index=False)
    with pytest.raises(InputError, match=r"inf\.csv.*1 Inf.*feature 'a'"):
        load_tabular(inf, target="t")

    ids = tmp_path / "ids.csv"
    pd.DataFrame({"id": [f"u{i}" for i in range(30)], "t": [0, 1] * 15}).to_csv(ids, index=False)
    with pytest.raises(InputError, match="30 distinct text values"):
        load_tabular(ids, target="t", max_categories=10)

    one = tmp_path / "one.csv"
    pd.DataFrame({"a": [1, 2], "t": ["x", "x"]}).to_csv(one, index=False)
    with pytest.raises(InputError, match=r"one\.csv.*at least 2 classes"):
        load_tabular(one, target="t")

    header = tmp_path / "header.csv"
    header.write_text("a,t\n")
    with pytest.raises(InputError, match="no data rows"):
        load_tabular(header, target="t")


# -------------------------------------------------------------------- builtins
@pytest.mark.parametrize(
    ("name", "shape", "classes"),
    [("digits", (1797, 1, 8, 8), 10), ("breast_cancer", (569, 30), 2), ("wine", (178, 13), 3)],
)
def test_builtins(name, shape, classes):
    ds = load_builtin(name)
    assert ds.x.shape == shape and ds.x.dtype == np.float32 and ds.y.dtype == np.int64
    assert ds.num_classes == classes and len(ds.class_names) == classes
    assert ds.bounds == (0.0, 1.0) and ds.x.min() == 0.0 and ds.x.max() == 1.0
    assert ds.source == f"builtin:{name}" and name in BUILTIN_DATASETS
    assert set(np.unique(ds.y).tolist()) == set(range(classes))
    if ds.modality == "tabular":
        assert len(ds.feature_names) == shape[1]
        sc = ds.metadata["scaling"]
        assert sc["method"] == "minmax" and len(sc["feature_min"]) == shape[1]
    assert load_dataset(f"builtin:{name}").sha256() == ds.sha256()


def test_builtin_unknown():
    with pytest.raises(InputError, match="digits, breast_cancer, wine"):
        load_builtin("cifar10")


# ------------------------------------------------------------------ load_dataset
def test_load_dataset_dispatch(tmp_path):
    p = tmp_path / "d.npz"
    np.savez(p, x=np.zeros((4, 2), np.float32), y=np.array([0, 1, 0, 1]))
    assert load_dataset(str(p)).input_shape == (2,)
    assert load_dataset(p).input_shape == (2,)

    csv = tmp_path / "t.csv"
    _table().to_csv(csv, index=False)
    a = load_dataset(f"{csv}?target=label&features=age,income")
    b = load_dataset(csv, target="label", features=["age", "income"])
    assert a.x.shape == (6, 2) and a.sha256() == b.sha256()
    with pytest.raises(InputError, match=r"needs its label column.*\?target="):
        load_dataset(csv)
    with pytest.raises(InputError, match="not understood by load_tabular"):
        load_dataset(csv, target="label", grayscale=True)

    with pytest.raises(InputError, match=r"does not exist.*digits"):
        load_dataset(tmp_path / "missing.npz")
    with pytest.raises(InputError, match="takes no options"):
        load_dataset("digits", bounds=(0, 1))
    with pytest.raises(InputError, match="unsupported dataset file type"):
        load_dataset(csv.rename(tmp_path / "t.xlsx"))
    pk = tmp_path / "d.pkl"
    pk.write_bytes(b"")
    with pytest.raises(UnsafeFileError, match="pickle files are refused"):
        load_dataset(pk)


def test_load_tabular_without_pandas(tmp_path, monkeypatch):
    from advguard.errors import MissingDependencyError

    p = tmp_path / "t.csv"
    _table().to_csv(p, index=False)
    monkeypatch.setitem(sys.modules, "pandas", None)  # import pandas -> ImportError
    with pytest.raises(MissingDependencyError, match=r"advguard\[tabular\]"):
        load_tabular(p, target="label")
