// CUDA kernels of fastflow::spectral_norm_power, spectral_norm_apply and
// spectral_norm_apply_backward.
//
// The shared ATen code of fastflow/spectral_norm.h runs as is: the GEMVs go to cuBLAS on the
// current stream, the norms and the sigma > coeff branch are device-side tensor expressions, so
// an n_iter loop issues kernels back to back with no host synchronisation. Half/bf16 weights
// are computed in float32 (their u, v and w_hat are cast back, sigma stays float32).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "fastflow/spectral_norm.h"

namespace fastflow {
namespace {

void check_cuda(const at::Tensor& weight, const char* op) {
  TORCH_CHECK(weight.is_cuda(), "fastflow: weight must be a CUDA tensor for the CUDA kernel of ",
              op);
  const auto t = weight.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16,
              "fastflow: the CUDA kernel of ", op,
              " supports float32, float64, float16 and bfloat16; weight is ", t);
}

std::tuple<at::Tensor, at::Tensor> spectral_norm_power_cuda(const at::Tensor& weight,
                                                            const at::Tensor& u,
                                                            const at::Tensor& v, int64_t n_iter,
                                                            double eps) {
  check_spectral_norm_power_args(weight, u, v, n_iter, eps);
  check_cuda(weight, "spectral_norm_power");
  const c10::cuda::CUDAGuard guard(weight.device());
  return spectral_norm_power_impl(weight, u, v, n_iter, eps);
}

std::tuple<at::Tensor, at::Tensor> spectral_norm_apply_cuda(const at::Tensor& weight,
                                                            const at::Tensor& u,
                                                            const at::Tensor& v, double coeff) {
  check_spectral_norm_args(weight, u, v);
  check_spectral_norm_coeff(coeff);
  check_cuda(weight, "spectral_norm_apply");
  const c10::cuda::CUDAGuard guard(weight.device());
  return spectral_norm_apply_impl(weight, u, v, coeff);
}

at::Tensor spectral_norm_apply_backward_cuda(const at::Tensor& grad_w_hat,
                                             const at::Tensor& grad_sigma,
                                             const at::Tensor& weight, const at::Tensor& u,
                                             const at::Tensor& v, double coeff) {
  check_spectral_norm_backward_args(grad_w_hat, grad_sigma, weight, u, v, coeff);
  check_cuda(weight, "spectral_norm_apply_backward");
  const c10::cuda::CUDAGuard guard(weight.device());
  return spectral_norm_apply_backward_impl(grad_w_hat, grad_sigma, weight, u, v, coeff);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastflow, CUDA, m) {
  m.impl("spectral_norm_power", &spectral_norm_power_cuda);
  m.impl("spectral_norm_apply", &spectral_norm_apply_cuda);
  m.impl("spectral_norm_apply_backward", &spectral_norm_apply_backward_cuda);
}

}  // namespace fastflow
