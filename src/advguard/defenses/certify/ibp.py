"""Interval bound propagation (Gowal et al., 2018), written out layer by layer.

Given a box of inputs (the Linf ball of radius ``epsilon`` around ``x``, intersected with the
model's bounds), IBP pushes elementwise lower/upper bounds through the network and returns
bounds that every logit provably respects for every input in the box. The bounds are sound
but loose; they certify a useful fraction of samples only for IBP-trained networks.

Supported layers: ``Linear``, ``Conv2d``, ``ReLU``, ``Flatten``, :class:`Normalize`,
``MaxPool2d``, ``AvgPool2d``, ``BatchNorm1d/2d`` (eval mode), ``Identity``/``Dropout``
(no-ops at inference), and nested ``nn.Sequential``. Anything else raises
:class:`InputError` naming the layer.

:func:`ibp_certify` uses the *elision of the last layer* (Gowal et al., Sec. 3): the margin
``z_y - z_j`` is bounded through the last ``Linear`` layer's row differences
``W_y - W_j`` applied to the penultimate box, which is never looser than subtracting
independent logit bounds.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from advguard.errors import InputError
from advguard.models.base import check_inputs, check_labels
from advguard.models.torch_model import Normalize

Box = tuple[torch.Tensor, torch.Tensor]

_PASS = (nn.Identity, nn.Dropout)
SUPPORTED = (
    "Linear, Conv2d, ReLU, Flatten, Normalize, MaxPool2d, AvgPool2d, BatchNorm1d/2d (eval), "
    "Identity, Dropout, nn.Sequential"
)


def flatten_layers(module: nn.Module) -> list[nn.Module]:
    """The network as a flat list of layers (nested ``Sequential``s unrolled).

    A :class:`~advguard.models.torch_model.TorchClassifier` contributes its ``preprocess``
    followed by its ``module``. Raises :class:`InputError` for anything IBP cannot handle.
    """
    pre = getattr(module, "preprocess", None)
    inner = getattr(module, "module", None)
    if isinstance(inner, nn.Module) and not isinstance(module, nn.Module):
        return ([*flatten_layers(pre)] if pre is not None else []) + flatten_layers(inner)
    if isinstance(module, nn.Sequential):
        return [leaf for child in module for leaf in flatten_layers(child)]
    supported = (
        nn.Linear,
        nn.Conv2d,
        nn.ReLU,
        nn.Flatten,
        Normalize,
        nn.MaxPool2d,
        nn.AvgPool2d,
        nn.BatchNorm1d,
        nn.BatchNorm2d,
        *_PASS,
    )
    if not isinstance(module, supported):
        raise InputError(
            f"IBP does not support layer {type(module).__name__} ({module!r}); supported: "
            f"{SUPPORTED}. Use randomized smoothing (--method smoothing) for this model."
        )
    return [module]


def _affine_box(lo: torch.Tensor, hi: torch.Tensor, fn: Callable, abs_fn: Callable) -> Box:
    mid, rad = (hi + lo) / 2, (hi - lo) / 2
    c, r = fn(mid), abs_fn(rad)
    return c - r, c + r


def propagate(layer: nn.Module, lo: torch.Tensor, hi: torch.Tensor) -> Box:
    """Bounds of ``layer``'s output over the box ``[lo, hi]``."""
    if isinstance(layer, nn.Linear):
        w = layer.weight
        return _affine_box(lo, hi, layer, lambda r: F.linear(r, w.abs()))
    if isinstance(layer, nn.Conv2d):
        if layer.padding_mode != "zeros":
            raise InputError(f"IBP supports Conv2d with zero padding only, got {layer!r}")

        def conv_abs(r: torch.Tensor) -> torch.Tensor:
            return F.conv2d(
                r, layer.weight.abs(), None, layer.stride, layer.padding, layer.dilation,
                layer.groups,
            )  # fmt: skip

        return _affine_box(lo, hi, layer, conv_abs)
    if isinstance(layer, nn.ReLU):
        return lo.clamp_min(0), hi.clamp_min(0)
    if isinstance(layer, (nn.Flatten, nn.MaxPool2d, nn.AvgPool2d, Normalize, *_PASS)):
        # monotone non-decreasing elementwise maps (Normalize: std > 0)
        return layer(lo), layer(hi)
    if isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)):
        if layer.training or layer.running_mean is None or layer.running_var is None:
            raise InputError(f"IBP needs {type(layer).__name__} in eval mode with running stats")
        scale = (layer.running_var + layer.eps).rsqrt()
        if layer.weight is not None:
            scale = scale * layer.weight
        shape = [1, -1] + [1] * (lo.ndim - 2)
        s = scale.view(shape)
        return _affine_box(lo, hi, layer, lambda r: r * s.abs())
    raise InputError(f"IBP does not support layer {type(layer).__name__}; supported: {SUPPORTED}")


def input_box(x: torch.Tensor, epsilon: float, bounds: tuple[float, float] | None) -> Box:
    eps = float(epsilon)
    if not np.isfinite(eps) or eps < 0:
        raise InputError(f"epsilon must be a finite number >= 0, got {epsilon}")
    lo, hi = x - eps, x + eps
    if bounds is not None:
        lo, hi = lo.clamp(bounds[0], bounds[1]), hi.clamp(bounds[0], bounds[1])
    return lo, hi


def _layers_and_device(module: nn.Module) -> tuple[list[nn.Module], torch.device]:
    layers = flatten_layers(module)
    dev = getattr(module, "device", None)
    if dev is None:
        p = next((t for m in layers for t in [*m.parameters(), *m.buffers()]), None)
        dev = p.device if p is not None else torch.device("cpu")
    return layers, torch.device(dev)


def _propagate_all(layers: list[nn.Module], lo: torch.Tensor, hi: torch.Tensor) -> Box:
    for layer in layers:
        lo, hi = propagate(layer, lo, hi)
    return lo, hi


def ibp_bounds(
    module: nn.Module,
    x: np.ndarray | torch.Tensor,
    epsilon: float,
    bounds: tuple[float, float] | None = (0.0, 1.0),
) -> Box:
    """``(lower, upper)`` logit bounds valid for every input within Linf ``epsilon`` of ``x``
    (and inside ``bounds``; ``None`` = unbounded).

    ``module`` is an ``nn.Module`` (Sequential-style) or a ``TorchClassifier`` (its
    ``preprocess`` is included). Differentiable w.r.t. the parameters (used by
    :func:`ibp_train`).
    """
    layers, dev = _layers_and_device(module)
    xt = torch.as_tensor(x, dtype=torch.float32).to(dev)
    return _propagate_all(layers, *input_box(xt, epsilon, bounds))


def margin_lower_bounds(
    module: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epsilon: float,
    bounds: tuple[float, float] | None = (0.0, 1.0),
) -> torch.Tensor:
    """Lower bounds ``(N, C)`` on ``z_y - z_j`` over the box (0 in column ``y``).

    Uses the elision of the last layer when it is a ``Linear`` layer, else logit bounds.
    """
    layers, dev = _layers_and_device(module)
    x, y = x.to(dev), y.to(dev).long()
    lo, hi = input_box(x, epsilon, bounds)
    last = layers[-1]
    if isinstance(last, nn.Linear):
        lo, hi = _propagate_all(layers[:-1], lo, hi)
        mid, rad = (hi + lo) / 2, (hi - lo) / 2
        w, b = last.weight, last.bias
        dw = w[y].unsqueeze(1) - w.unsqueeze(0)  # (N, C, D): W_y - W_j
        m = torch.einsum("ncd,nd->nc", dw, mid) - torch.einsum("ncd,nd->nc", dw.abs(), rad)
        if b is not None:
            m = m + (b[y].unsqueeze(1) - b.unsqueeze(0))
    else:
        lo, hi = _propagate_all(layers, lo, hi)
        m = lo.gather(1, y[:, None]) - hi
    return m.scatter(1, y[:, None], 0.0)


def ibp_certify(
    model: object,
    x: np.ndarray | torch.Tensor,
    y: np.ndarray | torch.Tensor,
    epsilon: float,
    *,
    batch_size: int = 512,
) -> np.ndarray:
    """Bool mask: samples whose label ``y`` provably wins against every other class for all
    inputs within Linf ``epsilon`` (inside the model's bounds).

    ``model`` is a :class:`~advguard.models.torch_model.TorchClassifier` (bounds taken from
    it) or a plain ``nn.Module`` (bounds (0, 1)). A True entry is a proof; False only means
    IBP could not prove it.
    """
    xt = torch.as_tensor(x, dtype=torch.float32)
    yt = torch.as_tensor(y)
    bounds: tuple[float, float] = tuple(getattr(model, "bounds", (0.0, 1.0)))
    if hasattr(model, "input_shape") and hasattr(model, "num_classes"):
        check_inputs(model, xt)  # type: ignore[arg-type]
        check_labels(model, yt, len(xt))  # type: ignore[arg-type]
    elif len(yt) != len(xt):
        raise InputError(f"need one label per input, got {len(yt)} labels for {len(xt)} inputs")
    out = []
    with torch.no_grad():
        for i in range(0, len(xt), batch_size):
            m = margin_lower_bounds(
                model,  # type: ignore[arg-type]
                xt[i : i + batch_size],
                yt[i : i + batch_size],
                epsilon,
                bounds,
            )
            others = m.scatter(1, yt[i : i + batch_size, None].to(m.device).long(), float("inf"))
            out.append((others.min(dim=1).values > 0).cpu())
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=bool)


def ibp_train(
    module: nn.Module,
    x: np.ndarray | torch.Tensor,
    y: np.ndarray | torch.Tensor,
    epsilon: float,
    *,
    epochs: int = 20,
    warmup_epochs: int = 2,
    ramp_epochs: int = 10,
    kappa_final: float = 0.5,
    batch_size: int = 64,
    lr: float = 1e-3,
    bounds: tuple[float, float] | None = (0.0, 1.0),
    seed: int = 0,
    progress: Callable[[int, int, float], None] | None = None,
) -> nn.Module:
    """IBP training (Gowal et al.): loss ``kappa * CE(clean) + (1 - kappa) * CE(worst case)``.

    The worst-case logits are the negated margin lower bounds (elided last layer). During
    ``warmup_epochs`` the training is clean (``kappa = 1``, ``epsilon = 0``); over the next
    ``ramp_epochs`` the training epsilon rises linearly to ``epsilon`` and kappa falls
    linearly to ``kappa_final`` (per step). Returns the module in eval mode.
    """
    xt = torch.as_tensor(x, dtype=torch.float32)
    yt = torch.as_tensor(y).long()
    if len(xt) == 0 or len(xt) != len(yt):
        raise InputError(f"need as many labels as inputs and at least one, got {len(xt)}/{len(yt)}")
    if epochs < 1 or batch_size < 1 or warmup_epochs < 0 or ramp_epochs < 0:
        raise InputError("epochs and batch_size must be >= 1, warmup/ramp epochs >= 0")
    if not 0 <= kappa_final <= 1:
        raise InputError(f"kappa_final must be in [0, 1], got {kappa_final}")
    flatten_layers(module)  # fail early on unsupported layers
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    module.train()
    for p in module.parameters():
        p.requires_grad_(True)
    opt = torch.optim.Adam(module.parameters(), lr=lr)
    steps_per_epoch = (len(xt) + batch_size - 1) // batch_size
    ramp_steps = max(ramp_epochs * steps_per_epoch, 1)
    step = 0
    for epoch in range(epochs):
        perm = torch.randperm(len(xt), generator=g)
        total, count = 0.0, 0
        for i in range(0, len(xt), batch_size):
            b = perm[i : i + batch_size]
            xb, yb = xt[b], yt[b]
            t = min(max(step - warmup_epochs * steps_per_epoch, 0) / ramp_steps, 1.0)
            eps_t, kappa = t * float(epsilon), 1.0 - t * (1.0 - kappa_final)
            loss = kappa * F.cross_entropy(module(xb), yb)
            if kappa < 1.0:
                worst = -margin_lower_bounds(module, xb, yb, eps_t, bounds)
                loss = loss + (1 - kappa) * F.cross_entropy(worst, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(b)
            count += len(b)
            step += 1
        if progress is not None:
            progress(epoch + 1, epochs, total / count)
    return module.eval()
