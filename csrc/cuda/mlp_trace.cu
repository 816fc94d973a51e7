// CUDA kernels of the MLP trace operators (fastflow/mlp_trace.h).
//
// mlp_trace and mlp_trace_backward run the shared ATen code of csrc/cpu/mlp_trace.cpp on the
// current stream: their work is GEMMs (cuBLAS) and elementwise passes, queued back to back
// with no host synchronisation.
//
// mlp_fixed_point is a kernel of its own: one thread block per sample iterates
// x <- y - g(x) through the whole network in shared memory and stops when that sample's
// residual is below tol (or not finite), so every sample converges on its own and the host
// never waits between iterations (DESIGN.md, "Performance rules"). Each thread computes output
// units of a layer as dot products over the layer's input (weights read from global memory,
// cached in L1/L2); the residual's maximum is a shared-memory tree reduction.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>

#include "fastflow/mlp_trace.h"

namespace fastflow {
namespace {

constexpr int kMaxLayers = 16;
constexpr int kThreads = 128;  // a power of two (the reduction halves it)

template <typename scalar_t>
struct MlpParams {
  const scalar_t* W[kMaxLayers];
  const scalar_t* b[kMaxLayers];  // nullptr: no bias
  int out[kMaxLayers];
  int in[kMaxLayers];
  const scalar_t* betas;  // LipSwish's betas, one per activation; else nullptr
  int layers;
  int act;
  bool preact;
};

template <typename scalar_t>
__device__ __forceinline__ scalar_t act_value(int act, scalar_t z, scalar_t beta) {
  switch (act) {
    case kActElu:
      return z > scalar_t(0) ? z : expm1(z);
    case kActLipSwish:
      return z / (scalar_t(1) + exp(-beta * z)) / scalar_t(kLipSwishDiv);
    case kActTanh:
      return tanh(z);
    case kActSoftplus:
      return z > scalar_t(20) ? z : log1p(exp(z));
    default:
      return z;
  }
}

// max that keeps a NaN once it has seen one
template <typename scalar_t>
__device__ __forceinline__ scalar_t nan_max(scalar_t a, scalar_t c) {
  return (c > a || isnan(c)) ? c : a;
}

template <typename scalar_t>
__global__ void mlp_fixed_point_kernel(MlpParams<scalar_t> p, const scalar_t* __restrict__ y,
                                       scalar_t* __restrict__ x_out,
                                       int64_t* __restrict__ iterations,
                                       scalar_t* __restrict__ residual, int D, int max_width,
                                       scalar_t tol, int64_t max_iter) {
  extern __shared__ unsigned char smem_raw[];
  scalar_t* xs = reinterpret_cast<scalar_t*>(smem_raw);  // the iterate, D
  scalar_t* buf0 = xs + D;                                // layer outputs, max_width each
  scalar_t* buf1 = buf0 + max_width;
  scalar_t* red = buf1 + max_width;  // kThreads
  const int tid = threadIdx.x;
  const scalar_t* yb = y + static_cast<int64_t>(blockIdx.x) * D;

  for (int i = tid; i < D; i += blockDim.x) {
    xs[i] = yb[i];
  }
  __syncthreads();

  scalar_t r = INFINITY;
  int64_t it = 0;
  while (it < max_iter) {
    // g(xs): [act ->] linear -> act -> linear ... ; hin never aliases xs after the preact
    const scalar_t* hin = xs;
    if (p.act != kActIdentity && p.preact) {
      const scalar_t beta = p.betas != nullptr ? p.betas[0] : scalar_t(0);
      for (int i = tid; i < D; i += blockDim.x) {
        buf1[i] = act_value(p.act, xs[i], beta);
      }
      __syncthreads();
      hin = buf1;
    }
    for (int l = 0; l < p.layers; ++l) {
      scalar_t* hout = hin == buf0 ? buf1 : buf0;
      const scalar_t* W = p.W[l];
      const scalar_t* bias = p.b[l];
      const int n_in = p.in[l], n_out = p.out[l];
      for (int j = tid; j < n_out; j += blockDim.x) {
        scalar_t acc = bias != nullptr ? bias[j] : scalar_t(0);
        const scalar_t* row = W + static_cast<int64_t>(j) * n_in;
        for (int i = 0; i < n_in; ++i) {
          acc += row[i] * hin[i];
        }
        hout[j] = acc;
      }
      __syncthreads();
      if (l + 1 < p.layers && p.act != kActIdentity) {
        const scalar_t beta =
            p.betas != nullptr ? p.betas[p.preact ? l + 1 : l] : scalar_t(0);
        for (int j = tid; j < n_out; j += blockDim.x) {
          hout[j] = act_value(p.act, hout[j], beta);
        }
        __syncthreads();
      }
      hin = hout;
    }
    // x <- y - g(x), and this sample's residual max_i |x_new - x_old| / (1 + |y_i|)
    scalar_t m = 0;
    for (int i = tid; i < D; i += blockDim.x) {
      const scalar_t xn = yb[i] - hin[i];
      m = nan_max(m, abs(xn - xs[i]) / (scalar_t(1) + abs(yb[i])));
      xs[i] = xn;
    }
    red[tid] = m;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
      if (tid < s) {
        red[tid] = nan_max(red[tid], red[tid + s]);
      }
      __syncthreads();
    }
    r = red[0];
    ++it;
    __syncthreads();  // every thread has read red[0] before the next iteration writes it
    if (!(r > tol) || !isfinite(r)) {
      break;
    }
  }
  scalar_t* xb = x_out + static_cast<int64_t>(blockIdx.x) * D;
  for (int i = tid; i < D; i += blockDim.x) {
    xb[i] = xs[i];
  }
  if (tid == 0) {
    iterations[blockIdx.x] = it;
    residual[blockIdx.x] = r;
  }
}

void check_cuda(const at::Tensor& x, const char* name, const char* op) {
  TORCH_CHECK(x.is_cuda(), "fastflow: ", name, " must be a CUDA tensor for the CUDA kernel of ",
              op, ", got ", x.device());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mlp_trace_cuda(
    const at::Tensor& x, at::TensorList weights, at::TensorList biases, at::TensorList gates,
    at::TensorList shifts, const at::Tensor& betas, int64_t act, bool preact,
    const at::Tensor& probes, at::ArrayRef<double> value_coeffs,
    at::ArrayRef<double> psi_coeffs) {
  check_cuda(x, "x", "mlp_trace");
  const c10::cuda::CUDAGuard guard(x.device());
  return mlp_trace_forward_impl(x, weights, biases, gates, shifts, betas, act, preact, probes,
                                value_coeffs, psi_coeffs);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mlp_trace_tensor_coeffs_cuda(
    const at::Tensor& x, at::TensorList weights, at::TensorList biases, at::TensorList gates,
    at::TensorList shifts, const at::Tensor& betas, int64_t act, bool preact,
    const at::Tensor& probes, const at::Tensor& value_coeffs, const at::Tensor& psi_coeffs) {
  check_cuda(x, "x", "mlp_trace");
  const c10::cuda::CUDAGuard guard(x.device());
  return mlp_trace_forward_tensor_coeffs_impl(x, weights, biases, gates, shifts, betas, act,
                                              preact, probes, value_coeffs, psi_coeffs);
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
           std::vector<at::Tensor>, at::Tensor>
mlp_trace_backward_cuda(const at::Tensor& grad_out, const at::Tensor& grad_trace,
                        const at::Tensor& x, at::TensorList weights, at::TensorList biases,
                        at::TensorList gates, at::TensorList shifts, const at::Tensor& betas,
                        int64_t act, bool preact, const at::Tensor& probes,
                        const at::Tensor& psi) {
  check_cuda(x, "x", "mlp_trace_backward");
  const c10::cuda::CUDAGuard guard(x.device());
  return mlp_trace_backward_impl(grad_out, grad_trace, x, weights, biases, gates, shifts, betas,
                                 act, preact, probes, psi);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mlp_fixed_point_cuda(
    const at::Tensor& y_in, at::TensorList weights, at::TensorList biases,
    const at::Tensor& betas, int64_t act, bool preact, double tol, int64_t max_iter) {
  check_fixed_point_args(y_in, weights, biases, betas, act, preact, tol, max_iter);
  check_cuda(y_in, "y", "mlp_fixed_point");
  const int64_t L = static_cast<int64_t>(weights.size());
  TORCH_CHECK(L <= kMaxLayers, "fastflow: the CUDA kernel of mlp_fixed_point takes at most ",
              kMaxLayers, " layers, got ", L);
  const c10::cuda::CUDAGuard guard(y_in.device());
  const at::Tensor y = y_in.contiguous();
  const int64_t B = y.size(0), D = y.size(1);
  int64_t max_width = D;
  std::vector<at::Tensor> keep;  // contiguous copies live until the kernel is queued
  for (int64_t l = 0; l < L; ++l) {
    max_width = std::max<int64_t>(max_width, weights[l].size(0));
  }
  const size_t smem = static_cast<size_t>(D + 2 * max_width + kThreads) * y.element_size();
  TORCH_CHECK(smem <= 48 * 1024, "fastflow: mlp_fixed_point's CUDA kernel keeps a sample's "
              "activations in shared memory, at most 48 KiB; these widths need ", smem,
              " bytes (use fastflow.ops.fixed_point.fixed_point_inverse)");
  at::Tensor x = at::empty_like(y);
  at::Tensor iterations = at::empty({B}, y.options().dtype(at::kLong));
  at::Tensor residual = at::empty({B}, y.options());
  if (B == 0) {
    return {x, iterations, residual};
  }
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "mlp_fixed_point_cuda", [&] {
    MlpParams<scalar_t> p{};
    for (int64_t l = 0; l < L; ++l) {
      keep.push_back(weights[l].contiguous());
      p.W[l] = keep.back().data_ptr<scalar_t>();
      p.out[l] = static_cast<int>(weights[l].size(0));
      p.in[l] = static_cast<int>(weights[l].size(1));
      if (!biases.empty()) {
        keep.push_back(biases[l].contiguous());
        p.b[l] = keep.back().data_ptr<scalar_t>();
      } else {
        p.b[l] = nullptr;
      }
    }
    if (act == kActLipSwish) {
      keep.push_back(betas.contiguous());
      p.betas = keep.back().data_ptr<scalar_t>();
    } else {
      p.betas = nullptr;
    }
    p.layers = static_cast<int>(L);
    p.act = static_cast<int>(act);
    p.preact = preact;
    mlp_fixed_point_kernel<scalar_t>
        <<<static_cast<unsigned>(B), kThreads, smem, at::cuda::getCurrentCUDAStream()>>>(
            p, y.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), iterations.data_ptr<int64_t>(),
            residual.data_ptr<scalar_t>(), static_cast<int>(D), static_cast<int>(max_width),
            static_cast<scalar_t>(tol), max_iter);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {x, iterations, residual};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastflow, CUDA, m) {
  m.impl("mlp_trace", &mlp_trace_cuda);
  m.impl("mlp_trace.tensor_coeffs", &mlp_trace_tensor_coeffs_cuda);
  m.impl("mlp_trace_backward", &mlp_trace_backward_cuda);
  m.impl("mlp_fixed_point", &mlp_fixed_point_cuda);
}

}  // namespace fastflow
