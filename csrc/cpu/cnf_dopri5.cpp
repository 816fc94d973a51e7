// The CNF solve operators (fastflow/cnf_dopri5.h): a whole dopri5 solve of FFJORD's augmented
// state for a concat-squash MLP, and its adjoint solve, in one operator call each.
//
// Per function evaluation the work is the MLP trace pass of csrc/cpu/mlp_trace.cpp (GEMMs and
// fused activation sweeps); what this operator removes is everything around it in the
// reference (torchdiffeq's Python loop: a dozen small tensor operations per stage over tuples
// of tensors, the gates computed layer by layer in Python, and in the adjoint an autograd graph
// of the gates per evaluation and one tensor per parameter in every Runge-Kutta combination).
// Here the state is one flat vector, the gates of all layers are two elementwise operations,
// and the adjoint's evaluation is one fused backward pass (mlp_trace_backward_impl, which also
// returns f and the trace from its own primal and tangent passes).
//
// The step control is torchdiffeq's dopri5 (so that native and reference solves take the same
// steps and count the same evaluations): the first step of Hairer, Norsett and Wanner (II.4),
// the error ratio as the maximum over the state's parts of the RMS of
// err / (atol + rtol max(|y0|, |y1|)), the step factor min(10, max(0.9 ratio^(-1/5), 0.2 on a
// rejection)), and the value at the end time from the 4th-order dense output of the step that
// passes it. The code is written once in ATen calls and runs on every device (the CUDA
// registration in csrc/cuda/cnf_dopri5.cu calls the same functions); the host reads one error
// ratio per step.
#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <utility>

#include "fastflow/cnf_dopri5.h"
#include "fastflow/mlp_trace.h"

namespace fastflow {
namespace {

// Dormand-Prince 5(4): nodes, stage weights (the 6th row is the 5th-order solution, so the last
// stage's input is the step's result and its derivative the next step's first), the error
// weights (5th minus 4th order) and the dense-output midpoint weights (Shampine).
constexpr double kAlpha[6] = {1.0 / 5, 3.0 / 10, 4.0 / 5, 8.0 / 9, 1.0, 1.0};
constexpr double kBeta[6][6] = {
    {1.0 / 5},
    {3.0 / 40, 9.0 / 40},
    {44.0 / 45, -56.0 / 15, 32.0 / 9},
    {19372.0 / 6561, -25360.0 / 2187, 64448.0 / 6561, -212.0 / 729},
    {9017.0 / 3168, -355.0 / 33, 46732.0 / 5247, 49.0 / 176, -5103.0 / 18656},
    {35.0 / 384, 0.0, 500.0 / 1113, 125.0 / 192, -2187.0 / 6784, 11.0 / 84},
};
constexpr double kErr[7] = {
    35.0 / 384 - 1951.0 / 21600, 0.0, 500.0 / 1113 - 22642.0 / 50085,
    125.0 / 192 - 451.0 / 720,   -2187.0 / 6784 + 12231.0 / 42400, 11.0 / 84 - 649.0 / 6300,
    -1.0 / 60,
};
constexpr double kMid[7] = {
    6025192743.0 / 30085553152.0 / 2,   0.0,
    51252292925.0 / 65400821598.0 / 2,  -2691868925.0 / 45128329728.0 / 2,
    187940372067.0 / 1594534317056.0 / 2, -1776094331.0 / 19743644256.0 / 2,
    11237099.0 / 235043384.0 / 2,
};

// The mixed RMS norm: the state is a flat vector of parts (offset, length); the norm is the
// largest part's root mean square. Elements from `counted` on are not in the norm.
class MixedNorm {
 public:
  MixedNorm(const std::vector<std::pair<int64_t, int64_t>>& parts, const at::TensorOptions& opt) {
    int64_t total = 0;
    std::vector<int64_t> ids;
    std::vector<double> inv;
    for (size_t i = 0; i < parts.size(); ++i) {
      TORCH_INTERNAL_ASSERT(parts[i].first == total && parts[i].second > 0);
      ids.insert(ids.end(), parts[i].second, static_cast<int64_t>(i));
      inv.push_back(1.0 / static_cast<double>(parts[i].second));
      total += parts[i].second;
    }
    counted_ = total;
    ids_ = at::tensor(ids, opt.dtype(at::kLong));
    inv_count_ = at::tensor(inv, opt.dtype(at::kDouble)).to(opt.dtype());
  }

  double operator()(const at::Tensor& v) const {
    const at::Tensor sq = v.narrow(0, 0, counted_).square();
    const at::Tensor sums = at::zeros({inv_count_.size(0)}, v.options()).index_add_(0, ids_, sq);
    return sums.mul_(inv_count_).sqrt_().max().item<double>();
  }

 private:
  int64_t counted_ = 0;
  at::Tensor ids_, inv_count_;
};

// dst = src * c, into a view of the stage matrix.
void scaled_into(const at::Tensor& dst, const at::Tensor& src, double c) {
  at::Tensor d = dst;
  at::mul_out(d, src, c);
}

// dy/dtau = F(tau, y), written into `out` (a row of the stage matrix).
using Dynamics = std::function<void(double tau, const at::Tensor& y, const at::Tensor& out)>;

double next_step(double dt, double ratio) {
  if (ratio == 0.0) {
    return dt * 10.0;
  }
  const double shrink = ratio < 1.0 ? 1.0 : 0.2;
  return dt * std::min(10.0, std::max(0.9 / std::pow(ratio, 1.0 / 5.0), shrink));
}

// y(tau1) from y(tau0) = y0 (tau1 > tau0); counts evaluations of F in nfe.
at::Tensor dopri5(const Dynamics& F, const at::Tensor& y0, double tau0, double tau1, double rtol,
                  double atol, const MixedNorm& norm, int64_t max_steps, int64_t& nfe,
                  const char* what) {
  const int64_t N = y0.numel();
  at::Tensor K = at::empty({7, N}, y0.options());
  F(tau0, y0, K[0]);
  ++nfe;
  double h;
  {  // first step
    const at::Tensor scale = y0.abs().mul_(rtol).add_(atol);
    const double d0 = norm(y0 / scale), d1 = norm(K[0] / scale);
    const double h0 = (d0 < 1e-5 || d1 < 1e-5) ? 1e-6 : 0.01 * d0 / d1;
    at::Tensor f1 = at::empty_like(y0);
    F(tau0 + h0, at::add(y0, K[0], h0), f1);
    ++nfe;
    const double d2 = norm(f1.sub_(K[0]).div_(scale)) / h0;
    const double h1 = (d1 <= 1e-15 && d2 <= 1e-15) ? std::max(1e-6, h0 * 1e-3)
                                                   : std::pow(0.01 / std::max(d1, d2), 1.0 / 5.0);
    h = std::min(100.0 * h0, h1);
  }
  double t = tau0;
  at::Tensor y = y0, out;
  for (int64_t steps = 0; tau1 > t; ++steps) {
    TORCH_CHECK(steps < max_steps, "fastflow: ", what, ": more than max_steps = ", max_steps,
                " dopri5 steps (t = ", t, " of [", tau0, ", ", tau1, "])");
    TORCH_CHECK(std::isfinite(h) && t + h > t, "fastflow: ", what,
                ": the step size underflowed or is not finite at t = ", t,
                " (the dynamics or the state became non-finite, or the tolerances are too tight)");
    const double dt = h;
    at::Tensor y1;
    for (int i = 0; i < 6; ++i) {
      at::Tensor yi = y.clone();
      for (int j = 0; j <= i; ++j) {
        if (kBeta[i][j] != 0.0) {
          yi.add_(K[j], kBeta[i][j] * dt);
        }
      }
      F(kAlpha[i] == 1.0 ? t + dt : t + kAlpha[i] * dt, yi, K[i + 1]);
      ++nfe;
      y1 = std::move(yi);
    }
    at::Tensor err = K[0] * (kErr[0] * dt);
    for (int j = 2; j < 7; ++j) {
      err.add_(K[j], kErr[j] * dt);
    }
    const at::Tensor tol = at::maximum(y.abs(), y1.abs()).mul_(rtol).add_(atol);
    const double ratio = norm(err.div_(tol));
    if (ratio <= 1.0) {
      const double t_prev = t;
      t = t + dt;
      if (!(tau1 > t)) {
        // dense output at tau1: the quartic through y, y1, the midpoint value and the two
        // derivatives (torchdiffeq's interp_fit / interp_evaluate, expanded)
        const double x = (tau1 - t_prev) / (t - t_prev);
        const double x2 = x * x, x3 = x2 * x, x4 = x3 * x;
        const double c_mid = 16 * x2 - 32 * x3 + 16 * x4;
        const double c_y0 = 1 - 11 * x2 + 18 * x3 - 8 * x4 + c_mid;
        const double c_y1 = -5 * x2 + 14 * x3 - 8 * x4;
        const double c_f0 = x - 4 * x2 + 5 * x3 - 2 * x4;
        const double c_f1 = x2 - 3 * x3 + 2 * x4;
        out = y * c_y0;
        out.add_(y1, c_y1);
        for (int j = 0; j < 7; ++j) {
          const double c = dt * (c_mid * kMid[j] + (j == 0 ? c_f0 : 0.0) + (j == 6 ? c_f1 : 0.0));
          if (c != 0.0) {
            out.add_(K[j], c);
          }
        }
      }
      y = std::move(y1);
      K[0].copy_(K[6]);
    }
    h = next_step(dt, ratio);
  }
  return out;
}

// The network's tensors, checked, and its time conditioning.
struct Net {
  std::vector<at::Tensor> W, b;
  at::Tensor gw, gb, sw;  // every layer's gate weights, gate biases, shift weights, concatenated
  std::vector<int64_t> outs;
  at::Tensor betas, probe;  // betas empty (no LipSwish); probes [P, B, D]
  double P = 1.0;            // the divergence is the sum over the probes
  int64_t act = 0;
  double T = 0.0;

  // the layers' gates sigmoid(gW t + gb) and shifts sW t as [1, out] rows, and their
  // concatenations
  void at_time(double t, std::vector<at::Tensor>& gates, std::vector<at::Tensor>& shifts,
               at::Tensor& gate_cat, at::Tensor& shift_cat) const {
    gate_cat = at::add(gb, gw, t).sigmoid_();
    shift_cat = sw * t;
    gates.clear();
    shifts.clear();
    int64_t off = 0;
    for (const int64_t o : outs) {
      gates.push_back(gate_cat.narrow(0, off, o).view({1, o}));
      shifts.push_back(shift_cat.narrow(0, off, o).view({1, o}));
      off += o;
    }
  }
};

void check_like(const at::Tensor& t, const at::Tensor& z, const char* name, int64_t l) {
  TORCH_CHECK(t.scalar_type() == z.scalar_type() && t.device() == z.device(), "fastflow: ", name,
              "[", l, "] must have the dtype and device of z (", z.scalar_type(), ", ", z.device(),
              "), got ", t.scalar_type(), ", ", t.device());
}

Net make_net(const at::Tensor& z, at::TensorList weights, at::TensorList biases,
             at::TensorList gate_weights, at::TensorList gate_biases,
             at::TensorList shift_weights, const at::Tensor& end_time, int64_t act,
             const at::Tensor& probe, double rtol, double atol, int64_t end_time_norm,
             int64_t max_steps) {
  TORCH_CHECK(z.dim() == 2, "fastflow: z must have shape [batch, features], got ", z.sizes());
  TORCH_CHECK(z.scalar_type() == at::kFloat || z.scalar_type() == at::kDouble,
              "fastflow: z must be float32 or float64, got ", z.scalar_type());
  const int64_t L = static_cast<int64_t>(weights.size());
  TORCH_CHECK(L >= 1, "fastflow: weights must hold at least one layer");
  TORCH_CHECK(static_cast<int64_t>(biases.size()) == L &&
                  static_cast<int64_t>(gate_weights.size()) == L &&
                  static_cast<int64_t>(gate_biases.size()) == L &&
                  static_cast<int64_t>(shift_weights.size()) == L,
              "fastflow: biases, gate_weights, gate_biases and shift_weights must have one "
              "tensor per layer (", L, "), got ", biases.size(), ", ", gate_weights.size(), ", ",
              gate_biases.size(), ", ", shift_weights.size());
  TORCH_CHECK(act == kActTanh || act == kActSoftplus,
              "fastflow: act must be tanh (3) or softplus (4) (ODEnet's), got ", act);
  TORCH_CHECK(std::isfinite(rtol) && rtol > 0, "fastflow: rtol must be positive, got ", rtol);
  TORCH_CHECK(std::isfinite(atol) && atol > 0, "fastflow: atol must be positive, got ", atol);
  TORCH_CHECK(end_time_norm >= 0 && end_time_norm <= 2,
              "fastflow: end_time_norm must be 0 (none), 1 (T) or 2 (sqrt T), got ", end_time_norm);
  TORCH_CHECK(max_steps >= 1, "fastflow: max_steps must be >= 1, got ", max_steps);
  TORCH_CHECK(end_time.numel() == 1, "fastflow: end_time must have one element, got shape ",
              end_time.sizes());
  const int64_t B = z.size(0), D = z.size(1);
  TORCH_CHECK(D >= 1, "fastflow: z must have at least one feature, got shape ", z.sizes());
  TORCH_CHECK(probe.sizes() == z.sizes() || (probe.dim() == 3 && probe.size(0) >= 1 &&
                                              probe.size(1) == B && probe.size(2) == D),
              "fastflow: probe must have the shape of z ", z.sizes(), " or [n_probes, ", B, ", ",
              D, "], got ", probe.sizes());
  check_like(probe, z, "probe", 0);
  Net n;
  n.act = act;
  n.T = end_time.item<double>();
  TORCH_CHECK(std::isfinite(n.T), "fastflow: end_time must be finite, got ", n.T);
  int64_t width = D;
  std::vector<at::Tensor> gw, gb, sw;
  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor& w = weights[l];
    check_like(w, z, "weights", l);
    TORCH_CHECK(w.dim() == 2 && w.size(1) == width, "fastflow: weights[", l,
                "] must have shape [out, ", width, "], got ", w.sizes());
    const int64_t o = w.size(0);
    TORCH_CHECK(l + 1 < L || o == D, "fastflow: the last layer must have ", D,
                " outputs (the width of z), got ", o);
    check_like(biases[l], z, "biases", l);
    check_like(gate_weights[l], z, "gate_weights", l);
    check_like(gate_biases[l], z, "gate_biases", l);
    check_like(shift_weights[l], z, "shift_weights", l);
    TORCH_CHECK(biases[l].dim() == 1 && biases[l].size(0) == o, "fastflow: biases[", l,
                "] must have shape [", o, "], got ", biases[l].sizes());
    TORCH_CHECK(gate_weights[l].dim() == 2 && gate_weights[l].size(0) == o &&
                    gate_weights[l].size(1) == 1,
                "fastflow: gate_weights[", l, "] must have shape [", o, ", 1], got ",
                gate_weights[l].sizes());
    TORCH_CHECK(gate_biases[l].dim() == 1 && gate_biases[l].size(0) == o, "fastflow: gate_biases[",
                l, "] must have shape [", o, "], got ", gate_biases[l].sizes());
    TORCH_CHECK(shift_weights[l].dim() == 2 && shift_weights[l].size(0) == o &&
                    shift_weights[l].size(1) == 1,
                "fastflow: shift_weights[", l, "] must have shape [", o, ", 1], got ",
                shift_weights[l].sizes());
    n.W.push_back(w.contiguous());
    n.b.push_back(biases[l].contiguous());
    gw.push_back(gate_weights[l].reshape({o}));
    gb.push_back(gate_biases[l]);
    sw.push_back(shift_weights[l].reshape({o}));
    n.outs.push_back(o);
    width = o;
  }
  n.gw = at::cat(gw);
  n.gb = at::cat(gb);
  n.sw = at::cat(sw);
  n.betas = at::empty({0}, z.options());
  n.probe = probe.dim() == 3 ? probe.contiguous() : probe.contiguous().view({1, B, D});
  n.P = static_cast<double>(n.probe.size(0));
  if (B > 0) {
    TORCH_CHECK(at::isfinite(z).all().item<bool>(),
                "fastflow: z has non-finite values (NaN or inf); the ODE solve needs finite input");
  }
  return n;
}

at::Tensor nfe_tensor(int64_t nfe) { return at::scalar_tensor(nfe, at::dtype(at::kLong)); }

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> cnf_dopri5_forward(
    const at::Tensor& z, at::TensorList weights, at::TensorList biases,
    at::TensorList gate_weights, at::TensorList gate_biases, at::TensorList shift_weights,
    const at::Tensor& end_time, int64_t act, const at::Tensor& probe, bool reverse, double rtol,
    double atol, int64_t end_time_norm, int64_t max_steps) {
  // the arithmetic runs in z's dtype even inside torch.autocast
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const Net n = make_net(z, weights, biases, gate_weights, gate_biases, shift_weights, end_time,
                         act, probe, rtol, atol, end_time_norm, max_steps);
  const int64_t B = z.size(0), D = z.size(1), BD = B * D;
  if (B == 0) {
    return {z.clone(), at::zeros({0}, z.options()), nfe_tensor(0)};
  }
  // normalised time s = sigma tau, tau increasing over [tau0, tau0 + 1]
  const double sigma = reverse ? -1.0 : 1.0, tau0 = reverse ? -1.0 : 0.0;
  std::vector<at::Tensor> gates, shifts;
  at::Tensor gate_cat, shift_cat;
  const Dynamics F = [&](double tau, const at::Tensor& y, const at::Tensor& out) {
    const double s = sigma * tau;
    n.at_time(s * n.T, gates, shifts, gate_cat, shift_cat);
    auto [f, trace, psi] =
        mlp_trace_forward_impl(y.narrow(0, 0, BD).view({B, D}), n.W, n.b, gates, shifts, n.betas,
                               n.act, false, n.probe, {1.0}, {});
    scaled_into(out.narrow(0, 0, BD), f.view({BD}), sigma * n.T);
    scaled_into(out.narrow(0, BD, B), trace, sigma * n.T * n.P);  // (trace: the probes' mean)
  };
  const at::Tensor y0 = at::cat({z.reshape({BD}), at::zeros({B}, z.options())});
  const MixedNorm norm({{0, BD}, {BD, B}}, z.options());
  int64_t nfe = 0;
  const at::Tensor y1 =
      dopri5(F, y0, tau0, tau0 + 1.0, rtol, atol, norm, max_steps, nfe, "cnf_dopri5");
  return {y1.narrow(0, 0, BD).view({B, D}).clone(), y1.narrow(0, BD, B).clone(), nfe_tensor(nfe)};
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
           std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor, at::Tensor>
cnf_dopri5_adjoint(const at::Tensor& grad_z, const at::Tensor& grad_logdet,
                   const at::Tensor& z_out, const at::Tensor& logdet, at::TensorList weights,
                   at::TensorList biases, at::TensorList gate_weights, at::TensorList gate_biases,
                   at::TensorList shift_weights, const at::Tensor& end_time, int64_t act,
                   const at::Tensor& probe, bool reverse, double rtol, double atol,
                   int64_t end_time_norm, int64_t max_steps) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const Net n = make_net(z_out, weights, biases, gate_weights, gate_biases, shift_weights,
                         end_time, act, probe, rtol, atol, end_time_norm, max_steps);
  const int64_t B = z_out.size(0), D = z_out.size(1), BD = B * D;
  TORCH_CHECK(grad_z.sizes() == z_out.sizes(), "fastflow: grad_z must have shape ",
              z_out.sizes(), ", got ", grad_z.sizes());
  TORCH_CHECK(grad_logdet.dim() == 1 && grad_logdet.size(0) == B && logdet.dim() == 1 &&
                  logdet.size(0) == B,
              "fastflow: grad_logdet and logdet must have shape [", B, "], got ",
              grad_logdet.sizes(), " and ", logdet.sizes());
  const int64_t L = static_cast<int64_t>(n.W.size());

  // state: [z | a | lambda (adjoint of z) | mu (of a) | W_l, b_l per layer | gate weights |
  // gate biases | shift weights | end time]; every parameter is a part of the norm of its own
  std::vector<std::pair<int64_t, int64_t>> parts{{0, BD}, {BD, B}, {BD + B, BD}, {2 * BD + B, B}};
  int64_t off = 2 * BD + 2 * B;
  std::vector<int64_t> w_off(L), b_off(L);
  for (int64_t l = 0; l < L; ++l) {
    w_off[l] = off;
    parts.emplace_back(off, n.W[l].numel());
    off += n.W[l].numel();
    b_off[l] = off;
    parts.emplace_back(off, n.outs[l]);
    off += n.outs[l];
  }
  const int64_t H = n.gw.numel();
  const int64_t gw_off = off, gb_off = off + H, sw_off = off + 2 * H, s_off = off + 3 * H,
                t_off = s_off + 1;
  for (int64_t block = 0; block < 3; ++block) {
    for (int64_t l = 0; l < L; ++l) {
      parts.emplace_back(off, n.outs[l]);
      off += n.outs[l];
    }
  }
  parts.emplace_back(s_off, 1);  // the time's adjoint
  // the end time's adjoint in the norm: as T's (1), or as that of the parameter sqrt(T) (2),
  // which is 2 sqrt(T) times T's; integrated in that scale
  const double root_scale = 2.0 * std::sqrt(std::abs(n.T));
  const bool t_in_norm = end_time_norm == 1 || (end_time_norm == 2 && root_scale > 0);
  const double t_scale = end_time_norm == 2 && t_in_norm ? root_scale : 1.0;
  if (t_in_norm) {
    parts.emplace_back(t_off, 1);
  }
  const int64_t N = t_off + 1;
  const at::TensorOptions opt = z_out.options();

  auto results = [&](const at::Tensor& y) {
    std::vector<at::Tensor> gW, gb, ggw, ggb, gsw;
    int64_t o = 0;
    for (int64_t l = 0; l < L; ++l) {
      gW.push_back(y.narrow(0, w_off[l], n.W[l].numel()).view(n.W[l].sizes()).clone());
      gb.push_back(y.narrow(0, b_off[l], n.outs[l]).clone());
      ggw.push_back(y.narrow(0, gw_off + o, n.outs[l]).view({n.outs[l], 1}).clone());
      ggb.push_back(y.narrow(0, gb_off + o, n.outs[l]).clone());
      gsw.push_back(y.narrow(0, sw_off + o, n.outs[l]).view({n.outs[l], 1}).clone());
      o += n.outs[l];
    }
    at::Tensor g_end = (y.narrow(0, t_off, 1) / t_scale).to(end_time.scalar_type());
    return std::make_tuple(y.narrow(0, BD + B, BD).view({B, D}).clone(), gW, gb, ggw, ggb, gsw,
                           g_end.reshape(end_time.sizes()), at::Tensor());
  };
  if (B == 0) {
    auto r = results(at::zeros({N}, opt));
    std::get<7>(r) = nfe_tensor(0);
    return r;
  }

  // adjoint time runs against the forward solve's
  const double sigma = reverse ? 1.0 : -1.0, tau0 = reverse ? 0.0 : -1.0;
  std::vector<at::Tensor> gates, shifts;
  at::Tensor gate_cat, shift_cat;
  const Dynamics G = [&](double tau, const at::Tensor& y, const at::Tensor& out) {
    const double s = sigma * tau, t = s * n.T;
    n.at_time(t, gates, shifts, gate_cat, shift_cat);
    const at::Tensor zv = y.narrow(0, 0, BD).view({B, D});
    const at::Tensor lam = y.narrow(0, BD + B, BD).view({B, D});
    const at::Tensor mu = y.narrow(0, 2 * BD + B, B);
    at::Tensor value, trace;
    // gradients of <-T lam, f> + <-T mu, trace> (the adjoint's -a^T dF/d(.)), with f and the
    // trace from the same passes
    auto [gx, gW, gb, gg, gs, gbeta] =
        mlp_trace_backward_impl(lam * (-n.T), mu * (-n.T * n.P), zv, n.W, n.b, gates, shifts,
                                n.betas, n.act, false, n.probe, n.probe, &value, &trace);
    trace.mul_(n.P);  // the probes' sum
    scaled_into(out.narrow(0, 0, BD), value.view({BD}), sigma * n.T);
    scaled_into(out.narrow(0, BD, B), trace, sigma * n.T);
    scaled_into(out.narrow(0, BD + B, BD), gx.view({BD}), sigma);
    out.narrow(0, 2 * BD + B, B).zero_();
    for (int64_t l = 0; l < L; ++l) {
      scaled_into(out.narrow(0, w_off[l], n.W[l].numel()), gW[l].view({-1}), sigma);
      scaled_into(out.narrow(0, b_off[l], n.outs[l]), gb[l], sigma);
    }
    // through the gates' sigmoid and the time products
    for (int64_t l = 0; l < L; ++l) {
      gg[l] = gg[l].view({-1});
      gs[l] = gs[l].view({-1});
    }
    const at::Tensor dpre = at::cat(gg).mul_(gate_cat).mul_(1.0 - gate_cat);
    const at::Tensor gshift = at::cat(gs);
    scaled_into(out.narrow(0, gw_off, H), dpre, sigma * t);
    scaled_into(out.narrow(0, gb_off, H), dpre, sigma);
    scaled_into(out.narrow(0, sw_off, H), gshift, sigma * t);
    // q = -T (lambda . df/dt + mu dtr/dt) = <dpre, gW> + <gshift, sW>. The time's adjoint
    // -a^T dF/ds = T q (torchdiffeq integrates it as part of the state and its norm); the end
    // time's, from d/dT of T f(sT) = f + s T df/dt: -(lambda . f + mu tr) + s q
    const at::Tensor q = at::dot(dpre, n.gw).add_(at::dot(gshift, n.sw));
    scaled_into(out.narrow(0, s_off, 1), q.view({1}), sigma * n.T);
    at::Tensor d_end = q * s;
    d_end.sub_(at::dot(lam.reshape({BD}), value.view({BD}))).sub_(at::dot(mu, trace));
    scaled_into(out.narrow(0, t_off, 1), d_end.view({1}), sigma * t_scale);
  };
  at::Tensor y0 = at::zeros({N}, opt);
  y0.narrow(0, 0, BD).copy_(z_out.reshape({BD}));
  y0.narrow(0, BD, B).copy_(logdet);
  y0.narrow(0, BD + B, BD).copy_(grad_z.reshape({BD}));
  y0.narrow(0, 2 * BD + B, B).copy_(grad_logdet);
  // the end time's part is last, left out of the norm when it has no scale
  const MixedNorm norm(parts, opt);
  int64_t nfe = 0;
  const at::Tensor y1 =
      dopri5(G, y0, tau0, tau0 + 1.0, rtol, atol, norm, max_steps, nfe, "cnf_dopri5_adjoint");
  auto r = results(y1);
  std::get<7>(r) = nfe_tensor(nfe);
  return r;
}

TORCH_LIBRARY_IMPL(fastflow, CPU, m) {
  m.impl("cnf_dopri5", &cnf_dopri5_forward);
  m.impl("cnf_dopri5_adjoint", &cnf_dopri5_adjoint);
}

}  // namespace fastflow
