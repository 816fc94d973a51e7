// The MLP trace operators (fastflow/mlp_trace.h): Hutchinson traces of powers of an MLP's
// Jacobian by forward-mode products through the known layers, their hand-written backward, and
// the batched fixed-point inverse of y = x + g(x).
//
// The forward and backward are written once in ATen calls and run on every device (the CUDA
// registrations in csrc/cuda/mlp_trace.cu call the same functions): the work is matrix
// products (the BLAS/cuBLAS GEMMs) and a few elementwise passes per layer, and what the native
// operator removes is the autograd machinery of the reference (a graph per vector-Jacobian
// product, double backward through it). The CPU fixed-point loop is here too; the CUDA one is a
// kernel of its own (one thread block per sample, no host synchronisation).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "fastflow/mlp_trace.h"
#include "fastflow/vec_math.h"

namespace fastflow {
namespace {

struct Net {
  at::TensorList W, b, gate, shift;
  at::Tensor betas;
  int64_t act;
  bool preact;

  int64_t layers() const { return static_cast<int64_t>(W.size()); }
  bool has_act(int64_t l) const { return act != kActIdentity && (l > 0 || preact); }
  at::Tensor beta(int64_t l) const {
    return act == kActLipSwish ? betas.select(0, preact ? l : l - 1) : at::Tensor();
  }
  // W_l h + b_l (no gate, no shift), h [N, in]
  at::Tensor linear(int64_t l, const at::Tensor& h) const {
    if (!b.empty()) {
      return at::addmm(b[l], h, W[l].t());
    }
    return at::mm(h, W[l].t());
  }
  // A gate shared by the batch ([1, out] or [out]) folds into the layer:
  // (W h + b) * g + s = (diag(g) W) h + (b * g + s). Per-sample gates do not.
  bool folds(int64_t l) const {
    const int64_t out = W[l].size(0);
    return !gate.empty() && gate[l].numel() == out && (shift.empty() || shift[l].numel() == out);
  }
  // (diag(g) W, b * g + s or undefined) of a folding layer
  std::pair<at::Tensor, at::Tensor> folded(int64_t l) const {
    const int64_t out = W[l].size(0);
    const at::Tensor g = gate[l].reshape({out});
    at::Tensor bias;
    if (!b.empty()) {
      bias = b[l] * g;
    }
    if (!shift.empty()) {
      bias = bias.defined() ? bias + shift[l].reshape({out}) : shift[l].reshape({out});
    }
    return {W[l] * g.view({out, 1}), bias};
  }
};

// y = h Wg^T + bias (bias may be undefined)
at::Tensor affine(const at::Tensor& h, const at::Tensor& Wg, const at::Tensor& bias) {
  return bias.defined() ? at::addmm(bias, h, Wg.t()) : at::mm(h, Wg.t());
}

// ---------------------------------------------------------------------------------------------
// Fused CPU activation passes: the value and derivatives an MLP pass needs, in one sweep over
// z (the ATen expressions below take one pass, and one allocation, per operation). Outputs
// that are null are skipped. Used for contiguous CPU float/double tensors; other inputs take the
// ATen expressions, which compute the same formulas.

template <typename T>
using Vec = at::vec::Vectorized<T>;

template <typename T>
struct ActOutputs {
  T* h = nullptr;
  T* d = nullptr;
  T* dd = nullptr;
  T* dh_dbeta = nullptr;
  T* dd_dbeta = nullptr;
};

template <typename T>
inline void act_block(int64_t act, const Vec<T>& z, const Vec<T>& beta, const ActOutputs<T>& o,
                      int64_t i, int64_t count) {
  const Vec<T> one(T(1)), two(T(2));
  auto put = [&](T* out, const Vec<T>& v) {
    if (out != nullptr) {
      v.store(out + i, static_cast<int>(count));
    }
  };
  if (act == kActLipSwish) {
    const Vec<T> c(T(1) / T(kLipSwishDiv));
    const Vec<T> bz = z * beta;
    const Vec<T> s = one / (one + vecmath::exp(Vec<T>(T(0)) - bz));
    put(o.h, z * s * c);
    put(o.d, s * (one + bz * (one - s)) * c);
    if (o.dd != nullptr || o.dd_dbeta != nullptr || o.dh_dbeta != nullptr) {
      const Vec<T> q = s * (one - s);
      const Vec<T> qr = q * (two + bz * (one - two * s)) * c;
      put(o.dd, beta * qr);
      put(o.dd_dbeta, z * qr);
      put(o.dh_dbeta, z * z * q * c);
    }
  } else if (act == kActElu) {
    const Vec<T> zero(T(0));
    const Vec<T> e = vecmath::exp(at::vec::minimum(z, zero));
    const Vec<T> pos = z > zero;  // all-ones lanes where z > 0 (NaN: false)
    put(o.h, Vec<T>::blendv(e - one, z, pos));
    put(o.d, Vec<T>::blendv(e, one, pos));
    put(o.dd, Vec<T>::blendv(e, zero, pos));
  } else {  // tanh
    const Vec<T> h = vecmath::tanh(z);
    const Vec<T> d = one - h * h;
    put(o.h, h);
    put(o.d, d);
    put(o.dd, Vec<T>(T(-2)) * h * d);
  }
}

template <typename T>
void act_fused_cpu(int64_t act, const T* z, int64_t n, T beta, const ActOutputs<T>& o) {
  const Vec<T> vb(beta);
  at::parallel_for(0, n, 8192, [&](int64_t lo, int64_t hi) {
    int64_t i = lo;
    for (; i + Vec<T>::size() <= hi; i += Vec<T>::size()) {
      act_block<T>(act, Vec<T>::loadu(z + i), vb, o, i, Vec<T>::size());
    }
    if (i < hi) {
      const int64_t rest = hi - i;
      act_block<T>(act, Vec<T>::loadu(z + i, static_cast<int>(rest)), vb, o, i, rest);
    }
  });
}


// The reverse step through an activation for the primal and P tangents at once, given
// hbar = dL/dh [N], thbar = dL/dh_dot [P, N], and the activation input z [N] with its tangents
// tz [P, N] (N = B * H):
//     cross = sum_p thbar_p tz_p
//     zbar = phi'(z) hbar + phi''(z) cross,   tbar_p = phi'(z) thbar_p
//     beta_grad = sum(dphi/dbeta hbar + dphi'/dbeta cross)     (LipSwish)
// in one sweep, without materialising phi', phi'' or the beta partials (the backward's peak
// memory is what the reverse pass holds at once).
template <typename T>
T act_backward_cpu(int64_t act, const T* z, const T* hbar, const T* thbar, const T* tz,
                   int64_t N, int64_t P, T beta, T* zbar, T* tbar) {
  using V = Vec<T>;
  const V vb(beta), one(T(1)), two(T(2)), zero(T(0));
  const V c(T(1) / T(kLipSwishDiv));
  auto block = [&](int64_t i, int count, V& acc) {
    const V zv = V::loadu(z + i, count);
    V d, dd, dhb, ddb;
    if (act == kActLipSwish) {
      const V bz = zv * vb;
      const V sg = one / (one + vecmath::exp(zero - bz));
      const V q = sg * (one - sg);
      const V qr = q * (two + bz * (one - two * sg)) * c;
      d = sg * (one + bz * (one - sg)) * c;
      dd = vb * qr;
      ddb = zv * qr;
      dhb = zv * zv * q * c;
    } else if (act == kActElu) {
      const V e = vecmath::exp(at::vec::minimum(zv, zero));
      const V pos = zv > zero;
      d = V::blendv(e, one, pos);
      dd = V::blendv(e, zero, pos);
    } else {  // tanh
      const V h = vecmath::tanh(zv);
      d = one - h * h;
      dd = V(T(-2)) * h * d;
    }
    V cross = zero;
    for (int64_t p = 0; p < P; ++p) {
      const V th = V::loadu(thbar + p * N + i, count);
      cross = cross + th * V::loadu(tz + p * N + i, count);
      (th * d).store(tbar + p * N + i, count);
    }
    const V hb = V::loadu(hbar + i, count);
    (hb * d + cross * dd).store(zbar + i, count);
    if (act == kActLipSwish) {
      // lanes past count are zero in every load, so they add nothing
      acc = acc + hb * dhb + cross * ddb;
    }
  };
  return at::parallel_reduce(
      0, N, 4096, T(0),
      [&](int64_t lo, int64_t hi, T init) {
        V acc(T(0));
        int64_t i = lo;
        for (; i + V::size() <= hi; i += V::size()) {
          block(i, V::size(), acc);
        }
        if (i < hi) {
          block(i, static_cast<int>(hi - i), acc);
        }
        return init + vecmath::reduce_sum(acc);
      },
      std::plus<T>());
}

bool fusable(int64_t act, const at::Tensor& z) {
  return z.device().is_cpu() && z.is_contiguous() &&
         (z.scalar_type() == at::kFloat || z.scalar_type() == at::kDouble) &&
         (act == kActLipSwish || act == kActElu || act == kActTanh);
}

// Runs the fused pass; every requested output is a fresh tensor of z's shape.
struct ActTensors {
  at::Tensor h, d, dd, dh_dbeta, dd_dbeta;
};

ActTensors act_fused(int64_t act, const at::Tensor& z, const at::Tensor& beta, bool want_h,
                     bool want_d, bool want_second) {
  ActTensors t;
  auto make = [&](bool want) { return want ? at::empty_like(z) : at::Tensor(); };
  t.h = make(want_h);
  t.d = make(want_d);
  t.dd = make(want_second);
  t.dh_dbeta = make(want_second && act == kActLipSwish);
  t.dd_dbeta = make(want_second && act == kActLipSwish);
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "mlp_act_fused", [&] {
    auto ptr = [](const at::Tensor& x) {
      return x.defined() ? x.data_ptr<scalar_t>() : static_cast<scalar_t*>(nullptr);
    };
    ActOutputs<scalar_t> o;
    o.h = ptr(t.h);
    o.d = ptr(t.d);
    o.dd = ptr(t.dd);
    o.dh_dbeta = ptr(t.dh_dbeta);
    o.dd_dbeta = ptr(t.dd_dbeta);
    const scalar_t b = beta.defined() ? beta.item<scalar_t>() : scalar_t(0);
    act_fused_cpu<scalar_t>(act, z.data_ptr<scalar_t>(), z.numel(), b, o);
  });
  return t;
}

// The activation's value.
at::Tensor act_value(const Net& n, int64_t l, const at::Tensor& z) {
  if (fusable(n.act, z)) {
    return act_fused(n.act, z, n.beta(l), true, false, false).h;
  }
  switch (n.act) {
    case kActElu:
      return at::elu(z);
    case kActLipSwish: {
      const at::Tensor beta = n.beta(l);
      return z * at::sigmoid(z * beta) / kLipSwishDiv;
    }
    case kActTanh:
      return at::tanh(z);
    case kActSoftplus:
      return at::softplus(z);
    default:
      return z;
  }
}

// The activation's value h and first derivative d.
std::pair<at::Tensor, at::Tensor> act_value_deriv(const Net& n, int64_t l, const at::Tensor& z) {
  if (fusable(n.act, z)) {
    ActTensors t = act_fused(n.act, z, n.beta(l), true, true, false);
    return {t.h, t.d};
  }
  switch (n.act) {
    case kActElu: {
      at::Tensor h = at::elu(z);
      return {h, at::where(z > 0, at::ones_like(z), h + 1)};
    }
    case kActLipSwish: {
      const at::Tensor beta = n.beta(l);
      const at::Tensor bz = z * beta;
      const at::Tensor s = at::sigmoid(bz);
      // phi = z s / 1.1,  phi' = s (1 + beta z (1 - s)) / 1.1
      at::Tensor h = z * s / kLipSwishDiv;
      at::Tensor d = s * (bz * (1 - s) + 1) / kLipSwishDiv;
      return {h, d};
    }
    case kActTanh: {
      at::Tensor h = at::tanh(z);
      return {h, 1 - h * h};
    }
    case kActSoftplus:
      return {at::softplus(z), at::sigmoid(z)};
    default:
      return {z, at::Tensor()};
  }
}

// First and second derivatives, and for LipSwish the partials of phi and phi' w.r.t. beta.
struct ActGrad {
  at::Tensor d, dd, dh_dbeta, dd_dbeta;
};

ActGrad act_grad(const Net& n, int64_t l, const at::Tensor& z) {
  ActGrad a;
  if (fusable(n.act, z)) {
    ActTensors t = act_fused(n.act, z, n.beta(l), false, true, true);
    a.d = t.d;
    a.dd = t.dd;
    a.dh_dbeta = t.dh_dbeta;
    a.dd_dbeta = t.dd_dbeta;
    return a;
  }
  switch (n.act) {
    case kActElu: {
      const at::Tensor e = at::exp(at::clamp_max(z, 0));
      const at::Tensor pos = z > 0;
      a.d = at::where(pos, at::ones_like(z), e);
      a.dd = at::where(pos, at::zeros_like(z), e);
      break;
    }
    case kActLipSwish: {
      const at::Tensor beta = n.beta(l);
      const at::Tensor bz = z * beta;
      const at::Tensor s = at::sigmoid(bz);
      const at::Tensor q = s * (1 - s);
      // phi'' = beta q (2 + beta z (1 - 2 s)) / 1.1;  d phi / d beta = z^2 q / 1.1;
      // d phi' / d beta = z q (2 + beta z (1 - 2 s)) / 1.1
      const at::Tensor r = bz * (1 - 2 * s) + 2;
      a.d = s * (bz * (1 - s) + 1) / kLipSwishDiv;
      const at::Tensor zqr = z * q * r / kLipSwishDiv;
      a.dd = q * r * beta / kLipSwishDiv;
      a.dd_dbeta = zqr;
      a.dh_dbeta = z * z * q / kLipSwishDiv;
      break;
    }
    case kActTanh: {
      const at::Tensor h = at::tanh(z);
      a.d = 1 - h * h;
      a.dd = -2 * h * a.d;
      break;
    }
    case kActSoftplus: {
      a.d = at::sigmoid(z);
      a.dd = a.d * (1 - a.d);
      break;
    }
    default:
      break;
  }
  return a;
}

// t [P*B, H] times a per-sample tensor broadcastable to [B, H] (shared by the P probes).
at::Tensor per_sample_mul(const at::Tensor& t, int64_t P, const at::Tensor& s) {
  const int64_t H = t.size(1);
  return (t.view({P, t.size(0) / P, H}) * s).view({t.size(0), H});
}

// The reverse step through activation l (see act_backward_cpu): returns (zbar, tbar) and, for
// LipSwish, appends beta's gradient to gbeta. Fused on the CPU, ATen expressions elsewhere.
std::pair<at::Tensor, at::Tensor> act_backward(const Net& n, int64_t l, const at::Tensor& z,
                                               const at::Tensor& hbar, const at::Tensor& thbar,
                                               const at::Tensor& tz, int64_t P,
                                               std::vector<at::Tensor>& gbeta) {
  const int64_t H = z.size(1), B = z.size(0);
  if (fusable(n.act, z)) {
    const at::Tensor hb = hbar.contiguous(), th = thbar.contiguous(), t = tz.contiguous();
    at::Tensor zbar = at::empty_like(z), tbar = at::empty_like(th);
    AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "mlp_act_backward", [&] {
      const at::Tensor beta = n.beta(l);
      const scalar_t b = beta.defined() ? beta.item<scalar_t>() : scalar_t(0);
      const scalar_t g = act_backward_cpu<scalar_t>(
          n.act, z.data_ptr<scalar_t>(), hb.data_ptr<scalar_t>(), th.data_ptr<scalar_t>(),
          t.data_ptr<scalar_t>(), B * H, P, b, zbar.data_ptr<scalar_t>(),
          tbar.data_ptr<scalar_t>());
      if (n.act == kActLipSwish) {
        gbeta.push_back(at::scalar_tensor(g, z.options()));
      }
    });
    return {zbar, tbar};
  }
  const ActGrad a = act_grad(n, l, z);
  const at::Tensor cross = (thbar.view({P, B, H}) * tz.view({P, B, H})).sum(0);
  at::Tensor zbar = hbar * a.d + cross * a.dd;
  at::Tensor tbar = per_sample_mul(thbar, P, a.d);
  if (n.act == kActLipSwish) {
    gbeta.push_back((hbar * a.dh_dbeta + cross * a.dd_dbeta).sum());
  }
  return {zbar, tbar};
}

}  // namespace

int64_t check_mlp_args(const at::Tensor& x, const char* x_name, at::TensorList weights,
                       at::TensorList biases, at::TensorList gates, at::TensorList shifts,
                       const at::Tensor& betas, int64_t act, bool preact) {
  TORCH_CHECK(x.dim() == 2, "fastflow: ", x_name, " must be a matrix [batch, features], got shape ",
              x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, "fastflow: ",
              x_name, " must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(act >= kActIdentity && act <= kActSoftplus,
              "fastflow: act must be 0 (identity), 1 (elu), 2 (lipswish), 3 (tanh) or 4 "
              "(softplus), got ",
              act);
  const int64_t L = static_cast<int64_t>(weights.size());
  TORCH_CHECK(L >= 1, "fastflow: weights must hold at least one matrix");
  TORCH_CHECK(biases.empty() || static_cast<int64_t>(biases.size()) == L,
              "fastflow: biases must be empty or hold one vector per weight (", L, "), got ",
              biases.size());
  TORCH_CHECK(gates.empty() || static_cast<int64_t>(gates.size()) == L,
              "fastflow: gates must be empty or hold one tensor per weight (", L, "), got ",
              gates.size());
  TORCH_CHECK(shifts.empty() || static_cast<int64_t>(shifts.size()) == L,
              "fastflow: shifts must be empty or hold one tensor per weight (", L, "), got ",
              shifts.size());
  const int64_t B = x.size(0);
  int64_t width = x.size(1);
  auto same = [&](const at::Tensor& t, const char* name, int64_t l) {
    TORCH_CHECK(t.scalar_type() == x.scalar_type(), "fastflow: ", name, "[", l,
                "] must have the dtype of ", x_name, " (", x.scalar_type(), "), got ",
                t.scalar_type());
    TORCH_CHECK(t.device() == x.device(), "fastflow: ", name, "[", l,
                "] must be on the device of ", x_name, " (", x.device(), "), got ", t.device());
  };
  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor& w = weights[l];
    TORCH_CHECK(w.dim() == 2 && w.size(1) == width, "fastflow: weights[", l,
                "] must be a matrix [out, ", width, "], got shape ", w.sizes());
    same(w, "weights", l);
    const int64_t out = w.size(0);
    if (!biases.empty()) {
      TORCH_CHECK(biases[l].dim() == 1 && biases[l].size(0) == out, "fastflow: biases[", l,
                  "] must have shape [", out, "], got ", biases[l].sizes());
      same(biases[l], "biases", l);
    }
    for (int which = 0; which < 2; ++which) {
      const at::TensorList list = which == 0 ? gates : shifts;
      const char* name = which == 0 ? "gates" : "shifts";
      if (list.empty()) {
        continue;
      }
      const at::Tensor& t = list[l];
      const bool ok = t.dim() <= 2 && (t.dim() == 0 || t.size(-1) == out || t.size(-1) == 1) &&
                      (t.dim() < 2 || t.size(0) == B || t.size(0) == 1);
      TORCH_CHECK(ok, "fastflow: ", name, "[", l, "] must broadcast to [", B, ", ", out,
                  "], got shape ", t.sizes());
      same(t, name, l);
    }
    width = out;
  }
  TORCH_CHECK(width == x.size(1), "fastflow: the last weight must map back to ", x.size(1),
              " features (g maps R^D to R^D), got ", width);
  const int64_t n_act = act == kActIdentity ? 0 : (preact ? L : L - 1);
  const int64_t want = act == kActLipSwish ? n_act : 0;
  TORCH_CHECK(betas.dim() == 1 && betas.size(0) == want, "fastflow: betas must have shape [",
              want, "] (one per LipSwish activation), got ", betas.sizes());
  if (want > 0) {
    same(betas, "betas", 0);
  }
  return n_act;
}

at::Tensor mlp_apply(const at::Tensor& x, at::TensorList weights, at::TensorList biases,
                     const at::Tensor& betas, int64_t act, bool preact) {
  const Net n{weights, biases, {}, {}, betas, act, preact};
  at::Tensor h = x;
  for (int64_t l = 0; l < n.layers(); ++l) {
    if (n.has_act(l)) {
      h = act_value(n, l, h);
    }
    h = n.linear(l, h);
  }
  return h;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mlp_trace_forward_impl(
    const at::Tensor& x_in, at::TensorList weights, at::TensorList biases, at::TensorList gates,
    at::TensorList shifts, const at::Tensor& betas, int64_t act, bool preact,
    const at::Tensor& probes_in, at::ArrayRef<double> value_coeffs,
    at::ArrayRef<double> psi_coeffs) {
  check_mlp_args(x_in, "x", weights, biases, gates, shifts, betas, act, preact);
  // The arithmetic runs in the inputs' dtype even inside torch.autocast: an autocast GEMM
  // would return half/bf16 products into float32 sums.
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const int64_t B = x_in.size(0), D = x_in.size(1);
  TORCH_CHECK(probes_in.dim() == 3 && probes_in.size(0) >= 1 && probes_in.size(1) == B &&
                  probes_in.size(2) == D,
              "fastflow: probes must have shape [n_probes, ", B, ", ", D, "], got ",
              probes_in.sizes());
  TORCH_CHECK(probes_in.scalar_type() == x_in.scalar_type() && probes_in.device() == x_in.device(),
              "fastflow: probes must have the dtype and device of x (", x_in.scalar_type(), ", ",
              x_in.device(), "), got ", probes_in.scalar_type(), ", ", probes_in.device());
  const int64_t K = static_cast<int64_t>(value_coeffs.size());
  TORCH_CHECK(static_cast<int64_t>(psi_coeffs.size()) <= K,
              "fastflow: psi_coeffs may not have more entries than value_coeffs (", K, "), got ",
              psi_coeffs.size());
  const Net n{weights, biases, gates, shifts, betas, act, preact};
  const int64_t L = n.layers();
  const int64_t P = probes_in.size(0);
  const at::Tensor x = x_in.contiguous();

  // primal pass, keeping each activation's derivative for the tangents
  std::vector<at::Tensor> deriv(L), Wg(L);  // Wg: the gate folded into W, where it folds
  at::Tensor h = x;
  for (int64_t l = 0; l < L; ++l) {
    if (n.has_act(l)) {
      auto hd = act_value_deriv(n, l, h);
      h = std::move(hd.first);
      deriv[l] = std::move(hd.second);
    }
    if (n.folds(l)) {
      at::Tensor bias;
      std::tie(Wg[l], bias) = n.folded(l);
      h = affine(h, Wg[l], bias);
      continue;
    }
    h = n.linear(l, h);
    if (!gates.empty()) {
      h = h * gates[l];
    }
    if (!shifts.empty()) {
      h = h + shifts[l];
    }
  }
  at::Tensor out = h;

  // tangents w_k = J w_{k-1}, all probes at once as rows of one [P*B, D] matrix
  const at::Tensor v = probes_in.contiguous().view({P * B, D});
  at::Tensor trace = at::zeros({B}, x.options());
  at::Tensor psi = psi_coeffs.empty() ? at::zeros({P * B, D}, x.options()) : v * psi_coeffs[0];
  at::Tensor t = v;
  for (int64_t k = 1; k <= K; ++k) {
    for (int64_t l = 0; l < L; ++l) {
      if (deriv[l].defined()) {
        t = per_sample_mul(t, P, deriv[l]);
      }
      if (Wg[l].defined()) {
        t = at::mm(t, Wg[l].t());
        continue;
      }
      t = at::mm(t, weights[l].t());
      if (!gates.empty()) {
        t = per_sample_mul(t, P, gates[l]);
      }
    }
    trace.add_((t * v).view({P, B, D}).sum(at::IntArrayRef{0, 2}), value_coeffs[k - 1]);
    if (k < static_cast<int64_t>(psi_coeffs.size())) {
      psi.add_(t, psi_coeffs[k]);
    }
  }
  if (P > 1) {
    trace.div_(static_cast<double>(P));
  }
  return {out, trace, psi.view({P, B, D})};
}

namespace {

// The entries of a 1-D coefficient tensor as doubles, up to its last non-zero one.
std::vector<double> host_coeffs(const at::Tensor& c, const char* name) {
  TORCH_CHECK(c.dim() == 1, "fastflow: ", name, " must be a 1-D tensor, got shape ", c.sizes());
  TORCH_CHECK(at::isFloatingType(c.scalar_type()), "fastflow: ", name,
              " must be a floating-point tensor, got ", c.scalar_type());
  const at::Tensor h = c.to(at::kCPU, at::kDouble).contiguous();
  const double* p = h.data_ptr<double>();
  const int64_t n = h.numel();
  int64_t last = 0;
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(std::isfinite(p[i]), "fastflow: ", name, "[", i, "] must be finite, got ", p[i]);
    if (p[i] != 0) {
      last = i + 1;
    }
  }
  return std::vector<double>(p, p + last);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> mlp_trace_forward_tensor_coeffs_impl(
    const at::Tensor& x, at::TensorList weights, at::TensorList biases, at::TensorList gates,
    at::TensorList shifts, const at::Tensor& betas, int64_t act, bool preact,
    const at::Tensor& probes, const at::Tensor& value_coeffs, const at::Tensor& psi_coeffs) {
  const std::vector<double> value = host_coeffs(value_coeffs, "value_coeffs");
  const std::vector<double> psi = host_coeffs(psi_coeffs, "psi_coeffs");
  TORCH_CHECK(psi.size() <= value.size(), "fastflow: psi_coeffs may not have a non-zero entry "
              "at or past K = ", value.size(), " (1 + the index of the last non-zero entry of "
              "value_coeffs), got one at index ", psi.size() - 1);
  return mlp_trace_forward_impl(x, weights, biases, gates, shifts, betas, act, preact, probes,
                                value, psi);
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
           std::vector<at::Tensor>, at::Tensor>
mlp_trace_backward_impl(const at::Tensor& grad_out_in, const at::Tensor& grad_trace,
                        const at::Tensor& x_in, at::TensorList weights, at::TensorList biases,
                        at::TensorList gates, at::TensorList shifts, const at::Tensor& betas,
                        int64_t act, bool preact, const at::Tensor& probes,
                        const at::Tensor& psi_in, at::Tensor* value, at::Tensor* tangent_dot) {
  check_mlp_args(x_in, "x", weights, biases, gates, shifts, betas, act, preact);
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const int64_t B = x_in.size(0), D = x_in.size(1);
  TORCH_CHECK(grad_out_in.sizes() == x_in.sizes(), "fastflow: grad_out must have shape ",
              x_in.sizes(), ", got ", grad_out_in.sizes());
  TORCH_CHECK(grad_trace.dim() == 1 && grad_trace.size(0) == B,
              "fastflow: grad_trace must have shape [", B, "], got ", grad_trace.sizes());
  TORCH_CHECK(probes.dim() == 3 && probes.size(1) == B && probes.size(2) == D &&
                  probes.size(0) >= 1,
              "fastflow: probes must have shape [n_probes, ", B, ", ", D, "], got ",
              probes.sizes());
  TORCH_CHECK(psi_in.sizes() == probes.sizes(), "fastflow: psi must have the shape of probes ",
              probes.sizes(), ", got ", psi_in.sizes());
  const Net n{weights, biases, gates, shifts, betas, act, preact};
  const int64_t L = n.layers();
  const int64_t P = probes.size(0);
  const at::Tensor x = x_in.contiguous();

  // primal and tangent (along psi) passes, keeping only each layer's input before its
  // activation and its tangents (and, with gates, the pre-gate outputs): the reverse pass
  // recomputes the rest layer by layer and drops what it has used, so that it holds little at
  // once.
  std::vector<at::Tensor> z_act(L), u_pre(L), tz_act(L), tu_pre(L), Wg(L);
  const at::Tensor psi = psi_in.contiguous().view({P * B, D});
  at::Tensor h = x;
  at::Tensor t = psi;
  for (int64_t l = 0; l < L; ++l) {
    z_act[l] = h;  // the activation's input, or the layer's input where it has none
    tz_act[l] = t;
    if (n.has_act(l)) {
      auto hd = act_value_deriv(n, l, h);
      h = std::move(hd.first);
      t = per_sample_mul(t, P, hd.second);
    }
    if (n.folds(l)) {  // the gate's gradient then comes from the weight-gradient product
      at::Tensor bias;
      std::tie(Wg[l], bias) = n.folded(l);
      h = affine(h, Wg[l], bias);
      t = at::mm(t, Wg[l].t());
      continue;
    }
    h = n.linear(l, h);
    t = at::mm(t, weights[l].t());
    if (!gates.empty()) {
      u_pre[l] = h;
      tu_pre[l] = t;
      h = h * gates[l];
      t = per_sample_mul(t, P, gates[l]);
    }
    if (!shifts.empty()) {
      h = h + shifts[l];
    }
  }
  if (value != nullptr) {
    *value = h;
  }
  if (tangent_dot != nullptr) {
    *tangent_dot = (t * probes.contiguous().view({P * B, D})).view({P, B, D}).sum(at::IntArrayRef{0, 2});
    if (P > 1) {
      tangent_dot->div_(static_cast<double>(P));
    }
  }
  h = at::Tensor();
  t = at::Tensor();

  std::vector<at::Tensor> gW(L), gb(biases.empty() ? 0 : L), gg(gates.empty() ? 0 : L),
      gs(shifts.empty() ? 0 : L), gbeta;
  at::Tensor zbar = grad_out_in.contiguous();
  at::Tensor tbar = (probes.contiguous() * (grad_trace.to(x.scalar_type()) / P).view({1, B, 1}))
                        .view({P * B, D});
  // the layer's input and its tangent, recomputed from the activation's input
  auto layer_input = [&](int64_t l) -> std::pair<at::Tensor, at::Tensor> {
    if (!n.has_act(l)) {
      return {z_act[l], tz_act[l]};
    }
    auto hd = act_value_deriv(n, l, z_act[l]);
    return {std::move(hd.first), per_sample_mul(tz_act[l], P, hd.second)};
  };
  for (int64_t l = L - 1; l >= 0; --l) {
    const int64_t out = weights[l].size(0);
    if (!shifts.empty()) {
      gs[l] = zbar.sum_to_size(shifts[l].sizes());
    }
    at::Tensor hbar, thbar;  // the gradients w.r.t. the layer's input and its tangent
    if (Wg[l].defined()) {
      // out = (W h + b) * g + s, tangent (W t) * g, g shared by the batch. With
      // M = zbar^T h + tbar^T t: dW = diag(g) M, dg = rowsum(W * M) + b * colsum(zbar),
      // db = g * colsum(zbar), and the input's gradients go through diag(g) W.
      auto [h_in, t_in] = layer_input(l);
      const at::Tensor M = at::addmm(at::mm(zbar.t(), h_in), tbar.t(), t_in);
      h_in = t_in = at::Tensor();
      const at::Tensor g = gates[l].reshape({out});
      const at::Tensor zsum = zbar.sum(0);
      gW[l] = M * g.view({out, 1});
      at::Tensor dg = (M * weights[l]).sum(1);
      if (!biases.empty()) {
        gb[l] = zsum * g;
        dg.addcmul_(biases[l], zsum);
      }
      gg[l] = dg.view(gates[l].sizes());
      hbar = at::mm(zbar, Wg[l]);
      thbar = at::mm(tbar, Wg[l]);
      zbar = tbar = Wg[l] = at::Tensor();
    } else {
      at::Tensor ubar = zbar, tubar = tbar;
      if (!gates.empty()) {
        const at::Tensor cross = (tbar.view({P, B, out}) * tu_pre[l].view({P, B, out})).sum(0);
        gg[l] = (zbar * u_pre[l] + cross).sum_to_size(gates[l].sizes());
        ubar = zbar * gates[l];
        tubar = per_sample_mul(tbar, P, gates[l]);
        u_pre[l] = tu_pre[l] = at::Tensor();
      }
      zbar = tbar = at::Tensor();
      if (!biases.empty()) {
        gb[l] = ubar.sum(0);
      }
      auto [h_in, t_in] = layer_input(l);
      gW[l] = at::addmm(at::mm(ubar.t(), h_in), tubar.t(), t_in);
      h_in = t_in = at::Tensor();
      hbar = at::mm(ubar, weights[l]);
      thbar = at::mm(tubar, weights[l]);
    }
    if (n.has_act(l)) {
      std::tie(zbar, tbar) = act_backward(n, l, z_act[l], hbar, thbar, tz_act[l], P, gbeta);
    } else {
      zbar = std::move(hbar);
      tbar = std::move(thbar);
    }
    z_act[l] = tz_act[l] = at::Tensor();
  }
  at::Tensor grad_betas;
  if (gbeta.empty()) {
    grad_betas = at::zeros_like(betas);
  } else {
    std::reverse(gbeta.begin(), gbeta.end());
    grad_betas = at::stack(gbeta);
  }
  return {zbar, gW, gb, gg, gs, grad_betas};
}

void check_fixed_point_args(const at::Tensor& y, at::TensorList weights, at::TensorList biases,
                            const at::Tensor& betas, int64_t act, bool preact, double tol,
                            int64_t max_iter) {
  check_mlp_args(y, "y", weights, biases, {}, {}, betas, act, preact);
  TORCH_CHECK(std::isfinite(tol) && tol > 0, "fastflow: tol must be positive and finite, got ",
              tol);
  TORCH_CHECK(max_iter >= 1, "fastflow: max_iter must be >= 1, got ", max_iter);
}

namespace {

void mlp_trace_check_cpu(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), "fastflow: x must be a CPU tensor for the CPU kernel, got ",
              x.device());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mlp_trace_forward_cpu(
    const at::Tensor& x, at::TensorList weights, at::TensorList biases, at::TensorList gates,
    at::TensorList shifts, const at::Tensor& betas, int64_t act, bool preact,
    const at::Tensor& probes, at::ArrayRef<double> value_coeffs,
    at::ArrayRef<double> psi_coeffs) {
  mlp_trace_check_cpu(x);
  return mlp_trace_forward_impl(x, weights, biases, gates, shifts, betas, act, preact, probes,
                                value_coeffs, psi_coeffs);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mlp_trace_forward_tensor_coeffs_cpu(
    const at::Tensor& x, at::TensorList weights, at::TensorList biases, at::TensorList gates,
    at::TensorList shifts, const at::Tensor& betas, int64_t act, bool preact,
    const at::Tensor& probes, const at::Tensor& value_coeffs, const at::Tensor& psi_coeffs) {
  mlp_trace_check_cpu(x);
  return mlp_trace_forward_tensor_coeffs_impl(x, weights, biases, gates, shifts, betas, act,
                                              preact, probes, value_coeffs, psi_coeffs);
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
           std::vector<at::Tensor>, at::Tensor>
mlp_trace_backward_cpu(const at::Tensor& grad_out, const at::Tensor& grad_trace,
                       const at::Tensor& x, at::TensorList weights, at::TensorList biases,
                       at::TensorList gates, at::TensorList shifts, const at::Tensor& betas,
                       int64_t act, bool preact, const at::Tensor& probes, const at::Tensor& psi) {
  mlp_trace_check_cpu(x);
  return mlp_trace_backward_impl(grad_out, grad_trace, x, weights, biases, gates, shifts, betas,
                                 act, preact, probes, psi);
}

// Per-sample fixed-point iteration, the working set shrunk to the samples still active after
// every iteration (on the CPU the test costs nothing, and converged samples stop costing work).
std::tuple<at::Tensor, at::Tensor, at::Tensor> mlp_fixed_point_cpu(
    const at::Tensor& y_in, at::TensorList weights, at::TensorList biases,
    const at::Tensor& betas, int64_t act, bool preact, double tol, int64_t max_iter) {
  check_fixed_point_args(y_in, weights, biases, betas, act, preact, tol, max_iter);
  TORCH_CHECK(y_in.device().is_cpu(), "fastflow: y must be a CPU tensor for the CPU kernel, got ",
              y_in.device());
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const at::Tensor y = y_in.contiguous();
  const int64_t B = y.size(0);
  at::Tensor x = y.clone();
  at::Tensor iterations = at::zeros({B}, y.options().dtype(at::kLong));
  at::Tensor residual =
      at::full({B}, std::numeric_limits<double>::infinity(), y.options());
  at::Tensor rows;  // undefined: every sample is active
  at::Tensor xw = y, yw = y, dw = y.abs() + 1;
  for (int64_t it = 1; it <= max_iter && xw.size(0) > 0; ++it) {
    at::Tensor xn = yw - mlp_apply(xw, weights, biases, betas, act, preact);
    at::Tensor r = std::get<0>(((xn - xw).abs() / dw).max(1));
    if (!rows.defined()) {
      x.copy_(xn);
      residual.copy_(r);
      iterations.fill_(it);
    } else {
      x.index_copy_(0, rows, xn);
      residual.index_copy_(0, rows, r);
      iterations.index_fill_(0, rows, it);
    }
    const at::Tensor keep = (r > tol).logical_and_(at::isfinite(r));
    const int64_t n_keep = keep.sum().item<int64_t>();
    if (n_keep == 0) {
      break;
    }
    if (n_keep < xn.size(0)) {
      const at::Tensor sel = keep.nonzero().squeeze(1);
      rows = rows.defined() ? rows.index_select(0, sel) : sel;
      xw = xn.index_select(0, sel);
      yw = yw.index_select(0, sel);
      dw = dw.index_select(0, sel);
    } else {
      xw = xn;
    }
  }
  return {x, iterations, residual};
}


// ---------------------------------------------------------------------------------------------
// Autograd kernel of mlp_trace, for every device (this file is in every build). In C++ rather
// than through torch.library.register_autograd: the Python autograd kernel of an operator with
// tensor-list arguments cost about 1 ms per training step of a residual block (of ~8 ms), and
// FFJORD calls the operator once per function evaluation of its ODE solves.

template <typename Sig>
c10::TypedOperatorHandle<Sig> find_op(const char* name, const char* overload = "") {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, overload).typed<Sig>();
}

// Coeffs: at::ArrayRef<double> (mlp_trace) or const at::Tensor& (mlp_trace.tensor_coeffs).
template <typename Coeffs>
using TraceSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, at::TensorList, at::TensorList, at::TensorList, at::TensorList,
    const at::Tensor&, int64_t, bool, const at::Tensor&, Coeffs, Coeffs);

template <typename Coeffs>
constexpr const char* trace_overload() {
  return std::is_same_v<Coeffs, at::ArrayRef<double>> ? "" : "tensor_coeffs";
}
using TraceBackwardSig =
    std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>,
               std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor>(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, at::TensorList, at::TensorList,
        at::TensorList, at::TensorList, const at::Tensor&, int64_t, bool, const at::Tensor&,
        const at::Tensor&);

// The backward does not read the coefficients (psi is saved), so both overloads share it.
template <typename Coeffs>
class MlpTrace : public torch::autograd::Function<MlpTrace<Coeffs>> {
 public:
  static torch::autograd::variable_list forward(
      torch::autograd::AutogradContext* ctx, const at::Tensor& x, at::TensorList weights,
      at::TensorList biases, at::TensorList gates, at::TensorList shifts, const at::Tensor& betas,
      int64_t act, bool preact, const at::Tensor& probes, Coeffs value_coeffs,
      Coeffs psi_coeffs) {
    static const auto op =
        find_op<TraceSig<Coeffs>>("fastflow::mlp_trace", trace_overload<Coeffs>());
    at::Tensor out, trace, psi;
    {
      const at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(out, trace, psi) = op.call(x, weights, biases, gates, shifts, betas, act, preact,
                                          probes, value_coeffs, psi_coeffs);
    }
    std::vector<at::Tensor> saved{x};
    saved.insert(saved.end(), weights.begin(), weights.end());
    saved.insert(saved.end(), biases.begin(), biases.end());
    saved.insert(saved.end(), gates.begin(), gates.end());
    saved.insert(saved.end(), shifts.begin(), shifts.end());
    saved.push_back(betas);
    saved.push_back(probes);
    saved.push_back(psi);
    ctx->save_for_backward(saved);
    ctx->saved_data["n"] = std::vector<int64_t>{
        static_cast<int64_t>(weights.size()), static_cast<int64_t>(biases.size()),
        static_cast<int64_t>(gates.size()), static_cast<int64_t>(shifts.size())};
    ctx->saved_data["act"] = act;
    ctx->saved_data["preact"] = preact;
    ctx->mark_non_differentiable({psi});
    return {out, trace, psi};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    static const auto op = find_op<TraceBackwardSig>("fastflow::mlp_trace_backward");
    const auto saved = ctx->get_saved_variables();
    const auto n = ctx->saved_data["n"].toIntVector();
    const int64_t act = ctx->saved_data["act"].toInt();
    const bool preact = ctx->saved_data["preact"].toBool();
    size_t pos = 0;
    const at::Tensor& x = saved[pos++];
    auto take = [&](int64_t count) {
      std::vector<at::Tensor> list(saved.begin() + pos, saved.begin() + pos + count);
      pos += count;
      return list;
    };
    const auto weights = take(n[0]), biases = take(n[1]), gates = take(n[2]), shifts = take(n[3]);
    const at::Tensor& betas = saved[pos++];
    const at::Tensor& probes = saved[pos++];
    const at::Tensor& psi = saved[pos++];
    at::Tensor grad_out = grads[0], grad_trace = grads[1];
    if (!grad_out.defined()) {
      grad_out = at::zeros_like(x);
    }
    if (!grad_trace.defined()) {
      grad_trace = at::zeros({x.size(0)}, x.options());
    }
    auto [gx, gw, gb, gg, gs, gbeta] =
        op.call(grad_out, grad_trace, x, weights, biases, gates, shifts, betas, act, preact,
                probes, psi);
    // one gradient per input, list inputs flattened, none for the non-tensor arguments
    torch::autograd::variable_list result{gx};
    result.insert(result.end(), gw.begin(), gw.end());
    result.insert(result.end(), gb.begin(), gb.end());
    result.insert(result.end(), gg.begin(), gg.end());
    result.insert(result.end(), gs.begin(), gs.end());
    result.push_back(gbeta);
    result.push_back(at::Tensor());  // act
    result.push_back(at::Tensor());  // preact
    result.push_back(at::Tensor());  // probes (constants)
    result.push_back(at::Tensor());  // value_coeffs
    result.push_back(at::Tensor());  // psi_coeffs
    return result;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> mlp_trace_autograd(
    const at::Tensor& x, at::TensorList weights, at::TensorList biases, at::TensorList gates,
    at::TensorList shifts, const at::Tensor& betas, int64_t act, bool preact,
    const at::Tensor& probes, at::ArrayRef<double> value_coeffs,
    at::ArrayRef<double> psi_coeffs) {
  auto out = MlpTrace<at::ArrayRef<double>>::apply(x, weights, biases, gates, shifts, betas, act,
                                                   preact, probes, value_coeffs, psi_coeffs);
  return {out[0], out[1], out[2]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mlp_trace_tensor_coeffs_autograd(
    const at::Tensor& x, at::TensorList weights, at::TensorList biases, at::TensorList gates,
    at::TensorList shifts, const at::Tensor& betas, int64_t act, bool preact,
    const at::Tensor& probes, const at::Tensor& value_coeffs, const at::Tensor& psi_coeffs) {
  auto out = MlpTrace<const at::Tensor&>::apply(x, weights, biases, gates, shifts, betas, act,
                                                preact, probes, value_coeffs, psi_coeffs);
  return {out[0], out[1], out[2]};
}

// The fixed-point solve has no gradient (its implicit-function gradient is taken through g by
// the caller): step below autograd.
std::tuple<at::Tensor, at::Tensor, at::Tensor> mlp_fixed_point_autograd(
    const at::Tensor& y, at::TensorList weights, at::TensorList biases, const at::Tensor& betas,
    int64_t act, bool preact, double tol, int64_t max_iter) {
  static const auto op =
      find_op<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
          const at::Tensor&, at::TensorList, at::TensorList, const at::Tensor&, int64_t, bool,
          double, int64_t)>("fastflow::mlp_fixed_point");
  const at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(y, weights, biases, betas, act, preact, tol, max_iter);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastflow, Autograd, m) {
  m.impl("mlp_trace", &mlp_trace_autograd);
  m.impl("mlp_trace.tensor_coeffs", &mlp_trace_tensor_coeffs_autograd);
  m.impl("mlp_fixed_point", &mlp_fixed_point_autograd);
}

TORCH_LIBRARY_IMPL(fastflow, CPU, m) {
  m.impl("mlp_trace", &mlp_trace_forward_cpu);
  m.impl("mlp_trace.tensor_coeffs", &mlp_trace_forward_tensor_coeffs_cpu);
  m.impl("mlp_trace_backward", &mlp_trace_backward_cpu);
  m.impl("mlp_fixed_point", &mlp_fixed_point_cpu);
}

}  // namespace fastflow
