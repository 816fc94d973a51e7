"""Tests of fastflow.data: the 2-D toy densities (shapes, determinism, and each one's geometry)
and scikit-learn's 8x8 digits (:func:`load_digits`: shape, dtype, the 17 levels, a seeded split
into disjoint parts that make up the whole set, bad arguments, the error without scikit-learn).
"""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch

from fastflow.data import (
    DIGITS_LEVELS,
    TOY_DATASETS,
    load_digits,
    make_circles,
    make_moons,
    make_swiss_roll,
    toy_data,
)

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


# --------------------------------------------------------------------------------------------
# scikit-learn's 8x8 digits

N_DIGITS = 1797


def _rows(x: torch.Tensor) -> set[bytes]:
    """Each image as bytes, to compare parts as sets of images."""
    return {row.tobytes() for row in x.reshape(x.shape[0], -1).numpy()}


def _sorted_rows(x: torch.Tensor) -> np.ndarray:
    """The images as a sorted array of 64-byte records: equal arrays = equal multisets."""
    rows = np.ascontiguousarray(x.reshape(x.shape[0], -1).numpy())
    return np.sort(rows.view(np.dtype((np.void, rows.shape[1]))).ravel())


def test_digits_shape_dtype_and_levels():
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_digits as sklearn_load_digits

    assert DIGITS_LEVELS == 17
    x = load_digits("all")
    assert x.shape == (N_DIGITS, 1, 8, 8) and x.dtype == torch.uint8 and x.is_contiguous()
    assert int(x.min()) == 0 and int(x.max()) == DIGITS_LEVELS - 1
    # every level occurs, and "all" is scikit-learn's set in its own order
    assert (torch.bincount(x.flatten().long()) > 0).all()
    expected = torch.from_numpy(sklearn_load_digits().images).reshape(N_DIGITS, 1, 8, 8)
    assert torch.equal(x.double(), expected)
    for split, n in (("train", N_DIGITS - 359), ("test", 359)):  # round(0.2 * 1797) = 359
        part = load_digits(split)
        assert part.shape == (n, 1, 8, 8) and part.dtype == torch.uint8 and part.is_contiguous()
        assert int(part.max()) <= DIGITS_LEVELS - 1


@pytest.mark.parametrize("test_fraction, seed", [(0.2, 0), (0.5, 7), (0.01, 123)])
def test_digits_split_is_disjoint_and_complete(test_fraction, seed):
    pytest.importorskip("sklearn")
    train = load_digits("train", test_fraction=test_fraction, seed=seed)
    test = load_digits("test", test_fraction=test_fraction, seed=seed)
    assert train.shape[0] + test.shape[0] == N_DIGITS
    assert test.shape[0] == round(test_fraction * N_DIGITS)
    # together the parts are the whole set, as a multiset of images (the set holds a few
    # duplicate images, so a set comparison alone would not see one image given to both parts)
    assert np.array_equal(_sorted_rows(torch.cat([train, test])), _sorted_rows(load_digits("all")))


def test_digits_split_uses_a_seeded_permutation_of_indices():
    """Disjoint by index (duplicate images aside): the test part is the seeded permutation's head."""
    pytest.importorskip("sklearn")
    whole = load_digits("all")
    perm = torch.from_numpy(np.random.default_rng(3).permutation(N_DIGITS))
    n_test = round(0.25 * N_DIGITS)
    assert torch.equal(load_digits("test", test_fraction=0.25, seed=3), whole[perm[:n_test]])
    assert torch.equal(load_digits("train", test_fraction=0.25, seed=3), whole[perm[n_test:]])
    # by content: the images that occur once in the set are in exactly one part
    rows, counts = np.unique(whole.reshape(N_DIGITS, -1).numpy(), axis=0, return_counts=True)
    unique = {r.tobytes() for r in rows[counts == 1]}
    assert len(unique) > 1700
    train, test = _rows(load_digits("train", 0.25, 3)), _rows(load_digits("test", 0.25, 3))
    assert not (unique & train & test) and unique <= train | test


def test_digits_determinism_and_seed():
    pytest.importorskip("sklearn")
    a = load_digits("train", seed=5)
    assert torch.equal(a, load_digits("train", seed=5))
    assert torch.equal(load_digits("test", seed=5), load_digits("test", seed=5))
    b = load_digits("train", seed=6)
    assert a.shape == b.shape and not torch.equal(a, b)
    # a different seed moves images between the parts, not only within them
    assert _rows(load_digits("test", seed=5)) != _rows(load_digits("test", seed=6))
    # "all" does not depend on the split arguments
    assert torch.equal(load_digits("all", test_fraction=0.5, seed=9), load_digits("all"))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"split": "val"}, "^split must be one of"),
        ({"split": None}, "^split must be one of"),
        ({"test_fraction": 0.0}, "^test_fraction"),
        ({"test_fraction": 1.0}, "^test_fraction"),
        ({"test_fraction": -0.1}, "^test_fraction"),
        ({"test_fraction": "0.2"}, "^test_fraction"),
        ({"test_fraction": True}, "^test_fraction"),
        ({"test_fraction": float("nan")}, "^test_fraction"),
        ({"test_fraction": 1e-6}, "^test_fraction=1e-06 leaves an empty"),  # rounds to 0 images
        ({"seed": -1}, "^seed must be"),
        ({"seed": 1.5}, "^seed must be"),
        ({"seed": None}, "^seed must be"),
        ({"seed": False}, "^seed must be"),
    ],
)
def test_digits_bad_arguments(kwargs, match):
    if "leaves an empty" in match:  # checked once the set's size is known
        pytest.importorskip("sklearn")
    with pytest.raises(ValueError, match=match):
        load_digits(**kwargs)


def test_digits_without_sklearn_says_how_to_install(monkeypatch):
    # a None entry in sys.modules makes "import sklearn..." raise ImportError
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match="pip install scikit-learn"):
        load_digits()


# --------------------------------------------------------------------------------------------
# tables from files, and the tabular benchmarks (small synthetic files of the same format)

from fastflow.data import TABULAR_DATASETS, TABULAR_FEATURES, load_array, load_tabular  # noqa: E402


def test_load_array_formats(tmp_path):
    x = np.random.default_rng(0).normal(size=(7, 3))
    np.save(tmp_path / "a.npy", x)
    np.savetxt(tmp_path / "b.csv", x, delimiter=",", header="p,q,r", comments="")
    np.savetxt(tmp_path / "c.txt", x)  # whitespace separated, no header
    (tmp_path / "d.tsv").write_text("\n".join("\t".join(str(float(v)) for v in row) for row in x) + "\n\n")
    for name in ("a.npy", "b.csv", "c.txt", "d.tsv"):
        t = load_array(tmp_path / name)
        assert t.dtype == torch.float32 and t.shape == (7, 3), name
        torch.testing.assert_close(t, torch.from_numpy(x).float(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("empty.csv", "", "the file is empty"),
        ("header.csv", "a,b\n", "header line and no data rows"),
        ("ragged.csv", "1,2\n3,4,5\n", "line 2: 3 columns, the first row has 2"),
        ("word.csv", "1,2\n3,x\n", "line 2: 'x' is not a number"),
        ("nan.csv", "1,2\nnan,4\n", "row 1 holds a NaN or an infinity"),
        ("junk.npy", b"\x93NUMPY garbage", "not a readable .npy array"),
        ("data.json", "[1, 2]", "unknown file type '.json'"),
    ],
)
def test_load_array_bad_files(tmp_path, name, content, match):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(ValueError, match=match):
        load_array(path)


def test_load_array_shape_and_dtype_errors(tmp_path):
    np.save(tmp_path / "v.npy", np.zeros(5))
    with pytest.raises(ValueError, match=r"expected a 2-D table \[rows, columns\], got shape \(5,\)"):
        load_array(tmp_path / "v.npy")
    np.save(tmp_path / "s.npy", np.array([["a", "b"]]))
    with pytest.raises(ValueError, match="expected numbers"):
        load_array(tmp_path / "s.npy")
    np.save(tmp_path / "o.npy", np.array([[1, None]], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="not a readable .npy array"):  # pickles are refused
        load_array(tmp_path / "o.npy")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_array(tmp_path / "missing.npy")


def test_hdf5_without_h5py_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "h5py", None)
    (tmp_path / "x.hdf5").write_bytes(b"")
    with pytest.raises(ImportError, match="pip install h5py"):
        load_array(tmp_path / "x.hdf5")
    with pytest.raises(ImportError, match="pip install h5py"):
        load_tabular("bsds300", tmp_path / "x.hdf5")


def test_hdf5_splits(tmp_path):
    h5py = pytest.importorskip("h5py")
    with h5py.File(tmp_path / "BSDS300.hdf5", "w") as f:
        for split, n in (("train", 30), ("validation", 5), ("test", 8)):
            f[split] = np.random.default_rng(0).normal(size=(n, 63))
    assert load_tabular("bsds300", tmp_path / "BSDS300.hdf5", "validation").shape == (5, 63)
    assert load_tabular("bsds300", tmp_path, "test").shape == (8, 63)  # the archive's layout
    with pytest.raises(ValueError, match="give the HDF5 data set to read"):
        load_array(tmp_path / "BSDS300.hdf5")
    assert load_array(tmp_path / "BSDS300.hdf5", key="train").shape == (30, 63)


def test_tabular_names():
    assert TABULAR_DATASETS == ("power", "gas", "hepmass", "miniboone", "bsds300")
    assert TABULAR_FEATURES == {"power": 6, "gas": 8, "hepmass": 21, "miniboone": 43, "bsds300": 63}


def _splits(name: str, path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(load_tabular(name, path, s) for s in ("train", "validation", "test"))


def _check_normalised(train, val):
    both = torch.cat([train, val]).double()
    torch.testing.assert_close(both.mean(0), torch.zeros(both.shape[1], dtype=torch.float64), rtol=0, atol=1e-5)
    torch.testing.assert_close(both.std(0, unbiased=False), torch.ones(both.shape[1], dtype=torch.float64), rtol=0, atol=1e-4)


def test_power_raw_file(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "power").mkdir()
    raw = np.round(rng.uniform(0, 5, size=(500, 8)), 3)
    np.save(tmp_path / "power" / "data.npy", raw)
    train, val, test = _splits("power", tmp_path)
    # the last 10% is the test part, the last 10% of the rest the validation part
    assert (train.shape, val.shape, test.shape) == ((405, 6), (45, 6), (50, 6))
    _check_normalised(train, val)
    # deterministic (the shuffle and the noise have a fixed seed)
    assert torch.equal(train, load_tabular("power", tmp_path / "power" / "data.npy"))
    np.save(tmp_path / "bad.npy", raw[:, :7])
    with pytest.raises(ValueError, match="power: .*bad.npy has 7 columns, expected 8"):
        load_tabular("power", tmp_path / "bad.npy")


def test_gas_drops_correlated_columns(tmp_path):
    rng = np.random.default_rng(0)
    sensors = rng.normal(size=(300, 16))
    sensors[:, 5] = 2 * sensors[:, 4] + 0.001 * rng.normal(size=300)  # correlated with column 4
    table = np.hstack([np.arange(300)[:, None], rng.uniform(size=(300, 2)), sensors])
    header = ",".join(["Time", "Meth", "Eth"] + [f"s{i}" for i in range(16)])
    np.savetxt(tmp_path / "ethylene_CO.csv", table, delimiter=",", header=header, comments="")
    train, val, test = _splits("gas", tmp_path)
    assert train.shape[1] == val.shape[1] == test.shape[1] == 15  # one of the pair dropped
    assert (train.shape[0], val.shape[0], test.shape[0]) == (243, 27, 30)
    # the same table without a header: time and concentrations are its first three columns
    np.save(tmp_path / "raw.npy", table)
    assert torch.equal(load_tabular("gas", tmp_path / "raw.npy"), train)
    np.save(tmp_path / "narrow.npy", sensors[:, :10])
    with pytest.raises(ValueError, match="gas: .* has 10 columns, expected 16"):
        load_tabular("gas", tmp_path / "narrow.npy")


def test_hepmass_signal_rows_and_repeated_features(tmp_path):
    rng = np.random.default_rng(0)

    def table(n):
        x = rng.normal(size=(n, 29))
        x[:, 0] = rng.integers(0, 2, n)  # the label
        x[:, 3] = rng.integers(0, 3, n)  # a feature with many repeated values: dropped
        return x

    header = ",".join(["# label"] + [f"f{i}" for i in range(27)] + ["mass"])
    train_table, test_table = table(400), table(100)
    np.savetxt(tmp_path / "1000_train.csv", train_table, delimiter=",", header=header, comments="")
    np.savetxt(tmp_path / "1000_test.csv", test_table, delimiter=",", header=header, comments="")
    train, val, test = _splits("hepmass", tmp_path)
    n_signal = int((train_table[:, 0] == 1).sum())
    assert train.shape[1] == val.shape[1] == test.shape[1] == 26
    assert train.shape[0] + val.shape[0] == n_signal and val.shape[0] == int(0.1 * n_signal)
    assert test.shape[0] == int((test_table[:, 0] == 1).sum())
    np.savetxt(tmp_path / "1000_test.csv", test_table[:, :20], delimiter=",")
    with pytest.raises(ValueError, match="hepmass: .* has 20 columns, expected at least 28"):
        load_tabular("hepmass", tmp_path, "test")


def test_miniboone_and_preprocessed_splits(tmp_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "data.npy", rng.normal(size=(300, 43)))
    train, val, test = _splits("miniboone", tmp_path / "data.npy")
    assert (train.shape[0], val.shape[0], test.shape[0]) == (243, 27, 30)
    _check_normalised(train, val)
    # a folder of preprocessed splits is read as stored (csv and npy mixed; "val" for validation)
    folder = tmp_path / "pre"
    folder.mkdir()
    np.save(folder / "train.npy", rng.normal(size=(20, 6)))
    np.savetxt(folder / "val.csv", rng.normal(size=(4, 6)), delimiter=",")
    np.savetxt(folder / "test.txt", rng.normal(size=(5, 6)))
    assert [t.shape[0] for t in _splits("power", folder)] == [20, 4, 5]
    with pytest.raises(ValueError, match="miniboone: .*train.npy has 6 columns, expected 43"):
        load_tabular("miniboone", folder)


def test_load_tabular_arguments(tmp_path):
    with pytest.raises(ValueError, match="name must be one of"):
        load_tabular("cifar", tmp_path)
    with pytest.raises(ValueError, match="split must be one of"):
        load_tabular("power", tmp_path, "dev")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tabular("power", tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="none of data.npy"):
        load_tabular("power", tmp_path)
    np.save(tmp_path / "tiny.npy", np.zeros((5, 43)))
    with pytest.raises(ValueError, match="too few rows"):
        load_tabular("miniboone", tmp_path / "tiny.npy")
