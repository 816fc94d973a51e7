// CPU kernels of fastflow::affine_coupling and fastflow::affine_coupling_backward.
//
// One pass over each sample's dense block: the scale activation, the affine map and the
// per-sample log-det sum are fused so the data is read once. The loops use at::vec::Vectorized,
// which is AVX2 code when setup.py builds with FASTFLOW_CPU_ISA=avx2 (the default on AVX2
// machines) and portable scalar code otherwise; exp, tanh and log1p come from vec_math.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include "fastflow/affine_coupling.h"
#include "fastflow/vec_math.h"

namespace fastflow {
namespace {

template <typename T>
using Vec = at::vec::Vectorized<T>;
using vecmath::reduce_sum;

template <typename T>
inline Vec<T> load(const T* p, int64_t n) {
  return n == Vec<T>::size() ? Vec<T>::loadu(p) : Vec<T>::loadu(p, n);
}

template <typename T>
inline void store(const Vec<T>& v, T* p, int64_t n) {
  if (n == Vec<T>::size()) {
    v.store(p);
  } else {
    v.store(p, n);
  }
}

// Scale of the exp activation, s = clamp * tanh(h / clamp), and ds/dh = 1 - tanh^2.
template <typename T, bool Clamped>
struct ExpScale {
  Vec<T> s, dsdh;
  inline ExpScale(const Vec<T>& h, T clamp, T inv_clamp) {
    if constexpr (Clamped) {
      const Vec<T> th = vecmath::tanh(h * Vec<T>(inv_clamp));
      s = th * Vec<T>(clamp);
      dsdh = Vec<T>(T(1)) - th * th;
    } else {
      s = h;
      dsdh = Vec<T>(T(1));
    }
  }
};

// Glow's scale s = sigmoid(h + 2) with 1 - s and log s, all without cancellation or overflow.
template <typename T>
struct SigmoidScale {
  Vec<T> s, one_minus_s, log_s;
  inline explicit SigmoidScale(const Vec<T>& h) {
    const Vec<T> a = h + Vec<T>(T(2));
    const Vec<T> e = vecmath::exp(a.abs().neg());  // exp(-|a|) in (0, 1]
    const Vec<T> inv = Vec<T>(T(1)) / (Vec<T>(T(1)) + e);
    const Vec<T> e_inv = e * inv;
    const auto positive = a >= Vec<T>(T(0));
    s = Vec<T>::blendv(e_inv, inv, positive);
    one_minus_s = Vec<T>::blendv(inv, e_inv, positive);
    log_s = at::vec::minimum(a, Vec<T>(T(0))) - vecmath::log1p_unit(e);
  }
};

inline int64_t grain_for(int64_t per_sample) {
  // Enough elements per task that thread start-up does not dominate.
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(per_sample, 1));
}

// `scale` (may be null) receives what the backward needs: s for exp, sigmoid(h + 2) for sigmoid.
template <typename T, CouplingActivation A, bool Inverse, bool Clamped>
void forward_kernel(const T* x, int64_t sx, const T* h, int64_t sh, const T* t, int64_t st, T* out,
                    T* logdet, T* scale, int64_t B, int64_t N, T clamp) {
  const T inv_clamp = T(1) / clamp;
  constexpr int64_t W = Vec<T>::size();
  at::parallel_for(0, B, grain_for(N), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t off = b * N;  // outputs are fresh, dense tensors
      const T* xb = x + b * sx;
      const T* hb = h == nullptr ? nullptr : h + b * sh;
      const T* tb = t + b * st;
      Vec<T> acc(T(0));
      for (int64_t j = 0; j < N; j += W) {
        const int64_t n = std::min<int64_t>(W, N - j);
        const Vec<T> xv = load(xb + j, n);
        const Vec<T> tv = load(tb + j, n);
        Vec<T> yv;
        if constexpr (A == CouplingActivation::Additive) {
          yv = Inverse ? xv - tv : xv + tv;
        } else if constexpr (A == CouplingActivation::Exp) {
          const ExpScale<T, Clamped> sc(load(hb + j, n), clamp, inv_clamp);
          if (scale != nullptr) {
            store(sc.s, scale + off + j, n);
          }
          if constexpr (Inverse) {
            yv = (xv - tv) * vecmath::exp(sc.s.neg());
            acc = acc - Vec<T>::set(Vec<T>(T(0)), sc.s, n);
          } else {
            yv = at::vec::fmadd(xv, vecmath::exp(sc.s), tv);
            acc = acc + Vec<T>::set(Vec<T>(T(0)), sc.s, n);
          }
        } else {
          const SigmoidScale<T> sc(load(hb + j, n));
          if (scale != nullptr) {
            store(sc.s, scale + off + j, n);
          }
          if constexpr (Inverse) {
            yv = xv / sc.s - tv;
            acc = acc - Vec<T>::set(Vec<T>(T(0)), sc.log_s, n);
          } else {
            yv = (xv + tv) * sc.s;
            acc = acc + Vec<T>::set(Vec<T>(T(0)), sc.log_s, n);
          }
        }
        store(yv, out + off + j, n);
      }
      logdet[b] = reduce_sum(acc);
    }
  });
}

// Backward from the scale the forward saved (no activation is recomputed). Formulas: REFERENCE.md
// 4.1; the shift's gradient is g, the input's gradient or their negation, so the Python side
// forms it without a kernel.
template <typename T, CouplingActivation A, bool Inverse, bool Clamped>
void backward_kernel(const T* g, int64_t sg, const T* gl, const T* u, int64_t su, const T* scale,
                     const T* t, int64_t st, T* du, T* dh, int64_t B, int64_t N, T clamp) {
  const T inv_clamp = T(1) / clamp;
  constexpr int64_t W = Vec<T>::size();
  at::parallel_for(0, B, grain_for(N), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t off = b * N;  // the saved scale and the outputs are dense
      const T* gb = g + b * sg;
      const T* ub = u + b * su;
      const T* tb = t + b * st;
      const Vec<T> glv(gl[b]);
      for (int64_t j = 0; j < N; j += W) {
        const int64_t n = std::min<int64_t>(W, N - j);
        const Vec<T> gv = load(gb + j, n);
        if constexpr (A == CouplingActivation::Additive) {
          store(gv, du + off + j, n);
        } else {
          const Vec<T> uv = load(ub + j, n);
          const Vec<T> sv = load(scale + off + j, n);
          if constexpr (A == CouplingActivation::Exp) {
            // ds/dh = 1 - tanh^2(h / clamp) = 1 - (s / clamp)^2
            Vec<T> dsdh(T(1));
            if constexpr (Clamped) {
              const Vec<T> th = sv * Vec<T>(inv_clamp);
              dsdh = dsdh - th * th;
            }
            if constexpr (Inverse) {
              // x = (y - t) e^{-s}: dy = g e^{-s}, dh = -(g x + gl) ds/dh
              const Vec<T> ei = vecmath::exp(sv.neg());
              const Vec<T> xo = (uv - load(tb + j, n)) * ei;
              store(gv * ei, du + off + j, n);
              store((at::vec::fmadd(gv, xo, glv) * dsdh).neg(), dh + off + j, n);
            } else {
              // y = x e^s + t: dx = g e^s, dh = (g x e^s + gl) ds/dh
              const Vec<T> duv = gv * vecmath::exp(sv);
              store(duv, du + off + j, n);
              store(at::vec::fmadd(duv, uv, glv) * dsdh, dh + off + j, n);
            }
          } else {
            const Vec<T> one_minus_s = Vec<T>(T(1)) - sv;
            if constexpr (Inverse) {
              // x = y / s - t: dy = g / s, dh = -(1 - s)(g y / s + gl)
              const Vec<T> duv = gv / sv;
              store(duv, du + off + j, n);
              store((at::vec::fmadd(duv, uv, glv) * one_minus_s).neg(), dh + off + j, n);
            } else {
              // y = (x + t) s: dx = g s, dh = (g (x + t) s + gl)(1 - s)
              const Vec<T> duv = gv * sv;
              const Vec<T> xt = uv + load(tb + j, n);
              store(duv, du + off + j, n);
              store(at::vec::fmadd(duv, xt, glv) * one_minus_s, dh + off + j, n);
            }
          }
        }
      }
    }
  });
}

// Calls f(activation, inverse, clamped) with the run-time choices turned into compile-time
// constants (std::integral_constant), so the inner loops carry no per-element branches.
template <typename F>
void dispatch_variant(CouplingActivation act, bool inverse, bool clamped, F&& f) {
  auto with_act = [&](auto a) {
    auto with_inv = [&](auto i) {
      if (clamped) {
        f(a, i, std::true_type{});
      } else {
        f(a, i, std::false_type{});
      }
    };
    if (inverse) {
      with_inv(std::true_type{});
    } else {
      with_inv(std::false_type{});
    }
  };
  using CA = CouplingActivation;
  switch (act) {
    case CA::Additive:
      with_act(std::integral_constant<CA, CA::Additive>{});
      break;
    case CA::Exp:
      with_act(std::integral_constant<CA, CA::Exp>{});
      break;
    case CA::Sigmoid:
      with_act(std::integral_constant<CA, CA::Sigmoid>{});
      break;
  }
}

void check_cpu_dtype(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "fastflow: the CPU kernel of affine_coupling supports float32 and float64; x is ",
              x.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> affine_coupling_cpu(
    const at::Tensor& x, const c10::optional<at::Tensor>& log_scale, const at::Tensor& shift,
    int64_t activation, double clamp, bool inverse, bool save_scale) {
  const auto act = check_affine_coupling_args(x, log_scale, shift, activation, clamp);
  TORCH_CHECK(x.device().is_cpu(), "fastflow: x must be a CPU tensor for the CPU kernel");
  check_cpu_dtype(x);
  const auto fmt = per_sample_format(x);
  // Inputs are read in place when each sample is one dense block, e.g. the halves of a
  // conditioner's output (out[:, :D], out[:, D:]); anything else is copied once.
  const at::Tensor xc = dense_samples(x, fmt);
  const at::Tensor tc = dense_samples(shift, fmt);
  const bool has_scale = act != CouplingActivation::Additive;
  const at::Tensor hc = has_scale ? dense_samples(*log_scale, fmt) : at::Tensor();
  at::Tensor out = at::empty_like(xc, fmt);
  at::Tensor logdet = at::empty({x.size(0)}, x.options());
  at::Tensor scale = (save_scale && has_scale) ? at::empty_like(xc, fmt) : at::empty({0}, x.options());
  const int64_t B = x.size(0);
  const int64_t N = x.numel() / B;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "affine_coupling_cpu", [&] {
    dispatch_variant(act, inverse, std::isfinite(clamp), [&](auto a, auto i, auto c) {
      forward_kernel<scalar_t, decltype(a)::value, decltype(i)::value, decltype(c)::value>(
          xc.const_data_ptr<scalar_t>(), sample_stride(xc),
          has_scale ? hc.const_data_ptr<scalar_t>() : nullptr, has_scale ? sample_stride(hc) : 0,
          tc.const_data_ptr<scalar_t>(), sample_stride(tc), out.mutable_data_ptr<scalar_t>(),
          logdet.mutable_data_ptr<scalar_t>(),
          scale.numel() > 0 ? scale.mutable_data_ptr<scalar_t>() : nullptr, B, N,
          static_cast<scalar_t>(clamp));
    });
  });
  return {out, logdet, scale};
}

std::tuple<at::Tensor, at::Tensor> affine_coupling_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& grad_logdet, const at::Tensor& input,
    const at::Tensor& scale, const at::Tensor& shift, int64_t activation, double clamp,
    bool inverse) {
  const auto act = check_affine_coupling_backward_args(grad_out, grad_logdet, input, scale, shift,
                                                       activation, clamp);
  TORCH_CHECK(input.device().is_cpu(), "fastflow: input must be a CPU tensor for the CPU kernel");
  check_cpu_dtype(input);
  const auto fmt = per_sample_format(input);
  const at::Tensor gc = dense_samples(grad_out, fmt);
  const at::Tensor glc = grad_logdet.contiguous();
  const at::Tensor uc = dense_samples(input, fmt);
  const at::Tensor tc = dense_samples(shift, fmt);
  const bool has_scale = act != CouplingActivation::Additive;
  const at::Tensor sc = has_scale ? scale.contiguous(fmt) : at::Tensor();
  at::Tensor du = at::empty_like(uc, fmt);
  at::Tensor dh = has_scale ? at::empty_like(uc, fmt) : at::empty({0}, input.options());
  const int64_t B = input.size(0);
  const int64_t N = input.numel() / B;
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "affine_coupling_backward_cpu", [&] {
    dispatch_variant(act, inverse, std::isfinite(clamp), [&](auto a, auto i, auto c) {
      backward_kernel<scalar_t, decltype(a)::value, decltype(i)::value, decltype(c)::value>(
          gc.const_data_ptr<scalar_t>(), sample_stride(gc), glc.const_data_ptr<scalar_t>(),
          uc.const_data_ptr<scalar_t>(), sample_stride(uc),
          has_scale ? sc.const_data_ptr<scalar_t>() : nullptr, tc.const_data_ptr<scalar_t>(),
          sample_stride(tc), du.mutable_data_ptr<scalar_t>(),
          has_scale ? dh.mutable_data_ptr<scalar_t>() : nullptr, B, N,
          static_cast<scalar_t>(clamp));
    });
  });
  return {du, dh};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastflow, CPU, m) {
  m.impl("affine_coupling", &affine_coupling_cpu);
  m.impl("affine_coupling_backward", &affine_coupling_backward_cpu);
}

}  // namespace fastflow
