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
from fastflow.ops.fixed_point import (
    FixedPointError,
    FixedPointResult,
    FixedPointWarning,
    fixed_point_inverse,
)
from fastflow.ops.logdet_estimators import (
    draw_roulette_n,
    jacobian,
    logdet_exact,
    logdet_roulette,
    logdet_series,
    roulette_tail_prob,
    sample_probes,
)
from fastflow.ops.mlp_trace import (
    MLP_ACTIVATIONS,
    mlp_apply_reference,
    mlp_fixed_point,
    mlp_fixed_point_reference,
    mlp_trace,
    mlp_trace_reference,
)
from fastflow.ops.spectral_norm import (
    spectral_norm_apply,
    spectral_norm_apply_backward_reference,
    spectral_norm_apply_reference,
    spectral_norm_conv_apply,
    spectral_norm_conv_power,
    spectral_norm_power,
    spectral_norm_power_reference,
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
    "FixedPointError",
    "FixedPointResult",
    "FixedPointWarning",
    "fixed_point_inverse",
    "draw_roulette_n",
    "jacobian",
    "logdet_exact",
    "logdet_roulette",
    "logdet_series",
    "MLP_ACTIVATIONS",
    "mlp_apply_reference",
    "mlp_fixed_point",
    "mlp_fixed_point_reference",
    "mlp_trace",
    "mlp_trace_reference",
    "roulette_tail_prob",
    "sample_probes",
    "spectral_norm_apply",
    "spectral_norm_apply_backward_reference",
    "spectral_norm_apply_reference",
    "spectral_norm_conv_apply",
    "spectral_norm_conv_power",
    "spectral_norm_power",
    "spectral_norm_power_reference",
]
