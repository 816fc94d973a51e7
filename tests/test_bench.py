"""Smoke tests of ``python -m bench``: the harness runs tiny cases and writes valid records.

Nothing here asserts on a timing (timings live in the benchmark, never in a test); these only
check that the machinery runs end to end and that its output has the promised shape. No case
here uses torch.compile (its first compilation alone would take seconds).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # bench/ lives at the repository root, beside fastflow/
    sys.path.insert(0, ROOT)

from bench import harness  # noqa: E402
from bench.__main__ import main  # noqa: E402
from bench.cases import affine_coupling as coupling_cases  # noqa: E402

REQUIRED = {"case", "impl", "pass", "device", "dtype", "median_ms", "min_ms", "max_ms", "peak_mem_mb"}
IMPLS = {"native", "reference", "reference-compiled", "nflows", "normflows"}


def _check_record(rec: dict) -> None:
    assert REQUIRED <= rec.keys(), REQUIRED - rec.keys()
    assert rec["impl"] in IMPLS
    assert rec["pass"] in {"fwd", "fwd+bwd", "inverse", "train-step"}
    assert rec["device"] == "cpu" and rec["dtype"] == "float32"
    assert rec["peak_mem_mb"] is None  # not measured on the CPU, and not made up
    for key in ("median_ms", "min_ms", "max_ms"):
        assert isinstance(rec[key], float) and math.isfinite(rec[key]) and rec[key] > 0
    assert rec["min_ms"] <= rec["median_ms"] <= rec["max_ms"]


def test_run_group_writes_json(tmp_path):
    cpu = torch.device("cpu")
    groups = coupling_cases.groups(cpu, torch.float32, quick=True)
    group = next(g for g in groups if g.pass_ == "fwd+bwd")
    notes: list[str] = []
    records = harness.run_group(
        group, cpu, torch.float32, repeat=2, warmup=1, min_sample_ms=0,
        impls=["native", "reference"], log=lambda _: None, notes=notes,
    )
    assert not [n for n in notes if n.startswith("FAILED")], notes
    impls = {r.impl for r in records}
    assert "reference" in impls
    assert impls <= {"native", "reference"}
    ref = next(r for r in records if r.impl == "reference")
    assert ref.speedup_vs_reference == pytest.approx(1.0)
    assert ref.speedup_vs_compiled is None  # the compiled reference did not run

    path = tmp_path / "sub" / "bench.json"
    harness.write_json(str(path), records)
    data = json.loads(path.read_text())
    assert isinstance(data, list) and len(data) == len(records)
    for rec in data:
        _check_record(rec)
        assert rec["repeat"] == 2
        assert rec["machine"]["torch"] == torch.__version__

    table = harness.format_table(records)
    assert group.case in table and "vs ref" in table


def test_cli_quick_run(tmp_path, capsys):
    path = tmp_path / "out.json"
    argv = [
        "--quick", "--filter", "affine_coupling/exp", "--impl", "native,reference",
        "--repeat", "1", "--warmup", "1", "--min-sample-ms", "0", "--json", str(path),
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "median ms" in out and "affine_coupling/exp/8x16" in out
    data = json.loads(path.read_text())
    assert {r["pass"] for r in data} == {"fwd", "fwd+bwd", "inverse"}
    for rec in data:
        _check_record(rec)


def test_cli_train_step_quick(tmp_path):
    # Peers and fastflow.models may be absent: their rows are skipped with a note, not failed.
    path = tmp_path / "out.json"
    argv = [
        "--quick", "--filter", "realnvp", "--impl", "native,reference,nflows,normflows",
        "--repeat", "1", "--warmup", "1", "--min-sample-ms", "0", "--json", str(path),
    ]
    assert main(argv) == 0
    for rec in json.loads(path.read_text()):
        _check_record(rec)
        assert rec["pass"] == "train-step"


def test_filter_and_list(capsys):
    assert main(["--quick", "--list", "--filter", "sigmoid"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    assert lines and all("sigmoid" in ln for ln in lines)
    assert main(["--quick", "--filter", "no-such-case"]) == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_cuda_unavailable_is_a_clear_error():
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--device", "cuda", "--list"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    assert "CUDA is not available" in proc.stderr


def test_demo_runs_briefly(tmp_path, capsys):
    # python -m fastflow.demo end to end on a few steps: the printed lines and the picture.
    pytest.importorskip("fastflow.models")
    from fastflow import demo

    argv = ["--steps", "10", "--timing-steps", "5", "--couplings", "2", "--hidden", "16",
            "--batch", "64", "--out", str(tmp_path)]
    assert demo.main(argv) == 0
    out = capsys.readouterr().out
    assert "test NLL:" in out and "best Gaussian" in out and "ms/step" in out
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in out
    else:
        assert (tmp_path / "realnvp_moons.png").stat().st_size > 0
