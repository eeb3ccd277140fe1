"""Image input transforms: what they do to inputs, what they cost on clean accuracy, and how
they mask gradients (and BPDA undoes the masking)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage
import torch
import torch.nn.functional as F

from advguard.attacks import PGD
from advguard.defenses.transforms import (
    BitDepthReduction,
    GaussianNoise,
    InputTransform,
    JpegCompression,
    MedianSmoothing,
    TransformedClassifier,
)
from advguard.errors import InputError


def all_transforms(bounds=(0.0, 1.0)) -> list[InputTransform]:
    return [
        BitDepthReduction(3, bounds=bounds),
        MedianSmoothing(2),
        MedianSmoothing(3),
        JpegCompression(75, bounds=bounds),
        GaussianNoise(0.1, seed=0, bounds=bounds),
    ]


@pytest.mark.parametrize("bounds", [(0.0, 1.0), (-1.0, 2.0)])
@pytest.mark.parametrize("channels", [1, 3])
def test_shapes_dtype_and_bounds_preserved(bounds, channels):
    lo, hi = bounds
    g = torch.Generator().manual_seed(0)
    x = lo + (hi - lo) * torch.rand(5, channels, 9, 11, generator=g)
    for t in all_transforms(bounds):
        out = t(x)
        assert out.shape == x.shape and out.dtype == x.dtype, t
        assert float(out.min()) >= lo - 1e-6 and float(out.max()) <= hi + 1e-6, t
        assert not torch.equal(out, x), f"{t} left a random image unchanged"
    assert MedianSmoothing(3)(x[:0]).shape == (0, channels, 9, 11)


def test_declared_properties():
    assert [t.differentiable for t in all_transforms()] == [False, False, False, False, True]
    assert [t.randomized for t in all_transforms()] == [False, False, False, False, True]
    d = JpegCompression(60).describe()
    assert d["name"] == "jpeg" and d["params"]["quality"] == 60


@pytest.mark.parametrize("bits", [1, 2, 3, 5])
def test_bit_depth_levels(bits):
    x = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    out = BitDepthReduction(bits)(x)
    levels = torch.unique(out)
    assert len(levels) <= 2**bits
    grid = torch.arange(2**bits, dtype=torch.float32) / (2**bits - 1)
    assert torch.isclose(levels[:, None], grid[None]).any(1).all()  # values on the grid
    assert (out - x).abs().max() <= 0.5 / (2**bits - 1) + 1e-6  # nearest level
    assert torch.equal(BitDepthReduction(bits)(out), out)  # idempotent
    # other bounds: 1 bit maps to {lo, hi}
    y = BitDepthReduction(1, bounds=(-1.0, 3.0))(torch.tensor([-1.0, 0.9, 1.1, 3.0]))
    assert y.tolist() == [-1.0, -1.0, 3.0, 3.0]


def test_median_known_array_and_scipy_reference():
    a = torch.tensor(
        [[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0], [9.0, 10.0, 11.0, 12.0], [13, 14, 15, 16]]
    )[None, None]
    # 3x3 windows, edges padded by repeating the border value
    expected3 = torch.tensor(
        [[2.0, 3.0, 4.0, 4.0], [5.0, 6.0, 7.0, 8.0], [9.0, 10.0, 11.0, 12.0], [13, 13, 14, 15]]
    )
    assert torch.equal(MedianSmoothing(3)(a)[0, 0], expected3)
    # 2x2 windows cover rows/cols i-1..i; even windows take the upper middle value
    # e.g. pixel (1, 1): window {1, 2, 5, 6} -> 5; pixel (0, 1): {1, 2, 1, 2} -> 2
    expected2 = torch.tensor(
        [[1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 6.0, 7.0], [9.0, 9.0, 10.0, 11.0], [13, 13, 14, 15]]
    )
    assert torch.equal(MedianSmoothing(2)(a)[0, 0], expected2)
    salt = torch.zeros(1, 1, 5, 5)
    salt[0, 0, 2, 2] = 1.0  # an isolated speck is removed by both filters
    assert MedianSmoothing(3)(salt).abs().max() == 0 and MedianSmoothing(2)(salt).max() == 0
    x = torch.rand(3, 2, 7, 9, generator=torch.Generator().manual_seed(2))
    for k in (2, 3, 4):
        ref = scipy.ndimage.median_filter(x.numpy(), size=(1, 1, k, k), mode="reflect")
        np.testing.assert_array_equal(MedianSmoothing(k)(x).numpy(), ref)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    mse = ((a - b) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse)


def test_jpeg_changes_images_but_keeps_them_close(digits_split):
    _, _, x_te, _ = digits_split
    x = torch.tensor(x_te)
    out = JpegCompression(75)(x)
    assert (out - x).abs().amax((1, 2, 3)).min() > 0  # every image is changed
    p = psnr(out, x)
    assert float(p.min()) > 24.0 and float(p.mean()) > 28.0  # measured: min 27.6, mean 30.0 dB
    # lower quality, larger error
    assert float(psnr(JpegCompression(10)(x), x).mean()) < float(p.mean()) - 3
    # on 8-bit values that are already JPEG-decoded, a second pass changes little
    assert float(psnr(JpegCompression(75)(out), out).mean()) > 40.0
    # RGB: a smooth colour image survives, and the channels stay in place
    ramp = torch.linspace(0, 1, 16)
    rgb = torch.stack(
        [
            ramp[None].expand(16, 16),
            ramp[:, None].expand(16, 16),
            0.5 + 0 * ramp[None].expand(16, 16),
        ]
    )[None]
    rgb_out = JpegCompression(90)(rgb)
    assert float(psnr(rgb_out, rgb)) > 30.0


@pytest.mark.slow  # accuracy costs on the digits CNN: a characterization band
def test_clean_accuracy_cost_on_digits(digits_split, digits_model):
    """What each transform costs on clean accuracy (397 digits test images, ~98% clean).

    The defended CNN keeps its clean accuracy under JPEG 75 (measured: 0.980 both).
    Measured drops (points, 5 trainings): bit depth 3: 0, bit depth 2: 0, JPEG 75: 0,
    noise 0.05: -0.3..0.3, bit depth 1: 4.5..5.5, median 3x3: 8..14, median 2x2: 21..24
    (8x8 digits are too small for it).
    """
    _, _, x_te, y_te = digits_split
    clean = digits_model.accuracy(x_te, y_te)
    assert clean > 0.95

    def drop(t: InputTransform) -> float:
        return clean - TransformedClassifier(digits_model, [t]).accuracy(x_te, y_te)

    for t in (BitDepthReduction(3), BitDepthReduction(2), JpegCompression(75)):
        assert drop(t) <= 0.01, t
    assert drop(GaussianNoise(0.05, seed=0)) <= 0.02
    # the aggressive settings cost visibly on 8x8 images: the price is real and measured
    assert 0.01 < drop(BitDepthReduction(1)) < 0.15
    assert 0.02 < drop(MedianSmoothing(3)) < 0.2
    assert drop(MedianSmoothing(2)) > drop(MedianSmoothing(3))
    jpeg = TransformedClassifier(digits_model, [JpegCompression(75)]).accuracy(x_te, y_te)
    assert jpeg >= clean - 0.03


def test_bit_depth_masks_gradients_and_bpda_restores_them(digits_eval, digits_model):
    x, y = digits_eval
    x, y = x[:100], y[:100]
    defended = TransformedClassifier(digits_model, [BitDepthReduction(2)])
    assert defended.nondifferentiable == ["bit-depth"]

    def ce(z: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(z, y, reduction="none")

    _, loss, grad = defended.value_and_grad(x, ce)
    assert torch.count_nonzero(grad) == 0  # masking: round() has zero gradient
    bpda_model = defended.with_bpda()
    _, loss_b, grad_b = bpda_model.value_and_grad(x, ce)
    assert (grad_b.flatten(1).abs().sum(1) > 0).all()
    assert torch.equal(loss, loss_b)
    np.testing.assert_array_equal(defended.predict_logits(x), bpda_model.predict_logits(x))

    # what masking buys on paper, and what it is worth: PGD without BPDA barely moves (its
    # sign step is 0 and only the random start remains), PGD through BPDA breaks the model
    attack = PGD(norm="linf", steps=10, seed=0)
    masked = attack(defended, x, y, epsilon=0.2).success.float().mean().item()
    through = attack(bpda_model, x, y, epsilon=0.2).success.float().mean().item()
    assert through > 0.8 and masked < through - 0.4, (masked, through)  # measured 0.01-0.03 / 1.0


def test_gaussian_noise_is_random_and_reproducible(digits_eval, digits_model):
    x, _ = digits_eval
    noisy = TransformedClassifier(digits_model, [GaussianNoise(0.1, seed=0)])
    assert noisy.randomized
    a, b = noisy.predict_logits(x[:20]), noisy.predict_logits(x[:20])
    assert not np.allclose(a, b)
    # the same seed replays the same sequence of draws
    t1, t2 = GaussianNoise(0.1, seed=5), GaussianNoise(0.1, seed=5)
    assert torch.equal(t1(x[:4]), t2(x[:4])) and torch.equal(t1(x[:4]), t2(x[:4]))
    assert torch.equal(GaussianNoise(0.0)(x[:4]), x[:4])
    noise = GaussianNoise(0.1, seed=1)(torch.full((1, 1, 64, 64), 0.5)) - 0.5
    assert abs(float(noise.std()) - 0.1) < 0.01 and abs(float(noise.mean())) < 0.01


def test_bad_input_raises_input_error():
    for make in (
        lambda: BitDepthReduction(0),
        lambda: BitDepthReduction(2.5),  # type: ignore[arg-type]
        lambda: BitDepthReduction(2, bounds=(1.0, 0.0)),
        lambda: MedianSmoothing(1),
        lambda: JpegCompression(0),
        lambda: JpegCompression(101),
        lambda: GaussianNoise(-0.1),
        lambda: GaussianNoise(0.1, seed=1.5),  # type: ignore[arg-type]
    ):
        with pytest.raises(InputError):
            make()
    with pytest.raises(InputError, match="channels"):
        JpegCompression(75)(torch.rand(2, 2, 8, 8))
    with pytest.raises(InputError, match=r"\(N, C, H, W\)"):
        MedianSmoothing(3)(torch.rand(2, 8, 8))
    with pytest.raises(InputError, match="at least"):
        MedianSmoothing(5)(torch.rand(1, 1, 1, 8))
    with pytest.raises(InputError, match=r"torch\.Tensor"):
        BitDepthReduction(2)(np.zeros((1, 1, 4, 4)))  # type: ignore[arg-type]
