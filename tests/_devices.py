"""What the operator tests run on: devices, their native kernels and dtypes."""

import pytest
import torch

import fastflow

NATIVE = fastflow.native_available()
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
requires_native = pytest.mark.skipif(not NATIVE, reason="fastflow._C is not built")


def native_on(device: str) -> bool:
    return device in NATIVE


def dtypes(device: str) -> list[torch.dtype]:
    """float32 and float64 everywhere; half and bf16 where the kernels take them (CUDA)."""
    extra = [torch.float16, torch.bfloat16] if device == "cuda" else []
    return [torch.float32, torch.float64] + extra
