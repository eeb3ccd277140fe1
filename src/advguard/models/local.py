"""Logits of inputs that differ from known ones in one small window (query-only attacks).

Square Attack (Andriushchenko et al. 2020) changes one ``s x s`` window per sample and
iteration; after its first few hundred iterations the window is a few pixels wide. In a
convolutional network such a change alters only a small region of every feature map until the
first dense layer, so the new logits can be had by recomputing those regions from cached
feature maps (the idea of incremental inference, e.g. Kang et al., "NoScope", 2017, and
"incremental CNN inference" in the video-analytics literature) instead of the whole network.

:class:`LocalForward` does this for a :class:`~advguard.models.torch_model.TorchClassifier`
whose network is an ``nn.Sequential`` (nested ones are flattened) of a *spatial prefix* --
``Conv2d`` (stride 1, no dilation, zero padding), ``MaxPool2d``/``AvgPool2d`` (kernel =
stride, no padding) and element-wise layers (activations, ``Dropout``, ``Identity``,
``BatchNorm2d`` in eval mode) -- followed by any *tail* (``Flatten``, ``Linear``, ...) that is
recomputed in full on the cached last feature map. Other networks (or a ``preprocess``) get
``None`` from :meth:`LocalForward.build` and callers use the plain forward pass.

Per feature map it keeps the current iterate's values (zero-padded for the convolution that
reads it). :meth:`LocalForward.propose` writes a candidate's window into the cached input,
recomputes for every layer only the region that can have changed (fixed size per layer,
positioned per sample, clamped inside the map; the convolution reads the padded cache, so
image borders see the same zeros as the full pass), keeps the overwritten values, and returns
the candidate's logits; :meth:`LocalForward.settle` keeps each sample's candidate or restores
its iterate. Every cached value is computed from the current inputs by the same layers, so
nothing accumulates: the logits equal the full pass's up to float rounding (a convolution
over a patch may sum in another order; ``tests/test_local_forward.py`` bounds the
difference). Queries are counted as by :meth:`TorchClassifier.logits`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from advguard.models.torch_model import TorchClassifier

_ELEMENTWISE = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.Softplus,
    nn.Identity,
    nn.Dropout,
    nn.Dropout2d,
    nn.BatchNorm2d,
)


def _flat(module: nn.Module) -> list[nn.Module]:
    out: list[nn.Module] = []
    for m in module.children() if isinstance(module, nn.Sequential) else [module]:
        out.extend(_flat(m) if isinstance(m, nn.Sequential) else [m])
    return out


def _pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


@dataclass
class _Stage:
    """One structural layer (a convolution or a pooling) and the element-wise layers after it."""

    op: nn.Module
    kind: str  # "conv" or "pool"
    k: tuple[int, int]  # kernel (conv) or kernel = stride (pool)
    pad: tuple[int, int]  # the conv's zero padding (0 for a pool)
    after: list[nn.Module]


def _conv_ok(m: nn.Conv2d) -> bool:
    return (
        _pair(m.stride) == (1, 1)
        and _pair(m.dilation) == (1, 1)
        and m.padding_mode == "zeros"
        and not isinstance(m.padding, str)
    )


def _pool_ok(m: nn.Module) -> bool:
    if not isinstance(m, nn.MaxPool2d | nn.AvgPool2d):
        return False
    k = _pair(m.kernel_size)
    stride = _pair(m.stride if m.stride is not None else m.kernel_size)
    dil_ok = isinstance(m, nn.AvgPool2d) or _pair(m.dilation) == (1, 1)
    return k == stride and _pair(m.padding) == (0, 0) and not m.ceil_mode and dil_ok


def _split(layers: list[nn.Module]) -> tuple[list[_Stage], list[nn.Module]] | None:
    """The spatial prefix as stages, and the tail; None when the first layer is not a conv."""
    stages: list[_Stage] = []
    i = 0
    while i < len(layers):
        m = layers[i]
        if isinstance(m, nn.Conv2d) and _conv_ok(m):
            stages.append(_Stage(m, "conv", _pair(m.kernel_size), _pair(m.padding), []))
        elif _pool_ok(m) and stages:
            stages.append(_Stage(m, "pool", _pair(m.kernel_size), (0, 0), []))
        elif isinstance(m, _ELEMENTWISE) and stages:
            stages[-1].after.append(m)
        else:
            break
        i += 1
    if not stages or stages[0].kind != "conv":
        return None
    return stages, layers[i:]


@dataclass
class _Region:
    """Per sample top-left corner (rows, cols: (n,) long) of a region of fixed size (m, n)."""

    r: torch.Tensor
    c: torch.Tensor
    size: tuple[int, int]


def _clamp(start: torch.Tensor, size: int, limit: int) -> tuple[torch.Tensor, int]:
    size = min(size, limit)
    return start.clamp(0, limit - size), size


def _rows(reg: _Region, height: int, width: int, dev: torch.device) -> torch.Tensor:
    """Row indices (n, m*k) of each sample's region in maps stored as (n * height * width, C)."""
    m, k = reg.size
    offs = (torch.arange(m, device=dev)[:, None] * width + torch.arange(k, device=dev)).view(-1)
    n = reg.r.shape[0]
    start = torch.arange(n, device=dev) * (height * width) + reg.r * width + reg.c
    return start[:, None] + offs[None, :]


class LocalForward:
    """Cached feature maps of a batch of iterates; candidates that change one window each
    (see the module docstring). Build with :meth:`build`, then :meth:`reset` on the iterates.
    """

    def __init__(self, model: TorchClassifier, stages: list[_Stage], tail: list[nn.Module]):
        self.model = model
        self.stages = stages
        self.tail = tail
        self.maps: list[torch.Tensor] = []  # maps[i]: input of stage i (padded); last: tail's
        self.dims: list[tuple[int, int]] = []  # unpadded (h, w) of every map
        self._saved: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    @classmethod
    def build(cls, model: Any, input_shape: tuple[int, ...]) -> LocalForward | None:
        """A :class:`LocalForward` for ``model`` (a plain TorchClassifier with a supported
        sequential network and no ``preprocess``, taking ``(C, H, W)`` images), else None."""
        if type(model) is not TorchClassifier or model.preprocess is not None:
            return None
        if len(input_shape) != 3 or tuple(model.input_shape) != tuple(input_shape):
            return None
        split = _split(_flat(model.module))
        if split is None:
            return None
        return cls(model, *split)

    def _pad(self, i: int) -> tuple[int, int]:
        """Zero margin of map ``i``: the padding of the convolution that reads it."""
        if i < len(self.stages) and self.stages[i].kind == "conv":
            return self.stages[i].pad
        return (0, 0)

    def _apply(self, st: _Stage, x: torch.Tensor) -> torch.Tensor:
        """The stage on an NCHW input (already padded for a conv): no padding of its own."""
        if st.kind == "conv":
            conv = st.op
            assert isinstance(conv, nn.Conv2d)
            y = F.conv2d(x, conv.weight, conv.bias, 1, 0, 1, conv.groups)
        elif isinstance(st.op, nn.MaxPool2d):
            y = F.max_pool2d(x, st.k, st.k)
        else:
            y = F.avg_pool2d(x, st.k, st.k)
        for m in st.after:
            y = m(y)
        return y

    @torch.no_grad()
    def reset(self, x: torch.Tensor) -> None:
        """Cache the feature maps of the iterates ``x`` (n, C, H, W); no query is counted.
        Maps are stored channels-last, (n, H, W, C) with the zero margin of the conv that
        reads them, so that a region is a set of rows of C contiguous values."""
        with self.model._eval_mode():
            cur = x.to(self.model.device, self.model.dtype)
            self.maps, self.dims = [], []
            for i, st in enumerate(self.stages):
                ph, pw = self._pad(i)
                self.dims.append((cur.shape[2], cur.shape[3]))
                cur = F.pad(cur, (pw, pw, ph, ph)) if ph or pw else cur
                self.maps.append(cur.permute(0, 2, 3, 1).contiguous())
                cur = self._apply(st, cur)
            self.dims.append((cur.shape[2], cur.shape[3]))
            self.maps.append(cur.permute(0, 2, 3, 1).contiguous())

    def subset(self, keep: torch.Tensor) -> None:
        """Keep only the samples ``keep`` (a boolean mask or indices)."""
        self.maps = [m[keep] for m in self.maps]

    def _flat(self, i: int) -> torch.Tensor:
        mp = self.maps[i]
        return mp.view(-1, mp.shape[3])

    def _write(self, i: int, reg: _Region, values: torch.Tensor) -> None:
        """Write ``values`` (n, C, m, k) at ``reg`` of map ``i`` (unpadded coordinates),
        keeping the old values for :meth:`settle`."""
        mp = self.maps[i]
        ph, pw = self._pad(i)
        rows = _rows(_Region(reg.r + ph, reg.c + pw, reg.size), mp.shape[1], mp.shape[2], mp.device)
        flat, idx = self._flat(i), rows.view(-1)
        self._saved.append((i, rows, flat.index_select(0, idx)))
        flat.index_copy_(0, idx, values.permute(0, 2, 3, 1).reshape(-1, mp.shape[3]))

    def _read(self, i: int, reg: _Region) -> torch.Tensor:
        """Map ``i`` at ``reg`` given in padded coordinates, as NCHW (n, C, m, k)."""
        mp = self.maps[i]
        n, ch = mp.shape[0], mp.shape[3]
        rows = _rows(reg, mp.shape[1], mp.shape[2], mp.device).view(-1)
        patch = self._flat(i).index_select(0, rows).view(n, *reg.size, ch)
        return patch.permute(0, 3, 1, 2).contiguous()

    def _next(self, i: int, reg: _Region) -> tuple[_Region, _Region]:
        """For stage ``i`` whose input changed in ``reg``: the output region that can have
        changed and the (padded) input region that computes it."""
        st = self.stages[i]
        (h_out, w_out) = self.dims[i + 1]
        (kh, kw), (m, k) = st.k, reg.size
        if st.kind == "conv":
            ph, pw = st.pad
            r, mh = _clamp(reg.r + ph - (kh - 1), m + kh - 1, h_out)
            c, mw = _clamp(reg.c + pw - (kw - 1), k + kw - 1, w_out)
            # output o reads padded input rows o .. o + kh - 1
            return _Region(r, c, (mh, mw)), _Region(r, c, (mh + kh - 1, mw + kw - 1))
        r, mh = _clamp(torch.div(reg.r, kh, rounding_mode="floor"), (m + kh - 2) // kh + 1, h_out)
        c, mw = _clamp(torch.div(reg.c, kw, rounding_mode="floor"), (k + kw - 2) // kw + 1, w_out)
        return _Region(r, c, (mh, mw)), _Region(r * kh, c * kw, (mh * kh, mw * kw))

    @torch.no_grad()
    def propose(self, rows: torch.Tensor, cols: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
        """Logits of the candidates: the iterates with ``window`` (n, C, s, s) written at
        (``rows``, ``cols``) (top-left corners, (n,)). Counts n forward queries. Call
        :meth:`settle` before the next proposal."""
        if self._saved:
            raise RuntimeError("LocalForward.propose: settle the previous proposal first")
        model = self.model
        n = window.shape[0]
        model.queries.forward += n
        with model._eval_mode():
            reg = _Region(rows, cols, (window.shape[2], window.shape[3]))
            self._write(0, reg, window.to(model.device, model.dtype))
            for i, st in enumerate(self.stages):
                out_reg, in_reg = self._next(i, reg)
                self._write(i + 1, out_reg, self._apply(st, self._read(i, in_reg)))
                reg = out_reg
            z = self.maps[-1].permute(0, 3, 1, 2)
            for m in self.tail:
                z = m(z)
        return z

    def settle(self, accept: torch.Tensor) -> None:
        """Keep the proposal for the samples where ``accept`` (n,) is true; restore the
        iterate's feature maps for the others."""
        back = ~accept
        if bool(back.any()):
            for i, rows, old in self._saved:
                ch = old.shape[1]
                idx = rows[back].reshape(-1)
                self._flat(i).index_copy_(
                    0, idx, old.view(rows.shape[0], -1, ch)[back].view(-1, ch)
                )
        self._saved = []
