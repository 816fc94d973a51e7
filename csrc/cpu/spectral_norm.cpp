// CPU kernels of fastflow::spectral_norm_power, spectral_norm_apply and
// spectral_norm_apply_backward (math: csrc/include/fastflow/spectral_norm.h, REFERENCE.md 4.3).
//
// The power iteration is one pass over W per round instead of two GEMVs: with t = W^T u and
// v = t / |t|, the row loop forms a_i = W_i . v and, while the row W_i is still in L1, adds
// a_i W_i to the next round's W^T a; then u = a / |a| and W^T u = (W^T a) / |a|. n rounds read
// W n + 1 times (2n for GEMV pairs), with no per-operation dispatch in between. The apply reads
// W twice (sigma, then the scaled copy) and the backward reads W and G once for sigma and
// <G, W> and writes the gradient in a second pass. Rows are split into a fixed number of chunks
// per call (from the thread count), each with its own partial sums, so the result does not
// depend on scheduling.
// Loops are at::vec::Vectorized (AVX2 when built with it); float32 and float64.
// This file also registers the Autograd kernels of the family, for every device (see below).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "fastflow/spectral_norm.h"
#include "fastflow/vec_math.h"

namespace fastflow {
namespace {

template <typename T>
using Vec = at::vec::Vectorized<T>;
using vecmath::reduce_sum;

// sum_j a[j] b[j], four independent vector accumulators.
template <typename T>
inline T dot(const T* a, const T* b, int64_t n) {
  constexpr int64_t W = Vec<T>::size();
  Vec<T> acc0(T(0)), acc1(T(0)), acc2(T(0)), acc3(T(0));
  int64_t j = 0;
  for (; j + 4 * W <= n; j += 4 * W) {
    acc0 = at::vec::fmadd(Vec<T>::loadu(a + j), Vec<T>::loadu(b + j), acc0);
    acc1 = at::vec::fmadd(Vec<T>::loadu(a + j + W), Vec<T>::loadu(b + j + W), acc1);
    acc2 = at::vec::fmadd(Vec<T>::loadu(a + j + 2 * W), Vec<T>::loadu(b + j + 2 * W), acc2);
    acc3 = at::vec::fmadd(Vec<T>::loadu(a + j + 3 * W), Vec<T>::loadu(b + j + 3 * W), acc3);
  }
  for (; j + W <= n; j += W) {
    acc0 = at::vec::fmadd(Vec<T>::loadu(a + j), Vec<T>::loadu(b + j), acc0);
  }
  T total = reduce_sum((acc0 + acc1) + (acc2 + acc3));
  for (; j < n; ++j) {
    total += a[j] * b[j];
  }
  return total;
}

// y += alpha x
template <typename T>
inline void axpy(T alpha, const T* x, T* y, int64_t n) {
  constexpr int64_t W = Vec<T>::size();
  const Vec<T> av(alpha);
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    at::vec::fmadd(av, Vec<T>::loadu(x + j), Vec<T>::loadu(y + j)).store(y + j);
  }
  for (; j < n; ++j) {
    y[j] += alpha * x[j];
  }
}

// y = a x + b z  (z may be null: y = a x)
template <typename T>
inline void scale_add(T a, const T* x, T b, const T* z, T* y, int64_t n) {
  constexpr int64_t W = Vec<T>::size();
  const Vec<T> av(a), bv(b);
  int64_t j = 0;
  if (z == nullptr) {
    for (; j + W <= n; j += W) {
      (av * Vec<T>::loadu(x + j)).store(y + j);
    }
    for (; j < n; ++j) {
      y[j] = a * x[j];
    }
    return;
  }
  for (; j + W <= n; j += W) {
    at::vec::fmadd(av, Vec<T>::loadu(x + j), bv * Vec<T>::loadu(z + j)).store(y + j);
  }
  for (; j < n; ++j) {
    y[j] = a * x[j] + b * z[j];
  }
}

// x / max(|x|, eps) in place; returns |x|.
template <typename T>
inline T normalize(T* x, int64_t n, T eps) {
  const T norm = std::sqrt(dot(x, x, n));
  const T d = std::max(norm, eps);
  constexpr int64_t W = Vec<T>::size();
  const Vec<T> dv(d);
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    (Vec<T>::loadu(x + j) / dv).store(x + j);
  }
  for (; j < n; ++j) {
    x[j] /= d;
  }
  return norm;
}

// Row chunks of one call: at most one per thread, and enough work per chunk (about 32k
// multiply-adds) that waking a thread pays.
inline int64_t row_chunks(int64_t m, int64_t n) {
  const int64_t by_work = std::max<int64_t>(1, (m * n) / 32768);
  return std::max<int64_t>(1, std::min<int64_t>({at::get_num_threads(), by_work, m}));
}

template <typename F>
inline void for_row_chunks(int64_t m, int64_t chunks, const F& f) {
  if (chunks == 1) {
    f(0, 0, m);
    return;
  }
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      f(c, c * m / chunks, (c + 1) * m / chunks);
    }
  });
}

// dst = sum over chunks of part[c * n : (c + 1) * n], times `scale`.
template <typename T>
inline void sum_chunks(const T* part, int64_t chunks, int64_t n, T scale, T* dst) {
  scale_add(scale, part, T(0), static_cast<const T*>(nullptr), dst, n);
  for (int64_t c = 1; c < chunks; ++c) {
    axpy(scale, part + c * n, dst, n);
  }
}

// u [m], v [n]: in/out. W row-major [m, n].
template <typename T>
void power_kernel(const T* w, int64_t m, int64_t n, T* u, T* v, int64_t n_iter, T eps) {
  if (n_iter == 0) {
    return;
  }
  const int64_t chunks = row_chunks(m, n);
  std::vector<T> part(static_cast<size_t>(chunks * n));
  // t = W^T u, kept in v until it is normalised.
  for_row_chunks(m, chunks, [&](int64_t c, int64_t r0, int64_t r1) {
    T* acc = part.data() + c * n;
    std::fill(acc, acc + n, T(0));
    for (int64_t i = r0; i < r1; ++i) {
      axpy(u[i], w + i * n, acc, n);
    }
  });
  sum_chunks(part.data(), chunks, n, T(1), v);
  for (int64_t it = 0; it < n_iter; ++it) {
    normalize(v, n, eps);
    const bool last = it + 1 == n_iter;
    for_row_chunks(m, chunks, [&](int64_t c, int64_t r0, int64_t r1) {
      T* acc = part.data() + c * n;
      if (!last) {
        std::fill(acc, acc + n, T(0));
      }
      for (int64_t i = r0; i < r1; ++i) {
        const T* row = w + i * n;
        const T a = dot(row, v, n);
        u[i] = a;
        if (!last) {
          axpy(a, row, acc, n);  // the row is still in L1
        }
      }
    });
    const T norm_a = normalize(u, m, eps);
    if (!last) {
      // W^T u = W^T a / max(|a|, eps), the next round's t
      sum_chunks(part.data(), chunks, n, T(1) / std::max(norm_a, eps), v);
    }
  }
}

// sigma = sum_i u_i (W_i . v) and, when g is given, <G, W>, in double across rows.
template <typename T>
std::pair<double, double> sigma_and_inner(const T* w, const T* g, const T* u, const T* v,
                                          int64_t m, int64_t n) {
  const int64_t chunks = row_chunks(m, n);
  std::vector<double> sig(static_cast<size_t>(chunks), 0.0), inner(static_cast<size_t>(chunks), 0.0);
  for_row_chunks(m, chunks, [&](int64_t c, int64_t r0, int64_t r1) {
    double s = 0.0, gi = 0.0;
    for (int64_t i = r0; i < r1; ++i) {
      const T* row = w + i * n;
      s += static_cast<double>(u[i]) * static_cast<double>(dot(row, v, n));
      if (g != nullptr) {
        gi += static_cast<double>(dot(g + i * n, row, n));
      }
    }
    sig[c] = s;
    inner[c] = gi;
  });
  double s = 0.0, gi = 0.0;
  for (int64_t c = 0; c < chunks; ++c) {
    s += sig[c];
    gi += inner[c];
  }
  return {s, gi};
}

void check_cpu(const at::Tensor& weight, const char* op) {
  TORCH_CHECK(weight.device().is_cpu(), "fastflow: weight must be a CPU tensor for the CPU kernel of ",
              op);
  TORCH_CHECK(weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kDouble,
              "fastflow: the CPU kernel of ", op, " supports float32 and float64; weight is ",
              weight.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> spectral_norm_power_cpu(const at::Tensor& weight,
                                                           const at::Tensor& u,
                                                           const at::Tensor& v, int64_t n_iter,
                                                           double eps) {
  check_spectral_norm_power_args(weight, u, v, n_iter, eps);
  check_cpu(weight, "spectral_norm_power");
  const at::Tensor w = weight.contiguous();
  at::Tensor un = u.clone(at::MemoryFormat::Contiguous);
  at::Tensor vn = v.clone(at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "spectral_norm_power_cpu", [&] {
    power_kernel<scalar_t>(w.data_ptr<scalar_t>(), w.size(0), w.size(1),
                           un.data_ptr<scalar_t>(), vn.data_ptr<scalar_t>(), n_iter,
                           static_cast<scalar_t>(eps));
  });
  return {un, vn};
}

// 1 / max(1, sigma / c), computed as the reference does (in the weight's dtype).
template <typename T>
inline T apply_scale(T sigma, double coeff) {
  return T(1) / std::max(sigma / static_cast<T>(coeff), T(1));
}

std::tuple<at::Tensor, at::Tensor> spectral_norm_apply_cpu(const at::Tensor& weight,
                                                           const at::Tensor& u,
                                                           const at::Tensor& v, double coeff) {
  check_spectral_norm_args(weight, u, v);
  check_spectral_norm_coeff(coeff);
  check_cpu(weight, "spectral_norm_apply");
  const at::Tensor w = weight.contiguous(), uc = u.contiguous(), vc = v.contiguous();
  const int64_t m = w.size(0), n = w.size(1);
  at::Tensor w_hat = at::empty({m, n}, w.options());
  at::Tensor sigma = at::empty({}, w.options());
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "spectral_norm_apply_cpu", [&] {
    const scalar_t* wp = w.data_ptr<scalar_t>();
    const scalar_t sig = static_cast<scalar_t>(
        sigma_and_inner<scalar_t>(wp, nullptr, uc.data_ptr<scalar_t>(), vc.data_ptr<scalar_t>(),
                                  m, n)
            .first);
    const scalar_t s = apply_scale(sig, coeff);
    scalar_t* out = w_hat.data_ptr<scalar_t>();
    for_row_chunks(m, row_chunks(m, n), [&](int64_t, int64_t r0, int64_t r1) {
      scale_add(s, wp + r0 * n, scalar_t(0), static_cast<const scalar_t*>(nullptr),
                out + r0 * n, (r1 - r0) * n);
    });
    *sigma.data_ptr<scalar_t>() = sig;
  });
  return {w_hat, sigma};
}

at::Tensor spectral_norm_apply_backward_cpu(const at::Tensor& grad_w_hat,
                                            const at::Tensor& grad_sigma,
                                            const at::Tensor& weight, const at::Tensor& u,
                                            const at::Tensor& v, double coeff) {
  check_spectral_norm_backward_args(grad_w_hat, grad_sigma, weight, u, v, coeff);
  check_cpu(weight, "spectral_norm_apply_backward");
  const at::Tensor w = weight.contiguous(), g = grad_w_hat.contiguous();
  const at::Tensor uc = u.contiguous(), vc = v.contiguous();
  const int64_t m = w.size(0), n = w.size(1);
  at::Tensor grad = at::empty({m, n}, w.options());
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "spectral_norm_apply_backward_cpu", [&] {
    const scalar_t* wp = w.data_ptr<scalar_t>();
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const scalar_t* up = uc.data_ptr<scalar_t>();
    const scalar_t* vp = vc.data_ptr<scalar_t>();
    const auto [sig_d, inner] = sigma_and_inner<scalar_t>(wp, gp, up, vp, m, n);
    const scalar_t sig = static_cast<scalar_t>(sig_d);
    const scalar_t s = apply_scale(sig, coeff);
    // rank-one coefficient k = grad_sigma - [sigma > c] c <G, W> / sigma^2 (REFERENCE.md 4.3)
    double k = static_cast<double>(grad_sigma.item<scalar_t>());
    if (sig > static_cast<scalar_t>(coeff)) {
      k -= coeff * inner / (sig_d * sig_d);
    }
    scalar_t* out = grad.data_ptr<scalar_t>();
    for_row_chunks(m, row_chunks(m, n), [&](int64_t, int64_t r0, int64_t r1) {
      for (int64_t i = r0; i < r1; ++i) {
        scale_add(s, gp + i * n, static_cast<scalar_t>(k * static_cast<double>(up[i])), vp,
                  out + i * n, n);
      }
    });
  });
  return grad;
}

// ---------------------------------------------------------------------------------------------
// Autograd kernels, for every device (this file is in every build). In C++ rather than through
// torch.library.register_autograd: a Python autograd kernel costs tens of microseconds per call
// and per backward, more than the whole operator on a 128 x 128 weight (measured: the native
// apply's forward+backward through a Python autograd kernel was no faster than the reference).

template <typename Sig>
c10::TypedOperatorHandle<Sig> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// spectral_norm_power has no gradient (u, v are state): step below autograd; the outputs never
// require grad, whatever the weight.
std::tuple<at::Tensor, at::Tensor> spectral_norm_power_autograd(const at::Tensor& weight,
                                                                const at::Tensor& u,
                                                                const at::Tensor& v,
                                                                int64_t n_iter, double eps) {
  static const auto op =
      find_op<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                 const at::Tensor&, int64_t, double)>(
          "fastflow::spectral_norm_power");
  const at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(weight, u, v, n_iter, eps);
}

// spectral_norm_apply: gradient w.r.t. weight only (u, v constants). The backward is the
// spectral_norm_apply_backward operator; under create_graph it is the same formula in
// differentiable ATen operations (fastflow/spectral_norm.h), which gives double backward.
class SpectralNormApply : public torch::autograd::Function<SpectralNormApply> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx,
                                                const at::Tensor& weight, const at::Tensor& u,
                                                const at::Tensor& v, double coeff) {
    static const auto op =
        find_op<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                   const at::Tensor&, double)>(
            "fastflow::spectral_norm_apply");
    at::Tensor w_hat, sigma;
    {
      const at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(w_hat, sigma) = op.call(weight, u, v, coeff);
    }
    ctx->save_for_backward({weight, u, v});
    ctx->saved_data["coeff"] = coeff;
    return {w_hat, sigma};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    static const auto backward_op =
        find_op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&, double)>(
            "fastflow::spectral_norm_apply_backward");
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& weight = saved[0];
    const double coeff = ctx->saved_data["coeff"].toDouble();
    at::Tensor grad_w_hat = grads[0], grad_sigma = grads[1];
    if (!grad_w_hat.defined()) {
      grad_w_hat = at::zeros_like(weight);
    }
    if (!grad_sigma.defined()) {
      grad_sigma = at::zeros({}, weight.options().dtype(spectral_norm_opmath(weight.scalar_type())));
    }
    at::Tensor grad;
    if (at::GradMode::is_enabled()) {
      grad = spectral_norm_apply_backward_impl(grad_w_hat, grad_sigma, weight, saved[1], saved[2],
                                               coeff);
    } else {
      grad = backward_op.call(grad_w_hat, grad_sigma, weight, saved[1], saved[2], coeff);
    }
    return {grad, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> spectral_norm_apply_autograd(const at::Tensor& weight,
                                                                const at::Tensor& u,
                                                                const at::Tensor& v,
                                                                double coeff) {
  auto out = SpectralNormApply::apply(weight, u, v, coeff);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastflow, Autograd, m) {
  m.impl("spectral_norm_power", &spectral_norm_power_autograd);
  m.impl("spectral_norm_apply", &spectral_norm_apply_autograd);
}

TORCH_LIBRARY_IMPL(fastflow, CPU, m) {
  m.impl("spectral_norm_power", &spectral_norm_power_cpu);
  m.impl("spectral_norm_apply", &spectral_norm_apply_cpu);
  m.impl("spectral_norm_apply_backward", &spectral_norm_apply_backward_cpu);
}

}  // namespace fastflow
