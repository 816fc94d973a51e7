"""Functional operators: each the native kernel's entry point beside its pure-PyTorch reference."""

from fastflow.ops.affine_coupling import (
    ACTIVATIONS,
    affine_coupling,
    affine_coupling_backward_reference,
    affine_coupling_inverse,
    affine_coupling_reference,
)

__all__ = [
    "ACTIVATIONS",
    "affine_coupling",
    "affine_coupling_backward_reference",
    "affine_coupling_inverse",
    "affine_coupling_reference",
]
