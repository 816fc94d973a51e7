"""The README's example runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


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
