"""The example scripts run end to end (tiny settings) and write what they promise."""

from __future__ import annotations

import importlib.util
import json
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]




def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("impl", ["fastflow", "reference"])
def test_glow_digits_trains_and_writes_figures_and_grid(tmp_path, impl):
    pytest.importorskip("matplotlib")
    pytest.importorskip("sklearn", reason="the digits example needs scikit-learn")
    glow_digits = _load("glow_digits")
    args = ["--impl", impl, "--seconds", "1", "--depth", "1", "--hidden", "8", "--warmup", "1",
            "--out", str(tmp_path)]
    assert glow_digits.main(args) == 0
    result = json.loads((tmp_path / f"{impl}.json").read_text())
    assert result["steps"] >= 1
    # one second of training already improves on the initialised model
    assert result["test_bits_per_dim"] < result["test_bits_per_dim_start"]
    png = tmp_path / f"{impl}_samples.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_glow_digits_rejects_bad_arguments(capsys):
    glow_digits = _load("glow_digits")
    with pytest.raises(SystemExit):
        glow_digits.main(["--seconds", "0"])
    assert "--seconds must be positive" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        glow_digits.main(["--depth", "0"])
    assert "--depth must be a positive integer" in capsys.readouterr().err


@pytest.mark.parametrize("model", ["maf", "planar"])
def test_toy_2d_trains_integrates_and_draws(tmp_path, model):
    pytest.importorskip("matplotlib")
    toy_2d = _load("toy_2d")
    # a fixed number of steps (the time limit only guards against a hang), so that the result
    # does not depend on how busy the machine is
    argv = ["--model", model, "--data", "moons", "--seconds", "60", "--steps", "150", "--out", str(tmp_path)]
    assert toy_2d.main(argv) == 0
    result = json.loads((tmp_path / f"{model}_moons.json").read_text())
    assert result["steps"] == 150
    assert result["test_nll"] < result["test_nll_start"]
    # after 150 steps the density may still have some mass outside the [-6, 6]^2 grid; that it
    # integrates to one is tested per layer (test_det_identity, test_autoregressive)
    assert 0.9 < result["grid_mass"] < 1.02
    assert (tmp_path / f"{model}_moons.png").read_bytes()[:4] == b"\x89PNG"


def test_toy_2d_ffjord_trains_integrates_and_draws(tmp_path):
    # a CNF: Hutchinson's estimate in training, the exact 2-D trace on the (coarse) grid
    pytest.importorskip("matplotlib")
    pytest.importorskip("torchdiffeq")
    toy_2d = _load("toy_2d")
    assert "ffjord" in toy_2d.MODELS
    argv = ["--model", "ffjord", "--data", "8gaussians", "--seconds", "60", "--steps", "4",
            "--grid-points", "60", "--out", str(tmp_path)]
    assert toy_2d.main(argv) == 0
    result = json.loads((tmp_path / "ffjord_8gaussians.json").read_text())
    assert result["steps"] == 4 and result["lr"] == toy_2d.DEFAULT_LR["ffjord"]
    assert result["test_nll"] < result["test_nll_start"]
    assert 0.9 < result["grid_mass"] < 1.02
    assert result["train_nfe_last_step"] > 0 and result["eval_nfe_last_call"] > 0
    assert (tmp_path / "ffjord_8gaussians.png").read_bytes()[:4] == b"\x89PNG"


def test_toy_2d_samples_and_picture(tmp_path):
    pytest.importorskip("matplotlib")
    toy_2d = _load("toy_2d")
    import torch

    model = toy_2d.build("maf")
    torch.manual_seed(5)
    samples = toy_2d.draw_samples(model, n=50)
    after = torch.rand(3)
    assert samples.shape == (50, 2) and torch.isfinite(samples).all()
    torch.manual_seed(6)
    assert torch.equal(samples, toy_2d.draw_samples(model, n=50))  # its own seed, same every call
    torch.manual_seed(5)
    assert torch.equal(after, torch.rand(3))  # the global random state is left alone
    assert model.training  # back in training mode
    p = torch.rand(20, 20)
    for s in (samples, None):  # None: a model without an inverse, a note instead of a scatter
        path = tmp_path / f"pic_{s is None}.png"
        toy_2d.picture(samples, p, s, "title", str(path))
        assert path.read_bytes()[:4] == b"\x89PNG"


def test_toy_2d_rejects_bad_arguments(capsys):
    toy_2d = _load("toy_2d")
    for argv, message in ((["--lr", "0"], "--lr must be positive"),
                          (["--grid-points", "1"], "--grid-points must be"),
                          (["--threads", "0"], "--threads must be"),
                          (["--steps", "0"], "--steps must be"),
                          (["--seconds", "0"], "--seconds must be positive")):
        with pytest.raises(SystemExit):
            toy_2d.parse_args(argv)
        assert message in capsys.readouterr().err
