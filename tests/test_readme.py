"""The README's examples run as written, its command lines parse, the docstrings' examples pass
(doctest), and docs/benchmarks.md is current with bench/RESULTS.md."""

import doctest
import importlib
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastflow

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

pytestmark = pytest.mark.usefixtures("one_thread")


def _section(text: str, title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, f"README.md has no '## {title}' section"
    return match.group(1)


def test_readme_example_runs():
    text = README.read_text()
    match = re.search(r"## Example\n\n```python\n(.*?)```", text, re.S)
    assert match, "README.md has no '## Example' python block"
    namespace: dict = {}
    exec(compile(match.group(1), str(README), "exec"), namespace)
    torch = namespace["torch"]
    assert namespace["samples"].shape == (1000, 2)
    torch.testing.assert_close(namespace["logdet_inv"], -namespace["logdet"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(namespace["x"], namespace["batch"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(namespace["ref"], namespace["flow"].log_prob(namespace["batch"]), rtol=1e-4, atol=1e-4)


def _family_blocks() -> list[tuple[str, str]]:
    section = _section(README.read_text(), "Flow families, by example")
    blocks = []
    for part in re.split(r"^### ", section, flags=re.M)[1:]:
        title = part.splitlines()[0].strip()
        code = re.findall(r"```python\n(.*?)```", part, re.S)
        assert len(code) == 1, f"README family section {title!r} must have one python block"
        blocks.append((title, code[0]))
    return blocks


FAMILIES = ["Real NVP", "Glow", "MAF and IAF", "Planar and Sylvester flows", "i-ResNet and Residual Flows", "FFJORD"]


def test_readme_has_a_section_per_family():
    assert [title for title, _ in _family_blocks()] == FAMILIES


@pytest.mark.parametrize("title", FAMILIES)
def test_readme_family_example_runs(title):
    if title == "Glow":
        pytest.importorskip("sklearn")
    if title == "FFJORD":
        pytest.importorskip("torchdiffeq")
    code = dict(_family_blocks())[title]
    torch.manual_seed(0)
    exec(compile(code, f"README.md ({title})", "exec"), {"__name__": "readme"})


def _cli_lines() -> list[str]:
    text = README.read_text()
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.splitlines():
            line = line.split("#")[0].strip()
            for command in line.split("&&"):
                command = command.strip()
                if re.match(r"(\.venv/bin/)?python -m fastflow\b(?!\.)", command):
                    lines.append(command)
    return lines


def test_readme_command_lines_parse():
    from fastflow.cli import MODELS, make_parser

    lines = _cli_lines()
    assert any(" demo" in line for line in lines)  # the Quickstart's main command
    seen = set()
    for line in lines:
        argv = shlex.split(line)[3:]
        args = make_parser().parse_args(argv)  # raises SystemExit on a stale option
        seen.add(args.command)
    assert seen == {"train", "sample", "evaluate", "plot", "demo"}
    section = _section(README.read_text(), "Command line")
    for model in MODELS:
        assert f"`{model}`" in section, model


MODULES = [
    "fastflow.checkpoint",
    "fastflow.data",
    "fastflow.plots",
    "fastflow.images",
    "fastflow.models",
    "fastflow.distributions",
    "fastflow.flow",
    "fastflow.ops.fixed_point",
    "fastflow.ops.mlp_trace",
    "fastflow.ops.cnf_dopri5",
    "fastflow.nn.residual",
    "fastflow.nn.lipschitz",
    "fastflow.nn._loops",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    if name == "fastflow.plots":
        pytest.importorskip("matplotlib")
    if name == "fastflow.ops.cnf_dopri5" and not fastflow.native_available():
        pytest.skip("the native CNF solve has no reference of its own (fastflow._C is not built)")
    if name in ("fastflow.data", "fastflow.models", "fastflow.nn._loops"):
        pytest.importorskip("sklearn")
        pytest.importorskip("torchdiffeq")
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    tests = finder.find(module, globs={"torch": torch, **vars(module)})
    assert sum(len(t.examples) for t in tests) > 0, f"{name} has no docstring examples"
    for test in tests:
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) of {name} failed (see the output above)"


def test_models_document_paper_arguments_and_example():
    from fastflow import models

    for name in models.__all__:
        doc = getattr(models, name).__doc__ or ""
        assert "arxiv.org" in doc, f"{name}: no paper link"
        if name != "IAF":  # IAF: "Same arguments as MAF"
            assert "Arguments:" in doc and "Example:" in doc, name


def test_benchmarks_page_is_current():
    result = subprocess.run([sys.executable, str(ROOT / "docs" / "make_benchmarks.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_benchmarks_page_lists_every_section_and_picture():
    results = (ROOT / "bench" / "RESULTS.md").read_text()
    page = (ROOT / "docs" / "benchmarks.md").read_text()
    for heading in re.findall(r"^#{2,3} (.+?)\s*$", results, re.M):
        assert heading.replace("|", "\\|") in page, heading
    for picture in set(re.findall(r"\]\(([^)]+\.png)\)", results)):
        assert f"../bench/{picture}" in page, picture
        assert (ROOT / "bench" / picture).exists(), picture
