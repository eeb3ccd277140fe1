"""Safety scan of model artifacts before they enter the registry.

Nothing here loads a model: pickles are only walked opcode by opcode with
:func:`pickletools.genops`, safetensors headers are parsed as JSON, ONNX files
are parsed as protobuf (no external data), skops files are audited with
``skops.io.get_untrusted_types``.

Policy
------
* pickle-based files (raw pickles of protocol 2-5, zip archives written by
  ``torch.save`` holding ``data.pkl``, and anything named ``.pkl``, ``.pickle``,
  ``.joblib``, ``.pt``, ``.pth``, ``.ckpt``, ``.bin`` that is not TorchScript)
  are refused unless ``allow_pickle=True``;
* with ``allow_pickle=True`` every import the pickle would perform
  (GLOBAL, STACK_GLOBAL, INST) must be on :data:`PICKLE_ALLOWED_GLOBALS`, and
  imports that cannot be resolved statically, copyreg extensions (EXT*) and
  REDUCE/OBJ/NEWOBJ/BUILD on a callable that is not an allowed import are refused;
* safetensors: the header must be JSON whose tensors' data offsets lie inside
  the file and match dtype x shape; advguard metadata must be well formed, and a
  factory recorded in it that is not one of advguard's zoo factories is refused
  (a model file never chooses code to run) unless the pusher passed exactly that
  factory explicitly (``--factory``), which is then recorded with a warning;
* ONNX: must parse; external data may only name files pushed alongside it;
* skops: every type must be in skops' trusted set;
* TorchScript archives are accepted but flagged: their code runs when loaded.
"""

from __future__ import annotations

import io
import itertools
import json
import pickletools
import struct
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from advguard.errors import InputError, UnsafeFileError

PICKLE_SUFFIXES = frozenset({".pkl", ".pickle", ".joblib", ".pt", ".pth", ".ckpt", ".bin"})

#: ``module.name`` imports a pickle may perform when ``allow_pickle=True``.
PICKLE_ALLOWED_GLOBALS = frozenset(
    {
        "collections.OrderedDict",
        "torch._utils._rebuild_tensor_v2",
        "torch._utils._rebuild_parameter",
        "torch.FloatStorage",
        "torch.DoubleStorage",
        "torch.HalfStorage",
        "torch.BFloat16Storage",
        "torch.LongStorage",
        "torch.IntStorage",
        "torch.ShortStorage",
        "torch.CharStorage",
        "torch.ByteStorage",
        "torch.BoolStorage",
        "numpy.core.multiarray._reconstruct",
        "numpy._core.multiarray._reconstruct",
        "numpy.core.multiarray.scalar",
        "numpy._core.multiarray.scalar",
        "numpy.ndarray",
        "numpy.dtype",
    }
)

SAFER_FORMATS = (
    "use safetensors for torch weights (advguard.models.io.save_torch), "
    "skops for scikit-learn (skops.io.dump) or ONNX"
)

_STRING_OPS = frozenset(
    {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING"}
    | {"SHORT_BINSTRING"}
)
_MEMO_PUT = frozenset({"PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"})
_MEMO_GET = frozenset({"GET", "BINGET", "LONG_BINGET"})
_CALL_OPS = frozenset({"REDUCE", "OBJ", "NEWOBJ", "NEWOBJ_EX", "BUILD"})

_ST_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}  # fmt: skip
_ST_MAX_HEADER = 100 * 1024 * 1024


@dataclass
class ScanResult:
    """What the scan found for one file."""

    path: str
    format: str  # safetensors, torchscript, onnx, skops, pickle, torch-zip
    warnings: list[str] = field(default_factory=list)
    globals: list[str] = field(default_factory=list)  # pickle imports seen (allowed ones)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "format": self.format,
            "warnings": list(self.warnings),
            "globals": list(self.globals),
        }


# -- detection -------------------------------------------------------------------
def _zip_names(path: Path) -> list[str] | None:
    if not zipfile.is_zipfile(path):
        return None
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.namelist()
    except zipfile.BadZipFile:
        return None


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    if len(head) < 10:
        return False
    n = struct.unpack("<Q", head[:8])[0]
    return 2 <= n <= min(size - 8, _ST_MAX_HEADER) and head[8:9] == b"{"


def detect_format(path: Path) -> str:
    """Classify ``path`` by content (magic bytes, zip members), then by suffix."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(16)
    suffix = path.suffix.lower()
    names = _zip_names(path)
    if names is not None:
        leaf = {n.split("/")[-1] for n in names}
        if "constants.pkl" in leaf and any("/code/" in f"/{n}" for n in names):
            return "torchscript"
        if "data.pkl" in leaf or any(n.endswith(".pkl") for n in names):
            return "torch-zip"
        if suffix == ".skops" or "schema.json" in names:
            return "skops"
        raise InputError(f"{path}: zip archive of unknown layout; expected a .skops file")
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"
    if suffix == ".safetensors" or _looks_like_safetensors(head, size):
        return "safetensors"
    if suffix == ".onnx":
        return "onnx"
    if suffix in PICKLE_SUFFIXES:
        return "pickle"  # protocol 0/1 pickles have no magic; trust the name
    raise InputError(
        f"{path}: unsupported artifact (expected .safetensors, .onnx, .skops or a TorchScript "
        "archive)"
    )


# -- pickle opcode scan ----------------------------------------------------------
def scan_pickle_bytes(data: bytes, where: str) -> list[str]:
    """Return the imports a pickle would perform; raise if any is not allowed.

    Walks the opcodes only (``pickletools.genops``); the pickle is never loaded.
    """
    seen: list[str] = []
    strings: list[str | None] = []  # values pushed recently (only strings matter)
    memo: dict[int, str | None] = {}
    last: str | None = None
    callable_ok: list[bool] = []  # stack of "the last global was allowed"
    try:
        ops = list(pickletools.genops(io.BytesIO(data)))
    except Exception as exc:
        raise UnsafeFileError(f"{where}: not a well-formed pickle ({exc}); refused") from None
    for op, arg, pos in ops:
        name = op.name
        ref: str | None = None
        if name in _STRING_OPS:
            last = arg.decode("latin-1") if isinstance(arg, bytes) else str(arg)
            strings.append(last)
            continue
        if name in _MEMO_PUT:
            if name == "MEMOIZE":
                key = len(memo)
            elif isinstance(arg, int):
                key = arg
            else:
                raise UnsafeFileError(
                    f"{where}: {name} without a memo index at byte {pos}; refused"
                )
            memo[key] = last
            continue
        if name in _MEMO_GET:
            if not isinstance(arg, int):
                raise UnsafeFileError(
                    f"{where}: {name} without a memo index at byte {pos}; refused"
                )
            last = memo.get(arg)
            strings.append(last)
            continue
        if name in ("GLOBAL", "INST"):
            mod, _, attr = str(arg).partition(" ")
            ref = f"{mod}.{attr}"
        elif name == "STACK_GLOBAL":
            if len(strings) < 2 or strings[-1] is None or strings[-2] is None:
                raise UnsafeFileError(
                    f"{where}: pickle imports a name that cannot be resolved statically "
                    f"(STACK_GLOBAL at byte {pos}); refused"
                )
            ref = f"{strings[-2]}.{strings[-1]}"
        elif name.startswith("EXT"):
            raise UnsafeFileError(
                f"{where}: pickle uses the copyreg extension registry ({name} at byte {pos}), "
                "which can import arbitrary code; refused"
            )
        elif name in _CALL_OPS and not callable_ok:
            raise UnsafeFileError(
                f"{where}: pickle calls an object ({name} at byte {pos}) that no allowed import "
                "produced; refused"
            )
        else:
            last = None
        if ref is not None:
            if ref not in PICKLE_ALLOWED_GLOBALS:
                raise UnsafeFileError(
                    f"{where}: pickle imports {ref!r} (byte {pos}), which is not on the "
                    "allow-list of tensor/array types; it could run code when loaded. "
                    f"Refused; {SAFER_FORMATS}."
                )
            callable_ok.append(True)
            if ref not in seen:
                seen.append(ref)
            last = None
    return seen


def _picklescan(path: Path) -> list[str]:
    """Run ``picklescan`` when installed (defence in depth); return its findings."""
    try:
        from picklescan.scanner import scan_file_path
    except ImportError:
        return []
    result = scan_file_path(str(path))
    if getattr(result, "infected_files", 0) or getattr(result, "scan_err", False):
        globs = [f"{g.module}.{g.name}" for g in getattr(result, "globals", [])]
        raise UnsafeFileError(f"{path}: picklescan flags this file as unsafe ({globs}); refused")
    return ["picklescan: no dangerous imports found"]


def _scan_pickle_file(path: Path, fmt: str, allow_pickle: bool) -> ScanResult:
    if not allow_pickle:
        kind = "torch.save archive" if fmt == "torch-zip" else "pickle"
        raise UnsafeFileError(
            f"{path}: pickle-based file ({kind}) refused: pickles can execute arbitrary code "
            f"when loaded. Instead {SAFER_FORMATS}; or pass --allow-pickle to accept plain "
            "tensor pickles after an opcode scan."
        )
    res = ScanResult(str(path), fmt)
    if fmt == "torch-zip":
        with zipfile.ZipFile(path) as zf:
            for member in zf.namelist():
                if member.endswith(".pkl"):
                    for g in scan_pickle_bytes(zf.read(member), f"{path}!{member}"):
                        if g not in res.globals:
                            res.globals.append(g)
    else:
        res.globals = scan_pickle_bytes(path.read_bytes(), str(path))
    res.warnings.append("pickle accepted with --allow-pickle after an opcode scan")
    res.warnings.extend(_picklescan(path))
    return res


# -- other formats -----------------------------------------------------------------
def validate_safetensors(path: Path) -> dict[str, str]:
    """Check the header and data offsets of a safetensors file; return its metadata."""
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise InputError(f"{path}: too short to be a safetensors file")
        n = struct.unpack("<Q", raw)[0]
        if n > _ST_MAX_HEADER or 8 + n > size:
            raise InputError(f"{path}: safetensors header length {n} does not fit the file")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"{path}: safetensors header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise InputError(f"{path}: safetensors header is not a JSON object")
    data_len = size - 8 - n
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
    ):
        raise InputError(f"{path}: safetensors __metadata__ must map strings to strings")
    spans = []
    for name, info in header.items():
        try:
            dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{path}: tensor {name!r} has a malformed header entry") from None
        if dtype not in _ST_DTYPE_BYTES or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise InputError(f"{path}: tensor {name!r} has bad dtype/shape {dtype} {shape}")
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end <= data_len):
            raise InputError(
                f"{path}: tensor {name!r} data offsets [{start}, {end}] lie outside the "
                f"{data_len}-byte data section"
            )
        count = 1
        for d in shape:
            count *= d
        if count * _ST_DTYPE_BYTES[dtype] != end - start:
            raise InputError(f"{path}: tensor {name!r} size does not match dtype x shape")
        spans.append((start, end, name))
    spans.sort()
    for (_s0, e0, a), (s1, _e1, b) in itertools.pairwise(spans):
        if s1 < e0:
            raise InputError(f"{path}: tensors {a!r} and {b!r} overlap in the data section")
    return meta


def validate_onnx(path: Path, siblings: Iterable[str]) -> list[str]:
    """Parse an ONNX model (external data not loaded); external data must be pushed too."""
    try:
        import onnx
    except ImportError as exc:
        from advguard.errors import MissingDependencyError

        raise MissingDependencyError("onnx", "onnx", "Scanning ONNX models") from exc
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise InputError(f"{path}: not a valid ONNX model ({exc})") from None
    allowed = set(siblings)
    refs: list[str] = []
    tensors = list(proto.graph.initializer)
    for node in proto.graph.node:
        tensors.extend(a.t for a in node.attribute if a.HasField("t"))
    for t in tensors:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        loc = next((e.value for e in t.external_data if e.key == "location"), "")
        p = PurePosixPath(loc.replace("\\", "/"))
        if p.is_absolute() or ".." in p.parts or str(p) not in allowed:
            raise UnsafeFileError(
                f"{path}: tensor {t.name!r} reads external data from {loc!r}, which is outside "
                "the pushed files; push the data file alongside the model (same directory)"
            )
        refs.append(str(p))
    return sorted(set(refs))


def validate_skops(path: Path) -> None:
    try:
        import skops.io as sio
    except ImportError as exc:
        from advguard.errors import MissingDependencyError

        raise MissingDependencyError("skops", "skops", "Scanning skops models") from exc
    try:
        untrusted = list(sio.get_untrusted_types(file=str(path)))
    except Exception as exc:
        raise InputError(f"{path}: not a valid skops file ({exc})") from None
    if untrusted:
        raise UnsafeFileError(
            f"{path}: contains types skops does not trust by default: {sorted(untrusted)}; "
            "refused (re-save the model with only standard scikit-learn/numpy types)"
        )


def check_safetensors_factory(
    path: Path, meta: Mapping[str, str], factory: str | None = None
) -> list[str]:
    """Validate advguard metadata; refuse a recorded non-zoo factory unless ``factory``
    (passed explicitly by the pusher) names exactly it. Returns warnings."""
    from advguard.models.io import META_PREFIX, is_zoo_factory, validated_metadata

    decoded: dict[str, Any] = {}
    for key, value in meta.items():
        if not key.startswith(META_PREFIX):
            continue
        name = key[len(META_PREFIX) :]
        try:
            decoded[name] = value if name in ("factory", "format") else json.loads(value)
        except json.JSONDecodeError:
            decoded[name] = value
    checked = validated_metadata(decoded, path)
    recorded = checked.get("factory")
    if recorded is None or is_zoo_factory(recorded):
        return []
    if factory is not None and factory == recorded:
        return [
            f"metadata names the non-zoo factory {recorded!r}; accepted because --factory "
            "names it explicitly. Loaders never import it from the file: whoever loads this "
            f"model must pass --factory {recorded} too"
        ]
    raise UnsafeFileError(
        f"{path}: metadata names the factory {recorded!r}, which is not an advguard zoo "
        "factory; advguard never runs code named by a model file. If you trust that code, "
        f"push with --factory {recorded}"
    )


def scan_file(
    path: Path,
    *,
    allow_pickle: bool = False,
    siblings: Iterable[str] = (),
    factory: str | None = None,
) -> ScanResult:
    """Scan one artifact; raise :class:`UnsafeFileError`/:class:`InputError` if refused.

    ``factory`` is the factory the pusher passed explicitly (``--factory``); it is compared
    with a factory recorded in a safetensors file, never imported here."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"artifact not found: {path}")
    fmt = detect_format(path)
    if fmt in ("pickle", "torch-zip"):
        return _scan_pickle_file(path, fmt, allow_pickle)
    res = ScanResult(str(path), fmt)
    if fmt == "safetensors":
        res.warnings.extend(check_safetensors_factory(path, validate_safetensors(path), factory))
    elif fmt == "onnx":
        validate_onnx(path, siblings)
    elif fmt == "skops":
        validate_skops(path)
    elif fmt == "torchscript":
        res.warnings.append("TorchScript archive: it contains code that runs when loaded")
    return res


def scan_files(
    files: Mapping[str, Path], *, allow_pickle: bool = False, factory: str | None = None
) -> list[ScanResult]:
    """Scan every file of a push (``files`` maps stored name -> path)."""
    if factory is not None:
        from advguard.models.io import check_factory_spec

        check_factory_spec(factory)
    names = list(files)
    return [
        scan_file(p, allow_pickle=allow_pickle, siblings=names, factory=factory)
        for p in files.values()
    ]
