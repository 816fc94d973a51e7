"""Loads a CUDA build of fastflow._C (no GPU needed) and checks every operator's kernels."""

import sys

import torch


def main(path: str) -> int:
    torch.ops.load_library(path)
    names = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("fastflow::"))
    if not names:
        print("cuda-check: FAILED, no fastflow operator is registered")
        return 1
    failed = False
    print(f"{'operator':40s} {'CPU':>5s} {'CUDA':>5s}")
    for name in names:
        row = []
        for key in ("CPU", "CUDA"):
            ok = torch._C._dispatch_has_kernel_for_dispatch_key(name, key)
            failed |= not ok
            row.append("yes" if ok else "NO")
        print(f"{name:40s} {row[0]:>5s} {row[1]:>5s}")
    print(f"cuda-check: {len(names)} operators, " + ("FAILED" if failed else "all have CPU and CUDA kernels"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
