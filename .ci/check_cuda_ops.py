"""Checks a CUDA build of fastflow._C on a machine without a GPU.

Loading the library runs its TORCH_LIBRARY / TORCH_LIBRARY_IMPL registrations, which needs no
GPU; the dispatcher then says which kernels each operator has. Fails (exit 1) unless every
operator in the fastflow namespace has a CPU and a CUDA kernel, and, given --schemas, unless
every operator that csrc/fastflow.cpp defines was registered by the library (a stale or partial
build shows up here rather than as a missing operator on a GPU machine).

    python .ci/check_cuda_ops.py path/to/_C.so [--schemas csrc/fastflow.cpp]
"""

from __future__ import annotations

import argparse
import os
import re
import sys

import torch

KEYS = ("CPU", "CUDA")


def defined_names(schemas_path: str) -> set[str]:
    """Operator names in the m.def("name(...") calls of the schema file."""
    with open(schemas_path) as f:
        text = f.read()
    return {"fastflow::" + m for m in re.findall(r'm\.def\(\s*"\s*([A-Za-z_][A-Za-z0-9_.]*)\s*\(', text)}


def registered_at(name: str, key: str) -> str:
    """Source file of the kernel registered for `key`, from the dispatcher's dump."""
    for line in torch._C._dispatch_dump(name).splitlines():
        m = re.match(rf"\s*{key}\[?[^:]*\]?: .*registered at (\S+?):\d+", line)
        if m:
            return os.path.relpath(m.group(1)) if os.path.isabs(m.group(1)) else m.group(1)
    return "-"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("library", help="the built fastflow/_C*.so")
    parser.add_argument("--schemas", help="csrc/fastflow.cpp, to check that every m.def registered")
    args = parser.parse_args()

    print(f"cuda-check: loading {args.library} with torch {torch.__version__} "
          f"(CUDA {torch.version.cuda}, GPU visible: {torch.cuda.is_available()})")
    torch.ops.load_library(args.library)
    names = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("fastflow::"))
    problems = []
    if not names:
        problems.append("no fastflow operator is registered")
    if args.schemas:
        for missing in sorted(defined_names(args.schemas) - set(names)):
            problems.append(f"{missing} is defined in {args.schemas} but not registered")

    width = max([len(n) for n in names] + [len("operator")])
    print(f"{'operator':{width}s}  {'CPU':4s}  {'CUDA':4s}  CUDA kernel registered at")
    for name in names:
        has = {k: torch._C._dispatch_has_kernel_for_dispatch_key(name, k) for k in KEYS}
        for k in KEYS:
            if not has[k]:
                problems.append(f"{name} has no {k} kernel")
        where = registered_at(name, "CUDA") if has["CUDA"] else "-"
        cells = "  ".join(f"{'yes' if has[k] else 'NO':4s}" for k in KEYS)
        print(f"{name:{width}s}  {cells}  {where}")

    for p in problems:
        print(f"cuda-check: FAILED: {p}")
    if problems:
        return 1
    print(f"cuda-check: {len(names)} operators, each with a CPU and a CUDA kernel")
    return 0


if __name__ == "__main__":
    sys.exit(main())
