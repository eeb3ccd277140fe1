"""Where a model runs: one parser for the ``--device`` option and the ``device=`` arguments.

``resolve_device`` accepts ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"`` and ``"auto"``
(the first CUDA GPU when torch sees one, else the CPU; ``auto`` never picks MPS, whose
kernels differ from the CPU's). Asking for an accelerator that is not there is a one-line
:class:`~advguard.errors.InputError`, never a silent fall-back to the CPU.

``configure_determinism`` makes CUDA results reproducible and full precision: cuDNN picks
deterministic algorithms (no autotuning) and TF32 is off for convolutions and matrix
products, so robustness numbers do not depend on the GPU's reduced-precision modes.
advguard never runs mixed precision (no autocast, no float16/bfloat16).
"""

from __future__ import annotations

import torch

from advguard.errors import InputError

#: The spellings the ``--device`` option documents (``cuda:N`` for any N).
DEVICE_CHOICES = ("cpu", "cuda", "cuda:N", "mps", "auto")

_HINT = "cpu, cuda, cuda:N, mps or auto"


def resolve_device(spec: str | torch.device | None, default: str = "cpu") -> torch.device:
    """``spec`` as a checked :class:`torch.device` (``None`` means ``default``).

    Raises :class:`InputError` for an unknown spelling or an accelerator that is not
    available (no CUDA build or no GPU, a GPU index past the last one, no MPS)."""
    if spec is None:
        spec = default
    if isinstance(spec, torch.device):
        return _check_available(spec)
    if not isinstance(spec, str):
        raise InputError(f"device must be a string ({_HINT}), got {type(spec).__name__}")
    text = spec.strip().lower()
    if text == "auto":
        return torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")
    dev = _parse(text, spec)
    return _check_available(dev)


def _parse(text: str, spec: str) -> torch.device:
    kind, _, index = text.partition(":")
    if kind not in ("cpu", "cuda", "mps") or (index and not index.isdigit()):
        raise InputError(f"device must be {_HINT}, got {spec!r}")
    if index and kind != "cuda":
        raise InputError(f"device must be {_HINT} (only cuda takes an index), got {spec!r}")
    return torch.device(kind, int(index)) if index else torch.device(kind)


def _check_available(dev: torch.device) -> torch.device:
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(
                f"device {str(dev)!r} requested but CUDA is not available "
                "(torch.cuda.is_available() is False); use --device cpu or auto"
            )
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise InputError(f"device {str(dev)!r} is not available ({count} GPU(s): cuda:0..)")
        return dev
    if dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise InputError(f"device {str(dev)!r} requested but MPS is not available")
        return dev
    raise InputError(f"device must be {_HINT}, got {str(dev)!r}")


def configure_determinism(dev: torch.device) -> None:
    """Full-precision, deterministic kernels for ``dev`` (a no-op on the CPU).

    Sets process-wide torch flags: ``cudnn.deterministic = True``, ``cudnn.benchmark =
    False`` and TF32 off for cuDNN and cuBLAS. Deterministic cuDNN is slower; results on a
    GPU still differ from the CPU's in the last bits (another summation order)."""
    if dev.type != "cuda":
        return
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def device_name(dev: torch.device) -> str:
    """A readable name: ``cpu`` or ``cuda:0 (NVIDIA H200)``."""
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return str(dev)
