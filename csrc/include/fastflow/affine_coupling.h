// Shared declarations of the affine_coupling operator (schema in csrc/fastflow.cpp).
#pragma once

#include <ATen/ATen.h>
#include <cmath>

#include "fastflow/checks.h"

namespace fastflow {

enum class CouplingActivation : int64_t { Additive = 0, Exp = 1, Sigmoid = 2 };

// Validates the operator's arguments; `input` is x for the forward map and y for the inverse.
inline CouplingActivation check_affine_coupling_args(const at::Tensor& input,
                                                     const c10::optional<at::Tensor>& log_scale,
                                                     const at::Tensor& shift, int64_t activation,
                                                     double clamp) {
  check_batched(input, "x");
  check_same(input, "x", shift, "shift");
  TORCH_CHECK(activation >= 0 && activation <= 2,
              "fastflow: activation must be 0 (additive), 1 (exp) or 2 (sigmoid), got ",
              activation);
  auto act = static_cast<CouplingActivation>(activation);
  if (act != CouplingActivation::Additive) {
    TORCH_CHECK(log_scale.has_value() && log_scale->defined(),
                "fastflow: log_scale is required unless activation is additive");
    check_same(input, "x", *log_scale, "log_scale");
  }
  TORCH_CHECK(clamp > 0, "fastflow: clamp must be positive (inf for no clamp), got ", clamp);
  TORCH_CHECK(at::isFloatingType(input.scalar_type()), "fastflow: x must be a floating tensor, got ",
              input.scalar_type());
  return act;
}

// Validates the backward's arguments. `scale` is the third output of the forward called with
// save_scale=true (unused, and may be empty, for the additive activation).
inline CouplingActivation check_affine_coupling_backward_args(
    const at::Tensor& grad_out, const at::Tensor& grad_logdet, const at::Tensor& input,
    const at::Tensor& scale, const at::Tensor& shift, int64_t activation, double clamp) {
  const auto act = check_affine_coupling_args(input, c10::nullopt, shift,
                                              /*activation=*/0, clamp);
  TORCH_CHECK(activation >= 0 && activation <= 2,
              "fastflow: activation must be 0 (additive), 1 (exp) or 2 (sigmoid), got ",
              activation);
  check_same(input, "input", grad_out, "grad_out");
  if (activation != 0) {
    check_same(input, "input", scale, "scale");
  }
  const auto ld_dtype = (input.scalar_type() == at::kHalf || input.scalar_type() == at::kBFloat16)
                            ? at::kFloat
                            : input.scalar_type();
  TORCH_CHECK(grad_logdet.dim() == 1 && grad_logdet.size(0) == input.size(0),
              "fastflow: grad_logdet must have shape [", input.size(0), "], got ",
              grad_logdet.sizes());
  TORCH_CHECK(grad_logdet.scalar_type() == ld_dtype && grad_logdet.device() == input.device(),
              "fastflow: grad_logdet must be a ", ld_dtype, " tensor on ", input.device(), ", got ",
              grad_logdet.scalar_type(), " on ", grad_logdet.device());
  (void)act;
  return static_cast<CouplingActivation>(activation);
}

// The per-sample log-det is float32 when activations are half/bf16, else the input's dtype.
inline at::ScalarType logdet_dtype(at::ScalarType t) {
  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
}

}  // namespace fastflow
