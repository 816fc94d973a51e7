// CUDA kernels of fastflow::affine_coupling and fastflow::affine_coupling_backward.
// The CPU kernel (csrc/cpu/affine_coupling.cpp) is the model: same checks, same formulas.
//
// Launch design. The op is elementwise plus one sum per sample, so it is bound by memory
// bandwidth and the only question is how to map samples to threads so that every shape keeps
// enough loads in flight without paying much for the per-sample reduction. Each sample is one
// dense block of N elements (contiguous or channels-last), read as 16-byte vectors where every
// pointer is aligned and N is a multiple of the vector width, else element by element.
//  - rows (small samples, tabular data such as [4096, 64]): a segment of a warp, the
//    smallest power of two >= the sample's vector count (at most 32 lanes), owns a sample and
//    reduces it with shuffles; used up to one vector per lane, or up to 8 when there are
//    samples enough to fill the card (see make_plan). [4096, 64] float is 16 float4 per sample: 16 lanes, one load
//    per tensor each, 2 samples per warp, every lane busy, no atomics and no zero-fill. A
//    block per sample would leave most of its 256 threads idle and add a block reduction per
//    64 elements.
//  - chunks (larger samples, images such as [64, 6, 64, 64]): one block of kThreads per
//    (sample, chunk), a block reduction and one atomicAdd per block into the zero-filled
//    per-sample sum. The chunk is shrunk until there are about kBlocksPerSm blocks per SM, so
//    few large samples still spread over the whole card: [64, 6, 64, 64] float is 6144 float4
//    per sample, cut into 24 chunks of 256 -> 1536 blocks on a 132-SM H200, 4 KiB per block
//    per tensor. With one chunk per sample the block stores its sum directly (no zero-fill).
//    Under torch.use_deterministic_algorithms the blocks write partial sums that at::sum_out
//    adds in a fixed order, since float atomics make the sum order (and low bits) vary.
// Each block only ever adds into its own sample's sum, so a NaN or inf stays in its sample.
// Arithmetic is in at::opmath_type (float for half/bf16, whose log-det is float32). expf,
// tanhf and log1pf, not the __expf intrinsics: __expf's error grows with |x| and the exp
// activation is evaluated at |s| up to clamp (or unbounded when clamp is inf).
// No host synchronisation: every launch goes on the current stream.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include "fastflow/affine_coupling.h"

namespace fastflow {
namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;
// A warp segment walks at most this many vectors per sample (8 per lane at 32 lanes) before a
// block per chunk does better.
constexpr int64_t kRowsMaxVecs = 32 * 8;
// Four vectors per thread per chunk amortise the block reduction and the atomic; the chunk is
// halved (down to one vector per thread) while there are fewer than kBlocksPerSm blocks per SM.
constexpr int64_t kChunkVecs = kThreads * 4;
constexpr int64_t kBlocksPerSm = 8;
constexpr int kVectorBytes = 16;

__device__ __forceinline__ float d_exp(float x) { return expf(x); }
__device__ __forceinline__ double d_exp(double x) { return exp(x); }
__device__ __forceinline__ float d_tanh(float x) { return tanhf(x); }
__device__ __forceinline__ double d_tanh(double x) { return tanh(x); }
__device__ __forceinline__ float d_log1p(float x) { return log1pf(x); }
__device__ __forceinline__ double d_log1p(double x) { return log1p(x); }

// VEC consecutive elements moved as one load/store instruction (16 bytes when VEC > 1).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load(const T* p, int64_t vec_index) {
  return reinterpret_cast<const Pack<T, VEC>*>(p)[vec_index];
}

template <typename T, int VEC>
__device__ __forceinline__ void store(T* p, int64_t vec_index, const Pack<T, VEC>& pack) {
  reinterpret_cast<Pack<T, VEC>*>(p)[vec_index] = pack;
}

// Glow's s = sigmoid(h + 2) with log s, from exp(-|a|) <= 1 so that neither overflows nor
// cancels: log s = min(a, 0) - log1p(exp(-|a|)). A NaN h gives e = NaN and so NaN in both.
template <typename acc_t>
struct SigmoidScale {
  acc_t s, log_s;
  __device__ __forceinline__ explicit SigmoidScale(acc_t h) {
    const acc_t a = h + acc_t(2);
    const acc_t e = d_exp(-fabs(a));
    const acc_t inv = acc_t(1) / (acc_t(1) + e);
    s = a >= acc_t(0) ? inv : e * inv;
    log_s = (a < acc_t(0) ? a : acc_t(0)) - d_log1p(e);
  }
};

// Forward of the exp (Real NVP) and sigmoid (Glow) activations on one vector; returns the
// vector's log-det terms. The additive activation has no kernel of its own (see below).
template <typename scalar_t, CouplingActivation A, bool Inverse, int VEC>
struct ForwardOp {
  using acc_t = at::opmath_type<scalar_t>;
  static constexpr bool kReduces = true;
  const scalar_t* x;
  const scalar_t* h;
  const scalar_t* t;
  scalar_t* out;
  scalar_t* scale;  // null unless save_scale
  acc_t clamp;
  acc_t inv_clamp;
  bool clamped;  // false when clamp is inf: s = h (clamp * tanh(h / clamp) would be inf * 0)

  __device__ __forceinline__ acc_t operator()(int64_t /*sample*/, int64_t v) const {
    const auto xp = load<scalar_t, VEC>(x, v);
    const auto hp = load<scalar_t, VEC>(h, v);
    const auto tp = load<scalar_t, VEC>(t, v);
    Pack<scalar_t, VEC> yp, sp;
    acc_t term = acc_t(0);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const acc_t xv = static_cast<acc_t>(xp.v[k]);
      const acc_t hv = static_cast<acc_t>(hp.v[k]);
      const acc_t tv = static_cast<acc_t>(tp.v[k]);
      acc_t y;
      if constexpr (A == CouplingActivation::Exp) {
        const acc_t s = clamped ? clamp * d_tanh(hv * inv_clamp) : hv;
        sp.v[k] = static_cast<scalar_t>(s);
        y = Inverse ? (xv - tv) * d_exp(-s) : xv * d_exp(s) + tv;
        term += Inverse ? -s : s;
      } else {
        const SigmoidScale<acc_t> sg(hv);
        sp.v[k] = static_cast<scalar_t>(sg.s);
        y = Inverse ? xv / sg.s - tv : (xv + tv) * sg.s;
        term += Inverse ? -sg.log_s : sg.log_s;
      }
      yp.v[k] = static_cast<scalar_t>(y);
    }
    store<scalar_t, VEC>(out, v, yp);
    if (scale != nullptr) {
      store<scalar_t, VEC>(scale, v, sp);
    }
    return term;
  }
};

// Backward from the scale the forward saved, so no tanh/sigmoid is recomputed (only exp(+-s)
// for the exp activation). Formulas as in the CPU kernel (REFERENCE.md 4.1). The shift is read
// only by the two variants whose formula needs it.
template <typename scalar_t, CouplingActivation A, bool Inverse, int VEC>
struct BackwardOp {
  using acc_t = at::opmath_type<scalar_t>;
  static constexpr bool kReduces = false;
  static constexpr bool kNeedsShift = (A == CouplingActivation::Exp) == Inverse;
  const scalar_t* g;
  const acc_t* gl;
  const scalar_t* u;  // x for the forward map, y for the inverse
  const scalar_t* scale;
  const scalar_t* t;
  scalar_t* du;
  scalar_t* dh;
  acc_t inv_clamp;  // 0 when clamp is inf, which makes ds/dh = 1

  __device__ __forceinline__ acc_t operator()(int64_t sample, int64_t v) const {
    const acc_t glv = gl[sample];
    const auto gp = load<scalar_t, VEC>(g, v);
    const auto up = load<scalar_t, VEC>(u, v);
    const auto sp = load<scalar_t, VEC>(scale, v);
    Pack<scalar_t, VEC> tp;
    if constexpr (kNeedsShift) {
      tp = load<scalar_t, VEC>(t, v);
    }
    Pack<scalar_t, VEC> dup, dhp;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const acc_t gv = static_cast<acc_t>(gp.v[k]);
      const acc_t uv = static_cast<acc_t>(up.v[k]);
      const acc_t s = static_cast<acc_t>(sp.v[k]);
      acc_t duv, dhv;
      if constexpr (A == CouplingActivation::Exp) {
        // ds/dh = 1 - tanh^2(h / clamp) = 1 - (s / clamp)^2
        const acc_t th = s * inv_clamp;
        const acc_t dsdh = acc_t(1) - th * th;
        if constexpr (Inverse) {
          // x = (y - t) e^{-s}: dy = g e^{-s}, dh = -(g x + gl) ds/dh
          const acc_t ei = d_exp(-s);
          const acc_t xo = (uv - static_cast<acc_t>(tp.v[k])) * ei;
          duv = gv * ei;
          dhv = -(gv * xo + glv) * dsdh;
        } else {
          // y = x e^s + t: dx = g e^s, dh = (g x e^s + gl) ds/dh
          duv = gv * d_exp(s);
          dhv = (duv * uv + glv) * dsdh;
        }
      } else {
        const acc_t one_minus_s = acc_t(1) - s;
        if constexpr (Inverse) {
          // x = y / s - t: dy = g / s, dh = -(g y / s + gl)(1 - s)
          duv = gv / s;
          dhv = -(duv * uv + glv) * one_minus_s;
        } else {
          // y = (x + t) s: dx = g s, dh = (g (x + t) s + gl)(1 - s)
          duv = gv * s;
          dhv = (duv * (uv + static_cast<acc_t>(tp.v[k])) + glv) * one_minus_s;
        }
      }
      dup.v[k] = static_cast<scalar_t>(duv);
      dhp.v[k] = static_cast<scalar_t>(dhv);
    }
    store<scalar_t, VEC>(du, v, dup);
    store<scalar_t, VEC>(dh, v, dhp);
    return acc_t(0);
  }
};

// Rows layout: a segment of 2^seg_log2 lanes (inside one warp) per sample.
template <typename Op>
__global__ void __launch_bounds__(kThreads)
    rows_kernel(Op op, typename Op::acc_t* logdet, int64_t B, int64_t vecs, int seg_log2) {
  using acc_t = typename Op::acc_t;
  const int seg = 1 << seg_log2;
  const int64_t sample = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) >> seg_log2;
  const int lane = threadIdx.x & (seg - 1);
  acc_t sum = acc_t(0);
  if (sample < B) {
    const int64_t base = sample * vecs;
    for (int64_t j = lane; j < vecs; j += seg) {
      sum += op(sample, base + j);
    }
  }
  if constexpr (Op::kReduces) {
    // Every lane of the warp reaches the shuffles (no early return above). Lane 0 of a segment
    // only ever receives values from lanes of its own segment.
    for (int offset = seg >> 1; offset > 0; offset >>= 1) {
      sum += __shfl_down_sync(0xffffffffu, sum, offset);
    }
    if (lane == 0 && sample < B) {
      logdet[sample] = sum;
    }
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t block_sum(acc_t v) {
  __shared__ acc_t partial[kThreads / kWarp];
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) {
    v += __shfl_down_sync(0xffffffffu, v, offset);
  }
  if (threadIdx.x % kWarp == 0) {
    partial[threadIdx.x / kWarp] = v;
  }
  __syncthreads();
  v = threadIdx.x < kThreads / kWarp ? partial[threadIdx.x] : acc_t(0);
  if (threadIdx.x < kWarp) {
#pragma unroll
    for (int offset = kWarp / 2; offset > 0; offset >>= 1) {
      v += __shfl_down_sync(0xffffffffu, v, offset);
    }
  }
  return v;  // valid in thread 0
}

// Chunks layout: block blockIdx.x = sample * chunks + chunk. `partials` (one slot per block)
// is non-null only in deterministic mode.
template <typename Op>
__global__ void __launch_bounds__(kThreads)
    chunks_kernel(Op op, typename Op::acc_t* logdet, typename Op::acc_t* partials, int64_t vecs,
                  int64_t chunks, int64_t chunk_vecs) {
  using acc_t = typename Op::acc_t;
  const int64_t sample = blockIdx.x / chunks;
  const int64_t begin = (blockIdx.x % chunks) * chunk_vecs;
  const int64_t end = begin + chunk_vecs < vecs ? begin + chunk_vecs : vecs;
  const int64_t base = sample * vecs;
  acc_t sum = acc_t(0);
#pragma unroll 4
  for (int64_t j = begin + threadIdx.x; j < end; j += kThreads) {
    sum += op(sample, base + j);
  }
  if constexpr (Op::kReduces) {
    sum = block_sum(sum);
    if (threadIdx.x == 0) {
      if (chunks == 1) {
        logdet[sample] = sum;
      } else if (partials != nullptr) {
        partials[blockIdx.x] = sum;
      } else {
        atomicAdd(logdet + sample, sum);
      }
    }
  }
}

// How a [B, N] problem is cut; `vecs` counts VEC-wide vectors per sample.
struct Plan {
  bool rows;
  int seg_log2 = 0;
  int64_t blocks = 0;
  int64_t chunks = 1;
  int64_t chunk_vecs = 0;
};

Plan make_plan(int64_t B, int64_t vecs) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  Plan p;
  while ((int64_t{1} << p.seg_log2) < vecs && p.seg_log2 < 5) {
    ++p.seg_log2;
  }
  p.blocks = ((B << p.seg_log2) + kThreads - 1) / kThreads;
  // Past one vector per lane, rows only pays when there are samples enough to fill the card:
  // [512, 1024] float would be 512 warps on 132 SMs, where a block per sample gives each
  // thread one vector and keeps 4x more loads in flight.
  p.rows = vecs <= kWarp || (vecs <= kRowsMaxVecs && p.blocks >= kBlocksPerSm * sms / 2);
  if (p.rows) {
    return p;
  }
  p.chunk_vecs = kChunkVecs;
  auto chunks_for = [&](int64_t cv) { return (vecs + cv - 1) / cv; };
  while (p.chunk_vecs > kThreads && B * chunks_for(p.chunk_vecs) < kBlocksPerSm * sms) {
    p.chunk_vecs /= 2;
  }
  p.chunks = chunks_for(p.chunk_vecs);
  p.blocks = B * p.chunks;
  TORCH_CHECK(p.blocks <= std::numeric_limits<int32_t>::max(),
              "fastflow: affine_coupling: too many samples for one launch (", B, ")");
  return p;
}

// True when every pointer is 16-byte aligned and a sample is a whole number of vectors, so
// that the VEC-wide loads never straddle two samples or run past a tensor's end.
template <typename scalar_t>
bool can_vectorize(int64_t N, std::initializer_list<const void*> ptrs) {
  constexpr int vec = kVectorBytes / sizeof(scalar_t);
  if (N % vec != 0) {
    return false;
  }
  for (const void* p : ptrs) {
    if (p != nullptr && reinterpret_cast<std::uintptr_t>(p) % kVectorBytes != 0) {
      return false;
    }
  }
  return true;
}

// Launches `op` over B samples of `vecs` vectors each, writing per-sample sums into `logdet`
// (which must be zero-filled when the plan has several chunks and atomics are used).
template <typename Op>
void launch(const Op& op, const Plan& p, typename Op::acc_t* logdet,
            typename Op::acc_t* partials, int64_t B, int64_t vecs) {
  auto stream = at::cuda::getCurrentCUDAStream();
  if (p.rows) {
    rows_kernel<Op><<<p.blocks, kThreads, 0, stream>>>(op, logdet, B, vecs, p.seg_log2);
  } else {
    chunks_kernel<Op><<<p.blocks, kThreads, 0, stream>>>(op, logdet, partials, vecs, p.chunks,
                                                         p.chunk_vecs);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Runs f(activation, inverse) with both as compile-time constants, so the kernels carry no
// per-element branches on them. Additive never reaches here.
template <typename F>
void dispatch_variant(CouplingActivation act, bool inverse, F&& f) {
  using CA = CouplingActivation;
  auto with_inv = [&](auto a) {
    if (inverse) {
      f(a, std::true_type{});
    } else {
      f(a, std::false_type{});
    }
  };
  if (act == CA::Exp) {
    with_inv(std::integral_constant<CA, CA::Exp>{});
  } else {
    with_inv(std::integral_constant<CA, CA::Sigmoid>{});
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> affine_coupling_cuda(
    const at::Tensor& x, const c10::optional<at::Tensor>& log_scale, const at::Tensor& shift,
    int64_t activation, double clamp, bool inverse, bool save_scale) {
  const auto act = check_affine_coupling_args(x, log_scale, shift, activation, clamp);
  TORCH_CHECK(x.is_cuda(), "fastflow: x must be a CUDA tensor for the CUDA kernel");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto fmt = per_sample_format(x);
  const at::Tensor xc = x.contiguous(fmt);
  const at::Tensor tc = shift.contiguous(fmt);
  const int64_t B = x.size(0);
  const int64_t N = x.numel() / B;
  const auto ld_options = x.options().dtype(logdet_dtype(x.scalar_type()));

  if (act == CouplingActivation::Additive) {
    // y = x +- t with a zero log-det: ATen's elementwise kernel is already a vectorised
    // bandwidth-bound add, and a fused kernel would have nothing to fuse.
    at::Tensor out = at::empty_like(xc, fmt);
    if (inverse) {
      at::sub_out(out, xc, tc);
    } else {
      at::add_out(out, xc, tc);
    }
    return {out, at::zeros({B}, ld_options), at::empty({0}, x.options())};
  }

  const at::Tensor hc = log_scale->contiguous(fmt);
  at::Tensor out = at::empty_like(xc, fmt);
  at::Tensor scale = save_scale ? at::empty_like(xc, fmt) : at::empty({0}, x.options());
  at::Tensor logdet;
  if (N == 0) {
    return {out, at::zeros({B}, ld_options), scale};
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "affine_coupling_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        scalar_t* scale_ptr = save_scale ? scale.mutable_data_ptr<scalar_t>() : nullptr;
        const bool vectorize = can_vectorize<scalar_t>(
            N, {xc.const_data_ptr(), hc.const_data_ptr(), tc.const_data_ptr(),
                out.const_data_ptr(), scale_ptr});
        constexpr int kVec = kVectorBytes / sizeof(scalar_t);
        const int64_t vecs = vectorize ? N / kVec : N;
        const Plan plan = make_plan(B, vecs);
        // Atomics need a zero start; a single writer per sample does not.
        const bool atomics = !plan.rows && plan.chunks > 1;
        const bool deterministic = atomics && at::globalContext().deterministicAlgorithms();
        logdet = (atomics && !deterministic) ? at::zeros({B}, ld_options)
                                             : at::empty({B}, ld_options);
        at::Tensor partials =
            deterministic ? at::empty({B, plan.chunks}, ld_options) : at::Tensor();
        acc_t* partials_ptr = deterministic ? partials.mutable_data_ptr<acc_t>() : nullptr;
        dispatch_variant(act, inverse, [&](auto a, auto i) {
          auto run = [&](auto vec) {
            ForwardOp<scalar_t, decltype(a)::value, decltype(i)::value, decltype(vec)::value> op{
                xc.const_data_ptr<scalar_t>(),
                hc.const_data_ptr<scalar_t>(),
                tc.const_data_ptr<scalar_t>(),
                out.mutable_data_ptr<scalar_t>(),
                scale_ptr,
                static_cast<acc_t>(clamp),
                static_cast<acc_t>(1.0 / clamp),
                std::isfinite(clamp)};
            launch(op, plan, logdet.mutable_data_ptr<acc_t>(), partials_ptr, B, vecs);
          };
          if (vectorize) {
            run(std::integral_constant<int, kVec>{});
          } else {
            run(std::integral_constant<int, 1>{});
          }
        });
        if (deterministic) {
          at::sum_out(logdet, partials, /*dim=*/1);
        }
      });
  return {out, logdet, scale};
}

std::tuple<at::Tensor, at::Tensor> affine_coupling_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& grad_logdet, const at::Tensor& input,
    const at::Tensor& scale, const at::Tensor& shift, int64_t activation, double clamp,
    bool inverse) {
  const auto act = check_affine_coupling_backward_args(grad_out, grad_logdet, input, scale, shift,
                                                       activation, clamp);
  TORCH_CHECK(input.is_cuda(), "fastflow: input must be a CUDA tensor for the CUDA kernel");
  const c10::cuda::CUDAGuard guard(input.device());
  const auto fmt = per_sample_format(input);
  const at::Tensor gc = grad_out.contiguous(fmt);
  if (act == CouplingActivation::Additive) {
    // d(x +- t)/dx = 1: the input's gradient is grad_out itself, copied so that the caller
    // owns a fresh tensor in the input's layout, as from the CPU kernel.
    at::Tensor du = at::empty_like(gc, fmt);
    du.copy_(gc);
    return {du, at::empty({0}, input.options())};
  }
  const at::Tensor glc = grad_logdet.contiguous();
  const at::Tensor uc = input.contiguous(fmt);
  const at::Tensor tc = shift.contiguous(fmt);
  const at::Tensor sc = scale.contiguous(fmt);
  at::Tensor du = at::empty_like(uc, fmt);
  at::Tensor dh = at::empty_like(uc, fmt);
  const int64_t B = input.size(0);
  const int64_t N = input.numel() / B;
  if (N == 0) {
    return {du, dh};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "affine_coupling_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const bool vectorize = can_vectorize<scalar_t>(
            N, {gc.const_data_ptr(), uc.const_data_ptr(), sc.const_data_ptr(),
                tc.const_data_ptr(), du.const_data_ptr(), dh.const_data_ptr()});
        constexpr int kVec = kVectorBytes / sizeof(scalar_t);
        const int64_t vecs = vectorize ? N / kVec : N;
        const Plan plan = make_plan(B, vecs);
        dispatch_variant(act, inverse, [&](auto a, auto i) {
          auto run = [&](auto vec) {
            BackwardOp<scalar_t, decltype(a)::value, decltype(i)::value, decltype(vec)::value>
                op{gc.const_data_ptr<scalar_t>(),
                   glc.const_data_ptr<acc_t>(),
                   uc.const_data_ptr<scalar_t>(),
                   sc.const_data_ptr<scalar_t>(),
                   tc.const_data_ptr<scalar_t>(),
                   du.mutable_data_ptr<scalar_t>(),
                   dh.mutable_data_ptr<scalar_t>(),
                   static_cast<acc_t>(std::isfinite(clamp) ? 1.0 / clamp : 0.0)};
            launch(op, plan, nullptr, nullptr, B, vecs);
          };
          if (vectorize) {
            run(std::integral_constant<int, kVec>{});
          } else {
            run(std::integral_constant<int, 1>{});
          }
        });
      });
  return {du, dh};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastflow, CUDA, m) {
  m.impl("affine_coupling", &affine_coupling_cuda);
  m.impl("affine_coupling_backward", &affine_coupling_backward_cuda);
}

}  // namespace fastflow
