// CPU kernels of fastflow::invconv_plu and fastflow::invconv_plu_backward.
//
// The work is C x C algebra on the factors plus one GEMM over all pixels (and one more for the
// weight gradient), which ATen's BLAS already does at full speed; the shared code is in
// fastflow/invconv.h, identical on CPU and CUDA. Here only the device and dtype are checked.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "fastflow/invconv.h"

namespace fastflow {
namespace {

void check_cpu(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu(), "fastflow: ", name, " must be a CPU tensor for the CPU kernel");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "fastflow: the CPU kernel of invconv_plu supports float32 and float64; ", name,
              " is ", x.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> invconv_plu_cpu(const at::Tensor& x, const at::Tensor& perm,
                                                   const at::Tensor& lower,
                                                   const at::Tensor& upper,
                                                   const at::Tensor& sign,
                                                   const at::Tensor& log_s, bool inverse) {
  check_invconv_args(x, perm, lower, upper, sign, log_s);
  check_cpu(x, "x");
  return invconv_plu_impl(x, perm, lower, upper, sign, log_s, inverse);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> invconv_plu_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& grad_logdet, const at::Tensor& input,
    const at::Tensor& perm, const at::Tensor& lower, const at::Tensor& upper,
    const at::Tensor& sign, const at::Tensor& log_s, bool inverse) {
  check_invconv_backward_args(grad_out, grad_logdet, input, perm, lower, upper, sign, log_s);
  check_cpu(input, "input");
  return invconv_plu_backward_impl(grad_out, grad_logdet, input, perm, lower, upper, sign, log_s,
                                   inverse);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastflow, CPU, m) {
  m.impl("invconv_plu", &invconv_plu_cpu);
  m.impl("invconv_plu_backward", &invconv_plu_backward_cpu);
}

}  // namespace fastflow
