// Shared code of the spectral-norm operators (schemas in csrc/fastflow.cpp):
//
//   spectral_norm_power(weight, u, v, n_iter, eps) -> (u', v')
//       n_iter rounds of  v <- W^T u / max(|W^T u|, eps),  u <- W v / max(|W v|, eps)
//   spectral_norm_apply(weight, u, v, coeff) -> (w_hat, sigma)
//       sigma = u^T W v (u, v constants),  w_hat = W / max(1, sigma / coeff)
//   spectral_norm_apply_backward(grad_w_hat, grad_sigma, weight, u, v, coeff) -> grad_weight
//       with s = 1 / max(1, sigma / c) and G = grad_w_hat (REFERENCE.md 4.3):
//       grad_weight = s G + (grad_sigma - [sigma > c] c <G, W> / sigma^2) u v^T
//
// Everything is matrix-vector algebra, written here once in ATen calls. The CUDA kernels run it
// as is (cuBLAS GEMVs, no host synchronisation: the branch on sigma > c is a tensor expression,
// never a read of sigma on the host). The CPU kernels are fused loops of their own
// (csrc/cpu/spectral_norm.cpp); on every device the backward under create_graph is
// spectral_norm_apply_backward_impl below, whose ATen calls autograd differentiates (double
// backward). What makes this the native path on CUDA: the n_iter loop runs in C++, without a
// Python round trip per operation, and the backward is one call instead of an autograd graph.
//
// Half/bf16 weights are computed in float32 (u', v' and w_hat are cast back, sigma stays
// float32); float32/float64 in their own dtype.
#pragma once

#include <ATen/ATen.h>

#include <cmath>

#include "fastflow/checks.h"

namespace fastflow {

inline at::ScalarType spectral_norm_opmath(at::ScalarType t) {
  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
}

inline void check_spectral_norm_vector(const at::Tensor& weight, const at::Tensor& t,
                                       const char* name, int64_t size, const char* dim_name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == size, "fastflow: ", name, " must have shape [", size,
              "] (the ", dim_name, " dimension of weight ", weight.sizes(), "), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == weight.scalar_type(), "fastflow: ", name,
              " must have the dtype of weight (", weight.scalar_type(), "), got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == weight.device(), "fastflow: ", name,
              " must be on the device of weight (", weight.device(), "), got ", t.device());
}

inline void check_spectral_norm_args(const at::Tensor& weight, const at::Tensor& u,
                                     const at::Tensor& v) {
  TORCH_CHECK(weight.dim() == 2, "fastflow: weight must be a matrix [out, in], got shape ",
              weight.sizes());
  TORCH_CHECK(at::isFloatingType(weight.scalar_type()),
              "fastflow: weight must be a floating tensor, got ", weight.scalar_type());
  TORCH_CHECK(weight.size(0) >= 1 && weight.size(1) >= 1,
              "fastflow: weight must not be empty, got shape ", weight.sizes());
  check_spectral_norm_vector(weight, u, "u", weight.size(0), "first (out)");
  check_spectral_norm_vector(weight, v, "v", weight.size(1), "second (in)");
}

inline void check_spectral_norm_power_args(const at::Tensor& weight, const at::Tensor& u,
                                           const at::Tensor& v, int64_t n_iter, double eps) {
  check_spectral_norm_args(weight, u, v);
  TORCH_CHECK(n_iter >= 0, "fastflow: n_iter must be >= 0, got ", n_iter);
  TORCH_CHECK(eps >= 0 && std::isfinite(eps), "fastflow: eps must be >= 0 and finite, got ",
              eps);
}

inline void check_spectral_norm_coeff(double coeff) {
  TORCH_CHECK(coeff > 0 && std::isfinite(coeff), "fastflow: coeff must be > 0 and finite, got ",
              coeff);
}

inline void check_spectral_norm_backward_args(const at::Tensor& grad_w_hat,
                                              const at::Tensor& grad_sigma,
                                              const at::Tensor& weight, const at::Tensor& u,
                                              const at::Tensor& v, double coeff) {
  check_spectral_norm_args(weight, u, v);
  check_spectral_norm_coeff(coeff);
  TORCH_CHECK(grad_w_hat.sizes() == weight.sizes(), "fastflow: grad_w_hat must have the shape of ",
              "weight ", weight.sizes(), ", got ", grad_w_hat.sizes());
  TORCH_CHECK(grad_w_hat.scalar_type() == weight.scalar_type() &&
                  grad_w_hat.device() == weight.device(),
              "fastflow: grad_w_hat must be a ", weight.scalar_type(), " tensor on ",
              weight.device(), ", got ", grad_w_hat.scalar_type(), " on ", grad_w_hat.device());
  const auto od = spectral_norm_opmath(weight.scalar_type());
  TORCH_CHECK(grad_sigma.dim() == 0, "fastflow: grad_sigma must be a 0-dim tensor, got shape ",
              grad_sigma.sizes());
  TORCH_CHECK(grad_sigma.scalar_type() == od && grad_sigma.device() == weight.device(),
              "fastflow: grad_sigma must be a ", od, " tensor on ", weight.device(), ", got ",
              grad_sigma.scalar_type(), " on ", grad_sigma.device());
}

// n_iter rounds of the power iteration in ATen calls (the CUDA path). Outputs are fresh
// tensors of u's and v's dtype, never aliases of the inputs (also when n_iter == 0).
inline std::tuple<at::Tensor, at::Tensor> spectral_norm_power_impl(const at::Tensor& weight,
                                                                   const at::Tensor& u,
                                                                   const at::Tensor& v,
                                                                   int64_t n_iter, double eps) {
  const auto od = spectral_norm_opmath(weight.scalar_type());
  const at::Tensor w = weight.to(od);
  const at::Tensor wt = w.t();
  at::Tensor un = at::empty({w.size(0)}, w.options());
  at::Tensor vn = at::empty({w.size(1)}, w.options());
  un.copy_(u);
  vn.copy_(v);
  for (int64_t i = 0; i < n_iter; ++i) {
    at::mv_out(vn, wt, un);
    vn.div_(at::linalg_vector_norm(vn).clamp_min_(eps));
    at::mv_out(un, w, vn);
    un.div_(at::linalg_vector_norm(un).clamp_min_(eps));
  }
  if (od != u.scalar_type()) {
    return {un.to(u.scalar_type()), vn.to(v.scalar_type())};
  }
  return {un, vn};
}

// sigma = u^T W v as a 0-dim tensor of the opmath dtype.
inline at::Tensor spectral_norm_sigma(const at::Tensor& w, const at::Tensor& u,
                                      const at::Tensor& v) {
  return at::dot(u, at::mv(w, v));
}

// The scale s = 1 / max(1, sigma / c) as a 0-dim tensor (no host read of sigma).
inline at::Tensor spectral_norm_scale(const at::Tensor& sigma, double coeff) {
  return at::clamp_min(sigma * (1.0 / coeff), 1.0).reciprocal_();
}

inline std::tuple<at::Tensor, at::Tensor> spectral_norm_apply_impl(const at::Tensor& weight,
                                                                   const at::Tensor& u,
                                                                   const at::Tensor& v,
                                                                   double coeff) {
  const auto od = spectral_norm_opmath(weight.scalar_type());
  const at::Tensor w = weight.to(od);
  at::Tensor sigma = spectral_norm_sigma(w, u.to(od), v.to(od));
  const at::Tensor s = spectral_norm_scale(sigma, coeff);
  // A fresh contiguous output whatever weight's strides (the fake kernel says the same).
  at::Tensor w_hat = at::empty(weight.sizes(), weight.options());
  at::mul_out(w_hat, w, s);  // in the opmath dtype, rounded once into weight's
  return {w_hat, sigma};
}

inline at::Tensor spectral_norm_apply_backward_impl(const at::Tensor& grad_w_hat,
                                                    const at::Tensor& grad_sigma,
                                                    const at::Tensor& weight, const at::Tensor& u,
                                                    const at::Tensor& v, double coeff) {
  const auto od = spectral_norm_opmath(weight.scalar_type());
  const at::Tensor w = weight.to(od).contiguous();
  const at::Tensor g = grad_w_hat.to(od).contiguous();
  const at::Tensor uo = u.to(od), vo = v.to(od);
  const at::Tensor sigma = spectral_norm_sigma(w, uo, vo);
  const at::Tensor s = spectral_norm_scale(sigma, coeff);
  // d s / d sigma = -[sigma > c] c / sigma^2 = -[sigma > c] s^2 / c, so the rank-one part of
  // the gradient is k u v^T with k = grad_sigma - [sigma > c] <G, W> s^2 / c.
  const at::Tensor gw = at::dot(g.view(-1), w.view(-1));
  const at::Tensor k = grad_sigma - at::where(sigma > coeff, gw * s * s * (1.0 / coeff), 0.0);
  at::Tensor grad = at::mul(g, s).addr_(uo * k, vo);
  return grad.to(weight.scalar_type());
}

}  // namespace fastflow
