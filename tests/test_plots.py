"""Tests of fastflow.plots: every picture is written as a PNG that shows something (not blank),
the density picture has its mass where the model's density is, and a missing matplotlib gives
an ImportError that names the extra to install."""

from __future__ import annotations

import sys

import pytest
import torch

pytest.importorskip("matplotlib")

from matplotlib.image import imread  # noqa: E402

from fastflow import Flow, plots  # noqa: E402
from fastflow.data import toy_data  # noqa: E402
from fastflow.models import Glow, RealNVP  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def pixels(path):
    img = imread(str(path))
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    return torch.from_numpy(img[..., :3].copy()).double()


def test_density_shows_the_density(tmp_path):
    # a standard normal flow (no transforms): the density panel must peak at its centre
    flow = Flow([], event_shape=2)
    data = torch.randn(3000, 2)
    path = plots.plot_density(flow, data, tmp_path / "sub" / "d.png", bounds=(-4, 4, -4, 4), samples=True)
    img = pixels(path)
    h, w, _ = img.shape
    assert img.var() > 0.01
    # three panels side by side; the middle one is the density, viridis: bright = high
    mid = img[:, w // 3 : 2 * w // 3]
    centre = mid[h // 2 - 3 : h // 2 + 3, mid.shape[1] // 2 - 3 : mid.shape[1] // 2 + 3].sum(-1).mean()
    corner = mid[int(0.2 * h) : int(0.2 * h) + 6, int(0.15 * mid.shape[1]) : int(0.15 * mid.shape[1]) + 6].sum(-1).mean()
    assert centre > corner + 0.5, (centre, corner)


def test_density_of_a_trained_looking_model_and_no_samples_panel(tmp_path):
    model = RealNVP(2, n_couplings=2, hidden=8)
    data = toy_data("moons", 2000, seed=0)
    two = pixels(plots.plot_density(model, data, tmp_path / "two.png", samples=False))
    three = pixels(plots.plot_density(model, data, tmp_path / "three.png"))
    assert three.shape[1] > 1.3 * two.shape[1]  # the samples panel widens the picture
    assert two.var() > 0.01


def test_density_grid_orientation():
    class Lopsided(torch.nn.Module):  # log p grows with x only
        def log_prob(self, x):
            return x[:, 0]

    xs, ys, logp = plots.density_grid(Lopsided(), (0, 1, -1, 1), n=5)
    assert logp.shape == (5, 5)
    torch.testing.assert_close(logp[0], xs)  # a row is one y, columns go along x
    torch.testing.assert_close(logp[:, 2], torch.full((5,), 0.5))


def test_samples_scatter(tmp_path):
    img = pixels(plots.plot_samples(torch.randn(500, 2), tmp_path / "s.png", data=torch.randn(500, 2) + 3))
    assert img.var() > 0.005
    with pytest.raises(ValueError, match=r"samples must be a tensor of 2-D points \[N, 2\]"):
        plots.plot_samples(torch.randn(5, 3), tmp_path / "x.png")


def test_image_grid_and_temperature_sweep(tmp_path):
    images = torch.rand(10, 1, 8, 8)
    img = pixels(plots.plot_image_grid(images, tmp_path / "g.png", n_cols=5, title="grid"))
    assert img.var() > 0.01
    with pytest.raises(ValueError, match=r"images must be a tensor \[N, C, H, W\]"):
        plots.plot_image_grid(torch.rand(3, 8, 8), tmp_path / "bad.png")
    model = Glow((1, 8, 8), levels=2, depth=1, hidden=8)
    model(torch.rand(16, 1, 8, 8) - 0.5)  # ActNorm initialisation
    state = torch.get_rng_state()
    img = pixels(plots.plot_temperature_grid(model, tmp_path / "t.png", temperatures=(0.0, 1.0), n_per_row=4))
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random stream is untouched
    assert img.var() > 0.005


def test_training_curve(tmp_path):
    history = {"loss": [3.0 - 0.01 * i + 0.05 * (-1) ** i for i in range(200)],
               "eval": [{"step": 0, "value": 3.1}, {"step": 100, "value": 2.2}, {"step": 200, "value": 1.4}]}
    img = pixels(plots.plot_training_curve(history, tmp_path / "c.png"))
    assert img.var() > 0.005
    with pytest.raises(ValueError, match="no losses and no evaluations"):
        plots.plot_training_curve({"loss": [], "eval": []}, tmp_path / "e.png")


def test_without_matplotlib_the_error_names_the_extra(tmp_path, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=r"pip install 'fastflow\[plot\]'"):
        plots.plot_samples(torch.randn(5, 2), tmp_path / "s.png")


def test_import_fastflow_does_not_import_matplotlib():
    import subprocess

    code = "import sys, fastflow, fastflow.plots, fastflow.cli; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
