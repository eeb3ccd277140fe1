"""Small reference architectures, loadable as ``advguard.models.zoo:small_cnn``."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from advguard.errors import InputError


def small_cnn(input_shape: Sequence[int] = (1, 28, 28), num_classes: int = 10) -> nn.Module:
    """A compact CNN for small grayscale/colour images (8x8 digits up to 32x32).

    Two conv blocks (32, 64 channels), a max-pool after each when the image is
    at least 16 pixels wide, then a 128-unit hidden layer.
    """
    if len(input_shape) != 3:
        raise InputError(f"small_cnn needs (channels, height, width), got {tuple(input_shape)}")
    c, h, w = (int(v) for v in input_shape)
    pool = min(h, w) >= 16
    layers: list[nn.Module] = [nn.Conv2d(c, 32, 3, padding=1), nn.ReLU()]
    if pool:
        layers.append(nn.MaxPool2d(2))
    layers += [nn.Conv2d(32, 64, 3, padding=1), nn.ReLU()]
    if pool:
        layers.append(nn.MaxPool2d(2))
    fh, fw = (h // 4, w // 4) if pool else (h, w)
    layers += [nn.Flatten(), nn.Linear(64 * fh * fw, 128), nn.ReLU(), nn.Linear(128, num_classes)]
    return nn.Sequential(*layers)


def trades_cnn(input_shape: Sequence[int] = (1, 28, 28), num_classes: int = 10) -> nn.Module:
    """The 4-conv "SmallCNN" of Zhang et al. 2019 (TRADES), the usual MNIST robustness model.

    conv32-conv32-pool-conv64-conv64-pool (3x3, no padding) then two 200-unit hidden
    layers. Needs images at least 16 pixels wide; about as fast as :func:`small_cnn` per
    sample on 28x28 inputs but deeper, which matters for adversarial training at eps 0.3.
    """
    if len(input_shape) != 3:
        raise InputError(f"trades_cnn needs (channels, height, width), got {tuple(input_shape)}")
    c, h, w = (int(v) for v in input_shape)
    if min(h, w) < 16:
        raise InputError(f"trades_cnn needs images at least 16x16, got {h}x{w}; use small_cnn")
    fh, fw = ((h - 4) // 2 - 4) // 2, ((w - 4) // 2 - 4) // 2
    return nn.Sequential(
        nn.Conv2d(c, 32, 3), nn.ReLU(), nn.Conv2d(32, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3), nn.ReLU(), nn.Conv2d(64, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * fh * fw, 200), nn.ReLU(), nn.Linear(200, 200), nn.ReLU(),
        nn.Linear(200, num_classes),
    )  # fmt: skip


def mlp(
    input_shape: Sequence[int], num_classes: int, hidden: Sequence[int] = (128, 64)
) -> nn.Module:
    """A ReLU multilayer perceptron for tabular or flattened inputs."""
    n_in = 1
    for d in input_shape:
        n_in *= int(d)
    layers: list[nn.Module] = [nn.Flatten()]
    for h in hidden:
        layers += [nn.Linear(n_in, int(h)), nn.ReLU()]
        n_in = int(h)
    layers.append(nn.Linear(n_in, num_classes))
    return nn.Sequential(*layers)
