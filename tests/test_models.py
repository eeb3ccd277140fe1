"""Black-box adapters (scikit-learn, ONNX) and safe model loading/saving."""

from __future__ import annotations

import pickle
import pickletools
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer
from sklearn.svm import SVC

from advguard.errors import InputError, MissingDependencyError, UnsafeFileError
from advguard.models import TorchClassifier, is_white_box
from advguard.models import io as mio
from advguard.models.onnx_model import OnnxClassifier
from advguard.models.sklearn_model import SklearnClassifier
from advguard.models.torch_model import Normalize
from advguard.models.zoo import small_cnn

FACTORY = "advguard.models.zoo:small_cnn"
FACTORY_KW = {"input_shape": [1, 8, 8], "num_classes": 10}


# -- fixtures ----------------------------------------------------------------
@pytest.fixture(scope="module")
def x_test(digits_split) -> torch.Tensor:
    return torch.tensor(digits_split[2][:300])


@pytest.fixture(scope="module")
def onnx_path(digits_module, tmp_path_factory) -> Path:
    clf = TorchClassifier(digits_module, input_shape=(1, 8, 8), num_classes=10)
    return mio.export_onnx(clf, tmp_path_factory.mktemp("onnx") / "digits.onnx")


@pytest.fixture(scope="module")
def logreg(digits_split) -> LogisticRegression:
    x_tr, y_tr, _, _ = digits_split
    return LogisticRegression(solver="newton-cg", max_iter=200).fit(
        x_tr.reshape(len(x_tr), -1), y_tr
    )


class _Payload:
    """Unpickling this creates ``marker`` (as a real attack would run code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _malicious_pickle(path: Path, marker: Path) -> Path:
    data = pickle.dumps(_Payload(marker))
    # the payload really calls open() on load: check the opcodes, without loading it
    ops = [(op.name, arg) for op, arg, _ in pickletools.genops(data)]
    assert any(arg == "open" for _, arg in ops) and ("REDUCE", None) in ops
    path.write_bytes(data)
    return path


# -- ONNX --------------------------------------------------------------------
def test_onnx_export_matches_torch(digits_model, onnx_path, x_test):
    onnx_clf = mio.load_onnx(onnx_path)
    assert isinstance(onnx_clf, OnnxClassifier) and not is_white_box(onnx_clf)
    assert onnx_clf.input_shape == (1, 8, 8) and onnx_clf.num_classes == 10
    assert onnx_clf.bounds == (0.0, 1.0) and onnx_clf.input_name == "input"
    z_torch = digits_model.predict_logits(x_test)
    z_onnx = onnx_clf.predict_logits(x_test, batch_size=128)
    np.testing.assert_allclose(z_onnx, z_torch, atol=1e-4, rtol=0)
    np.testing.assert_array_equal(z_onnx.argmax(1), z_torch.argmax(1))
    assert onnx_clf.queries.forward == len(x_test)
    # batching inside the adapter (batch_size < N) gives the same scores
    small = OnnxClassifier(onnx_path.read_bytes(), batch_size=7)
    np.testing.assert_allclose(small.logits(x_test[:20]).numpy(), z_onnx[:20], atol=1e-6)
    assert small.queries.forward == 20
    assert small.logits(x_test[:0]).shape == (0, 10)


def test_onnx_export_includes_preprocess(digits_module, x_test, tmp_path):
    # a model whose inputs are in [0, 255] with normalization inside the adapter
    clf = TorchClassifier(
        digits_module,
        input_shape=(1, 8, 8),
        num_classes=10,
        bounds=(0.0, 255.0),
        preprocess=Normalize(0.0, 255.0),
    )
    onnx_clf = mio.load_model(mio.export_onnx(clf, tmp_path / "scaled.onnx"))
    assert onnx_clf.bounds == (0.0, 255.0)  # read from the ONNX metadata
    np.testing.assert_allclose(
        onnx_clf.predict_logits(x_test * 255), clf.predict_logits(x_test * 255), atol=1e-4
    )


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_onnx_probabilities_and_dynamic_shape(digits_module, x_test, tmp_path):
    class SoftmaxFlat(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = digits_module

        def forward(self, x):
            return torch.softmax(self.net(x.reshape(-1, 1, 8, 8)), dim=1)

    path = tmp_path / "proba.onnx"
    with torch.no_grad():
        torch.onnx.export(
            SoftmaxFlat().eval(),
            (torch.rand(2, 64),),
            str(path),
            dynamo=False,
            input_names=["x"],
            output_names=["p"],
            dynamic_axes={"x": {0: "n", 1: "f"}, "p": {0: "n", 1: "k"}},
        )
    with pytest.raises(InputError, match="pass input_shape"):
        OnnxClassifier(path)
    with pytest.raises(InputError, match="output must be"):
        OnnxClassifier(path, input_shape=(64,), output="scores")
    clf = OnnxClassifier(path, input_shape=(64,), output="probabilities")
    assert clf.num_classes == 10 and clf.queries.forward == 0  # dummy run not counted
    p = torch.softmax(digits_module(x_test), dim=1).detach().numpy()
    z = clf.predict_logits(x_test.reshape(-1, 64))
    np.testing.assert_allclose(z, np.log(p + 1e-12), atol=1e-4)
    np.testing.assert_array_equal(z.argmax(1), p.argmax(1))


def test_onnx_bad_inputs(onnx_path, tmp_path):
    with pytest.raises(InputError, match="not found"):
        OnnxClassifier(tmp_path / "missing.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(InputError, match="could not load"):
        OnnxClassifier(bad)
    with pytest.raises(InputError, match="does not match"):
        OnnxClassifier(onnx_path, input_shape=(1, 28, 28))
    with pytest.raises(InputError, match="num_classes=3"):
        OnnxClassifier(onnx_path, num_classes=3)
    clf = OnnxClassifier(onnx_path)
    with pytest.raises(InputError, match="shape"):
        clf.predict(np.zeros((2, 64), np.float32))


def test_onnx_missing_dependency(onnx_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(MissingDependencyError, match=r"advguard\[onnx\]"):
        OnnxClassifier(onnx_path)


# -- safetensors / torch -------------------------------------------------------
def test_safetensors_round_trip(digits_model, x_test, tmp_path):
    path = mio.save_torch(
        digits_model, tmp_path / "m.safetensors", factory=FACTORY, factory_kwargs=FACTORY_KW
    )
    meta = mio.read_safetensors_metadata(path)
    assert meta["factory"] == FACTORY and meta["input_shape"] == [1, 8, 8]
    # everything from the file's metadata
    loaded = mio.load_model(path)
    assert isinstance(loaded, TorchClassifier) and is_white_box(loaded)
    assert loaded.input_shape == (1, 8, 8) and loaded.num_classes == 10
    assert loaded.bounds == (0.0, 1.0)
    np.testing.assert_array_equal(
        loaded.predict_logits(x_test), digits_model.predict_logits(x_test)
    )
    # or with everything explicit (a callable factory, a bare module saved without metadata)
    bare = mio.save_torch(digits_model.module, tmp_path / "bare.safetensors")
    again = mio.load_torch(
        lambda: small_cnn((1, 8, 8), 10), bare, input_shape=(1, 8, 8), num_classes=10
    )
    np.testing.assert_array_equal(again.predict_logits(x_test), digits_model.predict_logits(x_test))
    assert len(mio.file_sha256(path)) == 64
    assert mio.file_sha256(path) == mio.file_sha256(path)
    assert mio.file_sha256(path) != mio.file_sha256(bare)


def test_safetensors_mismatch_lists_keys(digits_model, tmp_path):
    path = mio.save_torch(digits_model, tmp_path / "m.safetensors")
    with pytest.raises(InputError, match=r"missing keys: .*unexpected keys: "):
        mio.load_torch("advguard.models.zoo:mlp", path, factory_kwargs=FACTORY_KW)
    with pytest.raises(InputError, match="do not match"):  # same keys, other shapes
        mio.load_torch(FACTORY, path, factory_kwargs={"input_shape": [1, 8, 8], "num_classes": 3})
    with pytest.raises(InputError, match="needs a factory"):
        mio.load_torch(None, path)


def test_factory_string_errors(digits_model, tmp_path):
    path = mio.save_torch(digits_model, tmp_path / "m.safetensors")
    for spec, msg in [
        ("no_such_module_xyz:build", "cannot import module"),
        ("advguard.models.zoo:no_such_fn", "has no attribute"),
        ("advguard.models.zoo", "package.module:callable"),
        ("advguard.errors:__doc__", "not callable"),
        ("numpy:zeros", "rejected its keyword arguments"),
    ]:
        with pytest.raises(InputError, match=msg):
            mio.load_torch(spec, path, factory_kwargs=FACTORY_KW)
    with pytest.raises(InputError, match=r"not a torch\.nn\.Module"):
        mio.load_torch("builtins:dict", path, factory_kwargs=FACTORY_KW)


def test_torch_state_dict_loads_weights_only(digits_model, x_test, tmp_path, monkeypatch):
    path = tmp_path / "sd.pt"
    torch.save({"epoch": 3, "state_dict": digits_model.module.state_dict()}, path)
    seen = []
    real_load = torch.load

    def spy(*args, **kwargs):
        seen.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    loaded = mio.load_model(
        path, factory=FACTORY, factory_kwargs=FACTORY_KW, input_shape=(1, 8, 8), num_classes=10
    )
    assert seen == [True]
    np.testing.assert_array_equal(
        loaded.predict_logits(x_test), digits_model.predict_logits(x_test)
    )
    with pytest.raises(InputError, match="pass factory="):
        mio.load_model(path)


def test_torch_full_module_refused(digits_module, tmp_path):
    path = tmp_path / "full.pt"
    torch.save(digits_module, path)  # needs unpickling of nn.Sequential etc.
    with pytest.raises(UnsafeFileError, match=r"(?s)unpickling.*save_file\(model.state_dict\(\)"):
        mio.load_torch(
            FACTORY, path, factory_kwargs=FACTORY_KW, input_shape=(1, 8, 8), num_classes=10
        )


def test_old_torch_refused(digits_model, tmp_path, monkeypatch):
    path = tmp_path / "sd.pth"
    torch.save(digits_model.module.state_dict(), path)
    monkeypatch.setattr(mio, "_torch_version", lambda: "2.5.1+cpu")
    with pytest.raises(UnsafeFileError, match="CVE-2025-32434"):
        mio.load_torch(
            FACTORY, path, factory_kwargs=FACTORY_KW, input_shape=(1, 8, 8), num_classes=10
        )


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript_only_when_explicit(digits_module, x_test, tmp_path):
    path = tmp_path / "ts.pt"
    torch.jit.trace(digits_module, x_test[:2]).save(str(path))
    assert mio.is_torchscript_archive(path)
    kw = {"input_shape": (1, 8, 8), "num_classes": 10}
    with pytest.raises(InputError, match="torchscript=True"):
        mio.load_model(path, **kw)
    with pytest.raises(InputError, match="instead of factory="):
        mio.load_torch(FACTORY, path, factory_kwargs=FACTORY_KW, **kw)
    ts = mio.load_model(path, torchscript=True, **kw)
    ref = TorchClassifier(digits_module, **kw)
    np.testing.assert_allclose(ts.predict_logits(x_test), ref.predict_logits(x_test), atol=1e-5)
    assert is_white_box(ts)
    plain = tmp_path / "plain.pt"
    torch.save(digits_module.state_dict(), plain)
    assert not mio.is_torchscript_archive(plain)
    with pytest.raises(InputError, match="not a TorchScript archive"):
        mio.load_torchscript(plain, **kw)


# -- pickles are never loaded -----------------------------------------------
@pytest.mark.parametrize("suffix", [".pkl", ".pickle", ".joblib", ".PKL"])
def test_pickle_suffixes_refused_without_loading(tmp_path, monkeypatch, suffix):
    marker = tmp_path / "pwned"
    path = _malicious_pickle(tmp_path / f"model{suffix}", marker)

    def forbidden(*args, **kwargs):
        raise AssertionError("a deserializer was called on a pickle file")

    for mod, name in [(pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")]:
        monkeypatch.setattr(mod, name, forbidden)
    monkeypatch.setattr(torch.jit, "load", forbidden)
    for call in (
        lambda: mio.load_model(path),
        lambda: mio.load_model(path, factory=FACTORY),
        lambda: mio.load_torch(FACTORY, path),
        lambda: mio.load_sklearn(path),
        lambda: mio.load_onnx(path),
        lambda: mio.load_torchscript(path, input_shape=(64,), num_classes=10),
    ):
        with pytest.raises(UnsafeFileError, match="pickle can execute arbitrary code"):
            call()
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_malicious_pickle_in_pt_file_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    for name in ("evil.pt", "evil.bin"):
        path = _malicious_pickle(tmp_path / name, marker)
        with pytest.raises(UnsafeFileError, match="can run code"):
            mio.load_model(
                path,
                factory=FACTORY,
                factory_kwargs=FACTORY_KW,
                input_shape=(1, 8, 8),
                num_classes=10,
            )
    assert not marker.exists()


def test_unsupported_and_missing_files(tmp_path):
    with pytest.raises(InputError, match="not found"):
        mio.load_model(tmp_path / "nope.onnx")
    weird = tmp_path / "model.h5"
    weird.write_bytes(b"\x00")
    with pytest.raises(InputError, match="unsupported model file"):
        mio.load_model(weird)
    with pytest.raises(InputError, match="needs weights="):
        mio.load_model(FACTORY)


def test_load_model_rejects_foreign_options(onnx_path):
    with pytest.raises(InputError, match=r"\['factory'\] do not apply to an ONNX model"):
        mio.load_model(onnx_path, factory=FACTORY)
    assert mio.load_model(onnx_path, batch_size=16).batch_size == 16


# -- scikit-learn / skops ----------------------------------------------------
def test_skops_round_trip(logreg, digits_split, tmp_path):
    import skops.io as sio

    x_te = digits_split[2][:300]
    flat = x_te.reshape(len(x_te), -1)
    path = tmp_path / "lr.skops"
    sio.dump(logreg, path)
    clf = mio.load_model(path)
    assert isinstance(clf, SklearnClassifier) and not is_white_box(clf)
    assert clf.input_shape == (64,) and clf.num_classes == 10
    np.testing.assert_array_equal(clf.predict(flat), logreg.predict(flat))
    np.testing.assert_allclose(clf.predict_proba(flat), logreg.predict_proba(flat), atol=1e-6)
    # image-shaped inputs are flattened before they reach the estimator
    img = SklearnClassifier(logreg, input_shape=(1, 8, 8))
    np.testing.assert_array_equal(img.predict(x_te), logreg.predict(flat))


def test_skops_untrusted_types_refused(logreg, tmp_path):
    import math

    import skops.io as sio

    pipe = make_pipeline(FunctionTransformer(math.sqrt), logreg)
    path = tmp_path / "pipe.skops"
    sio.dump(pipe, path)
    with pytest.raises(UnsafeFileError, match=r"math\.sqrt.*trusted_types"):
        mio.load_sklearn(path)
    # an unfitted first step records no n_features_in_: give the input shape
    loaded = mio.load_sklearn(path, trusted_types=["math.sqrt"], input_shape=(64,))
    assert loaded.num_classes == 10
    bad = tmp_path / "bad.skops"
    bad.write_bytes(b"junk")
    with pytest.raises(InputError, match="not a valid skops file"):
        mio.load_sklearn(bad)


def test_skops_missing_dependency(tmp_path, monkeypatch):
    path = tmp_path / "m.skops"
    path.write_bytes(b"junk")
    monkeypatch.setitem(sys.modules, "skops.io", None)
    with pytest.raises(MissingDependencyError, match=r"advguard\[skops\]"):
        mio.load_sklearn(path)


def test_sklearn_classifier_queries_and_logits(logreg, digits_split):
    flat = torch.tensor(digits_split[2][:50].reshape(50, -1))
    clf = SklearnClassifier(logreg)
    assert clf.queries.forward == 0
    z = clf.logits(flat)
    assert z.dtype == torch.float32 and z.shape == (50, 10) and z.device == flat.device
    np.testing.assert_allclose(
        z.numpy(), np.log(logreg.predict_proba(flat.numpy()) + 1e-12), rtol=1e-5, atol=1e-5
    )
    assert clf.queries.forward == 50
    clf.predict(flat[:20], batch_size=8)
    assert clf.queries.forward == 70
    assert clf.queries.gradient == 0 and not hasattr(clf, "value_and_grad")


def test_sklearn_bad_inputs(logreg):
    clf = SklearnClassifier(logreg)
    with pytest.raises(InputError, match="shape"):
        clf.predict(np.zeros((3, 63), np.float32))
    x = np.full((3, 64), 0.5, np.float32)
    x[1, 5] = np.nan
    with pytest.raises(InputError, match="NaN"):
        clf.predict(x)
    with pytest.raises(InputError, match="bounds"):
        clf.predict(np.full((2, 64), 2.0, np.float32))
    assert clf.queries.forward == 0  # refused inputs are never sent to the model
    with pytest.raises(InputError, match="predict_proba"):
        SklearnClassifier(SVC())
    with pytest.raises(InputError, match="features"):
        SklearnClassifier(logreg, input_shape=(1, 7, 7))


def test_sklearn_class_mapping():
    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    keep = np.isin(d.target, [3, 7])
    names = np.where(d.target[keep] == 3, "three", "seven")
    est = LogisticRegression(solver="newton-cg").fit(x[keep], names)
    with pytest.raises(InputError, match="class_mapping"):
        SklearnClassifier(est)
    clf = SklearnClassifier(est, class_mapping={"three": 3, "seven": 7}, num_classes=10)
    pred = clf.predict(x[keep])
    assert set(np.unique(pred)) <= {3, 7}
    expect = np.where(est.predict(x[keep]) == "three", 3, 7)
    np.testing.assert_array_equal(pred, expect)
    # integer labels that are a subset of 0..K-1 need no mapping
    sub = LogisticRegression(solver="newton-cg").fit(x[keep], d.target[keep])
    with pytest.raises(InputError, match="not integers in"):
        SklearnClassifier(sub)  # default num_classes = 2 cannot hold label 7
    clf2 = SklearnClassifier(sub, num_classes=10)
    np.testing.assert_array_equal(clf2.predict(x[keep]), sub.predict(x[keep]))


def test_trades_cnn_shapes_and_errors():
    from advguard.models.zoo import trades_cnn

    for shape in [(1, 28, 28), (3, 32, 32), (1, 16, 16)]:
        net = trades_cnn(shape, 7)
        assert net(torch.rand(2, *shape)).shape == (2, 7)
    # 4 conv layers (the TRADES SmallCNN), not the 2 of small_cnn
    assert sum(isinstance(m, torch.nn.Conv2d) for m in trades_cnn().modules()) == 4
    with pytest.raises(InputError, match="at least 16x16"):
        trades_cnn((1, 8, 8), 10)
    with pytest.raises(InputError, match="channels, height, width"):
        trades_cnn((784,), 10)
