// Every operator schema of fastflow, in one place. Kernels are registered per device in
// csrc/cpu/<family>.cpp and csrc/cuda/<family>.cu with TORCH_LIBRARY_IMPL.
#include <Python.h>
#include <torch/library.h>

// `import fastflow._C` only has to load this shared library so that the registrations below
// run; the operators are then reached through torch.ops.fastflow.*.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "fastflow native operators (see torch.ops.fastflow)", -1,
      nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(fastflow, m) {
  // Fused elementwise part of a coupling layer plus its per-sample log-det.
  // activation: 0 additive (NICE), 1 exp of clamp*tanh(h/clamp) (Real NVP), 2 sigmoid(h+2) (Glow).
  // inverse=true applies the inverse map; the log-det returned is then log|det dx/dy|.
  // save_scale=true also returns the activated scale (s for exp, sigmoid(h + 2) for sigmoid),
  // from which the backward runs without recomputing any transcendental; else an empty tensor.
  m.def(
      "affine_coupling(Tensor x, Tensor? log_scale, Tensor shift, int activation, float clamp, "
      "bool inverse, bool save_scale) -> (Tensor, Tensor, Tensor)");
  // Gradients w.r.t. the input (x, or y for the inverse) and the raw log-scale; the shift's
  // gradient is +-grad_out or +-grad_input and is formed by the caller.
  m.def(
      "affine_coupling_backward(Tensor grad_out, Tensor grad_logdet, Tensor input, "
      "Tensor scale, Tensor shift, int activation, float clamp, bool inverse) "
      "-> (Tensor, Tensor)");
  // Glow's invertible 1x1 convolution over a PLU decomposition, W = P A B with
  // A = strict-lower(lower) + I, B = strict-upper(upper) + diag(sign * exp(log_s)) and
  // P[i, perm[i]] = 1, applied per pixel over the channels (dim 1) of x. Returns (out, logdet):
  // W x and H*W*sum(log_s), or with inverse=true W^{-1} x (triangular solves) and its negation.
  m.def(
      "invconv_plu(Tensor x, Tensor perm, Tensor lower, Tensor upper, Tensor sign, "
      "Tensor log_s, bool inverse) -> (Tensor, Tensor)");
  // Gradients w.r.t. input (x, or y for the inverse), lower, upper and log_s.
  m.def(
      "invconv_plu_backward(Tensor grad_out, Tensor grad_logdet, Tensor input, Tensor perm, "
      "Tensor lower, Tensor upper, Tensor sign, Tensor log_s, bool inverse) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // Spectral normalisation (i-ResNet, Residual Flows) of a matrix weight [out, in], with the
  // persistent vectors u [out] and v [in] (same dtype and device as weight). See
  // csrc/include/fastflow/spectral_norm.h and REFERENCE.md 4.3.
  // n_iter rounds of v <- W^T u / max(|W^T u|, eps), u <- W v / max(|W v|, eps); returns fresh
  // (u, v) and has no gradient.
  m.def("spectral_norm_power(Tensor weight, Tensor u, Tensor v, int n_iter, float eps) "
        "-> (Tensor, Tensor)");
  // (w_hat, sigma): sigma = u^T W v (u, v constants), w_hat = W / max(1, sigma / coeff).
  m.def("spectral_norm_apply(Tensor weight, Tensor u, Tensor v, float coeff) -> (Tensor, Tensor)");
  // Gradient w.r.t. weight of spectral_norm_apply, given those w.r.t. w_hat and sigma.
  m.def(
      "spectral_norm_apply_backward(Tensor grad_w_hat, Tensor grad_sigma, Tensor weight, "
      "Tensor u, Tensor v, float coeff) -> Tensor");
  // Hutchinson traces of powers of an MLP's Jacobian (residual flows' log-det series, FFJORD's
  // divergence) by forward-mode products through the known layers, and the batched fixed-point
  // inverse of y = x + g(x) for such an MLP. The network and the meaning of every argument:
  // csrc/include/fastflow/mlp_trace.h. act: 0 identity, 1 elu, 2 lipswish, 3 tanh, 4 softplus.
  m.def(
      "mlp_trace(Tensor x, Tensor[] weights, Tensor[] biases, Tensor[] gates, Tensor[] shifts, "
      "Tensor betas, int act, bool preact, Tensor probes, float[] value_coeffs, "
      "float[] psi_coeffs) -> (Tensor, Tensor, Tensor)");
  // The same with the coefficients as 1-D tensors (read on the host; CPU tensors cost no device
  // synchronisation): K is the position of the last non-zero value coefficient, so a fixed-length
  // tensor with trailing zeros carries a number of terms drawn at run time (a compiled graph's
  // Russian roulette). The output shapes do not depend on the values.
  m.def(
      "mlp_trace.tensor_coeffs(Tensor x, Tensor[] weights, Tensor[] biases, Tensor[] gates, "
      "Tensor[] shifts, Tensor betas, int act, bool preact, Tensor probes, Tensor value_coeffs, "
      "Tensor psi_coeffs) -> (Tensor, Tensor, Tensor)");
  // Gradients of <grad_out, out> + sum_b grad_trace_b mean_p <v, J psi> (v, psi constants)
  // w.r.t. x, weights, biases, gates, shifts and betas.
  m.def(
      "mlp_trace_backward(Tensor grad_out, Tensor grad_trace, Tensor x, Tensor[] weights, "
      "Tensor[] biases, Tensor[] gates, Tensor[] shifts, Tensor betas, int act, bool preact, "
      "Tensor probes, Tensor psi) -> (Tensor, Tensor[], Tensor[], Tensor[], Tensor[], Tensor)");
  // (x, iterations [B] int64, residual [B]) of x <- y - g(x), per sample, from x = y.
  m.def(
      "mlp_fixed_point(Tensor y, Tensor[] weights, Tensor[] biases, Tensor betas, int act, "
      "bool preact, float tol, int max_iter) -> (Tensor, Tensor, Tensor)");
  // A whole FFJORD solve for concat-squash MLP dynamics: dopri5 of (z, a), da/ds = T times
  // Hutchinson's divergence with the fixed probe, in normalised time s = 0 -> 1 (reverse:
  // 1 -> 0); returns (z_out, logdet, nfe). Its adjoint solve returns the gradients w.r.t. z and
  // every parameter and the end time, and its nfe. csrc/include/fastflow/cnf_dopri5.h.
  m.def(
      "cnf_dopri5(Tensor z, Tensor[] weights, Tensor[] biases, Tensor[] gate_weights, "
      "Tensor[] gate_biases, Tensor[] shift_weights, Tensor end_time, int act, Tensor probe, "
      "bool reverse, float rtol, float atol, int end_time_norm, int max_steps) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "cnf_dopri5_adjoint(Tensor grad_z, Tensor grad_logdet, Tensor z_out, Tensor logdet, "
      "Tensor[] weights, Tensor[] biases, Tensor[] gate_weights, Tensor[] gate_biases, "
      "Tensor[] shift_weights, Tensor end_time, int act, Tensor probe, bool reverse, float rtol, "
      "float atol, int end_time_norm, int max_steps) "
      "-> (Tensor, Tensor[], Tensor[], Tensor[], Tensor[], Tensor[], Tensor, Tensor)");
}
