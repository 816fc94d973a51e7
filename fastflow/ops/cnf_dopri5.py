"""A whole FFJORD solve in one native operator: dopri5 over the augmented state of a CNF whose
dynamics are an MLP of concat-squash layers, with Hutchinson's or the exact divergence, and its
adjoint.

The dynamics (normalised time ``s``, ``t = s T``; FFJORD's :class:`~fastflow.nn.ODEnet` with
``layer="concatsquash"``)::

    layer_l(h) = (W_l h + b_l) * sigmoid(gW_l t + gb_l) + sW_l t
    f(t, z)    = layer_{L-1}(act(... act(layer_0(z))))
    dz/ds = T f(sT, z),   da/ds = T sum_p eps_p^T (df/dz)(sT, z) eps_p

with the probes ``eps_p`` fixed over the solve: one probe ``[B, D]`` is Hutchinson's estimate of
the divergence, the ``D`` basis vectors (``probe = basis_probes(z)``, ``[D, B, D]``) its exact
value. :func:`cnf_dopri5` integrates ``(z, a)`` from
``s = 0`` (``a = 0``) to ``s = 1`` (``reverse=True``: from 1 to 0) and returns
``(z_out, logdet, nfe)``: ``logdet = a`` at the end (``+int_0^1 T tr ds``, or its negative for
``reverse``) and ``nfe`` the evaluations of the dynamics (a 0-d int64 tensor).

Each evaluation is :func:`fastflow.ops.mlp_trace.mlp_trace`'s forward-mode pass. The step control
is torchdiffeq's dopri5, reproduced step for step (first step from the derivatives, the mixed RMS
error norm over ``z`` and ``a``, dense output at the end time), so at the same ``rtol``/``atol``
the native solve takes the steps that ``torchdiffeq.odeint(..., method="dopri5")`` takes with the
autograd dynamics: that solve (:class:`~fastflow.nn.CNF` under ``fastflow.backend("reference")``)
is the reference, and the tests compare the two.

Gradients are by the adjoint method (Chen et al. 2018), like ``torchdiffeq.odeint_adjoint``: the
operator ``cnf_dopri5_adjoint`` integrates ``z``, its adjoint ``lambda`` and the parameters'
adjoints backwards from the end with dopri5,
``d lambda/ds = -lambda^T dF/dz - mu d(T tr)/dz``, ``d theta_bar/ds = -lambda^T dF/dtheta - ...``
(``mu``, the adjoint of ``a``, is constant), each evaluation one fused pass of
``mlp_trace_backward`` that returns ``f``, the trace and every vector-Jacobian product at once.
Its error norm also covers every parameter's adjoint and the time's adjoint ``-a^T dF/ds``, as
torchdiffeq's default does (torchdiffeq leaves out parameters that do not require gradients;
this norm keeps them, so with frozen parameters the two adjoint solves may take different
steps); ``end_time_norm`` says how the end time's adjoint enters it: 0 not at all (a fixed
``T``), 1 as ``T``'s, 2 as that of ``sqrt_T`` (``2 sqrt_T`` times ``T``'s:
:class:`~fastflow.nn.CNF` learns ``T = sqrt_T^2`` through ``sqrt_T``). The gradient is that of
the continuous solution up to the solver's tolerance (not of the discrete forward solve); no
second-order gradient.

Diagnostics: the backward's NFE, by probe: :func:`last_backward_nfe` (``probe -> int``).

Example:
    >>> import torch
    >>> from fastflow.nn import ODEnet
    >>> net = ODEnet(2, hidden=(8,))
    >>> z = torch.randn(4, 2)
    >>> w, b, gw, gb, sw = concatsquash_tensors(net)
    >>> out, logdet, nfe = cnf_dopri5(z, w, b, gw, gb, sw, torch.tensor(0.5), "tanh",
    ...                               torch.randn(4, 2))
    >>> out.shape, logdet.shape, int(nfe) > 0
    (torch.Size([4, 2]), torch.Size([4]), True)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from fastflow import _native
from fastflow.ops.mlp_trace import MLP_ACTIVATIONS

__all__ = ["ACTIVATIONS", "DEFAULT_MAX_STEPS", "basis_probes", "cnf_dopri5", "concatsquash_tensors", "last_backward_nfe"]

#: Activations the operator takes (:class:`~fastflow.nn.ODEnet`'s).
ACTIVATIONS = ("tanh", "softplus")
#: Accepted plus rejected dopri5 steps after which a solve raises (torchdiffeq has no default
#: limit; a solve that needs this many steps has failed in practice).
DEFAULT_MAX_STEPS = 100_000

for _dev in ("cpu", "cuda"):
    _native.register_native_dtypes("cnf_dopri5", _dev, (torch.float32, torch.float64))

_NFE_ATTR = "_fastflow_backward_nfe"  # set on the probe by the backward (it lives as long as it)


def last_backward_nfe(probe: Tensor) -> int | None:
    """Evaluations of the dynamics in the last adjoint solve through a :func:`cnf_dopri5` call
    made with ``probe`` (None before a backward pass). Recorded by eager backward passes."""
    nfe = getattr(probe, _NFE_ATTR, None)
    return None if nfe is None else int(nfe)


def basis_probes(z: Tensor) -> Tensor:
    """The ``D`` basis vectors as probes ``[D, B, D]`` for ``z [B, D]``: with them the solve's
    divergence is the exact trace."""
    D = z.shape[1]
    return torch.eye(D, dtype=z.dtype, device=z.device).unsqueeze(1).expand(D, z.shape[0], D).contiguous()


def concatsquash_tensors(net: nn.Module) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
    """``(weights, biases, gate_weights, gate_biases, shift_weights)`` of an
    :class:`~fastflow.nn.ODEnet` of concat-squash layers, in the operator's layout."""
    layers = list(net.layers)
    return (
        [layer.linear.weight for layer in layers],
        [layer.linear.bias for layer in layers],
        [layer.hyper_gate.weight for layer in layers],
        [layer.hyper_gate.bias for layer in layers],
        [layer.hyper_bias.weight for layer in layers],
    )


def _check(z: Any, lists: dict[str, Any], end_time: Any, activation: Any, probe: Any,
           rtol: Any, atol: Any, end_time_norm: Any, max_steps: Any) -> None:
    if not isinstance(z, Tensor):
        raise TypeError(f"z must be a Tensor, got {type(z).__name__}")
    if z.dim() != 2:
        raise ValueError(f"z must have shape [batch, features], got {tuple(z.shape)}")
    if z.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"z must be float32 or float64, got {z.dtype}")
    n_layers = None
    for name, value in lists.items():
        if isinstance(value, Tensor) or not isinstance(value, (list, tuple)):
            raise TypeError(f"{name} must be a list of tensors, got {type(value).__name__}")
        for i, t in enumerate(value):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name}[{i}] must be a Tensor, got {type(t).__name__}")
        if n_layers is None:
            n_layers = len(value)
        elif len(value) != n_layers:
            raise ValueError(f"{name} must have one tensor per layer ({n_layers}), got {len(value)}")
    if not n_layers:
        raise ValueError("weights must hold at least one layer")
    if not isinstance(end_time, Tensor) or end_time.numel() != 1:
        raise ValueError(f"end_time must be a one-element tensor, got {end_time!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if not isinstance(probe, Tensor) or not (
        probe.shape == z.shape or (probe.dim() == 3 and len(probe) >= 1 and probe.shape[1:] == z.shape)
    ):
        shape = tuple(probe.shape) if isinstance(probe, Tensor) else type(probe).__name__
        raise ValueError(
            f"probe must be a tensor of the shape of z {tuple(z.shape)} or [n_probes, *z.shape], got {shape}"
        )
    for name, value in (("rtol", rtol), ("atol", atol)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value == float("inf"):
            raise ValueError(f"{name} must be a positive number, got {value!r}")
    if end_time_norm not in (0, 1, 2) or isinstance(end_time_norm, bool):
        raise ValueError(f"end_time_norm must be 0, 1 or 2, got {end_time_norm!r}")
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"max_steps must be a positive int, got {max_steps!r}")


def cnf_dopri5(
    z: Tensor,
    weights: list[Tensor],
    biases: list[Tensor],
    gate_weights: list[Tensor],
    gate_biases: list[Tensor],
    shift_weights: list[Tensor],
    end_time: Tensor,
    activation: str,
    probe: Tensor,
    reverse: bool = False,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    end_time_norm: int = 0,
    max_steps: int = DEFAULT_MAX_STEPS,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(z_out, logdet, nfe)`` of one CNF solve (module docstring), on the native operator.

    Arguments:
        z: ``[B, D]`` float32 or float64, finite.
        weights, biases: ``W_l [out, in]``, ``b_l [out]`` of every layer (the last has ``D``
            outputs).
        gate_weights, gate_biases, shift_weights: ``gW_l [out, 1]``, ``gb_l [out]``,
            ``sW_l [out, 1]`` (:func:`concatsquash_tensors` takes all five lists from an
            :class:`~fastflow.nn.ODEnet`).
        end_time: ``T``, a one-element tensor (differentiable).
        activation: one of :data:`ACTIVATIONS`, between the layers.
        probe: Hutchinson's probe ``[B, D]``, or probes ``[P, B, D]`` whose sum of
            ``eps^T J eps`` is the divergence (:func:`basis_probes`: the exact trace); fixed over
            the solve and the adjoint's.
        reverse: integrate ``s = 1 -> 0`` (sampling).
        rtol, atol: dopri5 tolerances, of the forward and the adjoint solve.
        end_time_norm: the end time's adjoint in the adjoint's error norm: 0 not in it, 1 as
            ``T``'s, 2 as the adjoint of ``sqrt(T)`` (the parameter CNF learns).
        max_steps: dopri5 steps (accepted and rejected) after which the solve raises.

    Raises ``RuntimeError`` when the native operator is not available (there is no per-call
    reference: the reference solve is torchdiffeq's, :class:`~fastflow.nn.CNF` under the
    reference backend), or when the solve fails (non-finite state, step underflow, max_steps).
    """
    lists = {"weights": weights, "biases": biases, "gate_weights": gate_weights,
             "gate_biases": gate_biases, "shift_weights": shift_weights}
    _check(z, lists, end_time, activation, probe, rtol, atol, end_time_norm, max_steps)
    if _native.native_load_error() is not None:
        raise RuntimeError(f"fastflow: cnf_dopri5 needs the native extension: {_native.native_load_error()}")
    return torch.ops.fastflow.cnf_dopri5(
        z, list(weights), list(biases), list(gate_weights), list(gate_biases), list(shift_weights),
        end_time, MLP_ACTIVATIONS[activation], probe, bool(reverse), float(rtol), float(atol),
        int(end_time_norm), int(max_steps),
    )


# --------------------------------------------------------------------------------------------
# registration with torch.compile (fake) and autograd

if _native.native_load_error() is not None:
    pass
else:

    @torch.library.register_fake("fastflow::cnf_dopri5")
    def _cnf_dopri5_fake(z, weights, biases, gate_weights, gate_biases, shift_weights, end_time,
                         act, probe, reverse, rtol, atol, end_time_norm, max_steps):
        return (z.new_empty(z.shape), z.new_empty(z.shape[:1]),
                torch.empty((), dtype=torch.long, device="cpu"))

    @torch.library.register_fake("fastflow::cnf_dopri5_adjoint")
    def _cnf_dopri5_adjoint_fake(grad_z, grad_logdet, z_out, logdet, weights, biases, gate_weights,
                                 gate_biases, shift_weights, end_time, act, probe, reverse, rtol,
                                 atol, end_time_norm, max_steps):
        return (
            z_out.new_empty(z_out.shape),
            [w.new_empty(w.shape) for w in weights],
            [b.new_empty(b.shape) for b in biases],
            [w.new_empty(w.shape) for w in gate_weights],
            [b.new_empty(b.shape) for b in gate_biases],
            [w.new_empty(w.shape) for w in shift_weights],
            end_time.new_empty(end_time.shape),
            torch.empty((), dtype=torch.long, device="cpu"),
        )

    _N_LIST_ARGS = 5  # weights, biases, gate_weights, gate_biases, shift_weights

    def _setup_context(ctx, inputs, output):
        (z, weights, biases, gate_weights, gate_biases, shift_weights, end_time, act, probe,
         reverse, rtol, atol, end_time_norm, max_steps) = inputs
        z_out, logdet, _ = output
        ctx.n_layers = len(weights)
        ctx.options = (act, reverse, rtol, atol, end_time_norm, max_steps)
        ctx.save_for_backward(z_out, logdet, end_time, probe, *weights, *biases, *gate_weights,
                              *gate_biases, *shift_weights)

    def _backward(ctx, grad_z, grad_logdet, _grad_nfe):
        z_out, logdet, end_time, probe, *flat = ctx.saved_tensors
        L = ctx.n_layers
        lists = [flat[i * L:(i + 1) * L] for i in range(_N_LIST_ARGS)]
        act, reverse, rtol, atol, end_time_norm, max_steps = ctx.options
        if grad_z is None:
            grad_z = torch.zeros_like(z_out)
        if grad_logdet is None:
            grad_logdet = torch.zeros_like(logdet)
        (g_z, g_w, g_b, g_gw, g_gb, g_sw, g_end, nfe) = torch.ops.fastflow.cnf_dopri5_adjoint(
            grad_z, grad_logdet, z_out, logdet, *lists, end_time, act, probe, reverse, rtol, atol,
            end_time_norm, max_steps,
        )
        setattr(probe, _NFE_ATTR, nfe)
        return (g_z, g_w, g_b, g_gw, g_gb, g_sw, g_end, None, None, None, None, None, None, None)

    torch.library.register_autograd("fastflow::cnf_dopri5", _backward, setup_context=_setup_context)
