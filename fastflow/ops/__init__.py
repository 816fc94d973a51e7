"""Functional operators: each the native kernel's entry point beside its pure-PyTorch reference."""

from fastflow.ops.affine_coupling import (
    ACTIVATIONS,
    affine_coupling,
    affine_coupling_backward_reference,
    affine_coupling_inverse,
    affine_coupling_reference,
)
from fastflow.ops.invconv import (
    invconv_plu,
    invconv_plu_backward_reference,
    invconv_plu_inverse,
    invconv_plu_reference,
    plu_inverse_weight,
    plu_weight,
)

__all__ = [
    "ACTIVATIONS",
    "affine_coupling",
    "affine_coupling_backward_reference",
    "affine_coupling_inverse",
    "affine_coupling_reference",
    "invconv_plu",
    "invconv_plu_backward_reference",
    "invconv_plu_inverse",
    "invconv_plu_reference",
    "plu_inverse_weight",
    "plu_weight",
]
