"""Calibrated detectors saved and loaded without pickle (JSON + safetensors).

A saved detector is a directory::

    det/detector.json          kind, format version, parameters, threshold, target FPR,
                               FPR achieved on the calibration data, digest of the model it was
                               calibrated for, input shape (``input_shape``; a detector for a
                               text model has ``"input": {"kind": "text"}`` instead), sha256
                               of the arrays file
    det/detector.safetensors   arrays (Mahalanobis class means, precision matrix, classes)

:func:`load_detector` treats both files as untrusted data: sizes are capped before reading,
``kind`` is looked up in a fixed allow-list (:data:`KINDS`) that maps to advguard's own
classes (no class, module or callable named by the file is ever imported), every parameter
is type- and range-checked, the threshold and every array must be finite, array names,
dtypes and shapes must be exactly those the kind needs and agree with the model, and the
model's digest must be the one recorded at calibration. Any violation is one
:class:`~advguard.errors.InputError` line.

Persistable kinds: ``feature-squeezing`` (squeezers from the deterministic allow-list
``bit-depth``, ``median``, ``jpeg``), ``mahalanobis`` (hooked layer by name or the default
penultimate features; a ``features=`` callable is code and cannot be saved) and
``confidence``. ``disagreement`` needs its ensemble of models and is not persisted.

Text models: a ``confidence`` detector calibrated on a text model (strings in,
``predict_proba`` out) records ``"input": {"kind": "text"}`` in place of ``input_shape``
(format version 1 either way: a numeric detector's file is written exactly as before, and an
advguard without text detectors refuses a text one as an unknown field). It loads only for a
text model, and a numeric detector only for a numeric model. The digest of a text model is
:func:`advguard.models.text_io.text_model_digest` (its vocabulary, weights and options).
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch

from advguard.atomic import atomic_path, atomic_write_text
from advguard.defenses.detectors.base import Detector, check_fpr, is_text_model
from advguard.defenses.detectors.mahalanobis import MahalanobisDetector
from advguard.defenses.detectors.scores import ConfidenceDetector, FeatureSqueezingDetector
from advguard.defenses.transforms.base import InputTransform
from advguard.defenses.transforms.image import BitDepthReduction, JpegCompression, MedianSmoothing
from advguard.errors import InputError

FORMAT = "advguard-detector"
FORMAT_VERSION = 1
JSON_NAME = "detector.json"
ARRAYS_NAME = "detector.safetensors"
MAX_JSON_BYTES = 1 << 20
MAX_ARRAYS_BYTES = 256 << 20
MAX_HEADER_BYTES = 1 << 16
MAX_FEATURE_DIM = 4096
MAX_CLASSES = 10_000
MAX_SQUEEZERS = 8
MAX_INPUT_DIMS = 8
MAX_INPUT_SIZE = 1 << 26

#: kind recorded in detector.json -> advguard class (the only classes a file can select).
KINDS: dict[str, type[Detector]] = {
    "feature-squeezing": FeatureSqueezingDetector,
    "mahalanobis": MahalanobisDetector,
    "confidence": ConfidenceDetector,
}

#: squeezer name -> deterministic transform class (randomized ones cannot be calibrated once).
SQUEEZERS: dict[str, type[InputTransform]] = {
    "bit-depth": BitDepthReduction,
    "median": MedianSmoothing,
    "jpeg": JpegCompression,
}

_TOP_KEYS = {
    "format",
    "version",
    "kind",
    "params",
    "threshold",
    "fpr_target",
    "fpr_calibration",
    "n_calibration",
    "model_digest",
    "num_classes",
    "arrays_sha256",
}
#: Exactly one of these says what the detector scores: ``input_shape`` (numeric inputs) or
#: ``input`` (``{"kind": "text"}``: a text model's strings).
_INPUT_KEYS = ("input_shape", "input")
#: Kinds that can score a text model (they need only its probabilities).
TEXT_KINDS = ("confidence",)


# ---------------------------------------------------------------------------------------------
# model digest
# ---------------------------------------------------------------------------------------------
def model_digest(model: Any) -> str | None:
    """``torch-weights-sha256:<hex>`` over a torch model's state dict (names, dtypes, shapes,
    values, sorted by name); for a text model whose pipeline :mod:`advguard.models.text_io`
    can save, ``text-model-sha256:<hex>`` (:func:`~advguard.models.text_io.text_model_digest`);
    None for other adapters (give a digest, e.g. the model file's sha256, explicitly then)."""
    if is_text_model(model):
        from advguard.models.text_io import text_model_digest

        pipeline = getattr(model, "model", None)
        return text_model_digest(pipeline) if pipeline is not None else None
    module = getattr(model, "module", None)
    if not isinstance(module, torch.nn.Module):
        return None
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(json.dumps(list(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "torch-weights-sha256:" + h.hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# save
# ---------------------------------------------------------------------------------------------
def _kind_of(det: Detector) -> str:
    for kind, cls in KINDS.items():
        if type(det) is cls:
            return kind
    raise InputError(
        f"{type(det).__name__} cannot be saved; persistable detectors: {', '.join(KINDS)}"
    )


def _squeezer_spec(s: InputTransform) -> dict[str, Any]:
    for name, cls in SQUEEZERS.items():
        if type(s) is cls:
            p = s.params()
            return {"name": name, **{k: v for k, v in p.items() if k != "bounds"}}
    raise InputError(
        f"squeezer {type(s).__name__} cannot be saved; use one of {', '.join(SQUEEZERS)}"
    )


def _params_and_arrays(kind: str, det: Any) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    if kind == "feature-squeezing":
        return {"squeezers": [_squeezer_spec(s) for s in det.squeezers]}, {}
    if kind == "confidence":
        return {"kind": det.kind}, {}
    # mahalanobis
    if det._features_fn is not None:
        raise InputError(
            "a MahalanobisDetector with a features= callable cannot be saved (a callable is "
            "code); use layer='<module name>' or the default penultimate features"
        )
    if det.means is None or det.precision is None:
        raise InputError("the MahalanobisDetector is not fitted; call fit(x_benign) first")
    params = {"layer": det.layer, "shrinkage": det.shrinkage, "pool": det.pool}
    arrays = {
        "means": det.means.detach().cpu().double().numpy(),
        "precision": det.precision.detach().cpu().double().numpy(),
        "classes": det.classes.detach().cpu().long().numpy(),
    }
    return params, arrays


def save_detector(det: Detector, path: str | Path, *, digest: str | None = None) -> Path:
    """Write a fitted, calibrated detector to directory ``path`` (created; files replaced
    atomically). ``digest`` identifies the model; default :func:`model_digest`. Returns path."""
    if not isinstance(det, Detector):
        raise InputError(f"not a Detector: {type(det).__name__}")
    kind = _kind_of(det)
    if det.threshold is None or det.calibration is None:
        raise InputError(
            "the detector is not calibrated; call calibrate(x_benign_heldout, fpr) before saving"
        )
    params, arrays = _params_and_arrays(kind, det)
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    from safetensors.numpy import save_file

    with atomic_path(out / ARRAYS_NAME) as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp))
    if digest is None:
        digest = model_digest(det.model)
    doc = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "kind": kind,
        "params": params,
        "threshold": float(det.threshold),
        "fpr_target": float(det.calibration["fpr_target"]),
        "fpr_calibration": float(det.calibration["fpr_on_calibration_set"]),
        "n_calibration": int(det.calibration["n"]),
        "model_digest": digest,
        **(
            {"input": {"kind": "text"}}
            if det.takes_text
            else {"input_shape": [int(d) for d in det.model.input_shape]}
        ),
        "num_classes": int(det.model.num_classes),
        "arrays_sha256": _file_sha256(out / ARRAYS_NAME),
    }
    atomic_write_text(out / JSON_NAME, json.dumps(doc, indent=2) + "\n")
    return out


# ---------------------------------------------------------------------------------------------
# load: every field validated
# ---------------------------------------------------------------------------------------------
def _bad(path: Path, what: str) -> InputError:
    return InputError(f"{path}: {what}")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _finite_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


def _read_json(path: Path) -> dict[str, Any]:
    p = path / JSON_NAME
    if not p.is_file():
        raise InputError(f"{path} is not a saved detector (no {JSON_NAME})")
    size = p.stat().st_size
    if size > MAX_JSON_BYTES:
        raise _bad(p, f"{size} bytes, more than the {MAX_JSON_BYTES} a detector file may have")

    def no_constants(name: str) -> Any:
        raise InputError(f"{p}: {name} is not valid JSON (numbers must be finite)")

    try:
        doc = json.loads(p.read_text(encoding="utf-8"), parse_constant=no_constants)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise _bad(p, f"not valid JSON ({type(e).__name__})") from None
    if not isinstance(doc, dict):
        raise _bad(p, "must be a JSON object")
    return doc


def _check_top(p: Path, doc: dict[str, Any]) -> None:
    unknown = sorted(set(doc) - _TOP_KEYS - set(_INPUT_KEYS))
    missing = sorted(_TOP_KEYS - set(doc))
    if unknown:
        raise _bad(p, f"unknown field(s) {', '.join(map(repr, unknown[:5]))}")
    if missing:
        raise _bad(p, f"missing field(s) {', '.join(missing)}")
    if sum(k in doc for k in _INPUT_KEYS) != 1:
        raise _bad(p, "give exactly one of input_shape (numeric inputs) and input (text)")
    if doc["format"] != FORMAT:
        raise _bad(p, f"format must be {FORMAT!r}, got {str(doc['format'])[:40]!r}")
    if doc["version"] != FORMAT_VERSION or not _is_int(doc["version"]):
        raise _bad(p, f"unsupported version {str(doc['version'])[:20]!r} (this advguard reads 1)")
    kind = doc["kind"]
    if not isinstance(kind, str) or kind not in KINDS:
        raise _bad(p, f"unknown detector kind {str(kind)[:40]!r}; known: {', '.join(KINDS)}")
    if not isinstance(doc["params"], dict):
        raise _bad(p, "params must be an object")
    if not _finite_number(doc["threshold"]):
        raise _bad(p, f"threshold must be a finite number, got {str(doc['threshold'])[:40]!r}")
    for key in ("fpr_target", "fpr_calibration"):
        v = doc[key]
        if not _finite_number(v) or not 0.0 <= float(v) <= 1.0:
            raise _bad(p, f"{key} must be a number in [0, 1], got {str(v)[:40]!r}")
    check_fpr(doc["fpr_target"])
    n = doc["n_calibration"]
    if not _is_int(n) or not 1 <= n <= 1 << 40:
        raise _bad(p, f"n_calibration must be a positive integer, got {str(n)[:40]!r}")
    dg = doc["model_digest"]
    if dg is not None and (not isinstance(dg, str) or not 0 < len(dg) <= 200):
        raise _bad(p, "model_digest must be a string of at most 200 characters or null")
    if "input" in doc:
        inp = doc["input"]
        if not isinstance(inp, dict) or set(inp) != {"kind"} or inp["kind"] != "text":
            raise _bad(p, 'input must be {"kind": "text"} (numeric detectors record input_shape)')
        if kind not in TEXT_KINDS:
            raise _bad(p, f"a {kind} detector scores numeric inputs; it cannot be for text")
    else:
        _check_shape(p, doc["input_shape"])
    k = doc["num_classes"]
    if not _is_int(k) or not 2 <= k <= MAX_CLASSES:
        raise _bad(p, f"num_classes must be an integer in [2, {MAX_CLASSES}]")
    sha = doc["arrays_sha256"]
    if not isinstance(sha, str) or len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise _bad(p, "arrays_sha256 must be 64 lowercase hex digits")


def _check_shape(p: Path, shape: object) -> None:
    if (
        not isinstance(shape, list)
        or not 1 <= len(shape) <= MAX_INPUT_DIMS
        or not all(_is_int(d) and 1 <= d <= MAX_INPUT_SIZE for d in shape)
        or math.prod(shape) > MAX_INPUT_SIZE
    ):
        raise _bad(p, f"input_shape must be 1-{MAX_INPUT_DIMS} positive integers")


def _check_keys(p: Path, params: dict[str, Any], allowed: set[str]) -> None:
    extra = sorted(set(params) - allowed)
    if extra:
        raise _bad(p, f"unknown parameter(s) {', '.join(map(repr, extra[:5]))}")
    missing = sorted(allowed - set(params))
    if missing:
        raise _bad(p, f"missing parameter(s) {', '.join(missing)}")


def _build_squeezer(p: Path, spec: object, bounds: tuple[float, float]) -> InputTransform:
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise _bad(p, "each squeezer must be an object with a 'name'")
    name = spec["name"]
    if name not in SQUEEZERS:
        raise _bad(p, f"unknown squeezer {name[:40]!r}; known: {', '.join(SQUEEZERS)}")
    args = {k: v for k, v in spec.items() if k != "name"}
    allowed = {"bit-depth": {"bits"}, "median": {"size"}, "jpeg": {"quality"}}[name]
    _check_keys(p, args, allowed)
    if not all(_is_int(v) for v in args.values()):
        raise _bad(p, f"squeezer {name!r} parameters must be integers")
    try:
        if name == "median":
            return MedianSmoothing(args["size"])
        if name == "bit-depth":
            return BitDepthReduction(args["bits"], bounds=bounds)
        return JpegCompression(args["quality"], bounds=bounds)
    except InputError as e:
        raise _bad(p, f"squeezer {name!r}: {e}") from None


def _read_arrays(path: Path, doc: dict[str, Any], spec: dict[str, tuple[str, int]]) -> dict:
    """Arrays of ``detector.safetensors``; ``spec`` maps name -> (dtype, ndim)."""
    p = path / ARRAYS_NAME
    if not p.is_file():
        raise InputError(f"{path} is not a saved detector (no {ARRAYS_NAME})")
    size = p.stat().st_size
    if size > MAX_ARRAYS_BYTES:
        raise _bad(p, f"{size} bytes, more than the {MAX_ARRAYS_BYTES} allowed")
    with open(p, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise _bad(p, "not a safetensors file (truncated header)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or n + 8 > size:
            raise _bad(p, "not a safetensors file (header size out of range)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise _bad(p, "not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise _bad(p, "not a safetensors file (header is not an object)")
    header.pop("__metadata__", None)
    if set(header) != set(spec):
        raise _bad(
            p,
            f"arrays {sorted(header)[:8]} do not match the {doc['kind']} detector's {sorted(spec)}",
        )
    dtypes = {"float64": "F64", "int64": "I64"}
    for name, (dtype, ndim) in spec.items():
        info = header[name]
        if not isinstance(info, dict):
            raise _bad(p, f"array {name!r}: malformed safetensors header")
        shape = info.get("shape")
        if info.get("dtype") != dtypes[dtype] or not isinstance(shape, list):
            raise _bad(p, f"array {name!r} must be {dtype}")
        if len(shape) != ndim or not all(_is_int(d) and d >= 1 for d in shape):
            raise _bad(p, f"array {name!r} must have {ndim} positive dimension(s), got {shape}")
    if _file_sha256(p) != doc["arrays_sha256"]:
        raise _bad(p, "arrays do not match arrays_sha256 in detector.json (mixed-up or edited)")
    from safetensors.numpy import load_file

    try:
        arrays = load_file(str(p))
    except Exception as e:  # a malformed file: report, never crash
        raise _bad(p, f"not a valid safetensors file ({str(e)[:120]})") from None
    for name, a in arrays.items():
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise _bad(p, f"array {name!r} contains NaN or Inf")
    return arrays


def _restore_mahalanobis(
    p: Path, det: MahalanobisDetector, arrays: dict[str, np.ndarray], num_classes: int
) -> None:
    means, prec, classes = arrays["means"], arrays["precision"], arrays["classes"]
    c, d = means.shape
    if d > MAX_FEATURE_DIM:
        raise _bad(p, f"feature dimension {d} exceeds {MAX_FEATURE_DIM}")
    if prec.shape != (d, d):
        raise _bad(p, f"precision must be {d}x{d} (means are {c}x{d}), got {prec.shape}")
    if classes.shape != (c,) or not 2 <= c <= num_classes:
        raise _bad(p, f"classes must be {c} labels, 2 <= {c} <= num_classes ({num_classes})")
    if classes.min() < 0 or classes.max() >= num_classes or (np.diff(classes) <= 0).any():
        raise _bad(p, "classes must be sorted distinct labels in [0, num_classes)")
    if not np.allclose(prec, prec.T, rtol=1e-6, atol=1e-9 * max(1.0, float(np.abs(prec).max()))):
        raise _bad(p, "precision must be a symmetric matrix")
    x0 = torch.full((1, *det.model.input_shape), float(det.model.bounds[0]))
    got = det.features(x0.to(getattr(det.model, "device", torch.device("cpu"))))
    if got.shape[1] != d:
        raise _bad(p, f"the model's features have dimension {got.shape[1]}, the file has {d}")
    dev = got.device
    det.means = torch.from_numpy(means.copy()).to(dev)
    det.precision = torch.from_numpy(prec.copy()).to(dev)
    det.classes = torch.from_numpy(classes.copy()).to(dev)
    det.fitted = True


def _check_input(pj: Path, doc: dict[str, Any], model: Any) -> None:
    """The model takes what the file's detector scores: strings or numeric inputs of its shape."""
    text_model = is_text_model(model)
    if not text_model:
        for attr in ("input_shape", "num_classes", "bounds", "logits"):
            if not hasattr(model, attr):
                raise InputError(
                    f"load_detector needs a classifier adapter, got {type(model).__name__}"
                )
    if "input" in doc:  # a detector for a text model
        if not text_model:
            raise _bad(
                pj,
                "calibrated for a text model (it scores strings); this model takes numeric "
                f"inputs of shape {tuple(model.input_shape)}",
            )
        return
    if text_model:
        raise _bad(
            pj,
            f"calibrated for numeric inputs of shape {tuple(doc['input_shape'])}; this is a text "
            "model (it takes strings): calibrate a confidence detector on it "
            "(advguard detector calibrate --kind entropy)",
        )
    if tuple(doc["input_shape"]) != tuple(model.input_shape):
        raise _bad(
            pj,
            f"calibrated for inputs {tuple(doc['input_shape'])}, the model takes "
            f"{tuple(model.input_shape)}",
        )


def load_detector(path: str | Path, model: Any, *, digest: str | None = None) -> Detector:
    """Load a detector saved by :func:`save_detector` for ``model`` (validated; see module doc).

    ``digest`` identifies ``model`` (default :func:`model_digest`); it must equal the recorded
    one when the file records a digest.
    """
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"{path} is not a saved detector directory")
    doc = _read_json(path)
    pj = path / JSON_NAME
    _check_top(pj, doc)
    _check_input(pj, doc, model)
    if doc["num_classes"] != int(model.num_classes):
        raise _bad(
            pj, f"calibrated for {doc['num_classes']} classes, model has {model.num_classes}"
        )
    if doc["model_digest"] is not None:
        have = digest if digest is not None else model_digest(model)
        if have is None:
            raise _bad(pj, "calibrated for a specific model; cannot compute this model's digest "
                       "(pass digest=, e.g. the model file's sha256)")  # fmt: skip
        if have != doc["model_digest"]:
            raise _bad(pj, "calibrated for another model (model digest differs); recalibrate")

    kind, params = doc["kind"], doc["params"]
    det: Detector
    try:
        if kind == "feature-squeezing":
            _check_keys(pj, params, {"squeezers"})
            sq = params["squeezers"]
            if not isinstance(sq, list) or not 1 <= len(sq) <= MAX_SQUEEZERS:
                raise _bad(pj, f"squeezers must be a list of 1-{MAX_SQUEEZERS} squeezers")
            det = FeatureSqueezingDetector(
                model, [_build_squeezer(pj, s, model.bounds) for s in sq]
            )
            _read_arrays(path, doc, {})
        elif kind == "confidence":  # numeric or text (_check_input matched the model)
            _check_keys(pj, params, {"kind"})
            if params["kind"] not in ConfidenceDetector.KINDS:
                raise _bad(pj, f"confidence kind must be one of {ConfidenceDetector.KINDS}")
            det = ConfidenceDetector(model, params["kind"])
            _read_arrays(path, doc, {})
        else:  # mahalanobis
            _check_keys(pj, params, {"layer", "shrinkage", "pool"})
            layer, shrink, pool = params["layer"], params["shrinkage"], params["pool"]
            if layer is not None and (not isinstance(layer, str) or len(layer) > 200):
                raise _bad(pj, "layer must be a module name (string) or null")
            if not _finite_number(shrink) or not isinstance(pool, bool):
                raise _bad(pj, "shrinkage must be a number and pool a boolean")
            mdet = MahalanobisDetector(model, layer, shrinkage=float(shrink), pool=pool)
            arrays = _read_arrays(
                path,
                doc,
                {"means": ("float64", 2), "precision": ("float64", 2), "classes": ("int64", 1)},
            )
            _restore_mahalanobis(pj, mdet, arrays, doc["num_classes"])
            det = mdet
    except InputError as e:
        msg = str(e)
        raise (e if msg.startswith(str(path)) else _bad(pj, msg)) from None
    det.threshold = float(doc["threshold"])
    det.calibration = {
        "fpr_target": float(doc["fpr_target"]),
        "n": int(doc["n_calibration"]),
        "rule": "k = ceil((n + 1) * (1 - fpr)); flag score > s_(k)",
        "fpr_on_calibration_set": float(doc["fpr_calibration"]),
    }
    return det


def read_detector_info(path: str | Path) -> dict[str, Any]:
    """The validated ``detector.json`` of a saved detector (no model needed; for display)."""
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"{path} is not a saved detector directory")
    doc = _read_json(path)
    _check_top(path / JSON_NAME, doc)
    return doc


# ---------------------------------------------------------------------------------------------
# one-call calibration (what ``advguard detector calibrate`` runs)
# ---------------------------------------------------------------------------------------------
#: names accepted by :func:`calibrate_detector` (CLI ``--kind``) -> (kind, fixed parameters)
CALIBRATION_KINDS: dict[str, tuple[str, dict[str, Any]]] = {
    "squeeze": ("feature-squeezing", {}),
    "mahalanobis": ("mahalanobis", {}),
    "entropy": ("confidence", {"kind": "entropy"}),
    "max-prob": ("confidence", {"kind": "max_prob"}),
}


def parse_squeezers(text: str) -> list[dict[str, Any]]:
    """``"bit-depth:2,median:2,jpeg:75"`` -> squeezer specs (the one integer parameter each)."""
    arg = {"bit-depth": "bits", "median": "size", "jpeg": "quality"}
    out: list[dict[str, Any]] = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        name, _, value = item.partition(":")
        if name not in arg or not value.strip().isdigit():
            raise InputError(
                f"squeezer {item[:40]!r}: use NAME:INT with NAME one of {', '.join(arg)} "
                "(e.g. bit-depth:2,jpeg:75)"
            )
        out.append({"name": name, arg[name]: int(value)})
    if not out or len(out) > MAX_SQUEEZERS:
        raise InputError(f"give 1-{MAX_SQUEEZERS} squeezers, e.g. bit-depth:2,jpeg:75")
    return out


def _calibration_arrays(
    model: Any, x: Any, y: Any, kind: str, real: str
) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` as arrays: float32 inputs, or a 1-D object array of strings for a text model."""
    if is_text_model(model):
        if real not in TEXT_KINDS:
            raise InputError(
                f"detector kind {kind!r} scores numeric inputs; a text model takes "
                f"{' or '.join(k for k, (r, _) in CALIBRATION_KINDS.items() if r in TEXT_KINDS)}"
            )
        from advguard.attacks.text.model import check_text_labels, check_texts

        texts = check_texts(x, "x")
        xa = np.empty(len(texts), dtype=object)
        xa[:] = texts
        return xa, check_text_labels(y, len(texts), int(model.num_classes), "y")
    xa = np.asarray(torch.as_tensor(x).detach().cpu(), dtype=np.float32)
    ya = np.asarray(torch.as_tensor(y).detach().cpu()).astype(np.int64)
    if len(xa) != len(ya):
        raise InputError(f"{len(xa)} inputs but {len(ya)} labels")
    return xa, ya


def calibrate_detector(
    model: Any,
    x: Any,
    y: Any,
    kind: str,
    *,
    fpr: float = 0.01,
    squeezers: list[dict[str, Any]] | None = None,
    layer: str | None = None,
    shrinkage: float = 0.01,
    fit_fraction: float = 0.5,
    holdout: float = 0.2,
    seed: int = 0,
) -> tuple[Detector, dict[str, Any]]:
    """Build detector ``kind`` (:data:`CALIBRATION_KINDS`), fit and calibrate it on benign data.

    The benign ``(x, y)`` are shuffled (``seed``) and split: a ``holdout`` share is kept back
    to measure the false-positive rate on data that played no part in calibration; of the
    rest, detectors that need fitting (Mahalanobis) are fitted on a ``fit_fraction`` share and
    calibrated on the remainder (never the same samples); others calibrate on all of it.
    ``x`` should not be the model's training data (the model is over-confident there).
    For a text model (``x`` a list of strings) only the confidence kinds (``entropy``,
    ``max-prob``) apply. Returns the calibrated detector and a summary (split sizes, FPR on
    calibration and held-out data).
    """
    if kind not in CALIBRATION_KINDS:
        raise InputError(
            f"unknown detector kind {kind!r}; use one of {', '.join(CALIBRATION_KINDS)}"
        )
    fpr = check_fpr(fpr)
    for name, v, lo, hi in (
        ("fit_fraction", fit_fraction, 0.05, 0.95),
        ("holdout", holdout, 0.0, 0.9),
    ):
        if not _finite_number(v) or not lo <= float(v) <= hi:
            raise InputError(f"{name} must be a number in [{lo}, {hi}], got {v!r}")
    real, fixed = CALIBRATION_KINDS[kind]
    xa, ya = _calibration_arrays(model, x, y, kind, real)
    perm = np.random.default_rng(seed).permutation(len(xa))
    n_hold = round(holdout * len(xa))
    hold, rest = perm[:n_hold], perm[n_hold:]
    det: Detector
    fit_idx: np.ndarray = rest[:0]
    if real == "feature-squeezing":
        specs = squeezers if squeezers is not None else [
            {"name": "bit-depth", "bits": 1}, {"name": "median", "size": 2}
        ]  # fmt: skip
        det = FeatureSqueezingDetector(
            model, [_build_squeezer(Path("squeezers"), s, model.bounds) for s in specs]
        )
        cal_idx = rest
    elif real == "confidence":
        det = ConfidenceDetector(model, **fixed)
        cal_idx = rest
    else:
        det = MahalanobisDetector(model, layer, shrinkage=shrinkage)
        n_fit = round(fit_fraction * len(rest))
        fit_idx, cal_idx = rest[:n_fit], rest[n_fit:]
        det.fit(xa[fit_idx], ya[fit_idx])
    thr = det.calibrate(xa[cal_idx], fpr)
    summary: dict[str, Any] = {
        "kind": real,
        "threshold": thr,
        "fpr_target": fpr,
        "n_fit": len(fit_idx),
        "n_calibration": len(cal_idx),
        "fpr_calibration": det.calibration["fpr_on_calibration_set"] if det.calibration else None,
        "n_heldout": len(hold),
        "fpr_heldout": float(det.detect(xa[hold]).mean()) if len(hold) else None,
    }
    return det, summary
