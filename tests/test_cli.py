"""Tests of the command line (fastflow.cli, run in-process through ``main(argv)``) and of the
checkpoint helpers it stands on (fastflow.checkpoint): argument errors give argparse's usage
message, a resumed run continues with the same losses as an uninterrupted one, bad checkpoints
and data files give one clear line and a non-zero status, never a traceback."""

from __future__ import annotations

import json
import math
import os
import random

import numpy as np
import pytest
import torch

from fastflow import cli
from fastflow.checkpoint import (
    CheckpointError,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {
    "realnvp": ["--set", "n_couplings=2", "--set", "hidden=8"],
    "maf": ["--set", "n_transforms=2", "--set", "hidden=8"],
    "resflow": ["--set", "n_blocks=2", "--set", "hidden=8"],
    "iresnet": ["--set", "n_blocks=2", "--set", "hidden=8"],
    "glow": ["--set", "depth=1", "--set", "hidden=8"],
}


def train(tmp, model="realnvp", data="moons", steps=6, *extra):
    argv = ["train", "--model", model, "--data", data, "--steps", str(steps), "--out", str(tmp),
            "--batch-size", "32", "--progress", "off", "--no-plot", *TINY.get(model, []), *extra]
    return cli.main(argv)


def history(run_dir) -> dict:
    return load_checkpoint(os.path.join(run_dir, "checkpoint.pt"))["history"]


def usage_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage: python -m fastflow" in err and "Traceback" not in err
    return err


def user_error(capsys, argv) -> str:
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("fastflow ") and "error:" in err and "Traceback" not in err
    assert err.count("\n") == 1, err  # one line
    return err


# --------------------------------------------------------------------------------------------
# argument errors


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "required: COMMAND"),
        (["fly"], "invalid choice: 'fly'"),
        (["train", "--model", "nice", "--data", "moons"], "invalid choice: 'nice'"),
        (["train", "--model", "maf", "--data", "moons", "--steps", "-3"], "expected an integer >= 0"),
        (["train", "--model", "maf", "--data", "moons", "--lr", "0"], "expected a positive number"),
        (["train", "--model", "maf", "--data", "moons", "--batch-size", "x"], "expected a positive integer"),
        (["train", "--model", "maf", "--data", "moons", "--steps", "3", "--epochs", "2"], "not allowed with"),
        (["train", "--model", "maf", "--data", "spiral"], "--data 'spiral' is not a toy density"),
        (["train", "--model", "maf", "--data", "/nonexistent/x.npy"], "--data /nonexistent/x.npy: no such file"),
        (["train", "--model", "maf", "--data", "power:/nonexistent"], "/nonexistent does not exist"),
        (["train", "--model", "glow", "--data", "moons"], "glow is an image model"),
        (["train", "--data", "moons"], "train needs --model and --data"),
        (["train", "--model", "maf", "--data", "moons", "--set", "hidden"], "expected KEY=VALUE"),
        (["train", "--model", "maf", "--data", "moons", "--device", "tpu9"], "--device 'tpu9' is not a device"),
        (["sample"], "the following arguments are required: checkpoint"),
        (["sample", "x.pt", "--n", "0"], "expected a positive integer"),
        (["evaluate", "x.pt", "--split", "dev"], "invalid choice: 'dev'"),
    ],
)
def test_argument_errors_give_the_usage_message(capsys, tmp_path, argv, message):
    if "--data" in argv or argv[:1] == ["train"]:
        argv = argv + ["--out", str(tmp_path / "run")]
    err = usage_error(capsys, argv)
    assert message in err, err


def test_cuda_device_without_cuda_is_an_argument_error(capsys, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    err = usage_error(capsys, ["train", "--model", "maf", "--data", "moons", "--device", "cuda", "--out", str(tmp_path)])
    assert "CUDA is not available" in err


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for command in ("train", "sample", "evaluate", "plot", "demo"):
        assert command in out


# --------------------------------------------------------------------------------------------
# training, resuming


def test_train_writes_checkpoint_history_and_evaluations(tmp_path, capsys):
    assert train(tmp_path, "realnvp", "moons", 6, "--eval-every", "3") == 0
    out = capsys.readouterr().out
    assert "held-out NLL" in out and "checkpoint:" in out
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["step"] == 6 and state["config"]["model"] == "realnvp"
    assert len(state["history"]["loss"]) == 6
    assert [e["step"] for e in state["history"]["eval"]] == [0, 3, 6]
    assert all(math.isfinite(v) for v in state["history"]["loss"])
    saved = json.loads((tmp_path / "history.json").read_text())
    assert saved["loss"] == state["history"]["loss"] and saved["unit"] == "nats"
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")]  # no temp files left


@pytest.mark.parametrize(
    "model, data",
    [
        ("realnvp", "moons"),
        ("resflow", "8gaussians"),  # Russian-roulette draws from torch's generator
        ("glow", "digits"),  # dequantisation noise from the data generator, ActNorm
    ],
)
def test_resume_reproduces_the_uninterrupted_run(tmp_path, model, data):
    if data == "digits":
        pytest.importorskip("sklearn")
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert train(whole, model, data, 6) == 0
    assert train(split, model, data, 3) == 0
    assert len(history(split)["loss"]) == 3
    # the resumed run takes its model, data and settings from the checkpoint
    assert cli.main(["train", "--resume", str(split), "--steps", "6", "--progress", "off", "--no-plot"]) == 0
    a, b = history(whole), history(split)
    assert len(b["loss"]) == 6
    assert a["loss"] == b["loss"]  # bit for bit, the next losses included
    sa = load_checkpoint(whole / "checkpoint.pt")["model"]
    sb = load_checkpoint(split / "checkpoint.pt")["model"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa if isinstance(sa[k], torch.Tensor))
    assert [e["value"] for e in a["eval"]][-1] == [e["value"] for e in b["eval"]][-1]


def test_resume_removes_the_temporaries_of_a_killed_save(tmp_path):
    """A run killed while saving leaves the save's temporary beside the (whole) files; the
    resumed run deletes it (scripts/soak.py kills real runs)."""
    assert train(tmp_path, "realnvp", "moons", 2) == 0
    (tmp_path / ".tmp-killed.ckpt").write_bytes(b"half a checkpoint")
    (tmp_path / "history.json.tmp").write_text('{"loss": [1.0')
    assert cli.main(["train", "--resume", str(tmp_path), "--steps", "3", "--progress", "off", "--no-plot"]) == 0
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt", "history.json"]
    assert len(history(tmp_path)["loss"]) == 3


def test_resume_with_out_and_epochs(tmp_path):
    assert train(tmp_path, "maf", "moons", 2) == 0
    assert cli.main(["train", "--resume", "--out", str(tmp_path), "--epochs", "1", "--progress", "off", "--no-plot"]) == 0
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    # 50000 training points in batches of 32, the last incomplete batch dropped
    assert state["step"] == 50_000 // 32 == state["config"]["steps"]


def test_resume_refuses_another_model(tmp_path, capsys):
    assert train(tmp_path, "maf", "moons", 2) == 0
    capsys.readouterr()
    err = usage_error(capsys, ["train", "--resume", str(tmp_path), "--model", "realnvp", "--steps", "4"])
    assert "differs from the checkpoint's maf" in err


def test_diverging_run_stops_with_a_message(tmp_path, capsys):
    # a learning rate this large sends the couplings' scales to infinity in a few steps
    status = train(tmp_path, "realnvp", "moons", 50, "--lr", "1e6", "--set", "clamp=1e9")
    if status == 0:
        pytest.skip("did not diverge")
    err = capsys.readouterr().err
    assert status == 1 and "diverged at step" in err


# --------------------------------------------------------------------------------------------
# bad checkpoints


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    torch.set_num_threads(1)
    assert train(d, "realnvp", "moons", 4) == 0
    return d


def test_corrupt_checkpoints_give_one_clear_line(tmp_path, capsys, run_dir):
    good = (run_dir / "checkpoint.pt").read_bytes()
    bad = tmp_path / "ckpt.pt"
    cases = {
        "truncated": good[: len(good) // 2],
        "empty": b"",
        "garbage": b"not a checkpoint\n" * 10,
    }
    for what, content in cases.items():
        bad.write_bytes(content)
        for command in ("evaluate", "sample", "plot"):
            err = user_error(capsys, [command, str(bad)])
            assert str(bad) in err and ("truncated" in err or "empty" in err), (what, err)
        err = user_error(capsys, ["train", "--resume", str(bad), "--steps", "8"])
        assert str(bad) in err
    torch.save({"weights": torch.zeros(3)}, bad)
    assert "not a fastflow checkpoint" in user_error(capsys, ["evaluate", str(bad)])
    save_checkpoint(bad, {"something": 1})
    assert "not of a training run" in user_error(capsys, ["evaluate", str(bad)])
    assert "does not exist" in user_error(capsys, ["evaluate", str(tmp_path / "missing.pt")])


# --------------------------------------------------------------------------------------------
# sample, evaluate, plot


def test_sample_writes_points_and_picture(tmp_path, capsys, run_dir):
    pytest.importorskip("matplotlib")
    out = tmp_path / "s.npy"
    assert cli.main(["sample", str(run_dir / "checkpoint.pt"), "--n", "50", "--out", str(out)]) == 0
    x = np.load(out)
    assert x.shape == (50, 2) and np.isfinite(x).all()
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    # temperature 0: every sample is the image of the base distribution's mode
    assert cli.main(["sample", str(run_dir), "--n", "5", "--temperature", "0", "--out", str(tmp_path / "t0.pt"), "--no-plot"]) == 0
    t0 = torch.load(tmp_path / "t0.pt")
    assert torch.allclose(t0, t0[:1].expand_as(t0))
    assert "5 points" in capsys.readouterr().out


def test_evaluate_matches_the_last_evaluation_of_training(capsys, run_dir):
    capsys.readouterr()
    assert cli.main(["evaluate", str(run_dir), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["split"] == "test" and result["n"] == 10_000 and result["step"] == 4
    assert result["nll"] == pytest.approx(history(run_dir)["eval"][-1]["value"], abs=1e-5)
    assert cli.main(["evaluate", str(run_dir), "--split", "train"]) == 0
    err = usage_error(capsys, ["evaluate", str(run_dir), "--split", "validation"])
    assert "has no validation part" in err


def test_plot_writes_every_picture(tmp_path, capsys, run_dir):
    pytest.importorskip("matplotlib")
    assert cli.main(["plot", str(run_dir), "--out", str(tmp_path)]) == 0
    for name in ("density.png", "samples.png", "curve.png"):
        assert (tmp_path / name).stat().st_size > 1000
    err = user_error(capsys, ["plot", str(run_dir), "--kind", "temperature", "--out", str(tmp_path / "t")])
    assert "no picture of kind temperature" in err


# --------------------------------------------------------------------------------------------
# data from files


def test_file_data_reports_nll_in_the_files_units(tmp_path):
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(400, 3)) * [1.0, 2.0, 0.5] + 4)
    np.savetxt(tmp_path / "a.csv", x.numpy(), delimiter=",", header="u,v,w", comments="")
    np.save(tmp_path / "b.npy", 10 * x.numpy())
    for name, path in (("a", "a.csv"), ("b", "b.npy")):
        assert train(tmp_path / name, "maf", str(tmp_path / path), 3) == 0
    a, b = history(tmp_path / "a"), history(tmp_path / "b")
    # the same standardised data: NLLs differ by the log-volume of the factor 10 in 3-D
    assert b["eval"][-1]["value"] - a["eval"][-1]["value"] == pytest.approx(3 * math.log(10), abs=1e-4)
    assert b["loss"][0] - a["loss"][0] == pytest.approx(3 * math.log(10), abs=1e-4)


def test_bad_data_files_give_one_clear_line(tmp_path, capsys):
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("1,2\n3,4\n5\n")
    assert "line 3: 1 columns, the first row has 2" in user_error(capsys, ["train", "--model", "maf", "--data", str(ragged), "--out", str(tmp_path / "r")])
    text = tmp_path / "text.csv"
    text.write_text("1,2\n3,abc\n")
    assert "'abc' is not a number" in user_error(capsys, ["train", "--model", "maf", "--data", str(text), "--out", str(tmp_path / "t")])
    junk = tmp_path / "junk.npy"
    junk.write_bytes(b"\x00\x01garbage")
    assert "not a readable .npy array" in user_error(capsys, ["train", "--model", "maf", "--data", str(junk), "--out", str(tmp_path / "j")])


def test_tabular_data_trains_and_wrong_columns_are_named(tmp_path, capsys):
    rng = np.random.default_rng(0)
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.mkdir()
    bad.mkdir()
    for split, n in (("train", 200), ("validation", 40), ("test", 40)):
        np.save(good / f"{split}.npy", rng.normal(size=(n, 43)))
        np.save(bad / f"{split}.npy", rng.normal(size=(n, 42)))
    assert train(tmp_path / "run", "maf", f"miniboone:{good}", 2, "--heldout", "validation") == 0
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert state["config"]["model_shape"] == [43]
    capsys.readouterr()
    assert cli.main(["evaluate", str(tmp_path / "run"), "--split", "validation"]) == 0
    assert "validation NLL" in capsys.readouterr().out
    err = user_error(capsys, ["train", "--model", "maf", "--data", f"miniboone:{bad}", "--out", str(tmp_path / "b")])
    assert "has 42 columns, expected 43" in err


def test_vector_model_on_images_flattens_them(tmp_path):
    pytest.importorskip("sklearn")
    assert train(tmp_path, "maf", "digits", 2) == 0
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["config"]["model_shape"] == [64] and state["config"]["unit"] == "bits/dim"
    assert cli.main(["sample", str(tmp_path), "--n", "3", "--no-plot", "--out", str(tmp_path / "s.npy")]) == 0
    x = np.load(tmp_path / "s.npy")
    assert x.shape == (3, 1, 8, 8) and x.min() >= 0 and x.max() <= 1


def test_demo_runs_through_the_cli(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    argv = ["demo", "--steps", "2", "--timing-steps", "5", "--out", str(tmp_path), "--no-progress"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "best Gaussian" in out and "reference" in out and "ms/step" in out
    for model in ("realnvp", "maf"):
        assert (tmp_path / model / "density.png").exists()


# --------------------------------------------------------------------------------------------
# fastflow.checkpoint


def test_rng_state_round_trip(tmp_path):
    g = torch.Generator().manual_seed(3)
    save_checkpoint(tmp_path / "c.pt", {"rng": rng_state({"data": g})})
    first = (torch.rand(4), np.random.rand(3), random.random(), torch.rand(2, generator=g))
    set_rng_state(load_checkpoint(tmp_path / "c.pt")["rng"], {"data": g})
    again = (torch.rand(4), np.random.rand(3), random.random(), torch.rand(2, generator=g))
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    assert first[2] == again[2] and torch.equal(first[3], again[3])
    with pytest.raises(KeyError, match="no state for the generator 'other'"):
        set_rng_state(load_checkpoint(tmp_path / "c.pt")["rng"], {"other": g})


def test_save_is_atomic_when_the_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"step": 1})
    before = path.read_bytes()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", fail)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"step": 2})
    assert path.read_bytes() == before  # the old checkpoint is intact
    assert os.listdir(tmp_path) == ["c.pt"]  # and the temporary file is gone
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "none.pt")
    with pytest.raises(IsADirectoryError):
        load_checkpoint(tmp_path)
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"model": torch.nn.Linear(3, 3).state_dict(), "step": 7})
    data = path.read_bytes()
    for cut in (0, 10, len(data) // 2, len(data) - 5):
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="empty|truncated"):
            load_checkpoint(path)
    torch.save([1, 2, 3], path)
    with pytest.raises(CheckpointError, match="not a fastflow checkpoint"):
        load_checkpoint(path)
    torch.save({"format": "fastflow-checkpoint", "format_version": 99}, path)
    with pytest.raises(CheckpointError, match="format version 99"):
        load_checkpoint(path)


def test_load_checkpoint_refuses_pickled_code(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("true",))

    path = tmp_path / "evil.pt"
    torch.save({"format": "fastflow-checkpoint", "format_version": 1, "x": Payload()}, path)
    with pytest.raises(CheckpointError, match="not tensors or plain containers"):
        load_checkpoint(path)


def test_save_checkpoint_argument_errors(tmp_path):
    with pytest.raises(TypeError, match="mapping with string keys"):
        save_checkpoint(tmp_path / "c.pt", {1: 2})
    with pytest.raises(ValueError, match="reserved key 'format'"):
        save_checkpoint(tmp_path / "c.pt", {"format": 2})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        save_checkpoint(tmp_path / "no" / "c.pt", {})
    with pytest.raises(TypeError, match=r"entry 'versions'\['torch'\] is a torch.torch_version.TorchVersion"):
        save_checkpoint(tmp_path / "c.pt", {"versions": {"torch": torch.__version__}})
    assert not (tmp_path / "c.pt").exists()


def test_python_dash_m_fastflow_entry_point(tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "fastflow", "train", "--model", "maf", "--data", "spiral",
                             "--out", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.startswith("usage: python -m fastflow train") and "Traceback" not in result.stderr
    result = subprocess.run([sys.executable, "-m", "fastflow", "evaluate", str(tmp_path / "none.pt")],
                            capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr.strip().endswith("does not exist")


def test_resume_keeps_the_runs_thread_count(tmp_path):
    try:
        assert train(tmp_path, "maf", "moons", 2, "--threads", "2") == 0
        torch.set_num_threads(1)
        assert cli.main(["train", "--resume", str(tmp_path), "--steps", "3", "--progress", "off", "--no-plot"]) == 0
        assert torch.get_num_threads() == 2
        assert load_checkpoint(tmp_path / "checkpoint.pt")["config"]["threads"] == 2
    finally:
        torch.set_num_threads(1)
