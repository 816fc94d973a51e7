"""Hutchinson traces of powers of an MLP's Jacobian, and the batched fixed-point inverse of a
residual block whose branch is such an MLP: the operators behind the native paths of
:class:`~fastflow.nn.iResBlock` (Residual Flows' log-det series) and of FFJORD's divergence.

The network ("MLP-structured ``g``"), for layers ``l = 0 .. L-1`` with ``z_0 = x`` (``[B, D]``)::

    h_l = act(z_l)   when layer l has an activation before it, else z_l
    z_{l+1} = (W_l h_l + b_l) * gate_l + shift_l        g(x) = z_L  ([B, D])

``W_l`` is ``[out, in]``; ``biases``, ``gates`` and ``shifts`` are each empty or one tensor per
layer (``gates``/``shifts`` broadcast to ``[B, out]``: the time gate and hyper-bias of FFJORD's
concat-squash layers). Layer ``l`` has an activation before it when ``activation`` is not
``"identity"`` and ``l > 0`` or ``preact``. LipSwish (``z sigmoid(beta z) / 1.1``) takes one
``beta`` per activation (``betas``, in order); ELU has ``alpha = 1``; softplus ``beta = 1``.

:func:`mlp_trace` returns ``g(x)`` and, per sample,

    ``trace = mean_p sum_{k=1}^{K} value_coeffs[k-1] <v_p, J^k v_p>``,   ``J = dg/dx``,

for the probes ``v_p`` (``[P, B, D]``), by forward-mode (Jacobian-vector) products
``w_k = J w_{k-1}`` through the known layers: ``K`` passes of ``L`` matrix products each, no
autograd graph. With ``value_coeffs[k-1] = (-1)^(k+1) / k`` this is i-ResNet's power series of
``log det(I + J)``, with the roulette weights ``1/P(N >= k - n_exact)`` Residual Flows'
unbiased estimate (:mod:`fastflow.ops.logdet_estimators`), and with ``K = 1``,
``value_coeffs = [1]`` FFJORD's Hutchinson divergence ``v^T J v``.

Gradient (hand-written, ``mlp_trace_backward``): the trace's gradient is that of the surrogate
``S = mean_p <v_p, J psi_p>`` with ``v`` and ``psi_p = sum_{j < len(psi_coeffs)} psi_coeffs[j]
J^j v_p`` held constant. With ``psi_coeffs[j] = (-1)^j c_{j+1}`` this is the Neumann-series
gradient of Residual Flows (its expectation is the exact gradient ``tr((I + J)^{-1} dJ)``; see
:mod:`fastflow.ops.logdet_estimators`, written there with vector-Jacobian products); with
``K = 1`` and ``psi_coeffs = [1]``, ``S`` is the trace itself and the gradient is exact. The
backward recomputes the primal and one tangent pass (along ``psi``) and runs one reverse pass
through both, which needs the activations' second derivatives; nothing but ``x``, the layers'
tensors, the probes and ``psi`` is saved.

Coefficients as tensors: ``value_coeffs`` and ``psi_coeffs`` may also be 1-D tensors (the
operator overload ``mlp_trace.tensor_coeffs``), of which only the entries up to the last non-zero
one count (``K`` is one plus the index of the last non-zero value coefficient). A fixed-length
tensor with trailing zeros then carries a number of terms that is only known at run time
(Residual Flows' Russian roulette inside a compiled graph: the count is a tensor, not a Python
value, and the operator's output shapes do not depend on it). The kernel reads them on the host:
CPU tensors cost no device synchronisation.

The reference (:func:`mlp_trace_reference`, the oracle of the tests and the fallback) is the same
function written with autograd: ``J t`` by the double-vector-Jacobian trick, the surrogate's
gradient by autograd through it.

:func:`mlp_jacobian` (the per-sample Jacobian ``J``, ``[B, D, D]``) and
:func:`mlp_power_traces` (``mean_p <v_p, J^k v_p>`` for ``k = 1 .. K``) run the same forward-mode
products in PyTorch operations, without ``torch.autograd.grad``: differentiable by ordinary
autograd (a gradient by backpropagation through every product) and traceable by
``torch.compile`` (:class:`~fastflow.nn.iResBlock`'s exact log-det and its truncated series with
the backpropagated gradient).

:func:`mlp_fixed_point` solves ``x + g(x) = y`` per sample with the stop test of
:func:`~fastflow.ops.fixed_point.fixed_point_inverse` (``max_j |x_k - x_{k-1}| / (1 + |y_j|) <=
tol``, from ``x = y``): on the CPU a loop in C++ whose working set shrinks to the samples still
active after every iteration, on CUDA one thread block per sample iterating in shared memory
with no host synchronisation. No gradient (the implicit-function gradient is
:func:`~fastflow.ops.fixed_point.fixed_point_inverse`'s, through ``g``).

References:
    Chen, Behrmann, Duvenaud, Jacobsen. "Residual Flows for Invertible Generative Modeling"
    (2019), https://arxiv.org/abs/1906.02735.
    Grathwohl, Chen, Bettencourt, Sutskever, Duvenaud. "FFJORD: Free-form Continuous Dynamics
    for Scalable Reversible Generative Models" (2019), https://arxiv.org/abs/1810.01367.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fastflow import _native

__all__ = [
    "MLP_ACTIVATIONS",
    "mlp_apply_reference",
    "mlp_fixed_point",
    "mlp_fixed_point_reference",
    "mlp_jacobian",
    "mlp_power_traces",
    "mlp_trace",
    "mlp_trace_reference",
]

#: Activation names and their codes in the native operators.
MLP_ACTIVATIONS = {"identity": 0, "elu": 1, "lipswish": 2, "tanh": 3, "softplus": 4}
_LIPSWISH_DIV = 1.1

for _op in ("mlp_trace", "mlp_fixed_point"):
    for _dev in ("cpu", "cuda"):
        _native.register_native_dtypes(_op, _dev, (torch.float32, torch.float64))


# --------------------------------------------------------------------------------------------
# argument checks (shared by both backends)


def _tensor_list(value: Any, name: str) -> list[Tensor]:
    if isinstance(value, Tensor) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a list of tensors, got {type(value).__name__}")
    out = list(value)
    for i, t in enumerate(out):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}[{i}] must be a Tensor, got {type(t).__name__}")
    return out


def _check_net(
    x: Any, x_name: str, weights: Any, biases: Any, gates: Any, shifts: Any, betas: Any,
    activation: Any, preact: Any,
) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor], Tensor, int, bool]:
    if not isinstance(x, Tensor):
        raise TypeError(f"{x_name} must be a Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{x_name} must be a matrix [batch, features], got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"{x_name} must be float32 or float64, got {x.dtype}")
    if activation not in MLP_ACTIVATIONS:
        raise ValueError(f"activation must be one of {tuple(MLP_ACTIVATIONS)}, got {activation!r}")
    weights = _tensor_list(weights, "weights")
    biases = _tensor_list(biases, "biases")
    gates = _tensor_list(gates, "gates")
    shifts = _tensor_list(shifts, "shifts")
    n_layers = len(weights)
    if n_layers == 0:
        raise ValueError("weights must hold at least one matrix")
    for name, lst in (("biases", biases), ("gates", gates), ("shifts", shifts)):
        if lst and len(lst) != n_layers:
            raise ValueError(
                f"{name} must be empty or hold one tensor per weight ({n_layers}), got {len(lst)}"
            )
    b, width = x.shape
    for i, w in enumerate(weights):
        if w.dim() != 2 or w.shape[1] != width:
            raise ValueError(f"weights[{i}] must be a matrix [out, {width}], got shape {tuple(w.shape)}")
        out = w.shape[0]
        if biases and tuple(biases[i].shape) != (out,):
            raise ValueError(f"biases[{i}] must have shape [{out}], got {tuple(biases[i].shape)}")
        for name, lst in (("gates", gates), ("shifts", shifts)):
            if not lst:
                continue
            t = lst[i]
            ok = t.dim() <= 2 and (t.dim() == 0 or t.shape[-1] in (out, 1)) and (
                t.dim() < 2 or t.shape[0] in (b, 1)
            )
            if not ok:
                raise ValueError(f"{name}[{i}] must broadcast to [{b}, {out}], got shape {tuple(t.shape)}")
        width = out
    if width != x.shape[1]:
        raise ValueError(
            f"the last weight must map back to {x.shape[1]} features (g maps R^D to R^D), got {width}"
        )
    preact = bool(preact)
    n_act = 0 if activation == "identity" else (n_layers if preact else n_layers - 1)
    want = n_act if activation == "lipswish" else 0
    if betas is None:
        if want:
            raise ValueError(f"betas must hold one beta per LipSwish activation ({want}), got None")
        betas = x.new_zeros(0)
    if not isinstance(betas, Tensor) or tuple(betas.shape) != (want,):
        raise ValueError(
            f"betas must have shape [{want}] (one per LipSwish activation), got "
            f"{tuple(betas.shape) if isinstance(betas, Tensor) else type(betas).__name__}"
        )
    for name, lst in (("weights", weights), ("biases", biases), ("gates", gates), ("shifts", shifts),
                      ("betas", [betas])):
        for i, t in enumerate(lst):
            if t.dtype != x.dtype or t.device != x.device:
                where = f"{name}[{i}]" if name != "betas" else name
                raise ValueError(
                    f"{where} must have the dtype and device of {x_name} ({x.dtype}, {x.device}), "
                    f"got {t.dtype}, {t.device}"
                )
    return weights, biases, gates, shifts, betas, MLP_ACTIVATIONS[activation], preact


def _check_coeff_tensor(value: Tensor, name: str) -> Tensor:
    if value.dim() != 1 or not value.is_floating_point():
        raise ValueError(
            f"{name} must be a 1-D floating-point tensor (or a list of numbers), got shape "
            f"{tuple(value.shape)} and dtype {value.dtype}"
        )
    return value


def _host_coeffs(value: Tensor) -> list[float]:
    """A coefficient tensor's entries up to its last non-zero one (a host read)."""
    out = [float(c) for c in value.detach().cpu().tolist()]
    while out and out[-1] == 0:
        out.pop()
    return out


def _check_coeffs(value: Any, name: str) -> list[float]:
    if isinstance(value, Tensor):
        return _check_coeffs(_host_coeffs(_check_coeff_tensor(value, name)), name)
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a list of numbers or a 1-D tensor, got {type(value).__name__}")
    out = []
    for i, c in enumerate(value):
        if isinstance(c, bool) or not isinstance(c, numbers.Real) or not math.isfinite(c):
            raise ValueError(f"{name}[{i}] must be a finite number, got {c!r}")
        out.append(float(c))
    return out


def _check_probes(probes: Any, x: Tensor) -> Tensor:
    if not isinstance(probes, Tensor):
        raise TypeError(f"probes must be a Tensor, got {type(probes).__name__}")
    if probes.shape == x.shape:
        probes = probes.unsqueeze(0)
    if probes.dim() != 3 or probes.shape[0] < 1 or probes.shape[1:] != x.shape:
        raise ValueError(
            f"probes must have shape [n_probes, {x.shape[0]}, {x.shape[1]}] (or x's shape), "
            f"got {tuple(probes.shape)}"
        )
    if probes.dtype != x.dtype or probes.device != x.device:
        raise ValueError(
            f"probes must have the dtype and device of x ({x.dtype}, {x.device}), got "
            f"{probes.dtype}, {probes.device}"
        )
    return probes


def _check_trace_args(x, weights, biases, gates, shifts, betas, activation, preact, probes,
                      value_coeffs, psi_coeffs) -> tuple:
    """Every argument of :func:`mlp_trace` checked, the activation as its code."""
    weights, biases, gates, shifts, betas, code, preact = _check_net(
        x, "x", weights, biases, gates, shifts, betas, activation, preact
    )
    probes = _check_probes(probes, x)
    if isinstance(value_coeffs, Tensor) and isinstance(psi_coeffs, Tensor):
        # the values are read by the kernel (checked there): no host read here
        return (weights, biases, gates, shifts, betas, code, preact, probes,
                _check_coeff_tensor(value_coeffs, "value_coeffs"),
                _check_coeff_tensor(psi_coeffs, "psi_coeffs"))
    value_coeffs = _check_coeffs(value_coeffs, "value_coeffs")
    psi_coeffs = _check_coeffs(psi_coeffs, "psi_coeffs")
    if len(psi_coeffs) > len(value_coeffs):
        raise ValueError(
            f"psi_coeffs may not have more entries than value_coeffs ({len(value_coeffs)}), "
            f"got {len(psi_coeffs)}"
        )
    return weights, biases, gates, shifts, betas, code, preact, probes, value_coeffs, psi_coeffs


# --------------------------------------------------------------------------------------------
# the reference (autograd)


def _act(code: int, z: Tensor, beta: Tensor | None) -> Tensor:
    if code == 1:
        return F.elu(z)
    if code == 2:
        return z * torch.sigmoid(beta * z) / _LIPSWISH_DIV
    if code == 3:
        return torch.tanh(z)
    if code == 4:
        return F.softplus(z)
    return z


def _apply(x, weights, biases, gates, shifts, betas, code, preact) -> Tensor:
    return _run(x, weights, biases, gates, shifts, betas, code, preact, derivatives=False)[0]


def mlp_apply_reference(
    x: Tensor,
    weights: Sequence[Tensor],
    biases: Sequence[Tensor] = (),
    betas: Tensor | None = None,
    activation: str = "lipswish",
    preact: bool = False,
    gates: Sequence[Tensor] = (),
    shifts: Sequence[Tensor] = (),
) -> Tensor:
    """``g(x)`` of the network (module docstring), in PyTorch operations."""
    weights, biases, gates, shifts, betas, code, preact = _check_net(
        x, "x", weights, biases, gates, shifts, betas, activation, preact
    )
    return _apply(x, weights, biases, gates, shifts, betas, code, preact)


def _act_deriv(code: int, z: Tensor, beta: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(act(z), act'(z))`` in PyTorch operations (differentiable again by autograd)."""
    if code == 1:  # ELU, alpha = 1: exp(min(z, 0)) is 1 for z > 0 and never overflows
        return F.elu(z), torch.exp(z.clamp(max=0))
    if code == 2:
        s = torch.sigmoid(beta * z)
        return z * s / _LIPSWISH_DIV, (s + beta * z * s * (1 - s)) / _LIPSWISH_DIV
    if code == 3:
        h = torch.tanh(z)
        return h, 1 - h * h
    if code == 4:  # softplus, beta = 1, threshold 20 (linear above it, as F.softplus)
        return F.softplus(z), torch.where(z > 20, torch.ones_like(z), torch.sigmoid(z))
    return z, torch.ones_like(z)


def _run(x, weights, biases, gates, shifts, betas, code, preact, derivatives: bool):
    """``g(x)`` and, with ``derivatives``, per layer the activation's derivative at its input
    (None: no activation)."""
    h = x
    derivs: list[Tensor | None] = []
    i_act = 0
    for l, w in enumerate(weights):
        d = None
        if code != 0 and (l > 0 or preact):
            beta = betas[i_act] if code == 2 else None
            if derivatives:
                h, d = _act_deriv(code, h, beta)
            else:
                h = _act(code, h, beta)
            i_act += 1
        derivs.append(d)
        h = F.linear(h, w, biases[l] if biases else None)
        if gates:
            h = h * gates[l]
        if shifts:
            h = h + shifts[l]
    return h, derivs


def _linearize(x, weights, biases, gates, shifts, betas, code, preact):
    """``g(x)`` and, per layer, the activation's derivative at its input (None: no activation)."""
    return _run(x, weights, biases, gates, shifts, betas, code, preact, derivatives=True)


def _jvp(t: Tensor, weights, gates, derivs) -> Tensor:
    """``J t`` for tangents ``t`` of shape ``[..., B, D]`` (one forward-mode pass)."""
    for l, w in enumerate(weights):
        if derivs[l] is not None:
            t = t * derivs[l]
        t = F.linear(t, w)
        if gates:
            t = t * gates[l]
    return t


def _vjp(u: Tensor, weights, gates, derivs) -> Tensor:
    """``J^T u`` for cotangents ``u`` of shape ``[..., B, D]`` (the layers in reverse)."""
    for l in range(len(weights) - 1, -1, -1):
        if gates:
            u = u * gates[l]
        u = u @ weights[l]
        if derivs[l] is not None:
            u = u * derivs[l]
    return u


def mlp_jacobian(
    x: Tensor,
    weights: Sequence[Tensor],
    biases: Sequence[Tensor] = (),
    betas: Tensor | None = None,
    activation: str = "lipswish",
    preact: bool = False,
    gates: Sequence[Tensor] = (),
    shifts: Sequence[Tensor] = (),
) -> tuple[Tensor, Tensor]:
    """``(g(x), J)`` with ``J[b, i, j] = d g(x)[b, i] / d x[b, j]``, ``[B, D, D]``.

    Forward mode in PyTorch operations: the ``D`` basis tangents pushed through the layers at
    once (memory ``D`` times the activations'), no ``torch.autograd.grad``; differentiable
    w.r.t. ``x`` and the layers' tensors by autograd, and traceable by ``torch.compile``.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> w = [torch.randn(8, 3), torch.randn(3, 8)]
        >>> x = torch.randn(4, 3)
        >>> out, J = mlp_jacobian(x, w, activation="tanh")
        >>> J.shape
        torch.Size([4, 3, 3])
        >>> J0 = torch.autograd.functional.jacobian(
        ...     lambda v: mlp_apply_reference(v[None], w, activation="tanh")[0], x[0])
        >>> torch.allclose(J[0], J0, atol=1e-5)
        True
    """
    weights, biases, gates, shifts, betas, code, preact = _check_net(
        x, "x", weights, biases, gates, shifts, betas, activation, preact
    )
    out, derivs = _linearize(x, weights, biases, gates, shifts, betas, code, preact)
    b, d = x.shape
    basis = torch.eye(d, dtype=x.dtype, device=x.device).unsqueeze(1).expand(d, b, d)
    cols = _jvp(basis, weights, gates, derivs)  # cols[j, b] = J[b] e_j
    return out, cols.permute(1, 2, 0)


def mlp_power_traces(
    x: Tensor,
    weights: Sequence[Tensor],
    biases: Sequence[Tensor] = (),
    betas: Tensor | None = None,
    activation: str = "lipswish",
    preact: bool = False,
    *,
    probes: Tensor,
    n_terms: int,
    gates: Sequence[Tensor] = (),
    shifts: Sequence[Tensor] = (),
) -> tuple[Tensor, Tensor]:
    """``(g(x), traces)`` with ``traces[k-1] = mean_p <v_p, J^k v_p>``, ``k = 1 .. n_terms``,
    ``[n_terms, B]`` (float32 or wider).

    The forward-mode products of :func:`mlp_trace` in PyTorch operations (no
    ``torch.autograd.grad``): a gradient by ordinary autograd backpropagates through every
    product (i-ResNet's gradient of the truncated series), and ``torch.compile`` traces it.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> w = [torch.randn(8, 2) * 0.3, torch.randn(2, 8) * 0.3]
        >>> x, v = torch.randn(4, 2), torch.randn(1, 4, 2)
        >>> _, traces = mlp_power_traces(x, w, activation="tanh", probes=v, n_terms=3)
        >>> _, tr = mlp_trace(x, w, activation="tanh", probes=v, value_coeffs=[0.0, 1.0])
        >>> traces.shape, torch.allclose(traces[1], tr, atol=1e-6)
        (torch.Size([3, 4]), True)
    """
    weights, biases, gates, shifts, betas, code, preact = _check_net(
        x, "x", weights, biases, gates, shifts, betas, activation, preact
    )
    probes = _check_probes(probes, x)
    if isinstance(n_terms, bool) or not isinstance(n_terms, numbers.Integral) or n_terms < 1:
        raise ValueError(f"n_terms must be an int >= 1, got {n_terms!r}")
    out, derivs = _linearize(x, weights, biases, gates, shifts, betas, code, preact)
    wide = torch.promote_types(x.dtype, torch.float32)
    traces = []
    t = probes
    for _ in range(int(n_terms)):
        t = _jvp(t, weights, gates, derivs)
        traces.append((t * probes).sum(2, dtype=wide).mean(0))
    return out, torch.stack(traces)


def mlp_trace_reference(
    x: Tensor,
    weights: Sequence[Tensor],
    biases: Sequence[Tensor],
    gates: Sequence[Tensor],
    shifts: Sequence[Tensor],
    betas: Tensor | None,
    activation: str,
    preact: bool,
    probes: Tensor,
    value_coeffs: Sequence[float],
    psi_coeffs: Sequence[float],
) -> tuple[Tensor, Tensor]:
    """:func:`mlp_trace` by autograd: ``J t`` as the gradient w.r.t. ``w`` of ``<J^T w, t>``
    (two vector-Jacobian products), the surrogate's gradient by autograd through them."""
    if isinstance(value_coeffs, Tensor):
        value_coeffs = _check_coeffs(value_coeffs, "value_coeffs")
    if isinstance(psi_coeffs, Tensor):
        psi_coeffs = _check_coeffs(psi_coeffs, "psi_coeffs")
    weights, biases, gates, shifts, betas, code, preact, probes, value_coeffs, psi_coeffs = (
        _check_trace_args(x, weights, biases, gates, shifts, betas, activation, preact, probes,
                          value_coeffs, psi_coeffs)
    )
    grad = torch.is_grad_enabled()
    with torch.enable_grad():
        xg = x if x.requires_grad else x.detach().requires_grad_()
        out = _apply(xg, weights, biases, gates, shifts, betas, code, preact)
        dummy = torch.zeros_like(out, requires_grad=True)
        (jt_dummy,) = torch.autograd.grad(out, xg, dummy, create_graph=True)

        def jvp(t: Tensor, create_graph: bool) -> Tensor:
            (jt,) = torch.autograd.grad(jt_dummy, dummy, t, retain_graph=True, create_graph=create_graph)
            return jt

        n_probes = probes.shape[0]
        trace = x.new_zeros(x.shape[0])
        surrogate = x.new_zeros(x.shape[0])
        for v in probes:
            w = v
            psi = v * psi_coeffs[0] if psi_coeffs else torch.zeros_like(v)
            for k in range(1, len(value_coeffs) + 1):
                w = jvp(w, False)
                trace = trace + (w * v).sum(1) * value_coeffs[k - 1]
                if k < len(psi_coeffs):
                    psi = psi + w * psi_coeffs[k]
            if grad:
                surrogate = surrogate + (jvp(psi.detach(), True) * v).sum(1)
    trace = trace.detach() / n_probes
    if not grad:
        return out.detach(), trace
    surrogate = surrogate / n_probes
    return out, trace + (surrogate - surrogate.detach())


# --------------------------------------------------------------------------------------------
# the entry points


def mlp_trace(
    x: Tensor,
    weights: Sequence[Tensor],
    biases: Sequence[Tensor] = (),
    gates: Sequence[Tensor] = (),
    shifts: Sequence[Tensor] = (),
    betas: Tensor | None = None,
    activation: str = "lipswish",
    preact: bool = False,
    *,
    probes: Tensor,
    value_coeffs: Sequence[float] | Tensor,
    psi_coeffs: Sequence[float] | Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``(g(x), trace)`` of an MLP-structured ``g`` (module docstring); native where built.

    Arguments:
        x: ``[B, D]`` float32/float64.
        weights: ``L`` matrices ``[out, in]``, the first ``[*, D]``, the last ``[D, *]``.
        biases, gates, shifts: empty, or one tensor per layer (module docstring).
        betas: LipSwish's ``beta`` per activation (``softplus`` of the raw parameter), ``[n_act]``.
        activation: one of :data:`MLP_ACTIVATIONS`.
        preact: an activation before the first layer.
        probes: ``[P, B, D]`` (or ``[B, D]``) probe vectors.
        value_coeffs: the weights of ``<v, J^k v>``, ``k = 1 .. K``: a list of numbers, or a
            1-D floating tensor whose trailing zeros do not count (module docstring; then
            ``psi_coeffs`` must be a tensor too).
        psi_coeffs: the weights of ``J^j v`` in the gradient's ``psi``, ``j = 0 .. <= K-1``
            (default: ``[1]``, the exact gradient when ``K = 1``); a list or a 1-D tensor.

    Returns:
        ``(out [B, D], trace [B])``; both differentiable (the trace by the surrogate gradient).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> w = [torch.randn(8, 2) * 0.3, torch.randn(2, 8) * 0.3]
        >>> x, v = torch.randn(4, 2), torch.randn(1, 4, 2)
        >>> out, tr = mlp_trace(x, w, activation="tanh", probes=v, value_coeffs=[1.0])
        >>> out.shape, tr.shape
        (torch.Size([4, 2]), torch.Size([4]))
    """
    if psi_coeffs is None:
        psi_coeffs = value_coeffs.new_ones(1) if isinstance(value_coeffs, Tensor) else [1.0]
    if isinstance(value_coeffs, Tensor) != isinstance(psi_coeffs, Tensor):
        raise TypeError(
            "value_coeffs and psi_coeffs must both be tensors or both be lists of numbers, got "
            f"{type(value_coeffs).__name__} and {type(psi_coeffs).__name__}"
        )
    if _native.use_native("mlp_trace", x) if isinstance(x, Tensor) else False:
        weights, biases, gates, shifts, betas, code, preact, probes, value_coeffs, psi_coeffs = (
            _check_trace_args(x, weights, biases, gates, shifts, betas, activation, preact,
                              probes, value_coeffs, psi_coeffs)
        )
        op = torch.ops.fastflow.mlp_trace
        op = op.tensor_coeffs if isinstance(value_coeffs, Tensor) else op.default
        out, trace, _ = op(
            x, weights, biases, gates, shifts, betas, code, preact, probes, value_coeffs, psi_coeffs
        )
        return out, trace
    return mlp_trace_reference(
        x, weights, biases, gates, shifts, betas, activation, preact, probes, value_coeffs,
        psi_coeffs,
    )


def mlp_fixed_point_reference(
    y: Tensor,
    weights: Sequence[Tensor],
    biases: Sequence[Tensor] = (),
    betas: Tensor | None = None,
    activation: str = "lipswish",
    preact: bool = False,
    *,
    tol: float = 1e-5,
    max_iter: int = 1000,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`mlp_fixed_point` by :func:`~fastflow.ops.fixed_point.fixed_point_inverse`'s loop
    (no gradient)."""
    from fastflow.ops.fixed_point import _solve

    weights, biases, _, _, betas, code, preact = _check_net(
        y, "y", weights, biases, (), (), betas, activation, preact
    )
    tol, max_iter = _check_solver(tol, max_iter)
    with torch.no_grad():
        y = y.detach()

        def g(x: Tensor) -> Tensor:
            return _apply(x, weights, biases, (), (), betas, code, preact)

        x, iterations, residual, _ = _solve(g, y, y, 1 + y.abs(), tol, max_iter, 1, 0, True)
    return x, iterations, residual


def _check_solver(tol: Any, max_iter: Any) -> tuple[float, int]:
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not (0 < tol < math.inf):
        raise ValueError(f"tol must be positive and finite, got {tol!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, numbers.Integral) or max_iter < 1:
        raise ValueError(f"max_iter must be an int >= 1, got {max_iter!r}")
    return float(tol), int(max_iter)


def _cuda_fits(y: Tensor, weights: Sequence[Tensor]) -> bool:
    """Whether the CUDA kernel takes this network (its shared memory and layer limits)."""
    widest = max([y.shape[1]] + [w.shape[0] for w in weights])
    return len(weights) <= 16 and (y.shape[1] + 2 * widest + 128) * y.element_size() <= 48 * 1024


def mlp_fixed_point(
    y: Tensor,
    weights: Sequence[Tensor],
    biases: Sequence[Tensor] = (),
    betas: Tensor | None = None,
    activation: str = "lipswish",
    preact: bool = False,
    *,
    tol: float = 1e-5,
    max_iter: int = 1000,
) -> tuple[Tensor, Tensor, Tensor]:
    """Solves ``x + g(x) = y`` per sample for an MLP-structured ``g`` (no gradient).

    Returns ``(x, iterations [B] int64, residual [B])``; a sample whose residual is not below
    ``tol`` did not converge (the caller reports it: :func:`~fastflow.ops.fixed_point.
    fixed_point_inverse` with ``solver=``). Native where built (module docstring).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> w = [torch.randn(8, 2), torch.randn(2, 8)]
        >>> w = [m * 0.5 / torch.linalg.matrix_norm(m, ord=2) for m in w]
        >>> x = torch.randn(5, 2)
        >>> y = x + mlp_apply_reference(x, w, activation="elu")
        >>> x2, iters, res = mlp_fixed_point(y, w, activation="elu", tol=1e-7)
        >>> bool((x2 - x).abs().max() < 1e-5)
        True
    """
    native = isinstance(y, Tensor) and _native.use_native("mlp_fixed_point", y)
    if native and y.device.type == "cuda" and not _cuda_fits(y, list(weights)):
        native = False
    if not native:
        return mlp_fixed_point_reference(
            y, weights, biases, betas, activation, preact, tol=tol, max_iter=max_iter
        )
    weights, biases, _, _, betas, code, preact = _check_net(
        y, "y", weights, biases, (), (), betas, activation, preact
    )
    tol, max_iter = _check_solver(tol, max_iter)
    with torch.no_grad():
        return torch.ops.fastflow.mlp_fixed_point(
            y.detach(), [w.detach() for w in weights], [b.detach() for b in biases],
            betas.detach(), code, preact, tol, max_iter,
        )


# --------------------------------------------------------------------------------------------
# registration with torch.compile (fake) and autograd

if _native.native_load_error() is None:

    @torch.library.register_fake("fastflow::mlp_trace")
    def _mlp_trace_fake(x, weights, biases, gates, shifts, betas, act, preact, probes, vc, pc):
        return x.new_empty(x.shape), x.new_empty(x.shape[:1]), probes.new_empty(probes.shape)

    @torch.library.register_fake("fastflow::mlp_trace.tensor_coeffs")
    def _mlp_trace_tensor_coeffs_fake(x, weights, biases, gates, shifts, betas, act, preact,
                                      probes, vc, pc):
        # the shapes do not depend on the coefficients' values (nor on how many are non-zero)
        return x.new_empty(x.shape), x.new_empty(x.shape[:1]), probes.new_empty(probes.shape)

    @torch.library.register_fake("fastflow::mlp_trace_backward")
    def _mlp_trace_backward_fake(
        grad_out, grad_trace, x, weights, biases, gates, shifts, betas, act, preact, probes, psi
    ):
        return (
            x.new_empty(x.shape),
            [w.new_empty(w.shape) for w in weights],
            [b.new_empty(b.shape) for b in biases],
            [g.new_empty(g.shape) for g in gates],
            [s.new_empty(s.shape) for s in shifts],
            betas.new_empty(betas.shape),
        )

    @torch.library.register_fake("fastflow::mlp_fixed_point")
    def _mlp_fixed_point_fake(y, weights, biases, betas, act, preact, tol, max_iter):
        return (
            y.new_empty(y.shape),
            y.new_empty(y.shape[:1], dtype=torch.long),
            y.new_empty(y.shape[:1]),
        )

    # The Autograd kernels of mlp_trace (the mlp_trace_backward operator) and mlp_fixed_point
    # (no gradient) are registered in C++, csrc/cpu/mlp_trace.cpp: a Python autograd kernel of
    # an operator with tensor-list arguments costs about a millisecond per call.
