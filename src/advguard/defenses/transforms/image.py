"""Image input transforms (pre-processing defenses) on torch batches ``(N, C, H, W)``.

All of them map a batch in the model's raw input space to a batch of the same shape inside
the same ``bounds`` (given to each transform; default ``(0, 1)``):

* :class:`BitDepthReduction` and :class:`MedianSmoothing` are the two "squeezers" of feature
  squeezing (Xu et al. 2018, NDSS).
* :class:`JpegCompression` re-encodes every image with Pillow (Dziugaite et al. 2016,
  Das et al. 2017, Guo et al. 2018).
* :class:`GaussianNoise` adds random noise (randomized smoothing without the certificate).

The first three are declared ``differentiable = False``: their gradient is zero (rounding),
sparse and meaningless (median by sorting) or absent (Pillow). Plain gradient attacks on them
are gradient-masked; attack them with BPDA (:meth:`TransformedClassifier.with_bpda`). The last
one is ``randomized = True``: attack it with EOT. See docs/transforms-and-detectors.md.
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
import torch

from advguard import _validate as check
from advguard.defenses.transforms.base import InputTransform
from advguard.errors import InputError


def _check_bounds(bounds: tuple[float, float]) -> tuple[float, float]:
    try:
        lo, hi = float(bounds[0]), float(bounds[1])
    except (TypeError, ValueError, IndexError):
        raise InputError(f"bounds must be a pair (low, high), got {bounds!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise InputError(f"bounds must be finite with low < high, got {bounds!r}")
    return lo, hi


def _check_int(name: str, value: object, lo: int, hi: int) -> int:
    return check.integer(name, value, low=lo, high=hi)


def _check_tensor(x: object, name: str, *, image: bool) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{name} expects a torch.Tensor batch, got {type(x).__name__}")
    if not torch.is_floating_point(x):
        raise InputError(f"{name} expects a floating-point tensor, got {x.dtype}")
    if image and x.ndim != 4:
        raise InputError(f"{name} expects an image batch (N, C, H, W), got shape {tuple(x.shape)}")
    if x.ndim < 1:
        raise InputError(f"{name} expects a batch, got a scalar")
    return x


class BitDepthReduction(InputTransform):
    """Quantize every value to ``2**bits`` levels evenly spaced over ``bounds`` (inclusive).

    ``x' = lo + (hi - lo) * round((x - lo) / (hi - lo) * (2**bits - 1)) / (2**bits - 1)``
    (Xu et al. 2018; 1 bit on MNIST). Works on any shape. Zero gradient almost everywhere,
    hence ``differentiable = False``; BPDA uses the identity.
    """

    name = "bit-depth"
    differentiable = False
    randomized = False

    def __init__(self, bits: int, *, bounds: tuple[float, float] = (0.0, 1.0)) -> None:
        self.bits = _check_int("bits", bits, 1, 16)
        self.bounds = _check_bounds(bounds)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = _check_tensor(x, "BitDepthReduction", image=False)
        lo, hi = self.bounds
        levels = float(2**self.bits - 1)
        u = ((x - lo) / (hi - lo)).clamp(0.0, 1.0)
        return (torch.round(u * levels) / levels) * (hi - lo) + lo

    def params(self) -> dict[str, Any]:
        return {"bits": self.bits, "bounds": list(self.bounds)}


class MedianSmoothing(InputTransform):
    """Median filter over ``size x size`` windows, per image and channel.

    Matches ``scipy.ndimage.median_filter(x, size=(1, 1, size, size), mode="reflect")``, the
    implementation of Xu et al. (2x2 on MNIST, 2x2 / 3x3 on CIFAR-10 and ImageNet): the window
    of pixel ``i`` covers offsets ``-(size // 2) .. (size - 1) // 2``, borders are padded by
    symmetric reflection (edge value repeated), and for an even window the upper of the two
    middle values is taken. Computed with ``unfold`` + sort. ``differentiable = False``: its
    gradient only flows to the selected pixel, which BPDA replaces by the identity.
    """

    name = "median"
    differentiable = False
    randomized = False

    def __init__(self, size: int = 2) -> None:
        self.size = _check_int("size", size, 2, 15)

    @staticmethod
    def _symmetric_index(n: int, before: int, after: int, device: torch.device) -> torch.Tensor:
        idx = torch.arange(-before, n + after, device=device)
        idx = torch.where(idx < 0, -idx - 1, idx)
        return torch.where(idx >= n, 2 * n - 1 - idx, idx)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = _check_tensor(x, "MedianSmoothing", image=True)
        n, c, h, w = x.shape
        k = self.size
        before, after = k // 2, (k - 1) // 2
        if before > min(h, w):
            raise InputError(
                f"MedianSmoothing(size={k}) needs images of at least {before} pixels per side, "
                f"got {h}x{w}; use a smaller size"
            )
        if x.numel() == 0:
            return x.clone()
        rows = self._symmetric_index(h, before, after, x.device)
        cols = self._symmetric_index(w, before, after, x.device)
        padded = x.index_select(2, rows).index_select(3, cols)
        # (N*C, 1, H+k-1, W+k-1) -> (N*C, k*k, H*W): one column per output pixel
        patches = torch.nn.functional.unfold(padded.reshape(n * c, 1, *padded.shape[2:]), k)
        med = patches.sort(dim=1).values[:, (k * k) // 2, :]
        return med.reshape(n, c, h, w)

    def params(self) -> dict[str, Any]:
        return {"size": self.size}


class JpegCompression(InputTransform):
    """Encode every image as JPEG with Pillow at ``quality`` and decode it again.

    Values are mapped from ``bounds`` to 8-bit integers (rounded), encoded as grayscale
    (1 channel) or RGB (3 channels, Pillow's default 4:2:0 chroma subsampling) and mapped
    back to floats in ``bounds``. Other channel counts raise :class:`InputError`. Runs on the
    CPU (the result is moved back to the input's device). No gradient: ``differentiable =
    False``; BPDA uses the identity (Athalye et al. 2018 broke JPEG defenses exactly so).
    """

    name = "jpeg"
    differentiable = False
    randomized = False

    def __init__(self, quality: int = 75, *, bounds: tuple[float, float] = (0.0, 1.0)) -> None:
        self.quality = _check_int("quality", quality, 1, 100)
        self.bounds = _check_bounds(bounds)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from PIL import Image

        x = _check_tensor(x, "JpegCompression", image=True)
        n, c, h, w = x.shape
        if c not in (1, 3):
            raise InputError(
                f"JpegCompression encodes grayscale (1 channel) or RGB (3 channels) images, "
                f"got {c} channels; drop it for this model or use another transform"
            )
        lo, hi = self.bounds
        u8 = (
            (((x.detach().float().cpu() - lo) / (hi - lo)).clamp(0.0, 1.0) * 255.0)
            .round()
            .to(torch.uint8)
            .numpy()
        )
        out = np.empty((n, c, h, w), dtype=np.float32)
        mode = "L" if c == 1 else "RGB"
        for i in range(n):
            arr = u8[i, 0] if c == 1 else np.ascontiguousarray(u8[i].transpose(1, 2, 0))
            buf = io.BytesIO()
            Image.fromarray(arr, mode=mode).save(buf, format="JPEG", quality=self.quality)
            buf.seek(0)
            with Image.open(buf) as img:
                dec = np.asarray(img.convert(mode), dtype=np.float32)
            out[i] = dec[None] if c == 1 else dec.transpose(2, 0, 1)
        res = torch.from_numpy(out / 255.0 * (hi - lo) + lo)
        return res.to(device=x.device, dtype=x.dtype)

    def params(self) -> dict[str, Any]:
        return {"quality": self.quality, "bounds": list(self.bounds)}


class GaussianNoise(InputTransform):
    """Add ``N(0, sigma^2)`` noise to every value, then clip to ``bounds``.

    ``randomized = True``: every call draws new noise (from a private generator seeded with
    ``seed``, so a sequence of calls is reproducible; ``seed=None`` seeds it from torch's
    global RNG). Differentiable (the noise is additive), but a single gradient is a sample of
    a random function: attack it with EOT, averaging gradients over draws.
    """

    name = "gaussian-noise"
    differentiable = True
    randomized = True

    def __init__(
        self, sigma: float, *, seed: int | None = None, bounds: tuple[float, float] = (0.0, 1.0)
    ) -> None:
        self.sigma = check.non_negative("sigma", sigma)
        self.seed = None if seed is None else check.integer("seed", seed)
        self.bounds = _check_bounds(bounds)
        self._gen = torch.Generator()
        if self.seed is None:
            self._gen.manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
        else:
            self._gen.manual_seed(self.seed)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = _check_tensor(x, "GaussianNoise", image=False)
        noise = torch.randn(x.shape, generator=self._gen, dtype=torch.float32)
        noise = noise.to(device=x.device, dtype=x.dtype)
        return (x + self.sigma * noise).clamp(*self.bounds)

    def params(self) -> dict[str, Any]:
        return {"sigma": self.sigma, "seed": self.seed, "bounds": list(self.bounds)}


__all__ = ["BitDepthReduction", "GaussianNoise", "JpegCompression", "MedianSmoothing"]
