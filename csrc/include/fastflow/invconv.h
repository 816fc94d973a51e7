// Shared code of the invconv_plu operator (schema in csrc/fastflow.cpp): the invertible 1x1
// convolution of Glow over a PLU decomposition, W = P A B with
//   A = strict-lower(lower) + I,  B = strict-upper(upper) + diag(sign * exp(log_s)),
//   P the permutation matrix with P[i, perm[i]] = 1 (so (P v)_i = v_{perm[i]}).
// Formulas: REFERENCE.md 4.2. Everything here is C x C algebra plus one GEMM over the pixels,
// so it is written once in ATen calls and the CPU and CUDA files only check the device and
// register it. What makes it the native path: W, W^{-1} and the backward are formed in one
// call each, with no slogdet, no inverse and no autograd graph through the factors.
#pragma once

#include <ATen/ATen.h>

#include "fastflow/checks.h"

namespace fastflow {

// Factors, W and the log-det are float32 when activations are half/bf16, else x's dtype.
inline at::ScalarType invconv_param_dtype(at::ScalarType t) {
  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
}

inline void check_invconv_param(const at::Tensor& x, const at::Tensor& t, const char* name,
                                at::IntArrayRef shape, at::ScalarType dtype) {
  TORCH_CHECK(t.sizes() == shape, "fastflow: ", name, " must have shape ", shape, ", got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, "fastflow: ", name, " must be ", dtype, " (x is ",
              x.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), "fastflow: ", name, " must be on the device of x (",
              x.device(), "), got ", t.device());
}

// Validates the operator's arguments; `x` is the input of the map (y for the inverse).
// perm is not checked to be a permutation: that would read it on the host (a sync on CUDA).
inline void check_invconv_args(const at::Tensor& x, const at::Tensor& perm,
                               const at::Tensor& lower, const at::Tensor& upper,
                               const at::Tensor& sign, const at::Tensor& log_s) {
  check_batched(x, "x");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "fastflow: x must be a floating tensor, got ",
              x.scalar_type());
  const int64_t C = x.size(1);
  TORCH_CHECK(C >= 1, "fastflow: x must have at least one channel (dim 1), got shape ",
              x.sizes());
  const auto pd = invconv_param_dtype(x.scalar_type());
  TORCH_CHECK(perm.dim() == 1 && perm.size(0) == C, "fastflow: perm must have shape [", C,
              "] (the channels of x), got ", perm.sizes());
  TORCH_CHECK(perm.scalar_type() == at::kLong, "fastflow: perm must be int64, got ",
              perm.scalar_type());
  TORCH_CHECK(perm.device() == x.device(), "fastflow: perm must be on the device of x (",
              x.device(), "), got ", perm.device());
  check_invconv_param(x, lower, "lower", {C, C}, pd);
  check_invconv_param(x, upper, "upper", {C, C}, pd);
  check_invconv_param(x, sign, "sign", {C}, pd);
  check_invconv_param(x, log_s, "log_s", {C}, pd);
}

inline void check_invconv_backward_args(const at::Tensor& grad_out,
                                        const at::Tensor& grad_logdet, const at::Tensor& input,
                                        const at::Tensor& perm, const at::Tensor& lower,
                                        const at::Tensor& upper, const at::Tensor& sign,
                                        const at::Tensor& log_s) {
  check_invconv_args(input, perm, lower, upper, sign, log_s);
  check_same(input, "input", grad_out, "grad_out");
  const auto pd = invconv_param_dtype(input.scalar_type());
  TORCH_CHECK(grad_logdet.dim() == 1 && grad_logdet.size(0) == input.size(0),
              "fastflow: grad_logdet must have shape [", input.size(0), "], got ",
              grad_logdet.sizes());
  TORCH_CHECK(grad_logdet.scalar_type() == pd && grad_logdet.device() == input.device(),
              "fastflow: grad_logdet must be a ", pd, " tensor on ", input.device(), ", got ",
              grad_logdet.scalar_type(), " on ", grad_logdet.device());
}

// Layout of the outputs: channels-last 4-D inputs stay channels-last, everything else is
// contiguous (mirrored by _per_sample_format in fastflow/ops/invconv.py).
inline at::MemoryFormat invconv_format(const at::Tensor& x) { return per_sample_format(x); }

// Pixels per sample (H*W for images, 1 for vectors).
inline int64_t invconv_pixels(const at::Tensor& x) {
  int64_t n = 1;
  for (int64_t d = 2; d < x.dim(); ++d) {
    n *= x.size(d);
  }
  return n;
}

struct PluFactors {
  at::Tensor A;  // unit lower-triangular
  at::Tensor B;  // upper-triangular with diagonal sign * exp(log_s)
};

inline PluFactors plu_factors(const at::Tensor& lower, const at::Tensor& upper,
                              const at::Tensor& sign, const at::Tensor& log_s) {
  const int64_t C = lower.size(0);
  return {lower.tril(-1) + at::eye(C, lower.options()),
          upper.triu(1) + at::diag(sign * log_s.exp())};
}

// W = P A B: row i of W is row perm[i] of A B.
inline at::Tensor plu_weight(const at::Tensor& perm, const PluFactors& f) {
  return at::matmul(f.A, f.B).index_select(0, perm);
}

// W^{-1} = B^{-1} A^{-1} P^T by two triangular solves against P^T (no inverse), in float64
// whatever the parameters' dtype (REFERENCE.md 4.2: invert in float64), cast back.
inline at::Tensor plu_inverse_weight(const at::Tensor& perm, const PluFactors& f) {
  const int64_t C = f.A.size(0);
  const auto d = f.A.options().dtype(at::kDouble);
  const at::Tensor pt = at::eye(C, d).index_select(1, perm);  // P^T[j, i] = [j == perm[i]]
  const at::Tensor a_inv_pt = at::linalg_solve_triangular(f.A.to(at::kDouble), pt,
                                                          /*upper=*/false, /*left=*/true,
                                                          /*unitriangular=*/true);
  return at::linalg_solve_triangular(f.B.to(at::kDouble), a_inv_pt, /*upper=*/true,
                                     /*left=*/true, /*unitriangular=*/false)
      .to(f.A.scalar_type());
}

// out[b, :, pixel] = M in[b, :, pixel] for every pixel, in `fmt`: one GEMM. M is cast to the
// activations' dtype (float32 W with half/bf16 activations, as autocast does for conv).
inline at::Tensor apply_1x1(const at::Tensor& M, const at::Tensor& in, at::MemoryFormat fmt) {
  const at::Tensor m = M.to(in.scalar_type());
  if (in.dim() == 2) {
    return at::matmul(in, m.t());
  }
  if (fmt == at::MemoryFormat::ChannelsLast) {
    // [B, H, W, C] is dense: one [B*H*W, C] x [C, C] GEMM, the result read back as NCHW.
    const at::Tensor xs = in.contiguous(fmt).permute({0, 2, 3, 1});
    return at::matmul(xs, m.t()).permute({0, 3, 1, 2});
  }
  const at::Tensor xc = in.contiguous();
  const int64_t B = in.size(0), C = in.size(1);
  return at::matmul(m, xc.view({B, C, -1})).view(in.sizes());
}

// sum over samples and pixels of g x^T (C x C), in `dtype`.
inline at::Tensor pixel_gram(const at::Tensor& g, const at::Tensor& x, at::MemoryFormat fmt,
                             at::ScalarType dtype) {
  const int64_t B = x.size(0), C = x.size(1);
  const at::Tensor gd = g.to(dtype), xd = x.to(dtype);
  if (x.dim() == 2) {
    return at::matmul(gd.t(), xd);
  }
  if (fmt == at::MemoryFormat::ChannelsLast) {
    const at::Tensor gs = gd.contiguous(fmt).permute({0, 2, 3, 1}).reshape({-1, C});
    const at::Tensor xs = xd.contiguous(fmt).permute({0, 2, 3, 1}).reshape({-1, C});
    return at::matmul(gs.t(), xs);
  }
  const at::Tensor gc = gd.contiguous().view({B, C, -1});
  const at::Tensor xc = xd.contiguous().view({B, C, -1});
  return at::matmul(gc, xc.transpose(1, 2)).sum(0);
}

// Forward (inverse=false: y = W x, log-det N sum log_s) or inverse (x = W^{-1} y, log-det
// -N sum log_s), N the pixels per sample. Returns (out, logdet).
inline std::tuple<at::Tensor, at::Tensor> invconv_plu_impl(
    const at::Tensor& x, const at::Tensor& perm, const at::Tensor& lower, const at::Tensor& upper,
    const at::Tensor& sign, const at::Tensor& log_s, bool inverse) {
  const PluFactors f = plu_factors(lower, upper, sign, log_s);
  const at::Tensor M = inverse ? plu_inverse_weight(perm, f) : plu_weight(perm, f);
  at::Tensor out = apply_1x1(M, x, invconv_format(x));
  const double n = static_cast<double>(invconv_pixels(x));
  at::Tensor logdet = (log_s.sum() * (inverse ? -n : n)).expand({x.size(0)}).contiguous();
  return {out, logdet};
}

// Gradients w.r.t. the input (x, or y for the inverse), lower, upper and log_s; those of lower
// and upper are zero outside their strict triangles. With Gw = dLoss/dW (REFERENCE.md 4.2):
//   forward  y = W x:      d input = W^T g,      Gw = sum g x^T
//   inverse  x = W^{-1} y: d input = W^{-T} g,   Gw = -W^{-T} (sum g y^T) W^{-T}
//   and, Q = P^T Gw:  d lower = strict-lower(Q B^T),  d upper = strict-upper(A^T Q),
//   d log_s = diag(A^T Q) sign exp(log_s) +- N sum_b grad_logdet[b].
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> invconv_plu_backward_impl(
    const at::Tensor& grad_out, const at::Tensor& grad_logdet, const at::Tensor& input,
    const at::Tensor& perm, const at::Tensor& lower, const at::Tensor& upper,
    const at::Tensor& sign, const at::Tensor& log_s, bool inverse) {
  const PluFactors f = plu_factors(lower, upper, sign, log_s);
  const auto fmt = invconv_format(input);
  const auto pd = lower.scalar_type();
  const at::Tensor M = inverse ? plu_inverse_weight(perm, f) : plu_weight(perm, f);
  at::Tensor grad_in = apply_1x1(M.t(), grad_out, fmt);
  at::Tensor gw = pixel_gram(grad_out, input, fmt, pd);
  if (inverse) {
    gw = at::matmul(at::matmul(M.t(), gw), M.t()).neg();
  }
  // Q = P^T Gw: row perm[i] of Q is row i of Gw, i.e. Q = Gw[argsort(perm)] (no scatter, so
  // deterministic on CUDA too).
  const at::Tensor q = gw.index_select(0, at::argsort(perm));
  at::Tensor grad_lower = at::matmul(q, f.B.t()).tril(-1);
  const at::Tensor z = at::matmul(f.A.t(), q);
  at::Tensor grad_upper = z.triu(1);
  const double n = static_cast<double>(invconv_pixels(input));
  at::Tensor grad_log_s =
      z.diagonal() * sign * log_s.exp() + grad_logdet.sum() * (inverse ? -n : n);
  return {grad_in, grad_lower, grad_upper, grad_log_s};
}

}  // namespace fastflow
