"""Helpers shared by the operators' Python sides."""

from __future__ import annotations

import torch
from torch import Tensor


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half/bf16 (log-dets, factors, accumulations), else the dtype itself."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def per_sample_format(x: Tensor) -> torch.memory_format:
    """Memory format of a kernel's output for input ``x``.

    Mirrors fastflow::per_sample_format in csrc/include/fastflow/checks.h: channels-last is kept,
    every other layout gives a contiguous output.
    """
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def pixels(x: Tensor) -> int:
    """Number of positions per sample and channel: the product of the dims after the second."""
    n = 1
    for s in x.shape[2:]:
        n *= s
    return n
