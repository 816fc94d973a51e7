"""Tests of the 2-D toy densities (fastflow.data): shapes, determinism, and each one's geometry."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fastflow.data import TOY_DATASETS, make_circles, make_moons, make_swiss_roll, toy_data

N = 4001  # odd and not a multiple of 4 or 5: every generator must still return exactly N


def test_names():
    assert TOY_DATASETS == (
        "swissroll", "circles", "rings", "moons", "8gaussians", "pinwheel", "2spirals", "checkerboard"
    )


@pytest.mark.parametrize("name", TOY_DATASETS)
def test_shape_dtype_and_determinism(name):
    x = toy_data(name, N, seed=3)
    assert x.shape == (N, 2) and x.dtype == torch.float32 and x.is_contiguous()
    assert torch.isfinite(x).all()
    assert torch.equal(x, toy_data(name, N, seed=3))
    assert not torch.equal(x, toy_data(name, N, seed=4))
    assert toy_data(name, 1, seed=0).shape == (1, 2)
    assert toy_data(name, 7).shape == (7, 2)
    # roughly centred and of order-one scale, as the recipes intend
    assert x.abs().max() < 10 and 0.5 < x.std(0).min() < 3


def _radii(name, n=N):
    return toy_data(name, n, seed=0).norm(dim=1)


def test_circles_and_rings_radii():
    r = _radii("circles")
    outer, inner = r[r > 2.25], r[r <= 2.25]
    assert abs(len(outer) - N // 2) < 20 and abs(len(inner) - (N - N // 2)) < 20
    assert abs(outer.mean() - 3.0) < 0.05 and abs(inner.mean() - 1.5) < 0.05
    r = _radii("rings")
    for radius in (3.0, 2.25, 1.5, 0.75):
        near = r[(r - radius).abs() < 0.375]
        assert abs(len(near) - N / 4) < 40, radius
        assert abs(near.mean() - radius) < 0.03


def test_eight_gaussians_centres():
    x = toy_data("8gaussians", N, seed=0).double()
    k = torch.arange(8, dtype=torch.float64) * math.pi / 4
    centres = 4 * torch.stack([k.cos(), k.sin()], 1) / 1.414
    d = torch.cdist(x, centres)
    nearest = d.argmin(1)
    counts = torch.bincount(nearest, minlength=8)
    assert (counts - N / 8).abs().max() < 100
    offsets = x - centres[nearest]
    torch.testing.assert_close(offsets.std(0), torch.full((2,), 0.5 / 1.414, dtype=torch.float64), rtol=0.05, atol=0)


def test_checkerboard_squares():
    x = toy_data("checkerboard", N, seed=0)
    assert x[:, 0].min() >= -4 and x[:, 0].max() < 4 and x[:, 1].min() >= -4 and x[:, 1].max() < 4
    cells = torch.floor(x / 2).sum(1)
    assert (cells % 2 == 0).all()  # only the "black" squares of the board


def test_moons_geometry():
    x = make_moons(1000, noise=None, rng=np.random.default_rng(0))
    # the upper unit half circle, and the lower unit half circle centred at (1, 0.5)
    on_outer = (np.abs(np.linalg.norm(x, axis=1) - 1) < 1e-12) & (x[:, 1] >= -1e-12)
    on_inner = (np.abs(np.linalg.norm(x - np.array([1.0, 0.5]), axis=1) - 1) < 1e-12) & (x[:, 1] <= 0.5 + 1e-12)
    assert (on_outer | on_inner).all()
    assert on_outer.sum() == 500 and on_inner.sum() == 500
    t = toy_data("moons", N, seed=0)
    torch.testing.assert_close(t.mean(0), torch.tensor([0.0, 0.3]), rtol=0, atol=0.1)


def test_swissroll_and_spirals_and_pinwheel():
    roll = make_swiss_roll(2000, noise=0.0, rng=np.random.default_rng(0))
    t = np.hypot(roll[:, 0], roll[:, 2])  # |(t cos t, t sin t)| = t
    assert t.min() >= 1.5 * np.pi - 1e-9 and t.max() <= 4.5 * np.pi + 1e-9
    assert 0 <= roll[:, 1].min() and roll[:, 1].max() <= 21
    s = toy_data("swissroll", N, seed=0)
    assert s.norm(dim=1).max() < 4.5 * math.pi / 5 + 1.0
    spirals = toy_data("2spirals", N, seed=0)
    assert spirals.norm(dim=1).max() < 3 * math.pi / 3 + 0.8
    torch.testing.assert_close(spirals.mean(0), torch.zeros(2), rtol=0, atol=0.1)
    pin = toy_data("pinwheel", N, seed=0)
    angles = torch.atan2(pin[:, 1], pin[:, 0])
    hist = torch.histc(angles, bins=36, min=-math.pi, max=math.pi)
    assert hist.min() < 0.3 * hist.mean()  # five arms, not a uniform ring


def test_make_circles_factor():
    x = make_circles(100, factor=0.5, rng=np.random.default_rng(0))
    radii = np.sort(np.linalg.norm(x, axis=1))
    np.testing.assert_allclose(radii[:50], 0.5)
    np.testing.assert_allclose(radii[50:], 1.0)
    with pytest.raises(ValueError, match="factor"):
        make_circles(10, factor=1.0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="name must be one of"):
        toy_data("spiral", 10)
    for n in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="^n must be"):
            toy_data("moons", n)
    with pytest.raises(ValueError, match="seed"):
        toy_data("moons", 10, seed=1.5)
