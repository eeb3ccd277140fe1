"""Safe model loading and saving: advguard never unpickles.

Formats
-------
``.safetensors``
    PyTorch weights (:func:`save_torch` / :func:`load_torch`). The architecture
    comes from a *factory*: ``"package.module:callable"`` (imported, so it must
    be code you trust) or a callable, returning an ``nn.Module``.
``.pt`` / ``.pth`` / ``.ckpt`` / ``.bin``
    A plain state dict saved with ``torch.save(model.state_dict(), path)``;
    read only with ``torch.load(..., weights_only=True)``. Files that need
    arbitrary classes (a whole pickled module, custom objects) are refused.
TorchScript archives
    Only through the explicit :func:`load_torchscript` (or ``torchscript=True``
    in :func:`load_model`): the archive carries the model's code and runs it.
``.onnx``
    :func:`load_onnx` (onnxruntime); :func:`export_onnx` writes one.
``.skops``
    scikit-learn models (:func:`load_sklearn`); types outside skops' trusted
    set are refused unless listed in ``trusted_types``.
``.pkl`` / ``.pickle`` / ``.joblib``
    Always refused, without opening the file.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import re
import warnings
import zipfile
from collections.abc import Callable, Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import torch
from torch import nn

from advguard.errors import InputError, MissingDependencyError, UnsafeFileError
from advguard.models.onnx_model import META_BOUNDS, OnnxClassifier
from advguard.models.sklearn_model import SklearnClassifier
from advguard.models.torch_model import TorchClassifier

PathType = str | PathLike[str]
Factory = str | Callable[..., nn.Module]

PICKLE_SUFFIXES = frozenset({".pkl", ".pickle", ".joblib"})
TORCH_SUFFIXES = frozenset({".pt", ".pth", ".ckpt", ".bin"})
SAFETENSORS_SUFFIX = ".safetensors"

#: Oldest torch whose ``weights_only=True`` loader we trust (CVE-2025-32434 and
#: later weights_only bypasses are fixed before it).
MIN_TORCH_WEIGHTS_ONLY = (2, 10)

#: Metadata keys stored in ``.safetensors`` files by :func:`save_torch`.
META_PREFIX = "advguard."

PICKLE_MESSAGE = (
    "{path}: pickle can execute arbitrary code when loaded; advguard never loads it. "
    "Save scikit-learn models with skops (skops.io.dump), torch models as safetensors, "
    "or export to ONNX."
)

RESAVE_SNIPPET = (
    "    from safetensors.torch import save_file\n"
    "    save_file(model.state_dict(), 'model.safetensors')"
)


# -- small helpers -----------------------------------------------------------
def file_sha256(path: PathType) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB chunks)."""
    p = _existing_file(path)
    h = hashlib.sha256()
    with p.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _existing_file(path: PathType) -> Path:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"model file not found: {p}")
    return p


def _refuse_pickle(path: PathType) -> None:
    if Path(path).suffix.lower() in PICKLE_SUFFIXES:
        raise UnsafeFileError(PICKLE_MESSAGE.format(path=path))


def _torch_version() -> str:
    return torch.__version__


def _check_torch_version() -> None:
    m = re.match(r"(\d+)\.(\d+)", _torch_version())
    version = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
    if version < MIN_TORCH_WEIGHTS_ONLY:
        need = ".".join(map(str, MIN_TORCH_WEIGHTS_ONLY))
        raise UnsafeFileError(
            f"torch {_torch_version()} is older than {need}; its weights_only loader has known "
            f"bypasses (e.g. CVE-2025-32434), so advguard will not read .pt files with it. "
            f"Upgrade torch to >= {need}, or convert the weights to safetensors:\n" + RESAVE_SNIPPET
        )


def is_torchscript_archive(path: PathType) -> bool:
    """True when ``path`` is a TorchScript zip (has ``constants.pkl`` and ``code/``).

    Only reads the zip directory; nothing is deserialized.
    """
    p = Path(path)
    if not p.is_file() or not zipfile.is_zipfile(p):
        return False
    try:
        with zipfile.ZipFile(p) as zf:
            names = zf.namelist()
    except zipfile.BadZipFile:
        return False
    has_constants = any(n.split("/")[-1] == "constants.pkl" for n in names)
    has_code = any("/code/" in f"/{n}" for n in names)
    return has_constants and has_code


def resolve_factory(factory: Factory) -> Callable[..., nn.Module]:
    """Turn ``"package.module:callable"`` into the callable (imports the module).

    The module is imported, i.e. its code runs: name only code you trust.
    """
    if callable(factory):
        return factory
    if not isinstance(factory, str) or factory.count(":") != 1:
        raise InputError(
            f"factory must be 'package.module:callable' (e.g. 'advguard.models.zoo:small_cnn') "
            f"or a callable, got {factory!r}"
        )
    mod_name, attr = (s.strip() for s in factory.split(":"))
    if not mod_name or not attr:
        raise InputError(f"factory {factory!r} must name both a module and a callable")
    try:
        obj: Any = importlib.import_module(mod_name)
    except ImportError as exc:
        raise InputError(f"factory {factory!r}: cannot import module {mod_name!r} ({exc})") from exc
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise InputError(
                f"factory {factory!r}: module {mod_name!r} has no attribute {attr!r}"
            ) from exc
    if not callable(obj):
        raise InputError(f"factory {factory!r} is not callable ({type(obj).__name__})")
    return obj


def _build_module(factory: Factory, factory_kwargs: Mapping[str, Any] | None) -> nn.Module:
    fn = resolve_factory(factory)
    try:
        module = fn(**dict(factory_kwargs or {}))
    except TypeError as exc:
        raise InputError(f"factory {factory!r} rejected factory_kwargs ({exc})") from exc
    if not isinstance(module, nn.Module):
        raise InputError(
            f"factory {factory!r} returned {type(module).__name__}, not a torch.nn.Module"
        )
    return module


# -- torch: safetensors and weights-only state dicts ------------------------------
def save_torch(
    model: nn.Module | TorchClassifier,
    path: PathType,
    *,
    factory: str | None = None,
    factory_kwargs: Mapping[str, Any] | None = None,
    input_shape: Sequence[int] | None = None,
    num_classes: int | None = None,
    bounds: tuple[float, float] | None = None,
) -> Path:
    """Save a module's ``state_dict`` as ``.safetensors`` with advguard metadata.

    ``model`` may be a :class:`TorchClassifier`; its ``input_shape``,
    ``num_classes`` and ``bounds`` then fill the metadata unless given. Its
    ``preprocess`` is *not* saved (it is code: pass it again to
    :func:`load_torch`). ``factory``/``factory_kwargs`` are recorded so
    :func:`load_torch` can rebuild the architecture without being told.
    """
    from safetensors.torch import save_file

    module = model
    if isinstance(model, TorchClassifier):
        module = model.module
        input_shape = model.input_shape if input_shape is None else input_shape
        num_classes = model.num_classes if num_classes is None else num_classes
        bounds = model.bounds if bounds is None else bounds
    if not isinstance(module, nn.Module):
        raise InputError(f"save_torch needs an nn.Module or TorchClassifier, got {type(model)}")
    p = Path(path)
    if p.suffix.lower() != SAFETENSORS_SUFFIX:
        raise InputError(f"save_torch writes safetensors; use a '.safetensors' path, got {p}")

    tensors: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for name, t in module.state_dict().items():
        t = t.detach().to("cpu")
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        # safetensors refuses tensors sharing memory (tied weights): store copies
        t = t.clone() if key in seen else t.contiguous()
        seen.add(key)
        tensors[name] = t

    meta: dict[str, str] = {META_PREFIX + "format": "torch-state-dict"}
    if factory is not None:
        if not isinstance(factory, str):
            raise InputError("factory metadata must be a 'package.module:callable' string")
        meta[META_PREFIX + "factory"] = factory
    if factory_kwargs is not None:
        meta[META_PREFIX + "factory_kwargs"] = json.dumps(dict(factory_kwargs))
    if input_shape is not None:
        meta[META_PREFIX + "input_shape"] = json.dumps([int(d) for d in input_shape])
    if num_classes is not None:
        meta[META_PREFIX + "num_classes"] = str(int(num_classes))
    if bounds is not None:
        meta[META_PREFIX + "bounds"] = json.dumps([float(bounds[0]), float(bounds[1])])
    p.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(p), metadata=meta)
    return p


def read_safetensors_metadata(path: PathType) -> dict[str, Any]:
    """advguard metadata of a ``.safetensors`` file, decoded (keys without prefix)."""
    from safetensors import safe_open

    p = _existing_file(path)
    try:
        with safe_open(str(p), framework="pt") as f:
            raw = f.metadata() or {}
    except Exception as exc:
        raise InputError(f"{p} is not a valid safetensors file ({exc})") from exc
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if not key.startswith(META_PREFIX):
            continue
        name = key[len(META_PREFIX) :]
        try:
            out[name] = value if name in ("factory", "format") else json.loads(value)
        except json.JSONDecodeError:
            out[name] = value
    return out


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    suffix = path.suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:
            raise InputError(f"{path} is not a valid safetensors file ({exc})") from exc
    if suffix not in TORCH_SUFFIXES:
        raise InputError(
            f"unsupported weights file {path}: use .safetensors (preferred) or a state dict "
            f"saved with torch.save ({', '.join(sorted(TORCH_SUFFIXES))})"
        )
    if is_torchscript_archive(path):
        raise InputError(
            f"{path} is a TorchScript archive, not a state dict. It contains code that runs "
            "when loaded; if you trust it, load it explicitly with "
            "advguard.models.io.load_torchscript (or load_model(..., torchscript=True))."
        )
    _check_torch_version()
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UnsafeFileError(
            f"{path} cannot be read as plain weights (torch.load with weights_only=True "
            f"failed: {str(exc).splitlines()[0][:200]}). It needs unpickling of arbitrary "
            "Python objects, which can run code, so advguard refuses it. If the file is "
            "yours, load it in a trusted session and re-save the weights as safetensors:\n"
            + RESAVE_SNIPPET
        ) from None
    return _as_state_dict(obj, path)


def _as_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        # common checkpoint layouts: {"state_dict": {...}, "epoch": 3, ...}
        for key in ("state_dict", "model_state_dict"):
            inner = obj.get(key)
            if isinstance(inner, Mapping):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise InputError(
            f"{path} does not hold a state dict (a mapping of names to tensors), found "
            f"{type(obj).__name__}; save it with torch.save(model.state_dict(), path)"
        )
    return dict(obj)


def _apply_state_dict(module: nn.Module, state: Mapping[str, torch.Tensor], path: Path) -> None:
    expected = set(module.state_dict().keys())
    got = set(state.keys())
    missing, unexpected = sorted(expected - got), sorted(got - expected)
    if missing or unexpected:

        def show(keys: list[str]) -> str:
            return ", ".join(keys[:10]) + (f" (+{len(keys) - 10} more)" if len(keys) > 10 else "")

        parts = []
        if missing:
            parts.append(f"missing keys: {show(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {show(unexpected)}")
        raise InputError(
            f"weights in {path} do not match the factory's architecture; "
            + "; ".join(parts)
            + ". Check the factory and factory_kwargs."
        )
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise InputError(
            f"weights in {path} do not match the factory's architecture: {exc}"
        ) from exc


def load_torch(
    factory: Factory | None,
    weights: PathType,
    *,
    factory_kwargs: Mapping[str, Any] | None = None,
    input_shape: Sequence[int] | None = None,
    num_classes: int | None = None,
    bounds: tuple[float, float] | None = None,
    preprocess: nn.Module | None = None,
    device: str | torch.device | None = None,
) -> TorchClassifier:
    """Build the module with ``factory`` and load ``weights`` strictly.

    ``weights`` is a ``.safetensors`` file, or a ``.pt/.pth/.ckpt/.bin`` state
    dict read with ``torch.load(weights_only=True)`` only (never a fallback).
    ``factory``, ``factory_kwargs``, ``input_shape``, ``num_classes`` and
    ``bounds`` default to the metadata :func:`save_torch` stored in a
    safetensors file; ``bounds`` finally defaults to ``(0, 1)``.
    """
    _refuse_pickle(weights)
    path = _existing_file(weights)
    meta = read_safetensors_metadata(path) if path.suffix.lower() == SAFETENSORS_SUFFIX else {}
    factory = factory if factory is not None else meta.get("factory")
    if factory is None:
        raise InputError(
            f"load_torch needs a factory ('package.module:callable' building the nn.Module) "
            f"for {path}; none given and none stored in the file"
        )
    if factory_kwargs is None and factory == meta.get("factory"):
        factory_kwargs = meta.get("factory_kwargs")
    input_shape = input_shape if input_shape is not None else meta.get("input_shape")
    num_classes = num_classes if num_classes is not None else meta.get("num_classes")
    bounds = bounds if bounds is not None else meta.get("bounds", (0.0, 1.0))
    if input_shape is None or num_classes is None:
        raise InputError(
            f"load_torch needs input_shape and num_classes for {path} (not stored in the file)"
        )

    state = _load_state_dict(path)
    module = _build_module(factory, factory_kwargs)
    _apply_state_dict(module, state, path)
    return TorchClassifier(
        module,
        input_shape=tuple(input_shape),
        num_classes=int(num_classes),
        bounds=(float(bounds[0]), float(bounds[1])),
        preprocess=preprocess,
        device=device,
    )


def load_torchscript(
    path: PathType,
    *,
    input_shape: Sequence[int],
    num_classes: int,
    bounds: tuple[float, float] = (0.0, 1.0),
    preprocess: nn.Module | None = None,
    device: str | torch.device | None = None,
) -> TorchClassifier:
    """Load a TorchScript archive (``torch.jit.save``) as a white-box classifier.

    TorchScript's loader restores only TorchScript types, but the archive ships
    the model's code and that code runs: load only archives you trust.
    """
    _refuse_pickle(path)
    p = _existing_file(path)
    if not is_torchscript_archive(p):
        raise InputError(
            f"{p} is not a TorchScript archive (no constants.pkl and code/ inside); "
            "for a state dict use load_torch with a factory"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(str(p), map_location=device or "cpu")
    except Exception as exc:
        raise InputError(f"could not load TorchScript archive {p} ({exc})") from exc
    return TorchClassifier(
        module,
        input_shape=tuple(input_shape),
        num_classes=num_classes,
        bounds=bounds,
        preprocess=preprocess,
        device=device,
    )


# -- ONNX ----------------------------------------------------------------------------
def load_onnx(path: PathType | bytes, **kwargs: Any) -> OnnxClassifier:
    """Load an ONNX model; ``kwargs`` go to :class:`OnnxClassifier`."""
    if not isinstance(path, bytes | bytearray):
        _refuse_pickle(path)
        path = _existing_file(path)
    return OnnxClassifier(path, **kwargs)


class _Exported(nn.Module):
    def __init__(self, preprocess: nn.Module | None, module: nn.Module) -> None:
        super().__init__()
        self.preprocess = preprocess
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.preprocess is not None:
            x = self.preprocess(x)
        return self.module(x)


def export_onnx(
    classifier: TorchClassifier,
    path: PathType,
    *,
    opset_version: int = 17,
    input_name: str = "input",
    output_name: str = "logits",
) -> Path:
    """Export a :class:`TorchClassifier` (preprocess included) to ONNX.

    The batch dimension is dynamic; the output holds logits. ``bounds`` are
    stored in the model metadata so :class:`OnnxClassifier` picks them up.
    Uses torch's TorchScript-based exporter (no ``onnxscript`` needed).
    """
    if not isinstance(classifier, TorchClassifier):
        raise InputError(f"export_onnx needs a TorchClassifier, got {type(classifier).__name__}")
    try:
        import onnx
    except ImportError as exc:
        raise MissingDependencyError("onnx", "onnx", "export_onnx") from exc
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    wrapper = _Exported(classifier.preprocess, classifier.module).eval()
    lo, hi = classifier.bounds
    dummy = torch.full(
        (2, *classifier.input_shape), (lo + hi) / 2.0, device=classifier.device, dtype=torch.float32
    )
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapper,
                (dummy,),
                str(p),
                dynamo=False,
                input_names=[input_name],
                output_names=[output_name],
                dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}},
                opset_version=opset_version,
            )
    except Exception as exc:
        raise InputError(f"ONNX export failed: {exc}") from exc
    proto = onnx.load(str(p))
    for key, value in ((META_BOUNDS, json.dumps([lo, hi])), ("advguard.output", "logits")):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(p))
    return p


# -- scikit-learn via skops ------------------------------------------------------
def load_sklearn(
    path: PathType,
    *,
    trusted_types: Sequence[str] | None = None,
    input_shape: Sequence[int] | None = None,
    bounds: tuple[float, float] = (0.0, 1.0),
    num_classes: int | None = None,
    class_mapping: Mapping[Any, int] | None = None,
) -> SklearnClassifier:
    """Load a ``.skops`` file (``skops.io.dump``) as a :class:`SklearnClassifier`.

    Types outside skops' default trusted set are refused unless every one of
    them is listed in ``trusted_types`` (review them first: trusting a type lets
    the file construct it).
    """
    _refuse_pickle(path)
    p = _existing_file(path)
    try:
        import skops.io as sio
    except ImportError as exc:
        raise MissingDependencyError("skops", "skops", "Loading scikit-learn models") from exc
    try:
        untrusted = list(sio.get_untrusted_types(file=str(p)))
    except Exception as exc:
        raise InputError(f"{p} is not a valid skops file ({exc})") from exc
    allowed = set(trusted_types or ())
    refused = sorted(t for t in untrusted if t not in allowed)
    if refused:
        raise UnsafeFileError(
            f"{p} contains types that skops does not trust by default: {refused}. "
            "Review them and, if you trust them, pass trusted_types=[...] listing them."
        )
    try:
        estimator = sio.load(str(p), trusted=untrusted or None)
    except Exception as exc:
        raise InputError(f"could not load skops file {p} ({exc})") from exc
    return SklearnClassifier(
        estimator,
        input_shape=input_shape,
        bounds=bounds,
        num_classes=num_classes,
        class_mapping=class_mapping,
    )


# -- one entry point ---------------------------------------------------------------
_FACTORY_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def load_model(path_or_spec: PathType, **kwargs: Any) -> Any:
    """Load any supported model by file type (the CLI's single entry point).

    - ``.onnx`` -> :func:`load_onnx`; ``.skops`` -> :func:`load_sklearn`
    - ``.safetensors`` -> :func:`load_torch` (``factory=`` kw, or from metadata)
    - ``.pt/.pth/.ckpt/.bin`` with ``factory=`` -> :func:`load_torch` (weights-only);
      with ``torchscript=True`` -> :func:`load_torchscript`
    - ``"package.module:callable"`` with ``weights=PATH`` -> :func:`load_torch`
    - ``.pkl/.pickle/.joblib`` -> :class:`UnsafeFileError` (the file is never opened)

    Remaining keyword arguments go to the chosen loader.
    """
    spec = str(path_or_spec)
    _refuse_pickle(spec)
    torchscript = bool(kwargs.pop("torchscript", False))
    p = Path(spec)
    if not p.exists() and _FACTORY_SPEC.match(spec):
        weights = kwargs.pop("weights", None)
        if weights is None:
            raise InputError(f"factory spec {spec!r} needs weights=PATH (a .safetensors file)")
        _check_kwargs(load_torch, kwargs, "torch weights")
        return load_torch(spec, weights, **kwargs)
    p = _existing_file(p)
    suffix = p.suffix.lower()
    if torchscript:
        _check_kwargs(load_torchscript, kwargs, "a TorchScript archive")
        return load_torchscript(p, **kwargs)
    if suffix == ".onnx":
        _check_kwargs(OnnxClassifier.__init__, kwargs, "an ONNX model")
        return load_onnx(p, **kwargs)
    if suffix == ".skops":
        _check_kwargs(load_sklearn, kwargs, "a skops file")
        return load_sklearn(p, **kwargs)
    if suffix == SAFETENSORS_SUFFIX or (suffix in TORCH_SUFFIXES and "factory" in kwargs):
        _check_kwargs(load_torch, kwargs, "torch weights", extra=("factory",))
        return load_torch(kwargs.pop("factory", None), p, **kwargs)
    if suffix in TORCH_SUFFIXES:
        if is_torchscript_archive(p):
            raise InputError(
                f"{p} is a TorchScript archive; it contains code that runs when loaded. "
                "If you trust it, pass torchscript=True."
            )
        raise InputError(
            f"{p} is a torch weights file; pass factory='package.module:callable' "
            "(plus input_shape and num_classes) to rebuild the architecture"
        )
    raise InputError(
        f"unsupported model file {p}: expected .onnx, .skops, .safetensors, "
        f".pt/.pth/.ckpt/.bin (state dict or TorchScript)"
    )


def _check_kwargs(
    fn: Callable[..., Any], kwargs: Mapping[str, Any], what: str, extra: tuple[str, ...] = ()
) -> None:
    params = inspect.signature(fn).parameters
    allowed = {name for name, prm in params.items() if prm.kind == prm.KEYWORD_ONLY}
    allowed.update(extra)
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise InputError(
            f"option(s) {unknown} do not apply to {what}; valid options: {sorted(allowed)}"
        )
