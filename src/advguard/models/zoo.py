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
