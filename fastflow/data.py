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

:func:`load_array` reads a numeric table ``[N, D]`` from a ``.npy``, ``.csv``/``.txt`` or (with
h5py) ``.hdf5`` file; :func:`load_tabular` reads the tabular benchmarks of the MAF paper (POWER,
GAS, HEPMASS, MINIBOONE, BSDS300) from local files, preprocessed as in that paper.

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
import os
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
    "TABULAR_DATASETS",
    "TABULAR_FEATURES",
    "TABULAR_SPLITS",
    "load_array",
    "load_tabular",
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


# -- arrays from files, and the tabular density-estimation benchmarks ---------------------------

#: The tabular data sets of the MAF paper (Papamakarios et al. 2017), used by FFJORD and others.
TABULAR_DATASETS: tuple[str, ...] = ("power", "gas", "hepmass", "miniboone", "bsds300")

#: Features of each tabular data set after the standard preprocessing.
TABULAR_FEATURES: dict[str, int] = {"power": 6, "gas": 8, "hepmass": 21, "miniboone": 43, "bsds300": 63}

#: Values of :func:`load_tabular`'s ``split``.
TABULAR_SPLITS: tuple[str, ...] = ("train", "validation", "test")

_TEXT_SUFFIXES = (".csv", ".txt", ".dat", ".tsv")
_HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf")
_SPLIT_ALIASES = {"train": ("train", "trn"), "validation": ("validation", "val", "valid"), "test": ("test", "tst")}


def _h5py():
    try:
        import h5py
    except ImportError as exc:
        raise ImportError(
            "reading HDF5 files (.h5, .hdf5) needs h5py: pip install h5py (or convert the file "
            "to .npy or .csv)"
        ) from exc
    return h5py


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _read_text(path: str) -> tuple[np.ndarray, list[str] | None]:
    """A delimited text table: comma, tab, semicolon or whitespace separated, with an optional
    header line (a first line with a field that is not a number). Returns the array and the
    header's names (None without a header)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [line for line in (raw.strip() for raw in f) if line]
    if not lines:
        raise ValueError(f"{path}: the file is empty")
    first = lines[0]
    delimiter = next((d for d in (",", "\t", ";") if d in first), None)

    def fields(line: str) -> list[str]:
        return [p.strip() for p in (line.split(delimiter) if delimiter else line.split())]

    names = None
    if not all(_is_number(p) for p in fields(first)):
        names = fields(first)
        lines = lines[1:]
        if not lines:
            raise ValueError(f"{path}: the file has a header line and no data rows")
    rows = []
    width = None
    for number, line in enumerate(lines, start=2 if names else 1):
        parts = fields(line)
        if width is None:
            width = len(parts)
        elif len(parts) != width:
            raise ValueError(f"{path}, line {number}: {len(parts)} columns, the first row has {width}")
        try:
            rows.append([float(p) for p in parts])
        except ValueError:
            bad = next(p for p in parts if not _is_number(p))
            raise ValueError(f"{path}, line {number}: {bad!r} is not a number") from None
    return np.asarray(rows, dtype=np.float64), names


def _read_table(path: str, key: str | None = None) -> tuple[np.ndarray, list[str] | None]:
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".npy":
        try:
            x = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise ValueError(f"{path}: not a readable .npy array ({exc})") from None
        names = None
    elif suffix in _TEXT_SUFFIXES:
        x, names = _read_text(path)
    elif suffix in _HDF5_SUFFIXES:
        h5py = _h5py()
        try:
            with h5py.File(path, "r") as f:
                keys = list(f.keys())
                if key is None:
                    if len(keys) != 1:
                        raise ValueError(f"{path}: give the HDF5 data set to read, one of {keys}")
                    key = keys[0]
                if key not in f:
                    raise ValueError(f"{path}: no HDF5 data set {key!r} (it has {keys})")
                x = np.asarray(f[key])
        except OSError as exc:
            raise ValueError(f"{path}: not a readable HDF5 file ({exc})") from None
        names = None
    else:
        raise ValueError(
            f"{path}: unknown file type {suffix or '(no suffix)'!r}; use .npy, .csv, .txt or .hdf5"
        )
    if x.dtype.kind not in "fiub":
        raise ValueError(f"{path}: expected numbers, got an array of dtype {x.dtype}")
    if x.ndim != 2:
        raise ValueError(f"{path}: expected a 2-D table [rows, columns], got shape {x.shape}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{path}: the table is empty (shape {x.shape})")
    x = x.astype(np.float64)
    if not np.isfinite(x).all():
        row = int(np.nonzero(~np.isfinite(x).all(1))[0][0])
        raise ValueError(f"{path}: row {row} holds a NaN or an infinity")
    return x, names


def load_array(path: str | os.PathLike, key: str | None = None) -> torch.Tensor:
    """A 2-D numeric table ``[N, D]`` from a file, as a float32 tensor.

    Formats, by suffix: ``.npy`` (numpy, no pickles); ``.csv``, ``.tsv``, ``.txt``, ``.dat``
    (comma, tab, semicolon or whitespace separated, an optional header line of column names);
    ``.h5``/``.hdf5`` (the data set ``key``, or the only one; needs h5py).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file cannot be read as a finite 2-D numeric table; the message names
            the file (and the line, for text).
        ImportError: an HDF5 file without h5py installed.

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "points.csv")
        >>> _ = open(path, "w").write("x,y\\n0.5,1\\n2,3\\n")
        >>> load_array(path)
        tensor([[0.5000, 1.0000],
                [2.0000, 3.0000]])
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    x, _ = _read_table(path, key)
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


def _three_way(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MAF's split: the last 10% is the test part, the last 10% of the rest the validation part."""
    n_test = int(0.1 * x.shape[0])
    rest = x[: x.shape[0] - n_test]
    n_val = int(0.1 * rest.shape[0])
    if n_test < 1 or n_val < 1:
        raise ValueError(f"too few rows ({x.shape[0]}) for a train/validation/test split")
    return rest[: rest.shape[0] - n_val], rest[rest.shape[0] - n_val :], x[x.shape[0] - n_test :]


def _normalise(parts, stats: np.ndarray) -> tuple[np.ndarray, ...]:
    mu, sd = stats.mean(0), stats.std(0)
    sd = np.where(sd > 0, sd, 1.0)
    return tuple((p - mu) / sd for p in parts)


def _find(path: str, *names: str) -> str:
    """``path`` itself when it is a file, else the first of ``names`` under it."""
    if os.path.isfile(path):
        return path
    for name in names:
        candidate = os.path.join(path, name)
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(f"{path}: none of {', '.join(names)} found there")


def _check_columns(name: str, x: np.ndarray, expected: int, what: str, path: str) -> None:
    if x.shape[1] != expected:
        raise ValueError(f"{name}: {path} has {x.shape[1]} columns, expected {expected} ({what})")


def _drop_repeated(train: np.ndarray, limit: int = 5) -> np.ndarray:
    """Indices of features whose most frequent value occurs at most ``limit`` times in ``train``
    (MAF's HEPMASS rule: features with many repeated values are dropped)."""
    keep = []
    for j in range(train.shape[1]):
        _, counts = np.unique(train[:, j], return_counts=True)
        if counts.max() <= limit:
            keep.append(j)
    return np.asarray(keep, dtype=np.int64)


def _raw_power(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    file = _find(path, "data.npy", "power/data.npy", "data.csv", "power/data.csv")
    x, _ = _read_table(file)
    _check_columns("power", x, 8, "the raw household power table: 7 measurements and the time", file)
    rng = np.random.RandomState(42)
    x = x.copy()
    rng.shuffle(x)
    # drop global intensity (3) and global reactive power (1); the measurements are rounded,
    # so uniform noise of their resolution makes the density continuous
    x = np.delete(x, [1, 3], axis=1)
    n = x.shape[0]
    noise = np.hstack([
        0.001 * rng.rand(n, 1),  # global active power
        0.01 * rng.rand(n, 1),  # voltage
        rng.rand(n, 3),  # the three sub-meterings
        np.zeros((n, 1)),  # time
    ])
    train, val, test = _three_way(x + noise)
    return _normalise((train, val, test), np.vstack([train, val]))


def _raw_gas(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    file = _find(path, "ethylene_CO.csv", "gas/ethylene_CO.csv", "ethylene_CO.npy", "gas/ethylene_CO.npy")
    x, names = _read_table(file)
    if names is not None:
        drop = [j for j, n in enumerate(names) if n.strip().lower() in ("time", "meth", "eth")]
        x = np.delete(x, drop, axis=1)
    elif x.shape[1] == 19:  # the table's own order: time, methane, ethylene, 16 sensors
        x = x[:, 3:]
    _check_columns("gas", x, 16, "the 16 sensor readings, after the time and the two concentrations", file)
    # drop, one at a time, a column correlated above 0.98 with another, until none is
    while True:
        with np.errstate(invalid="ignore", divide="ignore"):
            corr = np.nan_to_num(np.corrcoef(x, rowvar=False))
        over = (corr > 0.98).sum(1)
        if not (over > 1).any():
            break
        x = np.delete(x, int(np.nonzero(over > 1)[0][0]), axis=1)
    (x,) = _normalise((x,), x)
    return _three_way(x)


def _raw_hepmass(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    parts = []
    for which in ("train", "test"):
        file = _find(path, f"1000_{which}.csv", f"hepmass/1000_{which}.csv")
        x, _ = _read_table(file)
        if x.shape[1] < 28:
            raise ValueError(
                f"hepmass: {file} has {x.shape[1]} columns, expected at least 28 (the label, "
                "27 features, the mass)"
            )
        x = x[x[:, 0] == 1, 1:28]  # signal events only; drop the label, the mass and after
        if x.shape[0] == 0:
            raise ValueError(f"hepmass: {file} has no rows with label 1 (signal)")
        parts.append(x)
    train, test = parts
    keep = _drop_repeated(train)
    train, test = train[:, keep], test[:, keep]
    train, test = _normalise((train, test), train)
    n_val = int(0.1 * train.shape[0])
    if n_val < 1:
        raise ValueError(f"hepmass: too few signal rows ({train.shape[0]}) for a validation part")
    return train[: train.shape[0] - n_val], train[train.shape[0] - n_val :], test


def _raw_miniboone(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    file = _find(path, "data.npy", "miniboone/data.npy", "data.csv", "miniboone/data.csv")
    x, _ = _read_table(file)
    _check_columns("miniboone", x, 43, "the preprocessed particle-identification features", file)
    train, val, test = _three_way(x)
    return _normalise((train, val, test), np.vstack([train, val]))


def _raw_bsds300(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    file = _find(path, "BSDS300.hdf5", "BSDS300/BSDS300.hdf5")
    return tuple(_read_table(file, key)[0] for key in TABULAR_SPLITS)  # type: ignore[return-value]


_RAW = {
    "power": _raw_power,
    "gas": _raw_gas,
    "hepmass": _raw_hepmass,
    "miniboone": _raw_miniboone,
    "bsds300": _raw_bsds300,
}


def _split_file(directory: str, split: str) -> str | None:
    for alias in _SPLIT_ALIASES[split]:
        for suffix in (".npy",) + _TEXT_SUFFIXES + _HDF5_SUFFIXES:
            candidate = os.path.join(directory, alias + suffix)
            if os.path.isfile(candidate):
                return candidate
    return None


def load_tabular(name: str, path: str | os.PathLike, split: str = "train") -> torch.Tensor:
    """One split of a tabular density-estimation data set of the MAF paper, from local files,
    as a float32 tensor ``[N, D]`` (nothing is downloaded).

    ``path`` may hold the data in any of these forms, tried in this order:

    1. an HDF5 file (``.h5``/``.hdf5``, needs h5py) with data sets ``train``, ``validation``
       (or ``val``) and ``test``, already preprocessed (BSDS300's ``BSDS300.hdf5`` is one);
    2. a directory with the preprocessed splits as files ``train``, ``validation`` (or ``val``)
       and ``test`` with suffix ``.npy``, ``.csv``, ``.txt`` or ``.hdf5``;
    3. the files of the MAF paper's data archive (a file, or its folder), preprocessed here as
       in the MAF paper: ``power/data.npy`` (8 columns; global intensity and reactive power
       dropped, uniform noise of the readings' resolution added, shuffled with seed 42),
       ``gas/ethylene_CO`` as ``.csv`` with a header or ``.npy`` (time and concentrations
       dropped, then one of every pair of columns correlated above 0.98), ``hepmass/1000_train.csv``
       and ``1000_test.csv`` (signal rows, the 27 features, those with a value repeated more
       than 5 times in the training part dropped), ``miniboone/data.npy`` (43 columns).

    Splits of form 3: the last 10% of the rows is the test part and the last 10% of the rest
    the validation part (HEPMASS: its own test file, validation from the training file); the
    data are normalised to zero mean and unit variance with the statistics of the training and
    validation parts (GAS: of the whole set; HEPMASS: of the training file). Forms 1 and 2 are
    returned as stored and must have :data:`TABULAR_FEATURES` ``[name]`` columns (POWER 6,
    GAS 8, HEPMASS 21, MINIBOONE 43, BSDS300 63).

    Papamakarios, Pavlakou, Murray. "Masked Autoregressive Flow for Density Estimation" (2017),
    https://arxiv.org/abs/1705.07057.

    Arguments:
        name: one of :data:`TABULAR_DATASETS`.
        path: the file or directory.
        split: ``"train"``, ``"validation"`` or ``"test"``.

    Raises:
        FileNotFoundError: ``path`` or a file it should contain is missing.
        ValueError: a bad ``name`` or ``split``, a file that is not a numeric table, or one with
            the wrong number of columns (the message says how many were expected).
        ImportError: an HDF5 file without h5py.

    Example:
        >>> import tempfile, os
        >>> folder = tempfile.mkdtemp()
        >>> for split, n in (("train", 90), ("val", 10), ("test", 20)):
        ...     np.save(os.path.join(folder, split + ".npy"), np.random.randn(n, 43))
        >>> load_tabular("miniboone", folder, "validation").shape
        torch.Size([10, 43])
    """
    if name not in TABULAR_DATASETS:
        raise ValueError(f"name must be one of {TABULAR_DATASETS}, got {name!r}")
    if split not in TABULAR_SPLITS:
        raise ValueError(f"split must be one of {TABULAR_SPLITS}, got {split!r}")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{name}: {path} does not exist")
    expected = TABULAR_FEATURES[name]
    if os.path.isfile(path) and os.path.splitext(path)[1].lower() in _HDF5_SUFFIXES:
        h5py = _h5py()
        with h5py.File(path, "r") as f:
            keys = list(f.keys())
        key = next((a for a in _SPLIT_ALIASES[split] if a in keys), None)
        if key is None:
            raise ValueError(f"{name}: {path} has no {split!r} data set (it has {keys})")
        x, _ = _read_table(path, key)
        _check_columns(name, x, expected, "the preprocessed features", f"{path}[{key}]")
    elif os.path.isdir(path) and _split_file(path, split) is not None:
        file = _split_file(path, split)
        x, _ = _read_table(file)
        _check_columns(name, x, expected, "the preprocessed features", file)
    else:
        x = _RAW[name](path)[TABULAR_SPLITS.index(split)]
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
