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

Security: a model file is data
------------------------------
No code named by a model file is ever imported or called. A safetensors file
may *record* the factory it was saved with (``advguard.factory``), but only the
factories of advguard's own zoo (:data:`ZOO_FACTORIES`) are built from that
record, and without ``importlib``. Any other factory must be passed explicitly
by the caller (``factory=`` / ``--factory``); a file that names one is refused
with a message saying how. Explicit factory strings must be dotted identifiers
(``pkg.mod:callable``). The metadata (shape, classes, bounds, factory keyword
arguments) is validated as plain JSON data; the architecture a file's keyword
arguments describe is first built on the ``meta`` device and checked against
the stored tensors, so a file cannot make advguard allocate memory it does not
hold. Weights with NaN/Inf are refused. TorchScript archives run TorchScript
code in torch's TorchScript interpreter, which cannot import Python modules or
call Python functions; they are loaded only on explicit request
(``torchscript=True`` / ``--torchscript``).
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import math
import re
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from os import PathLike
from pathlib import Path
from typing import Any

import torch
from torch import nn

from advguard.errors import InputError, MissingDependencyError, UnsafeFileError
from advguard.models.devices import resolve_device
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


#: The only factories a model file's metadata may name: advguard's own zoo. They are
#: looked up in this table, never imported by a name read from the file.
ZOO_MODULE = "advguard.models.zoo"
ZOO_FACTORIES = frozenset({"small_cnn", "trades_cnn", "mlp"})

#: A factory spec: dotted identifiers ``pkg.mod:callable`` (ASCII only, bounded length).
_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_FACTORY_SPEC = re.compile(rf"^{_IDENT}(?:\.{_IDENT})*:{_IDENT}(?:\.{_IDENT})*$")
_MAX_SPEC_LEN = 300

#: Option names used in error messages; the CLI swaps in its own (``--factory``...).
PY_OPTION_NAMES: dict[str, str] = {
    "factory": "factory=",
    "factory_kwargs": "factory_kwargs=",
    "input_shape": "input_shape=",
    "num_classes": "num_classes=",
    "bounds": "bounds=",
    "torchscript": "torchscript=True",
    "device": "device=",
}
CLI_OPTION_NAMES: dict[str, str] = {
    "factory": "--factory",
    "factory_kwargs": "(factory keyword arguments are not settable from the CLI)",
    "input_shape": "--input-shape",
    "num_classes": "--num-classes",
    "bounds": "--bounds",
    "torchscript": "--torchscript",
    "device": "--device",
}
_option_names: ContextVar[Mapping[str, str]] = ContextVar(
    "advguard_option_names", default=PY_OPTION_NAMES
)


@contextmanager
def option_names(names: Mapping[str, str]) -> Iterator[None]:
    """Within the block, loader error messages name options as in ``names``.

    The CLI uses ``option_names(CLI_OPTION_NAMES)`` so a message says ``--input-shape``
    rather than the Python keyword ``input_shape=``.
    """
    token = _option_names.set({**PY_OPTION_NAMES, **names})
    try:
        yield
    finally:
        _option_names.reset(token)


def _opt(name: str) -> str:
    return _option_names.get().get(name, name)


def is_zoo_factory(spec: object) -> bool:
    """True when ``spec`` is exactly ``"advguard.models.zoo:<name>"`` for a zoo factory."""
    if not isinstance(spec, str) or spec.count(":") != 1:
        return False
    mod, attr = spec.split(":")
    return mod == ZOO_MODULE and attr in ZOO_FACTORIES


def check_factory_spec(spec: object) -> str:
    """Validate a factory spec's *syntax* (dotted identifiers ``pkg.mod:callable``)."""
    if not isinstance(spec, str) or len(spec) > _MAX_SPEC_LEN or not _FACTORY_SPEC.fullmatch(spec):
        shown = repr(spec)[:80] if isinstance(spec, str) else type(spec).__name__
        raise InputError(
            f"{_opt('factory')} must be 'package.module:callable' made of Python identifiers "
            f"(e.g. advguard.models.zoo:small_cnn), got {shown}"
        )
    return spec


def _zoo_callable(spec: str) -> Callable[..., nn.Module]:
    from advguard.models import zoo

    table: dict[str, Callable[..., nn.Module]] = {
        "small_cnn": zoo.small_cnn,
        "trades_cnn": zoo.trades_cnn,
        "mlp": zoo.mlp,
    }
    return table[spec.split(":")[1]]


def resolve_factory(factory: Factory) -> Callable[..., nn.Module]:
    """Turn a factory the *caller chose* into the callable.

    ``factory`` is a callable, or ``"package.module:callable"`` (dotted identifiers only),
    which imports the module, i.e. its code runs: name only code you trust, and never pass
    a string read from a file here (zoo factories are resolved without importing).
    """
    if callable(factory):
        return factory
    spec = check_factory_spec(factory)
    if is_zoo_factory(spec):
        return _zoo_callable(spec)
    mod_name, attr = spec.split(":")
    try:
        obj: Any = importlib.import_module(mod_name)
    except ImportError as exc:
        raise InputError(
            f"factory {spec!r}: cannot import module {mod_name!r} ({str(exc)[:200]})"
        ) from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise InputError(
                f"factory {spec!r}: module {mod_name!r} has no attribute {attr!r}"
            ) from None
    if not callable(obj):
        raise InputError(f"factory {spec!r} is not callable ({type(obj).__name__})")
    return obj


def _call_factory(fn: Callable[..., nn.Module], label: str, kwargs: Mapping[str, Any]) -> Any:
    try:
        return fn(**dict(kwargs))
    except TypeError as exc:
        raise InputError(f"factory {label!r} rejected its keyword arguments ({exc})") from None
    except InputError:
        raise
    except (ValueError, RuntimeError) as exc:
        raise InputError(f"factory {label!r} failed: {str(exc).splitlines()[0][:200]}") from None


def _build_module(
    factory: Factory,
    factory_kwargs: Mapping[str, Any] | None,
    *,
    expected: Mapping[str, torch.Tensor] | None = None,
    path: Path | None = None,
) -> nn.Module:
    """Call the factory; with ``expected`` (keyword arguments came from a file), first build
    the architecture on the ``meta`` device and check it against the stored tensors, so a
    file's keyword arguments cannot make us allocate more memory than the file holds."""
    fn = resolve_factory(factory)
    label = factory if isinstance(factory, str) else getattr(factory, "__name__", "factory")
    kwargs = dict(factory_kwargs or {})
    if expected is not None:
        with torch.device("meta"):
            probe = _call_factory(fn, label, kwargs)
        if not isinstance(probe, nn.Module):
            raise InputError(
                f"factory {label!r} returned {type(probe).__name__}, not a torch.nn.Module"
            )
        _check_against(probe, expected, path or Path("<weights>"))
        del probe
    module = _call_factory(fn, label, kwargs)
    if not isinstance(module, nn.Module):
        raise InputError(
            f"factory {label!r} returned {type(module).__name__}, not a torch.nn.Module"
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
            f"{path} is a TorchScript archive, not a state dict. It carries TorchScript code "
            f"that runs when loaded; if you trust it, load it with {_opt('torchscript')} "
            f"(plus {_opt('input_shape')} and {_opt('num_classes')}) instead of {_opt('factory')}"
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


def _key_mismatch(expected: set[str], got: set[str]) -> str | None:
    missing, unexpected = sorted(expected - got), sorted(got - expected)
    if not missing and not unexpected:
        return None

    def show(keys: list[str]) -> str:
        return ", ".join(keys[:10]) + (f" (+{len(keys) - 10} more)" if len(keys) > 10 else "")

    parts = []
    if missing:
        parts.append(f"missing keys: {show(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {show(unexpected)}")
    return "; ".join(parts)


def _check_against(module: nn.Module, state: Mapping[str, torch.Tensor], path: Path) -> None:
    """Keys and shapes of ``module``'s state dict must equal the stored tensors'."""
    mine = module.state_dict()
    problem = _key_mismatch(set(mine), set(state))
    if problem is None:
        bad = [k for k, t in mine.items() if tuple(t.shape) != tuple(state[k].shape)]
        if bad:
            k = bad[0]
            problem = (
                f"{len(bad)} tensor(s) differ in shape, e.g. {k!r}: architecture "
                f"{tuple(mine[k].shape)}, file {tuple(state[k].shape)}"
            )
    if problem is not None:
        raise InputError(
            f"weights in {path} do not match the factory's architecture; {problem}. "
            f"Check {_opt('factory')} and the factory's keyword arguments."
        )


def _apply_state_dict(module: nn.Module, state: Mapping[str, torch.Tensor], path: Path) -> None:
    _check_against(module, state, path)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise InputError(
            f"weights in {path} do not match the factory's architecture: "
            f"{str(exc).splitlines()[0][:300]}"
        ) from None


def check_finite_weights(state: Mapping[str, torch.Tensor], where: object) -> None:
    """Refuse weights holding NaN or Inf: such a model's outputs are meaningless."""
    bad = [
        k
        for k, t in state.items()
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all())
    ]
    if bad:
        more = f" (+{len(bad) - 5} more)" if len(bad) > 5 else ""
        raise InputError(
            f"weights in {where} contain NaN or Inf ({', '.join(bad[:5])}{more}); the model is "
            "broken, so advguard refuses to evaluate it. Retrain or fix the weights."
        )


# -- metadata of a safetensors file: plain data, validated ---------------------------
_MAX_DIMS = 8
_MAX_DIM = 1 << 20
_MAX_INPUT_ELEMENTS = 1 << 28
_MAX_CLASSES = 1_000_000
_MAX_KWARGS_CHARS = 10_000


def _meta_error(path: Path, key: str, expected: str, value: object) -> InputError:
    return InputError(
        f"{path}: malformed metadata advguard.{key}: expected {expected}, got {repr(value)[:60]}"
    )


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _json_depth(v: object, depth: int = 0) -> int:
    if isinstance(v, dict):
        return max((_json_depth(x, depth + 1) for x in v.values()), default=depth + 1)
    if isinstance(v, list):
        return max((_json_depth(x, depth + 1) for x in v), default=depth + 1)
    return depth


def validated_metadata(meta: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """Check the advguard metadata of a safetensors file; raise a one-line InputError.

    Returns only the keys advguard uses, with checked types: ``factory`` (syntax only; whether
    it may be *built* is decided by :func:`load_torch`), ``factory_kwargs`` (a small JSON
    object), ``input_shape`` (1-8 positive ints), ``num_classes`` (int >= 2) and ``bounds``
    (two finite numbers, low < high).
    """
    out: dict[str, Any] = {}
    if "factory" in meta:
        f = meta["factory"]
        if not isinstance(f, str) or len(f) > _MAX_SPEC_LEN or not _FACTORY_SPEC.fullmatch(f):
            raise _meta_error(path, "factory", "'package.module:callable'", f)
        out["factory"] = f
    if "factory_kwargs" in meta and meta["factory_kwargs"] is not None:
        kw = meta["factory_kwargs"]
        if (
            not isinstance(kw, dict)
            or not all(isinstance(k, str) and k.isidentifier() for k in kw)
            or len(json.dumps(kw)) > _MAX_KWARGS_CHARS
            or _json_depth(kw) > 4
        ):
            raise _meta_error(path, "factory_kwargs", "a small JSON object of keywords", kw)
        out["factory_kwargs"] = kw
    if "input_shape" in meta:
        shape = meta["input_shape"]
        if (
            not isinstance(shape, list)
            or not 1 <= len(shape) <= _MAX_DIMS
            or not all(_is_int(d) and 1 <= d <= _MAX_DIM for d in shape)
            or math.prod(shape) > _MAX_INPUT_ELEMENTS
        ):
            raise _meta_error(path, "input_shape", "a list of 1-8 positive integers", shape)
        out["input_shape"] = tuple(shape)
    if "num_classes" in meta:
        n = meta["num_classes"]
        if not _is_int(n) or not 2 <= n <= _MAX_CLASSES:
            raise _meta_error(path, "num_classes", f"an integer in [2, {_MAX_CLASSES}]", n)
        out["num_classes"] = n
    if "bounds" in meta:
        b = meta["bounds"]
        ok = (
            isinstance(b, list)
            and len(b) == 2
            and all(isinstance(v, int | float) and not isinstance(v, bool) for v in b)
            and all(math.isfinite(float(v)) for v in b)
            and float(b[0]) < float(b[1])
        )
        if not ok:
            raise _meta_error(path, "bounds", "[low, high] with finite low < high", b)
        out["bounds"] = (float(b[0]), float(b[1]))
    return out


def _shape_kwargs(
    factory: Factory, input_shape: Sequence[int], num_classes: int
) -> dict[str, Any] | None:
    """``{input_shape, num_classes}`` when the factory takes both (the zoo's convention)."""
    try:
        params = inspect.signature(resolve_factory(factory)).parameters
    except (TypeError, ValueError):
        return None
    if "input_shape" in params and "num_classes" in params:
        return {"input_shape": [int(d) for d in input_shape], "num_classes": int(num_classes)}
    return None


def _what(names: list[str]) -> str:
    human = {"input_shape": "the input shape", "num_classes": "the number of classes"}
    return " and ".join(human.get(n, n) for n in names)


def _missing(**values: object) -> list[str]:
    return [name for name, v in values.items() if v is None]


def _explicit(name: str, value: str) -> str:
    flag = _opt(name)
    return f"{flag} {value}" if flag.startswith("--") else f"{name}={value!r}"


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
    ``input_shape``, ``num_classes`` and ``bounds`` default to the metadata
    :func:`save_torch` stored in a safetensors file; ``bounds`` finally defaults
    to ``(0, 1)``.

    ``factory`` defaults to the file's recorded factory **only if it is one of
    advguard's zoo factories** (:data:`ZOO_FACTORIES`); any other recorded
    factory is refused (:class:`UnsafeFileError`) until the caller passes it
    explicitly: a model file never chooses code to run. The recorded
    ``factory_kwargs`` (JSON data) are used when the factory in effect is the
    recorded one; the architecture they describe is checked on the ``meta``
    device against the stored tensors before anything is allocated.
    """
    _refuse_pickle(weights)
    path = _existing_file(weights)
    meta = (
        validated_metadata(read_safetensors_metadata(path), path)
        if path.suffix.lower() == SAFETENSORS_SUFFIX
        else {}
    )
    recorded = meta.get("factory")
    factory = _factory_in_effect(factory, recorded, path)
    kwargs_from_file = False
    if factory_kwargs is None and isinstance(factory, str) and factory == recorded:
        factory_kwargs = meta.get("factory_kwargs")
        kwargs_from_file = factory_kwargs is not None
    input_shape = input_shape if input_shape is not None else meta.get("input_shape")
    num_classes = num_classes if num_classes is not None else meta.get("num_classes")
    bounds = bounds if bounds is not None else meta.get("bounds", (0.0, 1.0))
    missing = _missing(input_shape=input_shape, num_classes=num_classes)
    if missing:
        raise InputError(
            f"{path} does not record {_what(missing)}; pass "
            + " and ".join(_opt(n) for n in missing)
        )

    assert input_shape is not None and num_classes is not None
    if factory_kwargs is None:
        factory_kwargs = _shape_kwargs(factory, input_shape, num_classes)
    state = _load_state_dict(path)
    check_finite_weights(state, path)
    module = _build_module(
        factory, factory_kwargs, expected=state if kwargs_from_file else None, path=path
    )
    _apply_state_dict(module, state, path)
    return TorchClassifier(
        module,
        input_shape=tuple(input_shape),
        num_classes=int(num_classes),
        bounds=(float(bounds[0]), float(bounds[1])),
        preprocess=preprocess,
        device=device,
    )


def _factory_in_effect(factory: Factory | None, recorded: Any, path: Path) -> Factory:
    """The caller's factory, or the file's recorded one only when it is a zoo factory."""
    if factory is None:
        if recorded is None:
            raise InputError(
                f"{path} needs a factory ('package.module:callable' building the nn.Module): "
                f"none recorded in the file, pass {_opt('factory')}"
            )
        if not is_zoo_factory(recorded):
            raise UnsafeFileError(
                f"{path} names the factory {recorded!r} in its metadata; advguard never runs "
                "code named by a model file (only advguard.models.zoo factories are built from "
                f"metadata). If you trust that code, pass it explicitly: "
                f"{_explicit('factory', recorded)}"
            )
        return str(recorded)
    if isinstance(factory, str):
        check_factory_spec(factory)
    elif not callable(factory):
        raise InputError(
            f"{_opt('factory')} must be a 'package.module:callable' string or a callable"
        )
    return factory


def load_torchscript(
    path: PathType,
    *,
    input_shape: Sequence[int] | None = None,
    num_classes: int | None = None,
    bounds: tuple[float, float] | None = None,
    preprocess: nn.Module | None = None,
    device: str | torch.device | None = None,
) -> TorchClassifier:
    """Load a TorchScript archive (``torch.jit.save``) as a white-box classifier.

    What runs: the archive's TorchScript code, in torch's TorchScript interpreter. Its
    unpickler restores only TorchScript types, and TorchScript cannot import Python modules
    or call Python functions, so no Python code named by the file runs. It can still call
    any TorchScript operator (which includes ops that read files into tensors) and
    exercises a large C++ parser, so load only archives you trust; advguard asks for an
    explicit opt-in (``torchscript=True`` in :func:`load_model`, ``--torchscript`` on the
    CLI). ``input_shape`` and ``num_classes`` are required (an archive records neither).
    """
    _refuse_pickle(path)
    p = _existing_file(path)
    if not is_torchscript_archive(p):
        raise InputError(
            f"{p} is not a TorchScript archive (no constants.pkl and code/ inside); "
            f"for a state dict pass {_opt('factory')} instead of {_opt('torchscript')}"
        )
    missing = _missing(input_shape=input_shape, num_classes=num_classes)
    if missing:
        raise InputError(
            f"TorchScript archive {p} does not record {_what(missing)}; pass "
            + " and ".join(_opt(n) for n in missing)
        )
    assert input_shape is not None and num_classes is not None
    dev = resolve_device(device)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(str(p), map_location=dev)
    except Exception as exc:
        raise InputError(
            f"could not load TorchScript archive {p} ({str(exc).splitlines()[0][:200]})"
        ) from None
    check_finite_weights(module.state_dict(), p)
    return TorchClassifier(
        module,
        input_shape=tuple(input_shape),
        num_classes=num_classes,
        bounds=bounds if bounds is not None else (0.0, 1.0),
        preprocess=preprocess,
        device=dev,
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


def load_model(path_or_spec: PathType, **kwargs: Any) -> Any:
    """Load any supported model by file type (the CLI's single entry point).

    - ``.onnx`` -> :func:`load_onnx`; ``.skops`` -> :func:`load_sklearn`
    - ``.safetensors`` -> :func:`load_torch` (``factory=`` kw, or from metadata)
    - ``.pt/.pth/.ckpt/.bin`` with ``factory=`` -> :func:`load_torch` (weights-only);
      with ``torchscript=True`` -> :func:`load_torchscript`
    - ``"package.module:callable"`` with ``weights=PATH`` -> :func:`load_torch`
    - ``.pkl/.pickle/.joblib`` -> :class:`UnsafeFileError` (the file is never opened)

    ``device=`` (``cpu``, ``cuda``, ``cuda:N``, ``mps``, ``auto``) places torch models;
    ONNX and skops models run on the CPU, so for them only ``cpu`` and ``auto`` are accepted.
    Remaining keyword arguments go to the chosen loader.
    """
    spec = str(path_or_spec)
    _refuse_pickle(spec)
    torchscript = bool(kwargs.pop("torchscript", False))
    auto = str(kwargs.get("device", "")).strip().lower() == "auto"
    if "device" in kwargs:
        kwargs["device"] = resolve_device(kwargs["device"])
    p = Path(spec)
    if not p.exists() and _FACTORY_SPEC.match(spec):
        weights = kwargs.pop("weights", None)
        if weights is None:
            raise InputError(f"factory spec {spec!r} needs weights=PATH (a .safetensors file)")
        check_factory_spec(spec)
        _check_kwargs(load_torch, kwargs, "torch weights")
        return load_torch(spec, weights, **kwargs)
    p = _existing_file(p)
    suffix = p.suffix.lower()
    if torchscript:
        _check_kwargs(load_torchscript, kwargs, "a TorchScript archive")
        return load_torchscript(p, **kwargs)
    if suffix in (".onnx", ".skops"):
        _cpu_only(kwargs, "an ONNX model" if suffix == ".onnx" else "a skops model", auto)
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
                f"{p} is a TorchScript archive; it carries TorchScript code that runs when "
                f"loaded. If you trust it, pass {_opt('torchscript')} (plus "
                f"{_opt('input_shape')} and {_opt('num_classes')})."
            )
        raise InputError(
            f"{p} is a torch state dict; pass {_explicit('factory', 'package.module:callable')} "
            f"(plus {_opt('input_shape')} and {_opt('num_classes')}) to rebuild the architecture"
        )
    raise InputError(
        f"unsupported model file {p}: expected .onnx, .skops, .safetensors, "
        f".pt/.pth/.ckpt/.bin (state dict or TorchScript)"
    )


def _cpu_only(kwargs: dict[str, Any], what: str, auto: bool) -> None:
    """Drop a CPU (or ``auto``) ``device`` for a CPU-only format; refuse an accelerator."""
    dev = kwargs.pop("device", None)
    if dev is not None and dev.type != "cpu" and not auto:
        raise InputError(
            f"{_explicit('device', str(dev))} does not apply to {what} (it runs on the CPU); "
            f"use {_explicit('device', 'cpu')}"
        )


def _check_kwargs(
    fn: Callable[..., Any], kwargs: Mapping[str, Any], what: str, extra: tuple[str, ...] = ()
) -> None:
    params = inspect.signature(fn).parameters
    allowed = {name for name, prm in params.items() if prm.kind == prm.KEYWORD_ONLY}
    allowed.update(extra)
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        names = _option_names.get()
        if names is PY_OPTION_NAMES or names.get("factory") == PY_OPTION_NAMES["factory"]:
            raise InputError(
                f"option(s) {unknown} do not apply to {what}; valid options: {sorted(allowed)}"
            )
        raise InputError(
            f"{', '.join(names.get(k, k) for k in unknown)} do(es) not apply to {what}"
        )
