"""Small data sets for flows: the 2-D toy densities (the set used by FFJORD and Residual
Flows), numpy only, and scikit-learn's 8x8 digits.

:func:`toy_data` draws ``n`` points of a named density as a float32 tensor ``[n, 2]``; with a
``seed`` the draw is deterministic. The generators follow the recipes of REFERENCE.md 2.1; the
three that use scikit-learn there (``swissroll``, ``circles``, ``moons``) are reimplemented here
with the same parameters and the same construction (:func:`make_swiss_roll`,
:func:`make_circles`, :func:`make_moons`), so the toy densities do not need scikit-learn.

:func:`load_digits` returns the 1797 8x8 grey-scale digits that ship with scikit-learn (no
download) as integer images ``[N, 1, 8, 8]`` with :data:`DIGITS_LEVELS` = 17 levels (0..16), split
into seeded, disjoint train and test parts; it does need scikit-learn (``pip install
scikit-learn``, or the ``data`` extra), imported only when it is called. Dequantise the images
with ``fastflow.images.dequantize(x, n_bins=DIGITS_LEVELS)`` and report
``bits_per_dim(..., n_bins=DIGITS_LEVELS)``.

Every generator returns exactly ``n`` points: where a recipe splits ``n`` into equal groups
(rings, pinwheel arms, spiral arms), the remainder goes to the innermost ring, the first arms,
the first spiral.

References:
    Grathwohl, Chen, Bettencourt, Sutskever, Duvenaud. "FFJORD: Free-form Continuous Dynamics
    for Scalable Reversible Generative Models" (2018), https://arxiv.org/abs/1810.01367.
    Chen, Behrmann, Duvenaud, Jacobsen. "Residual Flows for Invertible Generative Modeling"
    (2019), https://arxiv.org/abs/1906.02735.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable

import numpy as np
import torch

__all__ = [
    "TOY_DATASETS",
    "toy_data",
    "make_moons",
    "make_circles",
    "make_swiss_roll",
    "DIGITS_LEVELS",
    "DIGITS_SPLITS",
    "load_digits",
]

Rng = np.random.Generator


def make_moons(n: int, noise: float | None = None, rng: Rng | None = None) -> np.ndarray:
    """Two interleaving half circles (scikit-learn's ``make_moons`` construction), ``[n, 2]``.

    The outer moon has ``n // 2`` points on the unit upper half circle, the inner one the rest on
    a lower half circle centred at ``(1, 0.5)``; evenly spaced, shuffled, plus Gaussian noise of
    standard deviation ``noise``.
    """
    rng = np.random.default_rng() if rng is None else rng
    n_out = n // 2
    n_in = n - n_out
    a_out = np.linspace(0, np.pi, n_out)
    a_in = np.linspace(0, np.pi, n_in)
    outer = np.stack([np.cos(a_out), np.sin(a_out)], 1)
    inner = np.stack([1 - np.cos(a_in), 1 - np.sin(a_in) - 0.5], 1)
    x = rng.permutation(np.concatenate([outer, inner]))
    if noise:
        x = x + rng.normal(scale=noise, size=x.shape)
    return x


def make_circles(
    n: int, factor: float = 0.8, noise: float | None = None, rng: Rng | None = None
) -> np.ndarray:
    """Two concentric circles, radii 1 and ``factor`` (scikit-learn's ``make_circles``), ``[n, 2]``.

    ``n // 2`` points on the outer circle, the rest on the inner one, evenly spaced angles
    without the end point, shuffled, plus Gaussian noise of standard deviation ``noise``.
    """
    if not 0 <= factor < 1:
        raise ValueError(f"factor must be in [0, 1), got {factor}")
    rng = np.random.default_rng() if rng is None else rng
    n_out = n // 2
    n_in = n - n_out
    a_out = np.linspace(0, 2 * np.pi, n_out, endpoint=False)
    a_in = np.linspace(0, 2 * np.pi, n_in, endpoint=False)
    outer = np.stack([np.cos(a_out), np.sin(a_out)], 1)
    inner = factor * np.stack([np.cos(a_in), np.sin(a_in)], 1)
    x = rng.permutation(np.concatenate([outer, inner]))
    if noise:
        x = x + rng.normal(scale=noise, size=x.shape)
    return x


def make_swiss_roll(n: int, noise: float = 0.0, rng: Rng | None = None) -> np.ndarray:
    """The 3-D swiss roll (scikit-learn's ``make_swiss_roll``), ``[n, 3]``.

    ``t = 1.5 pi (1 + 2 U)``, points ``(t cos t, 21 U', t sin t)`` plus Gaussian noise of
    standard deviation ``noise``.
    """
    rng = np.random.default_rng() if rng is None else rng
    t = 1.5 * np.pi * (1 + 2 * rng.random(n))
    y = 21 * rng.random(n)
    x = np.stack([t * np.cos(t), y, t * np.sin(t)], 1)
    return x + noise * rng.standard_normal((n, 3))


def _swissroll(n: int, rng: Rng) -> np.ndarray:
    return make_swiss_roll(n, noise=1.0, rng=rng)[:, [0, 2]] / 5.0


def _circles(n: int, rng: Rng) -> np.ndarray:
    return make_circles(n, factor=0.5, noise=0.08, rng=rng) * 3.0


def _rings(n: int, rng: Rng) -> np.ndarray:
    quarter = n // 4
    counts = (quarter, quarter, quarter, n - 3 * quarter)  # radii 1, .75, .5, .25
    parts = []
    for radius, count in zip((1.0, 0.75, 0.5, 0.25), counts):
        a = np.linspace(0, 2 * np.pi, count, endpoint=False)
        parts.append(radius * np.stack([np.cos(a), np.sin(a)], 1))
    x = rng.permutation(np.concatenate(parts) * 3.0)
    return x + rng.normal(scale=0.08, size=x.shape)


def _moons(n: int, rng: Rng) -> np.ndarray:
    return make_moons(n, noise=0.1, rng=rng) * 2 + np.array([-1.0, -0.2])


def _eight_gaussians(n: int, rng: Rng) -> np.ndarray:
    k = np.arange(8) * np.pi / 4
    centres = 4.0 * np.stack([np.cos(k), np.sin(k)], 1)
    x = rng.normal(scale=0.5, size=(n, 2)) + centres[rng.integers(0, 8, n)]
    return x / 1.414


def _pinwheel(n: int, rng: Rng) -> np.ndarray:
    arms, radial_std, tangential_std, rate = 5, 0.3, 0.1, 0.25
    labels = np.sort(np.arange(n) % arms)  # n // 5 per arm, the remainder to the first arms
    f = rng.standard_normal((n, 2)) * np.array([radial_std, tangential_std])
    f[:, 0] += 1.0
    angles = 2 * np.pi * labels / arms + rate * np.exp(f[:, 0])
    c, s = np.cos(angles), np.sin(angles)
    # row vector f times [[c, -s], [s, c]], as in the FFJORD generator
    x = np.stack([f[:, 0] * c + f[:, 1] * s, -f[:, 0] * s + f[:, 1] * c], 1)
    return 2 * rng.permutation(x)


def _two_spirals(n: int, rng: Rng) -> np.ndarray:
    m = n - n // 2  # the first arm takes the odd point
    theta = np.sqrt(rng.random(m)) * 3 * np.pi  # 540 degrees
    dx = -np.cos(theta) * theta + 0.5 * rng.random(m)
    dy = np.sin(theta) * theta + 0.5 * rng.random(m)
    arm = np.stack([dx, dy], 1)
    x = np.concatenate([arm, -arm[: n // 2]]) / 3
    return x + 0.1 * rng.standard_normal(x.shape)


def _checkerboard(n: int, rng: Rng) -> np.ndarray:
    x1 = rng.random(n) * 4 - 2
    x2 = rng.random(n) - 2 * rng.integers(0, 2, n) + np.floor(x1) % 2
    return np.stack([x1, x2], 1) * 2


_GENERATORS: dict[str, Callable[[int, Rng], np.ndarray]] = {
    "swissroll": _swissroll,
    "circles": _circles,
    "rings": _rings,
    "moons": _moons,
    "8gaussians": _eight_gaussians,
    "pinwheel": _pinwheel,
    "2spirals": _two_spirals,
    "checkerboard": _checkerboard,
}

#: Names accepted by :func:`toy_data`.
TOY_DATASETS: tuple[str, ...] = tuple(_GENERATORS)


def toy_data(name: str, n: int, seed: int | None = None) -> torch.Tensor:
    """``n`` points of the 2-D toy density ``name`` as a float32 tensor ``[n, 2]``.

    Arguments:
        name: one of :data:`TOY_DATASETS` (``swissroll``, ``circles``, ``rings``, ``moons``,
            ``8gaussians``, ``pinwheel``, ``2spirals``, ``checkerboard``).
        n: number of points (>= 1).
        seed: seed of the draw (numpy ``default_rng``); the same seed gives the same points.
            None: fresh randomness.

    Example:
        >>> x = toy_data("moons", 1000, seed=0)
        >>> x.shape, x.dtype
        (torch.Size([1000, 2]), torch.float32)
    """
    if name not in _GENERATORS:
        raise ValueError(f"name must be one of {TOY_DATASETS}, got {name!r}")
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
        raise ValueError(f"seed must be an int or None, got {seed!r}")
    rng = np.random.default_rng(seed)
    x = _GENERATORS[name](int(n), rng)
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


# -- scikit-learn's 8x8 digits ---------------------------------------------------------------

#: Grey levels of :func:`load_digits` images: the integers 0..16.
DIGITS_LEVELS = 17

#: Values of :func:`load_digits`'s ``split``.
DIGITS_SPLITS: tuple[str, ...] = ("train", "test", "all")


def load_digits(split: str = "train", test_fraction: float = 0.2, seed: int = 0) -> torch.Tensor:
    """scikit-learn's 8x8 handwritten digits as ``torch.uint8`` images ``[N, 1, 8, 8]``, levels 0..16.

    The 1797 images of ``sklearn.datasets.load_digits`` (UCI optical digits: each pixel counts
    the on-pixels of a 4x4 block of a 32x32 bitmap, hence :data:`DIGITS_LEVELS` = 17 levels; the
    data ships with scikit-learn, nothing is downloaded). The labels are dropped. The dtype is
    ``torch.uint8``, as for 8-bit images; cast (``.long()``, ``.float()``) before arithmetic that
    could leave 0..255.

    The split is a permutation of the 1797 indices drawn with ``numpy.random.default_rng(seed)``:
    the first ``round(test_fraction * 1797)`` go to ``"test"``, the rest to ``"train"``, each in
    the permuted (shuffled) order. For one ``(test_fraction, seed)`` the two parts are disjoint and
    together hold every image; the same arguments always give the same tensors. ``"all"`` is the
    whole set in scikit-learn's order (``test_fraction`` and ``seed`` are then unused, but still
    checked).

    Arguments:
        split: ``"train"``, ``"test"`` or ``"all"``.
        test_fraction: the share of images in the test part, ``0 < test_fraction < 1`` (both
            parts must be non-empty).
        seed: seed of the permutation, a non-negative int.

    Raises:
        ImportError: scikit-learn is not installed (``pip install scikit-learn``).
        ValueError: an argument is out of range; the message names it.

    Example:
        >>> train = load_digits("train")
        >>> train.shape, train.dtype, int(train.max())
        (torch.Size([1438, 1, 8, 8]), torch.uint8, 16)
        >>> load_digits("test").shape
        torch.Size([359, 1, 8, 8])
    """
    if split not in DIGITS_SPLITS:
        raise ValueError(f"split must be one of {DIGITS_SPLITS}, got {split!r}")
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, numbers.Real):
        raise ValueError(f"test_fraction must be a number in (0, 1), got {test_fraction!r}")
    if not 0 < float(test_fraction) < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    try:
        from sklearn.datasets import load_digits as sklearn_load_digits
    except ImportError as exc:
        raise ImportError(
            "fastflow.data.load_digits needs scikit-learn: pip install scikit-learn "
            "(or pip install 'fastflow[data]')"
        ) from exc
    images = sklearn_load_digits().images  # float64 [1797, 8, 8], integer values 0..16
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8)).unsqueeze(1)
    if split == "all":
        return x
    n = x.shape[0]
    n_test = round(float(test_fraction) * n)
    if not 0 < n_test < n:
        raise ValueError(
            f"test_fraction={test_fraction!r} leaves an empty train or test part of the {n} images"
        )
    perm = torch.from_numpy(np.random.default_rng(int(seed)).permutation(n))
    index = perm[:n_test] if split == "test" else perm[n_test:]
    return x[index].contiguous()
