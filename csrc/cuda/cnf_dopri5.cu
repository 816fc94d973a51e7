// CUDA registration of the CNF solve operators (fastflow/cnf_dopri5.h): the shared ATen code of
// csrc/cpu/cnf_dopri5.cpp on the current stream. Each function evaluation is the MLP trace
// pass (cuBLAS GEMMs and elementwise kernels) queued back to back; the host reads one error
// ratio per Runge-Kutta step to accept or reject it.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "fastflow/cnf_dopri5.h"

namespace fastflow {
namespace {

void check_cuda(const at::Tensor& z, const char* name, const char* op) {
  TORCH_CHECK(z.is_cuda(), "fastflow: ", name, " must be a CUDA tensor for the CUDA kernel of ",
              op, ", got ", z.device());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cnf_dopri5_cuda(
    const at::Tensor& z, at::TensorList weights, at::TensorList biases,
    at::TensorList gate_weights, at::TensorList gate_biases, at::TensorList shift_weights,
    const at::Tensor& end_time, int64_t act, const at::Tensor& probe, bool reverse, double rtol,
    double atol, int64_t end_time_norm, int64_t max_steps) {
  check_cuda(z, "z", "cnf_dopri5");
  const c10::cuda::CUDAGuard guard(z.device());
  return cnf_dopri5_forward(z, weights, biases, gate_weights, gate_biases, shift_weights,
                            end_time, act, probe, reverse, rtol, atol, end_time_norm, max_steps);
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
           std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor, at::Tensor>
cnf_dopri5_adjoint_cuda(const at::Tensor& grad_z, const at::Tensor& grad_logdet,
                        const at::Tensor& z_out, const at::Tensor& logdet, at::TensorList weights,
                        at::TensorList biases, at::TensorList gate_weights,
                        at::TensorList gate_biases, at::TensorList shift_weights,
                        const at::Tensor& end_time, int64_t act, const at::Tensor& probe,
                        bool reverse, double rtol, double atol, int64_t end_time_norm,
                        int64_t max_steps) {
  check_cuda(z_out, "z_out", "cnf_dopri5_adjoint");
  const c10::cuda::CUDAGuard guard(z_out.device());
  return cnf_dopri5_adjoint(grad_z, grad_logdet, z_out, logdet, weights, biases, gate_weights,
                            gate_biases, shift_weights, end_time, act, probe, reverse, rtol, atol,
                            end_time_norm, max_steps);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastflow, CUDA, m) {
  m.impl("cnf_dopri5", &cnf_dopri5_cuda);
  m.impl("cnf_dopri5_adjoint", &cnf_dopri5_adjoint_cuda);
}

}  // namespace fastflow
