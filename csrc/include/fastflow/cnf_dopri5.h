// Shared declarations of the CNF solve operators (schemas in csrc/fastflow.cpp; the math in
// fastflow/ops/cnf_dopri5.py's module docstring and REFERENCE.md's FFJORD section).
//
// The dynamics are FFJORD's concat-squash MLP in normalised time s (t = s T):
//
//     F(s, z) = T f(s T, z),   f = layer_{L-1}(act(... act(layer_0(z)))),
//     layer_l(h) = (W_l h + b_l) * sigmoid(gW_l t + gb_l) + sW_l t,
//
// with W_l [out, in], b_l [out], gW_l [out, 1], gb_l [out], sW_l [out, 1], and the augmented
// state (z, a) with da/ds = T sum_p eps_p^T (df/dz) eps_p over the probes (fixed over the
// solve; mlp_trace's forward-mode pass): one probe [B, D] is Hutchinson's divergence, the D
// basis vectors [D, B, D] the exact trace.
//
//   cnf_dopri5_forward(z, ..., end_time, act, probe, reverse, rtol, atol, end_time_norm,
//                      max_steps) -> (z_out, logdet, nfe)
//       integrates s = 0 -> 1 (reverse: 1 -> 0) with a = 0 at the start; logdet = a at the
//       end; nfe [] int64 counts evaluations of F. The step control is torchdiffeq's dopri5
//       (first step from the derivatives, mixed RMS error norm over the state's parts, dense
//       output at the end time), so that the native and reference solves take the same steps.
//   cnf_dopri5_adjoint(grad_z, grad_logdet, z_out, logdet, ..., same arguments)
//       -> (grad_z_in, grad_weights, grad_biases, grad_gate_weights, grad_gate_biases,
//           grad_shift_weights, grad_end_time, nfe)
//       the adjoint method (Chen et al. 2018): the state, its adjoint and the parameters'
//       adjoints integrated back from the end with dopri5 and the same control, the error norm
//       also over every parameter's adjoint (torchdiffeq's default); end_time_norm puts the
//       end time's adjoint in it too: 0 not at all (a fixed T), 1 as T's, 2 as the adjoint of
//       sqrt(T) (2 sqrt(T) times T's: the reference learns T = sqrt_T^2 through sqrt_T).
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

namespace fastflow {

std::tuple<at::Tensor, at::Tensor, at::Tensor> cnf_dopri5_forward(
    const at::Tensor& z, at::TensorList weights, at::TensorList biases,
    at::TensorList gate_weights, at::TensorList gate_biases, at::TensorList shift_weights,
    const at::Tensor& end_time, int64_t act, const at::Tensor& probe, bool reverse, double rtol,
    double atol, int64_t end_time_norm, int64_t max_steps);

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
           std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor, at::Tensor>
cnf_dopri5_adjoint(const at::Tensor& grad_z, const at::Tensor& grad_logdet,
                   const at::Tensor& z_out, const at::Tensor& logdet, at::TensorList weights,
                   at::TensorList biases, at::TensorList gate_weights, at::TensorList gate_biases,
                   at::TensorList shift_weights, const at::Tensor& end_time, int64_t act,
                   const at::Tensor& probe, bool reverse, double rtol, double atol,
                   int64_t end_time_norm, int64_t max_steps);

}  // namespace fastflow
