// Shared declarations of the MLP trace operators (schemas in csrc/fastflow.cpp; the math in
// fastflow/ops/mlp_trace.py's module docstring and REFERENCE.md 1.5, 1.6).
//
// The network, "MLP-structured g": for layers l = 0 .. L-1
//
//     h_l = act(z_l)  if the layer has an activation before it, else z_l     (z_0 = x)
//     z_{l+1} = (W_l h_l + b_l) * gate_l + shift_l
//
// with W_l [out, in], b_l [out], gate_l and shift_l broadcastable to [B, out] (FFJORD's
// concat-squash layers: the gate and the hyper-bias of the time t). Layer l has an activation
// before it when act != identity and (l > 0 or preact). act is one of ActKind; LipSwish takes a
// per-activation beta (betas[i] for the i-th activation, in order).
//
//   mlp_trace_forward(x, weights, biases, gates, shifts, betas, act, preact, probes,
//                     value_coeffs, psi_coeffs) -> (out, trace, psi)
//       out = g(x) [B, D]; with w_0 = v (each probe of probes [P, B, D]) and w_k = J w_{k-1}
//       (Jacobian-vector products through the known layers, J = dg/dx per sample),
//       trace = mean_p sum_{k=1}^{K} value_coeffs[k-1] <v, w_k>, K = len(value_coeffs), and
//       psi = sum_{j < len(psi_coeffs)} psi_coeffs[j] w_j (len(psi_coeffs) <= K), [P, B, D].
//   mlp_trace.tensor_coeffs(..., probes, value_coeffs, psi_coeffs): the same, the coefficients
//       1-D floating tensors (any device; read on the host, so CPU ones cost no synchronisation)
//       of which only the entries up to the last non-zero one count (K = 1 + the index of the
//       last non-zero value coefficient; psi_coeffs may not have a non-zero entry at or past K).
//   mlp_trace_backward(grad_out, grad_trace, x, ..., probes, psi)
//       -> (grad_x, grad_weights, grad_biases, grad_gates, grad_shifts, grad_betas)
//       gradients of sum_b [<grad_out_b, out_b> + grad_trace_b mean_p <v, J psi>] with v and
//       psi held constant (the Neumann surrogate; with K = 1 and psi = v, the exact gradient
//       of the trace). With value / tangent_dot non-null it also stores g(x) and
//       mean_p <v, J psi> there (from the passes it makes anyway: with psi = v, the value and
//       the one-term trace of mlp_trace_forward, for callers that need both, like the CNF
//       adjoint).
//   mlp_fixed_point(y, weights, biases, betas, act, preact, tol, max_iter)
//       -> (x, iterations, residual): x <- y - g(x) from x = y, per sample, until
//       max_j |x_k - x_{k-1}| / (1 + |y_j|) <= tol (fastflow/ops/fixed_point.py).
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

namespace fastflow {

enum ActKind : int64_t {
  kActIdentity = 0,
  kActElu = 1,       // alpha = 1
  kActLipSwish = 2,  // z sigmoid(beta z) / 1.1
  kActTanh = 3,
  kActSoftplus = 4,  // log(1 + exp(z)), beta = 1
};

constexpr double kLipSwishDiv = 1.1;

// Checks the network's tensors against x [B, D]; returns the number of activations.
int64_t check_mlp_args(const at::Tensor& x, const char* x_name, at::TensorList weights,
                       at::TensorList biases, at::TensorList gates, at::TensorList shifts,
                       const at::Tensor& betas, int64_t act, bool preact);

std::tuple<at::Tensor, at::Tensor, at::Tensor> mlp_trace_forward_impl(
    const at::Tensor& x, at::TensorList weights, at::TensorList biases, at::TensorList gates,
    at::TensorList shifts, const at::Tensor& betas, int64_t act, bool preact,
    const at::Tensor& probes, at::ArrayRef<double> value_coeffs, at::ArrayRef<double> psi_coeffs);

// mlp_trace.tensor_coeffs: the coefficient tensors read into host vectors (checked, trailing
// zeros dropped), then mlp_trace_forward_impl.
std::tuple<at::Tensor, at::Tensor, at::Tensor> mlp_trace_forward_tensor_coeffs_impl(
    const at::Tensor& x, at::TensorList weights, at::TensorList biases, at::TensorList gates,
    at::TensorList shifts, const at::Tensor& betas, int64_t act, bool preact,
    const at::Tensor& probes, const at::Tensor& value_coeffs, const at::Tensor& psi_coeffs);

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
           std::vector<at::Tensor>, at::Tensor>
mlp_trace_backward_impl(const at::Tensor& grad_out, const at::Tensor& grad_trace,
                        const at::Tensor& x, at::TensorList weights, at::TensorList biases,
                        at::TensorList gates, at::TensorList shifts, const at::Tensor& betas,
                        int64_t act, bool preact, const at::Tensor& probes, const at::Tensor& psi,
                        at::Tensor* value = nullptr, at::Tensor* tangent_dot = nullptr);

// g(x) alone (the primal pass), used by the fixed-point kernels' reference loop.
at::Tensor mlp_apply(const at::Tensor& x, at::TensorList weights, at::TensorList biases,
                     const at::Tensor& betas, int64_t act, bool preact);

void check_fixed_point_args(const at::Tensor& y, at::TensorList weights, at::TensorList biases,
                            const at::Tensor& betas, int64_t act, bool preact, double tol,
                            int64_t max_iter);

}  // namespace fastflow
