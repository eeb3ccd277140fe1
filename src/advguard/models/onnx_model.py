"""Black-box adapter around an ONNX model run by onnxruntime."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from os import PathLike
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from advguard.errors import InputError, MissingDependencyError
from advguard.models.base import ClassifierBase

#: Added to probabilities before the log when ``output="probabilities"``.
PROBA_EPS = 1e-12

#: ONNX model metadata keys written by :func:`advguard.models.io.export_onnx`.
META_BOUNDS = "advguard.bounds"
META_OUTPUT = "advguard.output"

_FLOAT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
}


def _import_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise MissingDependencyError("onnxruntime", "onnx", "OnnxClassifier") from exc
    return onnxruntime


def _static_dim(d: Any) -> int | None:
    return int(d) if isinstance(d, int) and d > 0 else None


class OnnxClassifier(ClassifierBase):
    """Run an ONNX classifier with onnxruntime (CPU) as a black box.

    Parameters
    ----------
    model:
        Path to a ``.onnx`` file, or the serialized model as ``bytes``.
    input_shape:
        Shape of one raw input without the batch dimension. Inferred from the
        model's input when all its non-batch dimensions are static; required
        otherwise (and checked against the static dimensions when given).
    num_classes:
        Inferred from a static output shape ``(batch, K)``, else from running
        one dummy input (not counted as a query).
    bounds:
        Valid range of raw inputs. Defaults to the ``advguard.bounds`` metadata
        written by :func:`~advguard.models.io.export_onnx`, else ``(0, 1)``.
    output:
        ``"logits"`` if the chosen output holds scores, ``"probabilities"`` if it
        holds probabilities (they are turned into ``log(p + 1e-12)``). Defaults
        to the ``advguard.output`` metadata, else ``"logits"``.
    input_name, output_name:
        Which graph input/output to use. Defaults: the only input, and the first
        floating-point tensor output (skipping e.g. a ``label`` output of
        converted scikit-learn models).
    batch_size:
        Largest batch sent to the session at once. A model with a fixed batch
        dimension is fed batches of exactly that size (the last one padded).
    providers:
        onnxruntime execution providers; CPU by default.
    """

    def __init__(
        self,
        model: str | PathLike[str] | bytes,
        *,
        input_shape: Sequence[int] | None = None,
        num_classes: int | None = None,
        bounds: tuple[float, float] | None = None,
        output: Literal["logits", "probabilities"] | None = None,
        input_name: str | None = None,
        output_name: str | None = None,
        batch_size: int = 256,
        providers: Sequence[str] = ("CPUExecutionProvider",),
    ) -> None:
        ort = _import_onnxruntime()
        if int(batch_size) < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.session = self._open(ort, model, providers)
        self.source = "<bytes>" if isinstance(model, bytes | bytearray) else str(model)
        meta = dict(self.session.get_modelmeta().custom_metadata_map or {})

        inputs = self.session.get_inputs()
        if input_name is None:
            if len(inputs) != 1:
                raise InputError(
                    f"the ONNX model has {len(inputs)} inputs {[i.name for i in inputs]}; "
                    "pass input_name to choose the image/feature input"
                )
            inp = inputs[0]
        else:
            found = [i for i in inputs if i.name == input_name]
            if not found:
                raise InputError(
                    f"the ONNX model has no input {input_name!r}; "
                    f"inputs: {[i.name for i in inputs]}"
                )
            inp = found[0]
        if inp.type not in _FLOAT_TYPES:
            raise InputError(f"ONNX input {inp.name!r} has type {inp.type}; need a float tensor")
        self.input_name: str = inp.name
        self._np_dtype = _FLOAT_TYPES[inp.type]
        dims = list(inp.shape or [])
        if not dims:
            raise InputError(f"ONNX input {inp.name!r} has no batch dimension (shape {dims})")
        self._fixed_batch = _static_dim(dims[0])
        shape = self._resolve_input_shape(dims[1:], input_shape)

        outputs = self.session.get_outputs()
        if output_name is None:
            float_outs = [o for o in outputs if o.type in _FLOAT_TYPES]
            if not float_outs:
                raise InputError(
                    "the ONNX model has no float tensor output; outputs: "
                    f"{[(o.name, o.type) for o in outputs]}"
                )
            out = float_outs[0]
        else:
            found_out = [o for o in outputs if o.name == output_name]
            if not found_out:
                raise InputError(
                    f"the ONNX model has no output {output_name!r}; "
                    f"outputs: {[o.name for o in outputs]}"
                )
            out = found_out[0]
        self.output_name: str = out.name

        output = output if output is not None else meta.get(META_OUTPUT, "logits")
        if output not in ("logits", "probabilities"):
            raise InputError(f"output must be 'logits' or 'probabilities', got {output!r}")
        self.output: str = output

        if bounds is None:
            bounds = tuple(json.loads(meta[META_BOUNDS])) if META_BOUNDS in meta else (0.0, 1.0)
        k = self._resolve_num_classes(list(out.shape or []), num_classes, shape, bounds)
        super().__init__(num_classes=k, input_shape=shape, bounds=bounds)

    # -- construction helpers ---------------------------------------------
    @staticmethod
    def _open(ort: Any, model: str | PathLike[str] | bytes, providers: Sequence[str]) -> Any:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if isinstance(model, bytes | bytearray):
            src: Any = bytes(model)
        else:
            path = Path(model)
            if not path.is_file():
                raise InputError(f"ONNX model file not found: {path}")
            src = str(path)
        try:
            return ort.InferenceSession(src, sess_options=opts, providers=list(providers))
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidProtobuf types
            raise InputError(f"could not load the ONNX model ({exc})") from exc

    def _resolve_input_shape(self, dims: list[Any], given: Sequence[int] | None) -> tuple[int, ...]:
        static = [_static_dim(d) for d in dims]
        if given is None:
            known = [d for d in static if d is not None]
            if not dims or len(known) != len(static):
                raise InputError(
                    f"the ONNX input {self.input_name!r} has dynamic shape {['N', *dims]}; "
                    "pass input_shape (one sample, without the batch dimension)"
                )
            return tuple(int(d) for d in known)
        shape = tuple(int(d) for d in given)
        if len(shape) != len(dims) or any(
            s is not None and s != g for s, g in zip(static, shape, strict=False)
        ):
            raise InputError(
                f"input_shape {shape} does not match the ONNX input {self.input_name!r} "
                f"shape {['N', *dims]}"
            )
        return shape

    def _resolve_num_classes(
        self,
        dims: list[Any],
        given: int | None,
        shape: tuple[int, ...],
        bounds: Sequence[float],
    ) -> int:
        static = [_static_dim(d) for d in dims[1:]]
        known = [s for s in static if s is not None]
        inferred = math.prod(known) if static and len(known) == len(static) else None
        if inferred is None:
            if given is not None:
                return int(given)
            n = self._fixed_batch or 1
            mid = (float(bounds[0]) + float(bounds[1])) / 2.0
            dummy = np.full((n, *shape), mid, dtype=self._np_dtype)
            try:
                (res,) = self.session.run([self.output_name], {self.input_name: dummy})
            except Exception as exc:
                raise InputError(
                    f"could not run the ONNX model on a dummy input of shape {dummy.shape} "
                    f"({exc}); pass input_shape and num_classes"
                ) from exc
            inferred = int(np.asarray(res).reshape(n, -1).shape[1])
        if given is not None and int(given) != inferred:
            raise InputError(
                f"num_classes={given} but the ONNX output {self.output_name!r} has "
                f"{inferred} values per sample"
            )
        return inferred

    # -- queries -------------------------------------------------------------
    def _run(self, chunk: np.ndarray) -> np.ndarray:
        n = len(chunk)
        fb = self._fixed_batch
        if fb is not None and n != fb:
            pad = np.repeat(chunk[-1:], fb - n, axis=0)
            chunk = np.concatenate([chunk, pad])
        (res,) = self.session.run([self.output_name], {self.input_name: chunk})
        res = np.asarray(res)
        return res.reshape(len(chunk), -1)[:n]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Scores for a batch (float32, on ``x``'s device); probabilities become logs."""
        n = len(x)
        self.queries.forward += n
        if n == 0:
            return torch.zeros((0, self.num_classes), dtype=torch.float32, device=x.device)
        arr = x.detach().to("cpu").numpy().astype(self._np_dtype, copy=False)
        step = self._fixed_batch or self.batch_size
        out = np.concatenate([self._run(arr[i : i + step]) for i in range(0, n, step)])
        if out.shape[1] != self.num_classes:
            raise InputError(
                f"the ONNX output {self.output_name!r} has {out.shape[1]} values per sample, "
                f"expected {self.num_classes}"
            )
        out = out.astype(np.float64)
        if self.output == "probabilities":
            out = np.log(np.clip(out, 0.0, None) + PROBA_EPS)
        return torch.from_numpy(out.astype(np.float32)).to(x.device)

    def __repr__(self) -> str:
        return (
            f"OnnxClassifier({self.source!r}, num_classes={self.num_classes}, "
            f"input_shape={self.input_shape}, bounds={self.bounds}, output={self.output!r})"
        )
