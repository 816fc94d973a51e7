// Vectorised exp, tanh and log1p, and a horizontal sum, for the CPU kernels.
//
// float under AVX2: own polynomial kernels, inlined. ATen's Vectorized<float>::exp/tanh/log1p
// call SLEEF's u10 routines, which are accurate to 1 ulp but cost 3-10x more (SLEEF's expm1 and
// log1p work in double-float arithmetic); measured on the coupling kernel, they made the fused
// kernel slower than eager PyTorch. The kernels here stay within a few ulp of the float64
// result (exp: Cephes-style range reduction with a two-part ln 2 and a degree-6 polynomial;
// tanh: an odd polynomial near 0, 1 - 2/(exp(2|x|) + 1) elsewhere; log1p on [0, 1]: a degree-9
// polynomial, fitted by least squares at Chebyshev nodes) and keep NaN as NaN.
// double, or builds without AVX2: ATen's (SLEEF or scalar libm) implementations.
#pragma once

#include <ATen/cpu/vec/vec.h>

namespace fastflow {
namespace vecmath {

template <typename T>
using Vec = at::vec::Vectorized<T>;

template <typename T>
inline Vec<T> exp(const Vec<T>& x) {
  return x.exp();
}

template <typename T>
inline Vec<T> tanh(const Vec<T>& x) {
  return x.tanh();
}

// log(1 + e) for e in [0, 1].
template <typename T>
inline Vec<T> log1p_unit(const Vec<T>& e) {
  return e.log1p();
}

// The sum of a vector's lanes, in lane order.
template <typename T>
inline T reduce_sum(const Vec<T>& v) {
  __at_align__ T lanes[Vec<T>::size()];
  v.store(lanes);
  T total = T(0);
  for (int64_t i = 0; i < Vec<T>::size(); ++i) {
    total += lanes[i];
  }
  return total;
}

#if defined(CPU_CAPABILITY_AVX2) && !defined(_MSC_VER)

template <>
inline Vec<float> exp(const Vec<float>& xv) {
  const __m256 x = xv;
  // Operand order keeps NaN: min/max return their second operand when either is NaN.
  __m256 xc = _mm256_min_ps(_mm256_set1_ps(88.3762626647949f), x);
  xc = _mm256_max_ps(_mm256_set1_ps(-87.3365478515625f), xc);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i bits =
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  __m256 y = _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
  // Below the clamp the true value is < FLT_MIN: return 0; above, +inf.
  y = _mm256_blendv_ps(y, _mm256_setzero_ps(),
                       _mm256_cmp_ps(x, _mm256_set1_ps(-87.3365478515625f), _CMP_LT_OQ));
  y = _mm256_blendv_ps(y, _mm256_set1_ps(INFINITY),
                       _mm256_cmp_ps(x, _mm256_set1_ps(88.7228391116729996f), _CMP_GT_OQ));
  return y;
}

template <>
inline Vec<float> tanh(const Vec<float>& xv) {
  const __m256 x = xv;
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256 ax = _mm256_andnot_ps(sign, x);
  // |x| < 0.625: tanh(x) = x + x^3 P(x^2).
  const __m256 u = _mm256_mul_ps(x, x);
  __m256 p = _mm256_set1_ps(-0.006104959047914363f);
  p = _mm256_fmadd_ps(p, u, _mm256_set1_ps(0.02100365092082213f));
  p = _mm256_fmadd_ps(p, u, _mm256_set1_ps(-0.05385250031030415f));
  p = _mm256_fmadd_ps(p, u, _mm256_set1_ps(0.13332782294830167f));
  p = _mm256_fmadd_ps(p, u, _mm256_set1_ps(-0.33333329100520515f));
  const __m256 small = _mm256_fmadd_ps(_mm256_mul_ps(x, u), p, x);
  // |x| >= 0.625: 1 - 2 / (exp(2|x|) + 1) loses at most one bit there; exp = inf gives 1.
  const __m256 e = exp(Vec<float>(_mm256_add_ps(ax, ax)));
  const __m256 big_abs = _mm256_sub_ps(
      _mm256_set1_ps(1.0f),
      _mm256_div_ps(_mm256_set1_ps(2.0f), _mm256_add_ps(e, _mm256_set1_ps(1.0f))));
  const __m256 big = _mm256_or_ps(big_abs, _mm256_and_ps(sign, x));
  // NaN compares false, so it takes the polynomial branch, which keeps it NaN.
  return _mm256_blendv_ps(small, big, _mm256_cmp_ps(ax, _mm256_set1_ps(0.625f), _CMP_GE_OQ));
}

template <>
inline Vec<float> log1p_unit(const Vec<float>& ev) {
  const __m256 e = ev;
  __m256 p = _mm256_set1_ps(-0.0032563784888017112f);
  p = _mm256_fmadd_ps(p, e, _mm256_set1_ps(0.019907161005012726f));
  p = _mm256_fmadd_ps(p, e, _mm256_set1_ps(-0.0570642009232539f));
  p = _mm256_fmadd_ps(p, e, _mm256_set1_ps(0.10614264704741536f));
  p = _mm256_fmadd_ps(p, e, _mm256_set1_ps(-0.15311863113330726f));
  p = _mm256_fmadd_ps(p, e, _mm256_set1_ps(0.1967811726038666f));
  p = _mm256_fmadd_ps(p, e, _mm256_set1_ps(-0.2495455887188062f));
  p = _mm256_fmadd_ps(p, e, _mm256_set1_ps(0.33330004035296884f));
  p = _mm256_fmadd_ps(p, e, _mm256_set1_ps(-0.4999990399276678f));
  p = _mm256_fmadd_ps(p, e, _mm256_set1_ps(0.9999999953848538f));
  return _mm256_mul_ps(p, e);
}

#endif  // CPU_CAPABILITY_AVX2

}  // namespace vecmath
}  // namespace fastflow
