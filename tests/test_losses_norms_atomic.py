"""Direct tests of the attack building blocks: losses (DLR against the paper's formula),
uniform sampling in norm balls, and crash-safe writes (advguard.atomic)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from advguard.atomic import atomic_path, atomic_write_text
from advguard.attacks import losses
from advguard.attacks.norms import norm_of, random_in_ball
from advguard.errors import InputError


def _logits(n: int = 64, k: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, k, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, k, (n,), generator=g)
    return z, y


def test_dlr_matches_croce_hein_formula():
    """DLR(x, y) = -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3), pi = logits sorted descending."""
    z, y = _logits()
    got = losses.dlr(z, y).numpy()
    for i, (row, yi) in enumerate(zip(z.numpy(), y.numpy(), strict=True)):
        desc = np.sort(row)[::-1]
        best_other = max(row[j] for j in range(len(row)) if j != yi)
        ref = -(row[yi] - best_other) / (desc[0] - desc[2])
        assert got[i] == pytest.approx(ref, rel=1e-9, abs=1e-9)
    # scale and shift invariant, positive exactly when misclassified
    assert np.allclose(losses.dlr(5 * z + 2, y).numpy(), got)
    assert ((got > 0) == (z.argmax(1) != y).numpy()).all()


def test_targeted_dlr_matches_formula():
    """-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)."""
    z, y = _logits(seed=1)
    t = (y + 3) % 10
    got = losses.dlr_targeted(z, y, t).numpy()
    for i, (row, yi, ti) in enumerate(zip(z.numpy(), y.numpy(), t.numpy(), strict=True)):
        desc = np.sort(row)[::-1]
        ref = -(row[yi] - row[ti]) / (desc[0] - 0.5 * (desc[2] + desc[3]))
        assert got[i] == pytest.approx(ref, rel=1e-9, abs=1e-9)


def test_margin_ce_and_for_goal():
    z, y = _logits(seed=2)
    t = (y + 1) % 10
    m = losses.margin(z, y)
    other = z.clone()
    other[torch.arange(len(z)), y] = -torch.inf
    assert torch.allclose(m, other.amax(1) - z[torch.arange(len(z)), y])
    assert torch.allclose(losses.margin_targeted(z, t), -losses.margin(z, t))
    assert torch.allclose(losses.ce_targeted(z, t), -losses.ce(z, t))
    assert torch.equal(losses.for_goal("ce", y)(z), losses.ce(z, y))
    assert torch.equal(losses.for_goal("margin", y, t)(z), losses.margin_targeted(z, t))
    assert torch.equal(losses.for_goal("dlr", y, t)(z), losses.dlr_targeted(z, y, t))
    with pytest.raises(InputError, match="loss"):
        losses.for_goal("hinge", y)


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_random_in_ball_is_inside_and_uniform_in_radius(norm):
    """Uniform in a d-dimensional ball of any norm: P(||v|| <= s * eps) = s^d, so
    (||v|| / eps)^d is uniform on [0, 1]."""
    d, n, eps = 3, 20000, 0.5
    gen = torch.Generator().manual_seed(0)
    v = random_in_ball(torch.zeros(n, d, dtype=torch.float64), norm, eps, gen)
    r = norm_of(v, norm).numpy()
    assert r.max() <= eps * (1 + 1e-12)
    assert stats.kstest((r / eps) ** d, "uniform").pvalue > 1e-3
    # no preferred direction: every coordinate has mean ~0 and is symmetric
    assert np.abs(v.mean(0).numpy()).max() < 0.02
    # a wrong radius law is detected: (r / eps)^(d - 1) is not uniform
    assert stats.kstest((r / eps) ** (d - 1), "uniform").pvalue < 1e-6


def test_random_in_ball_per_sample_radius_and_shape():
    gen = torch.Generator().manual_seed(1)
    eps = torch.tensor([0.1, 1.0, 2.0])
    v = random_in_ball(torch.zeros(3, 1, 4, 4), "l2", eps, gen)
    assert v.shape == (3, 1, 4, 4)
    assert (norm_of(v, "l2") <= eps + 1e-6).all()
    with pytest.raises(InputError):
        random_in_ball(torch.zeros(2, 3), "l0", 1.0, gen)


def test_atomic_write_text_replaces_and_creates_parents(tmp_path):
    dest = tmp_path / "a" / "b" / "report.json"
    atomic_write_text(dest, "first")
    atomic_write_text(dest, "second")
    assert dest.read_text() == "second"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["report.json"]


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_atomic_path_crash_keeps_the_old_file_and_no_temp_file(tmp_path, error):
    dest = tmp_path / "model.safetensors"
    dest.write_text("old")
    with pytest.raises(error), atomic_path(dest) as tmp:
        assert tmp.parent == dest.parent and tmp.name.endswith(".safetensors")
        tmp.write_text("half-writ")
        raise error()
    assert dest.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_atomic_path_success_moves_the_temp_file(tmp_path):
    dest = tmp_path / "out.bin"
    with atomic_path(dest) as tmp:
        tmp.write_bytes(b"\x00\x01")
        assert not dest.exists()  # nothing visible until the write is complete
    assert dest.read_bytes() == b"\x00\x01"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]
