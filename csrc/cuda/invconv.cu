// CUDA kernels of fastflow::invconv_plu and fastflow::invconv_plu_backward.
// The CPU kernel (csrc/cpu/invconv.cpp) is the model: same checks, same shared code
// (fastflow/invconv.h). The pixel GEMMs go to cuBLAS through ATen, the C x C triangular solves
// to cuBLAS/cuSOLVER, all on the current stream with no host synchronisation. Half/bf16
// activations are multiplied by W cast to their dtype (cuBLAS accumulates in float32); the
// factors, W^{-1}, the weight gradient (a sum over every pixel) and the log-det stay float32.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "fastflow/invconv.h"

namespace fastflow {
namespace {

void check_cuda(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.is_cuda(), "fastflow: ", name, " must be a CUDA tensor for the CUDA kernel");
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16,
              "fastflow: the CUDA kernel of invconv_plu supports float32, float64, float16 and "
              "bfloat16; ", name, " is ", t);
}

std::tuple<at::Tensor, at::Tensor> invconv_plu_cuda(const at::Tensor& x, const at::Tensor& perm,
                                                    const at::Tensor& lower,
                                                    const at::Tensor& upper,
                                                    const at::Tensor& sign,
                                                    const at::Tensor& log_s, bool inverse) {
  check_invconv_args(x, perm, lower, upper, sign, log_s);
  check_cuda(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  return invconv_plu_impl(x, perm, lower, upper, sign, log_s, inverse);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> invconv_plu_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& grad_logdet, const at::Tensor& input,
    const at::Tensor& perm, const at::Tensor& lower, const at::Tensor& upper,
    const at::Tensor& sign, const at::Tensor& log_s, bool inverse) {
  check_invconv_backward_args(grad_out, grad_logdet, input, perm, lower, upper, sign, log_s);
  check_cuda(input, "input");
  const c10::cuda::CUDAGuard guard(input.device());
  return invconv_plu_backward_impl(grad_out, grad_logdet, input, perm, lower, upper, sign, log_s,
                                   inverse);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastflow, CUDA, m) {
  m.impl("invconv_plu", &invconv_plu_cuda);
  m.impl("invconv_plu_backward", &invconv_plu_backward_cuda);
}

}  // namespace fastflow
