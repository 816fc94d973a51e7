"""Continuous normalizing flows (FFJORD): the dynamics nets :class:`ConcatSquashLinear`,
:class:`ConcatLinear` and :class:`ODEnet` for vectors ``[B, D]``, their convolutional
counterparts :class:`ConcatSquashConv2d`, :class:`ConcatConv2d` and :class:`ODEConvNet` for
images ``[B, C, H, W]``, the divergence functions :func:`divergence_exact` and
:func:`divergence_hutchinson`, the layer :class:`CNF` and the model :class:`FFJORD`.

A CNF acts on vectors (``features=D``) or on images (``features=(C, H, W)``, with the
convolutional dynamics by default); inside the solve an image is carried as the vector of its
``D = C * H * W`` values, so the divergence, the probes and the regularisers are the same code for
both (the dynamics see the image shape).

A CNF maps data to latent by integrating ``dz/dt = f(t, z)`` from ``t = 0`` to ``t = T``; the
log-det of the flow map obeys ``d/dt log|det dz(t)/dx| = tr(df/dz)`` (instantaneous change of
variables), so with the sign convention of REFERENCE.md
(``log p(x) = log p(z) + log|det dz/dx|``)::

    z, logdet = cnf(x)          # z = z(T), logdet = +int_0^T tr(df/dz)(t, z(t)) dt
    x, logdet_inv = cnf.inverse(z)   # integrates T -> 0, logdet_inv = -logdet

(FFJORD's code carries the opposite quantity, ``l(T) = -int tr``, and ``log p(x) = log p(z) - l``;
the two agree.) The augmented state ``[z, a]`` with ``da/dt = tr(df/dz)`` is integrated by
torchdiffeq (``odeint_adjoint`` by default, ``odeint`` with ``adjoint=False``), in a normalised
time ``s = t / T`` in ``[0, 1]`` so that the end time ``T = (sqrt_T)^2`` is an ordinary parameter
of the dynamics (its gradient flows through the adjoint like any weight).

Contract (DESIGN.md, "Points the contract settles"):

* The log-det is exact (``"exact"``: the trace of the Jacobian from ``D`` vector-Jacobian
  products per evaluation, for small ``D``) or Hutchinson's unbiased estimate (``"hutchinson"``:
  ``<eps^T df/dz, eps>`` with one probe per sample, Gaussian or Rademacher, drawn once per solve
  and held fixed over its evaluations). The kind is ``cnf.estimator`` in training mode and
  ``cnf.eval_estimator`` in eval mode (default: exact when ``D <= exact_max_dim``); both are
  plain attributes switchable at run time and not part of the state dict.
* An input with a NaN or an infinity raises ``ValueError`` before integrating.
* Diagnostics, as attributes after a call: ``last_nfe`` (evaluations of the dynamics in the
  forward solve), ``last_nfe_backward`` (in the adjoint solve of the last backward pass; 0 for
  ``adjoint=False``, which backpropagates through the solver's operations), ``last_estimator``.
* Optional regularisers (RNODE, Finlay et al.), integrated as extra states in training mode
  only: ``kinetic=True`` gives ``last_kinetic = int_0^T |f|^2 dt`` per sample and
  ``jacobian_frobenius=True`` gives ``last_jacobian_frobenius = int_0^T |eps^T df/dz|^2 dt`` per
  sample (a Hutchinson estimate of the squared Frobenius norm); add ``weight * value.mean()``
  to the loss. They are None in eval mode or when off.

Native paths: with no regulariser and vector dynamics that are an :class:`ODEnet` of
concat-squash layers,

* a dopri5 solve with adjoint gradients (the default configuration; or any dopri5 solve without
  gradients) is one call of the native operator :func:`fastflow.ops.cnf_dopri5.cnf_dopri5`: the
  whole solve, and in the backward pass the whole adjoint solve, in C++, for the Hutchinson
  estimator and for the exact trace (the ``D`` basis vectors as probes, ``D`` forward-mode
  passes in one matrix product per layer). It replays torchdiffeq's step control, so it takes
  the steps (and counts the evaluations) that the reference solve takes; the solve is then one
  node of a ``torch.compile`` graph;
* other Hutchinson solves (fixed-step solvers, ``adjoint=False`` with gradients) call the
  native operator :func:`fastflow.ops.mlp_trace.mlp_trace` once per evaluation of the dynamics
  inside torchdiffeq: ``f`` and ``eps^T (df/dz) eps`` by one forward-mode (Jacobian-vector) pass through
  the known layers, with a hand-written backward (exact: the gradient of ``eps^T J eps``), where
  autograd would build a vector-Jacobian graph and differentiate it again. The time gates and
  hyper-biases of the layers are computed from ``t`` in PyTorch and passed to the operator.

Everything else (the exact trace outside the native solve, the regularisers, other dynamics,
``fastflow.backend("reference")``) uses torchdiffeq and autograd in eager mode, so the layer turns
autograd on for its own computation under ``torch.no_grad()`` and ``torch.inference_mode()``.

Under ``torch.compile``: the native solve above is one node of the graph (training with the
adjoint, and no-grad solves). Every other solve without gradients (eval-mode ``log_prob`` and
sampling under ``torch.no_grad()``; the regularisers are then still integrated in training mode)
is traced into the graph by :mod:`fastflow.nn._ode_graph` (any of the solvers; Hutchinson or
exact; forward or inverse): the solver loop as a ``while_loop`` that replays torchdiffeq's step
control operation for operation (so the compiled solve takes the eager solve's steps,
``last_nfe`` included), and the divergence and the Jacobian-Frobenius regulariser by
vector-Jacobian products in the graph (no ``torch.autograd.grad``): written by hand through the
layers for an :class:`ODEnet` or :class:`ODEConvNet` (either layer, either activation), and by
``torch.func`` for a net of the user's own (whose call can be repeated:
:func:`~fastflow.nn._repeat.unrepeatable_submodule`). ``torch.compile(...,
fullgraph=True)`` of ``forward``, ``inverse`` and a model's ``log_prob`` then gives one graph.

Training with an :class:`ODEnet` or :class:`ODEConvNet` (the regularisers included) takes the
same in-graph solve with gradients, as the eager solve computes them: through the solver's steps
with ``adjoint=False``; by torchdiffeq's adjoint method with ``adjoint=True`` (the augmented
system solved back in time with its adjoint norm, so the compiled backward takes the eager
one's steps). Training with a net of the user's own does too with
``adjoint=True`` (both solves are loops without autograd, the products by ``torch.func``), not
with ``adjoint=False`` (torch 2.13's ``while_loop`` with autograd through ``torch.func``
products took other steps than eager). That needs the settings under which Inductor gets a
``while_loop``'s backward right: :func:`fastflow.compile` applies them to the model's graphs
(:mod:`fastflow.nn._loops`). Without them, solves with gradients outside the native solve run
eagerly on torchdiffeq inside a compiled model (``torch.compiler.disable``), as do training
with a net of the user's own and ``adjoint=False``, and nets with dropout or batch norm in
training mode: a plain ``torch.compile`` breaks the graph around them, and ``fullgraph=True``
raises an error that names the reason.

References:
    Chen, Rubanova, Bettencourt, Duvenaud. "Neural Ordinary Differential Equations" (2018),
    https://arxiv.org/abs/1806.07366.
    Grathwohl, Chen, Bettencourt, Sutskever, Duvenaud. "FFJORD: Free-form Continuous Dynamics
    for Scalable Reversible Generative Models" (2019), https://arxiv.org/abs/1810.01367.
    Finlay, Jacobsen, Nurbekyan, Oberman. "How to train your neural ODE: the world of Jacobian
    and kinetic regularization" (2020), https://arxiv.org/abs/2002.02798.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fastflow import _native
from fastflow.flow import Flow, Transform
from fastflow.ops.cnf_dopri5 import ACTIVATIONS as _SOLVE_ACTIVATIONS
from fastflow.ops.cnf_dopri5 import basis_probes, cnf_dopri5, concatsquash_tensors, last_backward_nfe
from fastflow.ops.mlp_trace import mlp_trace
from fastflow.nn._ode_graph import (
    ADAPTIVE_GRAPH_SOLVERS,
    GRAPH_SOLVERS,
    func_dynamics,
    graph_dynamics,
    has_tableau,
    load_tableau,
    odeint_adjoint_graph,
    odeint_graph,
)
from fastflow.nn._loops import loop_gradients_in_graph
from fastflow.nn._repeat import unrepeatable_submodule
from fastflow._checks import int_at_least as _int_at_least
from fastflow._checks import positive_float as _positive_float
from fastflow._checks import positive_int as _positive_int

__all__ = [
    "ESTIMATORS",
    "PROBES",
    "SOLVERS",
    "ConcatLinear",
    "ConcatSquashLinear",
    "ConcatConv2d",
    "ConcatSquashConv2d",
    "ODEnet",
    "ODEConvNet",
    "divergence_exact",
    "divergence_hutchinson",
    "CNF",
    "FFJORD",
]

#: The divergence estimators of a CNF.
ESTIMATORS = ("hutchinson", "exact")
#: Hutchinson probe distributions.
PROBES = ("gaussian", "rademacher")
#: Adaptive-step solvers of torchdiffeq that a CNF accepts.
ADAPTIVE_SOLVERS = ("dopri5", "dopri8", "bosh3", "adaptive_heun")
#: Fixed-step solvers (they need ``step_size``).
FIXED_SOLVERS = ("rk4", "euler", "midpoint")
SOLVERS = ADAPTIVE_SOLVERS + FIXED_SOLVERS
_ACTIVATIONS = {"tanh": torch.tanh, "softplus": F.softplus}
_LAYERS = ("concatsquash", "concat")


def _torchdiffeq() -> Any:
    try:
        import torchdiffeq
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "fastflow's continuous normalizing flows (CNF, FFJORD) need torchdiffeq: "
            "pip install torchdiffeq"
        ) from err
    return torchdiffeq


# -- dynamics nets ------------------------------------------------------------------------------


class ConcatSquashLinear(nn.Module):
    """Time-conditioned linear layer of FFJORD:
    ``(W h + b) * sigmoid(W_g t + b_g) + W_b t`` (``W_b`` without bias).

    Arguments:
        in_features: width of ``h``.
        out_features: width of the output.

    ``forward(t, h)`` takes ``t`` a scalar tensor (or a Python number) and ``h`` of shape
    ``[B, in_features]``.

    Example:
        >>> layer = ConcatSquashLinear(3, 5)
        >>> layer(torch.tensor(0.3), torch.randn(4, 3)).shape
        torch.Size([4, 5])
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features = _positive_int(in_features, "in_features")
        self.out_features = _positive_int(out_features, "out_features")
        self.linear = nn.Linear(in_features, out_features)
        self.hyper_gate = nn.Linear(1, out_features)
        self.hyper_bias = nn.Linear(1, out_features, bias=False)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"

    def forward(self, t: Tensor | float, h: Tensor) -> Tensor:
        t = torch.as_tensor(t, dtype=h.dtype, device=h.device).reshape(1, 1)
        return self.linear(h) * torch.sigmoid(self.hyper_gate(t)) + self.hyper_bias(t)


class ConcatLinear(nn.Module):
    """Time-conditioned linear layer ``Linear([t, h])`` (FFJORD's ``concat``).

    Example:
        >>> ConcatLinear(3, 5)(0.1, torch.randn(4, 3)).shape
        torch.Size([4, 5])
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features = _positive_int(in_features, "in_features")
        self.out_features = _positive_int(out_features, "out_features")
        self.linear = nn.Linear(in_features + 1, out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"

    def forward(self, t: Tensor | float, h: Tensor) -> Tensor:
        t = torch.as_tensor(t, dtype=h.dtype, device=h.device).reshape(1, 1)
        return self.linear(torch.cat([t.expand(h.shape[0], 1), h], dim=1))


class ODEnet(nn.Module):
    """The dynamics ``f(t, z)`` of a CNF on vectors ``[B, D]``: time-conditioned linear layers
    with the activation on all but the last.

    Arguments:
        features: ``D`` (input and output width).
        hidden: hidden widths (FFJORD 2-D: three layers of 64).
        activation: ``"tanh"`` (default) or ``"softplus"`` (smooth, as the divergence needs).
        layer: ``"concatsquash"`` (default) or ``"concat"``.

    Example:
        >>> net = ODEnet(2, hidden=(16, 16))
        >>> net(torch.tensor(0.0), torch.randn(8, 2)).shape
        torch.Size([8, 2])
    """

    def __init__(
        self,
        features: int,
        hidden: int | Sequence[int] = (64, 64, 64),
        activation: str = "tanh",
        layer: str = "concatsquash",
    ):
        super().__init__()
        self.features = _positive_int(features, "features")
        widths = _hidden_widths(hidden)
        _check_choice(activation, _ACTIVATIONS, "activation")
        _check_choice(layer, _LAYERS, "layer")
        self.activation = activation
        self.layer = layer
        self._act = _ACTIVATIONS[activation]
        cls = ConcatSquashLinear if layer == "concatsquash" else ConcatLinear
        dims = [self.features] + widths + [self.features]
        self.layers = nn.ModuleList(cls(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def extra_repr(self) -> str:
        return f"features={self.features}, activation={self.activation!r}, layer={self.layer!r}"

    def forward(self, t: Tensor | float, z: Tensor) -> Tensor:
        return _run_layers(self.layers, self._act, t, z)


def _run_layers(layers: nn.ModuleList, act: Any, t: Tensor | float, z: Tensor) -> Tensor:
    """The time-conditioned layers in turn, the activation between them (not after the last)."""
    h = z
    last = len(layers) - 1
    for k, layer in enumerate(layers):
        h = layer(t, h)
        if k < last:
            h = act(h)
    return h


def _time(t: Any, h: Tensor) -> Tensor:
    """``t`` (a Python number or a one-element tensor) as a ``[1, 1]`` tensor like ``h``."""
    t = torch.as_tensor(t, dtype=h.dtype, device=h.device)
    if t.numel() != 1:
        raise ValueError(f"t must be a scalar (one time for the whole batch), got shape {tuple(t.shape)}")
    return t.reshape(1, 1)


def _check_image(h: Any, channels: int, name: str) -> None:
    if not isinstance(h, Tensor) or h.dim() != 4 or h.shape[1] != channels:
        shape = tuple(h.shape) if isinstance(h, Tensor) else type(h).__name__
        raise ValueError(f"{name} must be a tensor [B, {channels}, H, W], got {shape}")


def _conv_geometry(kernel_size: Any, padding: Any) -> tuple[int, int]:
    kernel_size = _positive_int(kernel_size, "kernel_size")
    if padding is None:
        if kernel_size % 2 == 0:
            raise ValueError(
                f"kernel_size must be odd when padding is None (size-preserving), got {kernel_size}"
            )
        padding = kernel_size // 2
    return kernel_size, _int_at_least(padding, "padding", 0)


class _TimeConv2d(nn.Module):
    """The geometry and convolution shared by the time-conditioned conv layers; ``extra_in``
    input channels beyond ``h``'s (the time channel of :class:`ConcatConv2d`)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, padding: int | None,
                 extra_in: int = 0):
        super().__init__()
        self.in_channels = _positive_int(in_channels, "in_channels")
        self.out_channels = _positive_int(out_channels, "out_channels")
        self.kernel_size, self.padding = _conv_geometry(kernel_size, padding)
        self.conv = nn.Conv2d(in_channels + extra_in, out_channels, self.kernel_size,
                              padding=self.padding)

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, out_channels={self.out_channels}, "
            f"kernel_size={self.kernel_size}, padding={self.padding}"
        )


class ConcatSquashConv2d(_TimeConv2d):
    """Time-conditioned convolution of FFJORD's image models:
    ``conv(h) * sigmoid(W_g t + b_g) + W_b t``, the gate and the bias per output channel
    (``W_b`` without bias), broadcast over the pixels.

    Grathwohl et al. "FFJORD: Free-form Continuous Dynamics for Scalable Reversible Generative
    Models" (2019), https://arxiv.org/abs/1810.01367.

    Arguments:
        in_channels: channels of ``h``.
        out_channels: channels of the output.
        kernel_size: of the convolution (default 3).
        padding: zero padding (None: ``kernel_size // 2``, which keeps ``H`` and ``W`` for an odd
            kernel, as a CNF needs).

    ``forward(t, h)`` takes ``t`` a scalar tensor (or a Python number) and ``h`` of shape
    ``[B, in_channels, H, W]``.

    Example:
        >>> layer = ConcatSquashConv2d(3, 8)
        >>> layer(torch.tensor(0.3), torch.randn(2, 3, 5, 5)).shape
        torch.Size([2, 8, 5, 5])
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, padding: int | None = None):
        super().__init__(in_channels, out_channels, kernel_size, padding)
        self.hyper_gate = nn.Linear(1, out_channels)
        self.hyper_bias = nn.Linear(1, out_channels, bias=False)

    def forward(self, t: Tensor | float, h: Tensor) -> Tensor:
        _check_image(h, self.in_channels, "h")
        t = _time(t, h)
        gate = torch.sigmoid(self.hyper_gate(t)).view(1, -1, 1, 1)
        return self.conv(h) * gate + self.hyper_bias(t).view(1, -1, 1, 1)


class ConcatConv2d(_TimeConv2d):
    """Time-conditioned convolution ``conv([t, h])`` (FFJORD's ``concat`` for images): a
    constant channel holding ``t`` is put in front of ``h``'s channels.

    Arguments:
        in_channels, out_channels, kernel_size, padding: as in :class:`ConcatSquashConv2d`
            (the convolution itself has ``in_channels + 1`` input channels).

    Example:
        >>> ConcatConv2d(3, 8)(0.1, torch.randn(2, 3, 5, 5)).shape
        torch.Size([2, 8, 5, 5])
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, padding: int | None = None):
        super().__init__(in_channels, out_channels, kernel_size, padding, extra_in=1)

    def forward(self, t: Tensor | float, h: Tensor) -> Tensor:
        _check_image(h, self.in_channels, "h")
        t = _time(t, h)
        tt = t.reshape(1, 1, 1, 1).expand(h.shape[0], 1, h.shape[2], h.shape[3])
        return self.conv(torch.cat([tt, h], dim=1))


class ODEConvNet(nn.Module):
    """The dynamics ``f(t, z)`` of a CNF on images ``[B, C, H, W]``: time-conditioned
    convolutions (stride 1, size-preserving padding) with the activation on all but the last,
    ``C -> hidden[0] -> ... -> hidden[-1] -> C`` channels (FFJORD's image ODE nets, without the
    multiscale squeezes).

    Grathwohl et al. "FFJORD: Free-form Continuous Dynamics for Scalable Reversible Generative
    Models" (2019), https://arxiv.org/abs/1810.01367.

    Arguments:
        channels: ``C`` (input and output channels).
        hidden: hidden channel counts (FFJORD images: three layers of 64).
        activation: ``"tanh"`` (default) or ``"softplus"``.
        layer: ``"concatsquash"`` (default, :class:`ConcatSquashConv2d`) or ``"concat"``
            (:class:`ConcatConv2d`).
        kernel_size: of every convolution (odd; default 3).

    Example:
        >>> net = ODEConvNet(1, hidden=(8, 8))
        >>> net(torch.tensor(0.0), torch.randn(2, 1, 6, 6)).shape
        torch.Size([2, 1, 6, 6])
        >>> cnf = CNF((1, 6, 6), net=net)   # or CNF((1, 6, 6), hidden=(8, 8)): the same net
    """

    def __init__(
        self,
        channels: int,
        hidden: int | Sequence[int] = (64, 64, 64),
        activation: str = "tanh",
        layer: str = "concatsquash",
        kernel_size: int = 3,
    ):
        super().__init__()
        self.channels = _positive_int(channels, "channels")
        widths = _hidden_widths(hidden)
        _check_choice(activation, _ACTIVATIONS, "activation")
        _check_choice(layer, _LAYERS, "layer")
        self.kernel_size, _ = _conv_geometry(kernel_size, None)
        self.activation = activation
        self.layer = layer
        self._act = _ACTIVATIONS[activation]
        cls = ConcatSquashConv2d if layer == "concatsquash" else ConcatConv2d
        dims = [self.channels] + widths + [self.channels]
        self.layers = nn.ModuleList(cls(a, b, self.kernel_size) for a, b in zip(dims[:-1], dims[1:]))

    def extra_repr(self) -> str:
        return f"channels={self.channels}, activation={self.activation!r}, layer={self.layer!r}"

    def forward(self, t: Tensor | float, z: Tensor) -> Tensor:
        _check_image(z, self.channels, "z")
        return _run_layers(self.layers, self._act, t, z)


def _hidden_widths(hidden: Any) -> list[int]:
    if isinstance(hidden, numbers.Integral) and not isinstance(hidden, bool):
        hidden = [hidden]
    if not isinstance(hidden, Sequence):
        raise ValueError(f"hidden must be an int or a sequence of ints, got {hidden!r}")
    return [_positive_int(w, "hidden") for w in hidden]


def _check_choice(value: Any, choices: Any, name: str) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def _features_shape(features: Any) -> torch.Size:
    """``features`` of a CNF or FFJORD: an int ``D`` or an event shape such as ``(C, H, W)``."""
    if isinstance(features, numbers.Integral) and not isinstance(features, bool):
        return torch.Size([_positive_int(features, "features")])
    if isinstance(features, Sequence) and not isinstance(features, str) and len(features) > 0:
        for d in features:
            if isinstance(d, bool) or not isinstance(d, numbers.Integral) or d < 1:
                raise ValueError(f"features must be an int D or a shape of positive ints, got {features!r}")
        return torch.Size(int(d) for d in features)
    raise ValueError(f"features must be an int D or a shape of positive ints such as (C, H, W), got {features!r}")


class _Flattened(nn.Module):
    """A dynamics net of an event shape seen through the flat state ``[B, D]`` of the solve."""

    def __init__(self, net: nn.Module, shape: torch.Size):
        super().__init__()
        self.net = net
        self.shape = shape

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        out = self.net(t, z.reshape(z.shape[0], *self.shape))
        return out.reshape(z.shape[0], -1)


# -- divergence -------------------------------------------------------------------------------


def divergence_exact(f_out: Tensor, z: Tensor, create_graph: bool = True) -> Tensor:
    """``tr(df/dz)`` per sample, ``[B]``, from ``D`` vector-Jacobian products (small ``D``).

    ``f_out`` (``[B, D]``, or ``[B, C, H, W]`` and any ``[B, ...]``, then ``D`` is the number of
    values per sample) must have been computed from ``z`` (same shape, requiring grad) sample by
    sample. With ``create_graph`` the result is differentiable (w.r.t. ``z`` and the parameters).

    Example:
        >>> z = torch.randn(4, 3, requires_grad=True)
        >>> divergence_exact(2 * z, z, create_graph=False)
        tensor([6., 6., 6., 6.])
    """
    _check_pair(f_out, z)
    batch = f_out.shape[0]
    flat = f_out.reshape(batch, -1)
    total = f_out.new_zeros(batch)
    for i in range(flat.shape[1]):
        (g,) = torch.autograd.grad(flat[:, i].sum(), z, create_graph=create_graph, retain_graph=True)
        total = total + g.reshape(batch, -1)[:, i]
    return total


def divergence_hutchinson(f_out: Tensor, z: Tensor, eps: Tensor, create_graph: bool = True) -> Tensor:
    """Hutchinson's estimate ``<eps^T df/dz, eps>`` of ``tr(df/dz)`` per sample, ``[B]``.

    Unbiased when ``eps`` has zero mean and identity covariance (Gaussian or Rademacher); one
    vector-Jacobian product. ``eps`` has the shape of ``z`` (``[B, D]`` or ``[B, ...]``).

    Example:
        >>> z = torch.randn(4, 3, requires_grad=True)
        >>> eps = torch.randn(4, 3)
        >>> torch.allclose(divergence_hutchinson(2 * z, z, eps), 2 * (eps * eps).sum(1))
        True
    """
    _check_pair(f_out, z)
    if not isinstance(eps, Tensor) or eps.shape != z.shape:
        raise ValueError(
            f"eps must be a tensor of the shape of z {tuple(z.shape)}, got "
            f"{tuple(eps.shape) if isinstance(eps, Tensor) else type(eps).__name__}"
        )
    (vjp,) = torch.autograd.grad(f_out, z, eps, create_graph=create_graph, retain_graph=True)
    return (vjp * eps).reshape(z.shape[0], -1).sum(1)


def _check_pair(f_out: Tensor, z: Tensor) -> None:
    if not isinstance(z, Tensor) or z.dim() < 2:
        raise ValueError(
            f"z must be a tensor [B, D] or [B, ...] (e.g. [B, C, H, W]), got "
            f"{tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__}"
        )
    if not isinstance(f_out, Tensor) or f_out.shape != z.shape:
        raise ValueError(
            f"f_out must have the shape of z {tuple(z.shape)}, got "
            f"{tuple(f_out.shape) if isinstance(f_out, Tensor) else type(f_out).__name__}"
        )
    if not z.requires_grad:
        raise ValueError("z must require grad (f_out computed from it with autograd on)")


def _probe(z: Tensor, kind: str) -> Tensor:
    if kind == "gaussian":
        return torch.randn_like(z)
    return torch.randint_like(z, 0, 2).mul_(2).sub_(1)


@contextlib.contextmanager
def _autograd_on() -> Iterator[None]:
    if torch.is_inference_mode_enabled():
        with torch.inference_mode(False), torch.enable_grad():
            yield
    else:
        with torch.enable_grad():
            yield


# -- the layer --------------------------------------------------------------------------------


def _native_dynamics(net: nn.Module):
    """For an :class:`ODEnet` of concat-squash layers, the function ``t -> (weights, biases,
    gates, shifts)`` that feeds :func:`fastflow.ops.mlp_trace.mlp_trace` (the gates
    ``sigmoid(W_g t + b_g)`` and hyper-biases ``W_b t`` as ``[1, out]`` rows); else None."""
    if type(net) is not ODEnet or net.layer != "concatsquash":
        return None

    def tensors(t: Tensor) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        weights, biases, gate_weights, gate_biases, shift_weights = concatsquash_tensors(net)
        tt = t.reshape(1, 1).to(weights[0].dtype)
        gates = [torch.sigmoid(F.linear(tt, w, b)) for w, b in zip(gate_weights, gate_biases)]
        shifts = [F.linear(tt, w) for w in shift_weights]
        return weights, biases, gates, shifts

    return tensors


class _Dynamics(nn.Module):
    """The augmented dynamics of one solve (a fresh object per call: it holds that solve's
    probes and counters). State ``(z, a[, kinetic, jac])`` in normalised time ``s``."""

    def __init__(self, cnf: "CNF", estimator: str, eps: Tensor | None, regularize: bool):
        super().__init__()
        self.net = cnf.net if len(cnf.event_shape) == 1 else _Flattened(cnf.net, cnf.event_shape)
        self._cnf = [cnf]  # not a submodule (no parameter twice)
        self.estimator = estimator
        self.eps = eps
        self.regularize = regularize
        self.nfe = 0
        self.nfe_backward = 0
        self.backward_phase = False
        self.native = None
        if estimator == "hutchinson" and not regularize and len(cnf.event_shape) == 1:
            self.native = _native_dynamics(cnf.net)

    def forward(self, s: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        if self.backward_phase:
            self.nfe_backward += 1
        else:
            self.nfe += 1
        create_graph = torch.is_grad_enabled()
        z = state[0]
        if self.native is not None and _native.use_native("mlp_trace", z):
            T = self._cnf[0].end_time
            weights, biases, gates, shifts = self.native(s * T)
            f, div = mlp_trace(
                z, weights, biases, gates, shifts, None, self.net.activation, False,
                probes=self.eps.unsqueeze(0), value_coeffs=[1.0],
            )
            return T * f, T * div
        with torch.enable_grad():
            if not (create_graph and z.requires_grad):
                z = z.detach().requires_grad_(True)
            T = self._cnf[0].end_time
            f = self.net(s * T, z)
            if self.estimator == "exact":
                div = divergence_exact(f, z, create_graph=create_graph)
                vjp = None
            else:
                vjp = self._vjp(f, z, create_graph)
                div = (vjp * self.eps).sum(1)
            out = [T * f, T * div]
            if self.regularize:
                if vjp is None:
                    vjp = self._vjp(f, z, create_graph)
                out.append(T * f.pow(2).sum(1))
                out.append(T * vjp.pow(2).sum(1))
        if not create_graph:
            out = [o.detach() for o in out]
        return tuple(out)

    def _vjp(self, f: Tensor, z: Tensor, create_graph: bool) -> Tensor:
        (vjp,) = torch.autograd.grad(f, z, self.eps, create_graph=create_graph, retain_graph=True)
        return vjp


class CNF(Transform):
    """One continuous normalizing flow block on vectors ``[B, D]`` or images ``[B, C, H, W]``
    (module docstring).

    Arguments:
        features: ``D`` for vectors, or the event shape: ``(C, H, W)`` for images (any shape
            with a ``net`` of its own).
        net: the dynamics, an ``nn.Module`` with ``forward(t, z) -> dz/dt`` acting sample by
            sample on ``z`` of shape ``[B, *features]`` (None: ``ODEnet(D, hidden, activation,
            layer)`` for vectors, ``ODEConvNet(C, hidden, activation, layer)`` for images).
        hidden, activation, layer: of the default :class:`ODEnet` / :class:`ODEConvNet`
            (ignored with ``net``).
        T: the end time (FFJORD: 0.5).
        train_T: learn ``T`` (as ``T = sqrt_T^2``, FFJORD's parametrisation); else a buffer.
        estimator: divergence kind in training mode, ``"hutchinson"`` (default) or ``"exact"``.
        eval_estimator: kind in eval mode (None: ``"exact"`` when ``D <= exact_max_dim``, else
            ``"hutchinson"``).
        exact_max_dim: the largest ``D`` (for an image ``C * H * W``) for which the default eval
            estimator is exact (the exact trace costs ``D`` vector-Jacobian products per
            evaluation).
        probe: Hutchinson probe distribution, ``"gaussian"`` (default) or ``"rademacher"``.
        solver: torchdiffeq method, one of :data:`SOLVERS` (default ``"dopri5"``).
        atol, rtol: tolerances of the adaptive solvers (and of the adjoint solve).
        adjoint: gradients by the adjoint method (``odeint_adjoint``, memory independent of the
            number of steps); False backpropagates through the solver.
        step_size: step of the fixed-step solvers (rk4, euler, midpoint), in time ``t``.
        kinetic, jacobian_frobenius: integrate the RNODE regularisers in training mode
            (``last_kinetic``, ``last_jacobian_frobenius``).

    Example:
        >>> cnf = CNF(2, hidden=(16, 16), T=0.5)
        >>> x = torch.randn(8, 2)
        >>> z, logdet = cnf(x)
        >>> x2, logdet_inv = cnf.inverse(z)
        >>> cnf.last_nfe > 0, torch.allclose(x, x2, atol=1e-3)
        (True, True)
        >>> image_cnf = CNF((1, 4, 4), hidden=(8,), eval_estimator="exact")  # conv dynamics
        >>> image_cnf(torch.randn(2, 1, 4, 4))[0].shape
        torch.Size([2, 1, 4, 4])
    """

    def __init__(
        self,
        features: int,
        net: nn.Module | None = None,
        hidden: int | Sequence[int] = (64, 64, 64),
        activation: str = "tanh",
        layer: str = "concatsquash",
        T: float = 0.5,
        train_T: bool = True,
        estimator: str = "hutchinson",
        eval_estimator: str | None = None,
        exact_max_dim: int = 2,
        probe: str = "gaussian",
        solver: str = "dopri5",
        atol: float = 1e-5,
        rtol: float = 1e-5,
        adjoint: bool = True,
        step_size: float | None = None,
        kinetic: bool = False,
        jacobian_frobenius: bool = False,
    ):
        super().__init__()
        self.event_shape = _features_shape(features)
        #: ``D``, the number of values per sample (``C * H * W`` for an image).
        self.features = math.prod(self.event_shape)
        if net is None:
            if len(self.event_shape) == 1:
                net = ODEnet(self.features, hidden, activation, layer)
            elif len(self.event_shape) == 3:
                net = ODEConvNet(self.event_shape[0], hidden, activation, layer)
            else:
                raise ValueError(
                    f"features must be D or (C, H, W) for the default dynamics (got the shape "
                    f"{tuple(self.event_shape)}); pass a net for other shapes"
                )
        elif not isinstance(net, nn.Module):
            raise ValueError(f"net must be an nn.Module with forward(t, z), got {type(net).__name__}")
        self.net = net
        T = _positive_float(T, "T")
        if not isinstance(train_T, bool):
            raise ValueError(f"train_T must be a bool, got {train_T!r}")
        self.train_T = train_T
        sqrt_T = torch.tensor(math.sqrt(T))
        if train_T:
            self.sqrt_T = nn.Parameter(sqrt_T)
        else:
            self.register_buffer("sqrt_T", sqrt_T)
        self.estimator = estimator
        self.eval_estimator = eval_estimator
        self.exact_max_dim = _int_at_least(exact_max_dim, "exact_max_dim", 0)
        if probe not in PROBES:
            raise ValueError(f"probe must be one of {PROBES}, got {probe!r}")
        self.probe = probe
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
        self.solver = solver
        if solver in ADAPTIVE_GRAPH_SOLVERS:  # (its tableau for a compiled solve; here, eagerly)
            load_tableau(solver)
        self.atol = _positive_float(atol, "atol")
        self.rtol = _positive_float(rtol, "rtol")
        if not isinstance(adjoint, bool):
            raise ValueError(f"adjoint must be a bool, got {adjoint!r}")
        self.adjoint = adjoint
        if step_size is not None:
            step_size = _positive_float(step_size, "step_size")
        elif solver in FIXED_SOLVERS:
            raise ValueError(f"step_size must be given for the fixed-step solver {solver!r}")
        self.step_size = step_size
        self.kinetic = bool(kinetic)
        self.jacobian_frobenius = bool(jacobian_frobenius)
        # diagnostics
        self._last_nfe: int | Tensor | None = None
        self._last_probe: Tensor | None = None  # the native solve's probe (its backward NFE)
        self.last_estimator: str | None = None
        self.last_kinetic: Tensor | None = None
        self.last_jacobian_frobenius: Tensor | None = None
        self._last_dynamics: list[_Dynamics] = []  # a list: not registered as a submodule
        # the last solve ran in a compiled graph: False, "direct" or "adjoint" (with the
        # adjoint solve in the graph's backward, whose evaluations are not counted)
        self._last_graph: bool | str = False

    def extra_repr(self) -> str:
        shape = self.features if len(self.event_shape) == 1 else tuple(self.event_shape)
        return (
            f"features={shape}, T={self.end_time.item():.4g}, estimator={self.estimator!r}, "
            f"solver={self.solver!r}, atol={self.atol:g}, rtol={self.rtol:g}, adjoint={self.adjoint}"
        )

    # -- attributes -------------------------------------------------------------------------

    @property
    def end_time(self) -> Tensor:
        """``T = sqrt_T^2`` (a tensor; differentiable when ``train_T``)."""
        return self.sqrt_T * self.sqrt_T

    @property
    def estimator(self) -> str:
        return self._estimator

    @estimator.setter
    def estimator(self, value: str) -> None:
        if value not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {value!r}")
        self._estimator = value

    @property
    def eval_estimator(self) -> str | None:
        return self._eval_estimator

    @eval_estimator.setter
    def eval_estimator(self, value: str | None) -> None:
        if value is not None and value not in ESTIMATORS:
            raise ValueError(f"eval_estimator must be one of {ESTIMATORS} or None, got {value!r}")
        self._eval_estimator = value

    def active_estimator(self) -> str:
        """The kind a call uses now (training or eval mode)."""
        if self.training:
            return self._estimator
        if self._eval_estimator is not None:
            return self._eval_estimator
        return "exact" if self.features <= self.exact_max_dim else "hutchinson"

    @property
    def last_nfe(self) -> int | None:
        """Evaluations of the dynamics in the forward solve of the last call (None before one)."""
        nfe = self._last_nfe
        return int(nfe) if isinstance(nfe, Tensor) else nfe

    @property
    def last_nfe_backward(self) -> int | None:
        """Evaluations of the dynamics in the adjoint solves of backward passes through the last
        call (0 with ``adjoint=False`` or before a backward pass; None before a call, and after
        a compiled call whose adjoint solve ran in the graph, which does not count them)."""
        if self._last_probe is not None:
            return last_backward_nfe(self._last_probe) or 0
        if self._last_graph:
            return None if self._last_graph == "adjoint" else 0
        return self._last_dynamics[0].nfe_backward if self._last_dynamics else None

    # -- the solves -------------------------------------------------------------------------

    def _check_input(self, x: Any, name: str) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(x).__name__}")
        if x.dim() != len(self.event_shape) + 1 or x.shape[1:] != self.event_shape:
            shape = ", ".join(str(d) for d in self.event_shape)
            raise ValueError(f"{name} must have shape [batch, {shape}], got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
        message = f"{name} has non-finite values (NaN or inf); the ODE solve needs finite input"
        if torch.compiler.is_compiling():  # (the test reads a value: an assertion in the graph)
            torch._assert_async(torch.isfinite(x).all(), message)
        elif not bool(torch.isfinite(x).all()):
            raise ValueError(message)

    def _solves_natively(self, x: Tensor, estimator: str, regularize: bool, grad_on: bool) -> bool:
        """Whether this solve is one call of the native solve operator (module docstring)."""
        return (
            not regularize
            and self.solver == "dopri5"
            and (self.adjoint or not grad_on)
            and len(self.event_shape) == 1
            and type(self.net) is ODEnet
            and self.net.layer == "concatsquash"
            and self.net.activation in _SOLVE_ACTIVATIONS
            and _native.use_native("cnf_dopri5", x)
        )

    def _solve(self, x: Tensor, reverse: bool) -> tuple[Tensor, Tensor]:
        estimator = self.active_estimator()
        regularize = self.training and (self.kinetic or self.jacobian_frobenius) and not reverse
        # (Dynamo cannot trace the inference-mode query; a compiled graph is not in that mode)
        inference = not torch.compiler.is_compiling() and torch.is_inference_mode_enabled()
        grad_on = torch.is_grad_enabled() and not inference
        native = self._solves_natively(x, estimator, regularize, grad_on)
        if torch.compiler.is_compiling() and not native and self._solves_in_graph(grad_on):
            return self._solve_graph(x, reverse, estimator, regularize, grad_on)
        self.last_estimator = estimator
        self.last_kinetic = self.last_jacobian_frobenius = None
        if native:
            # the exact trace: the basis vectors as probes
            eps = basis_probes(x) if estimator == "exact" else _probe(x, self.probe)
            # the reference's adjoint norm sees sqrt_T's adjoint when T is learned
            end_time_norm = 2 if self.train_T and self.sqrt_T.requires_grad and grad_on else 0
            z, logdet, nfe = cnf_dopri5(
                x, *concatsquash_tensors(self.net), self.end_time, self.net.activation, eps,
                reverse=reverse, rtol=self.rtol, atol=self.atol, end_time_norm=end_time_norm,
            )
            self._last_dynamics = []
            self._last_probe = eps
            self._last_graph = False
            self._last_nfe = nfe
            return z, logdet
        return self._solve_torchdiffeq(x, reverse, estimator, regularize, grad_on, inference)

    def _solves_in_graph(self, grad_on: bool) -> bool:
        """Whether a compiled solve runs as traceable operations (:mod:`fastflow.nn._ode_graph`):
        a solver it replays, and either no gradient through the solve (any dynamics net
        whose call can be repeated, :func:`~fastflow.nn._repeat.unrepeatable_submodule`) or a
        gradient where a ``while_loop``'s backward is right
        (:func:`~fastflow.nn._loops.loop_gradients_in_graph`): for the library's nets through
        the steps or by the adjoint, for other such nets by the adjoint; otherwise the solve
        stays on torchdiffeq, eagerly."""
        return (
            self.solver in GRAPH_SOLVERS
            and (self.solver not in ADAPTIVE_GRAPH_SOLVERS or has_tableau(self.solver))
            and (not grad_on or loop_gradients_in_graph(convolutions=self._net_has_convolutions()))
            and (
                self._hand_written_dynamics()
                or ((not grad_on or self.adjoint) and unrepeatable_submodule(self.net) is None)
            )
        )

    def _hand_written_dynamics(self) -> bool:
        """Whether the in-graph solve differentiates the net by hand (:func:`graph_dynamics`:
        the library's ODEnet and ODEConvNet); other nets by ``torch.func``
        (:func:`func_dynamics`), in solves without autograd through the loop only (no
        gradient, or the adjoint): torch 2.13's ``while_loop`` with autograd through a body
        that calls ``torch.func.vjp`` took other steps than eager (a user's MLP, exact trace: 26
        evaluations for eager's 20, the log-det 0.06 off, already without compiling)."""
        return (type(self.net) is ODEnet and len(self.event_shape) == 1) or (
            type(self.net) is ODEConvNet and len(self.event_shape) == 3
        )

    def _net_has_convolutions(self) -> bool:
        return any(isinstance(m, nn.modules.conv._ConvNd) for m in self.net.modules())

    def _adjoint_parameters(self) -> tuple[list[str], tuple[Tensor, ...], bool]:
        """The adjoint solve's parameters (torchdiffeq's ``adjoint_params``, which keeps those
        that require grad): the net's that require grad, then ``sqrt_T`` when learned.
        ``(the net's parameter names, the parameters, whether sqrt_T is the last)``."""
        named = [(k, p) for k, p in self.net.named_parameters() if p.requires_grad]
        learn_T = self.train_T and self.sqrt_T.requires_grad
        params = tuple(p for _, p in named) + ((self.sqrt_T,) if learn_T else ())
        return [k for k, _ in named], params, learn_T

    def _solve_graph(self, x: Tensor, reverse: bool, estimator: str, regularize: bool,
                     grad_on: bool) -> tuple[Tensor, Tensor]:
        """The solve under ``torch.compile`` without torchdiffeq: the eager solve's steps and
        divergence as traceable operations (:mod:`fastflow.nn._ode_graph`), differentiable as
        the eager solve: by backpropagation through the steps (``adjoint=False``) or by
        torchdiffeq's adjoint (``adjoint=True``)."""
        make = graph_dynamics if self._hand_written_dynamics() else func_dynamics
        dynamics = make(self.net, self.event_shape)
        need_eps = estimator == "hutchinson" or regularize
        eps = _probe(x, self.probe) if need_eps else None
        exact = estimator == "exact"
        D = x.shape[1]
        if exact:  # the D basis vectors (and the regulariser's probe) as cotangents
            cotangents = basis_probes(x)
            if regularize:
                cotangents = torch.cat([cotangents, eps.unsqueeze(0)])
        else:
            cotangents = eps.unsqueeze(0)

        def rhs(s: Tensor, state: tuple[Tensor, ...], T: Tensor,
                given: dict[str, Tensor] | None) -> tuple[Tensor, ...]:
            f, vjps = dynamics(s * T, state[0], cotangents, given)
            if exact:
                div = torch.diagonal(vjps[:D], dim1=0, dim2=2).sum(-1)
            else:  # (eps itself is not closed over: a view of it would alias in the loop)
                div = (vjps[0] * cotangents[0]).sum(1)
            out = (T * f, T * div)
            if regularize:
                out = out + (T * f.pow(2).sum(1), T * vjps[-1].pow(2).sum(1))
            return out

        T = self.end_time
        # (distinct zeros: the adjoint's autograd.Function takes each part as its own input)
        state = (x,) + tuple(x.new_zeros(x.shape[0]) for _ in range(3 if regularize else 1))
        step = None
        if self.solver in FIXED_SOLVERS:  # torchdiffeq's step in s: step_size / T, in float64
            step = torch.as_tensor(self.step_size, dtype=torch.float64, device=T.device)
            step = step.div(T.detach().to(torch.float64))
        if self.adjoint and grad_on:
            names, params, learn_T = self._adjoint_parameters()

            def func(s: Tensor, y: tuple[Tensor, ...], ps: tuple[Tensor, ...] | None) -> tuple[Tensor, ...]:
                if ps is None:  # the forward solve: the module's own tensors (the same values)
                    return rhs(s, y, T, None)
                sqrt_T = ps[-1] if learn_T else self.sqrt_T
                return rhs(s, y, sqrt_T * sqrt_T, dict(zip(names, ps)))

            final, nfe = odeint_adjoint_graph(func, state, params, reverse, self.solver, self.rtol,
                                              self.atol, step)
        else:
            final, nfe = odeint_graph(lambda s, y: rhs(s, y, T, None), state, reverse, self.solver,
                                      self.rtol, self.atol, step, (T,) + tuple(self.net.parameters()))
        # (every attribute set after the loop: Dynamo drops the mutations after a while_loop of
        # an object mutated before it)
        self.last_estimator = estimator
        self.last_kinetic = final[2] if regularize and self.kinetic else None
        self.last_jacobian_frobenius = final[3] if regularize and self.jacobian_frobenius else None
        self._last_dynamics = []
        self._last_probe = None
        self._last_graph = "adjoint" if self.adjoint and grad_on else "direct"
        self._last_nfe = nfe
        return final[0], final[1]

    @torch.compiler.disable(
        reason="fastflow CNF: this solve runs on torchdiffeq (a data-dependent Python loop, the "
        "divergence by torch.autograd.grad), which torch.compile does not trace: compiled, a CNF "
        "solve is one graph only on the native cnf_dopri5 operator or on the in-graph solver "
        "(any of its solvers; gradients with torch._functorch.config.donated_buffer off, "
        "fastflow.nn._loops, for an ODEnet or ODEConvNet, or by the adjoint for other nets); "
        "other solves with gradients and nets with dropout or batch norm in training mode "
        "(fastflow.nn._repeat) run eagerly (fastflow.nn.continuous docstring)"
    )
    def _solve_torchdiffeq(self, x: Tensor, reverse: bool, estimator: str, regularize: bool,
                           grad_on: bool, inference: bool) -> tuple[Tensor, Tensor]:
        """The solve on torchdiffeq and autograd (eager; the reference of every other path)."""
        td = _torchdiffeq()
        with _autograd_on():
            if inference:
                x = x.clone()
            need_eps = estimator == "hutchinson" or regularize
            eps = _probe(x, self.probe) if need_eps else None
            dyn = _Dynamics(self, estimator, eps, regularize)
            zeros = x.new_zeros(x.shape[0])
            state = (x, zeros) + ((zeros, zeros) if regularize else ())
            s = torch.tensor([1.0, 0.0] if reverse else [0.0, 1.0], dtype=x.dtype, device=x.device)
            options = None
            if self.step_size is not None and self.solver in FIXED_SOLVERS:
                options = {"step_size": self.step_size / float(self.end_time.detach())}
            kwargs = dict(rtol=self.rtol, atol=self.atol, method=self.solver, options=options)
            if self.adjoint and grad_on:
                params = self._adjoint_parameters()[1]
                out = td.odeint_adjoint(dyn, state, s, adjoint_params=params, **kwargs)
            elif grad_on:
                out = td.odeint(dyn, state, s, **kwargs)
            else:
                with torch.no_grad():  # the dynamics turn autograd on for the divergence only
                    out = td.odeint(dyn, state, s, **kwargs)
            dyn.backward_phase = True
        self._last_dynamics = [dyn]
        self._last_probe = None
        self._last_graph = False
        self._last_nfe = dyn.nfe
        final = [o[-1] for o in out]
        if inference or not grad_on:
            final = [o.detach() for o in final]
        if regularize:
            self.last_kinetic = final[2] if self.kinetic else None
            self.last_jacobian_frobenius = final[3] if self.jacobian_frobenius else None
        return final[0], final[1]

    def _solve_shaped(self, x: Tensor, reverse: bool) -> tuple[Tensor, Tensor]:
        # the solve carries [B, D]; an image goes in flattened and comes out in its shape
        out, logdet = self._solve(x.reshape(x.shape[0], self.features), reverse)
        return out.reshape(x.shape), logdet

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(z(T), log|det dz/dx|)``, integrating ``0 -> T``."""
        self._check_input(x, "x")
        return self._solve_shaped(x, reverse=False)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(x, log|det dx/dz|)``, integrating ``T -> 0`` (the log-det comes out negated)."""
        self._check_input(z, "z")
        return self._solve_shaped(z, reverse=True)


class FFJORD(Flow):
    """FFJORD for vectors ``[B, D]`` or images ``[B, C, H, W]`` (single scale, convolutional
    dynamics): ``n_blocks`` :class:`CNF` blocks and a standard normal base (or ``base``).

    Grathwohl et al. "FFJORD: Free-form Continuous Dynamics for Scalable Reversible Generative
    Models" (2019), https://arxiv.org/abs/1810.01367.

    Arguments:
        features: ``D``, or an image shape ``(C, H, W)``.
        n_blocks: CNF blocks (FFJORD 2-D toy: 1).
        hidden, activation, layer: of each block's :class:`ODEnet` (:class:`ODEConvNet` for
            images).
        base: base distribution (None: standard normal over ``features``).
        **cnf_kwargs: passed to every :class:`CNF` (``T``, ``estimator``, ``solver``, ``atol``,
            ``rtol``, ``adjoint``, ...).

    Example:
        >>> flow = FFJORD(2, hidden=(16, 16))
        >>> flow.log_prob(torch.randn(4, 2)).shape
        torch.Size([4])
        >>> FFJORD((1, 4, 4), hidden=(8,)).sample(3).shape
        torch.Size([3, 1, 4, 4])
    """

    def __init__(
        self,
        features: int,
        n_blocks: int = 1,
        hidden: int | Sequence[int] = (64, 64, 64),
        activation: str = "tanh",
        layer: str = "concatsquash",
        base: nn.Module | None = None,
        **cnf_kwargs: Any,
    ):
        shape = _features_shape(features)
        features = shape[0] if len(shape) == 1 else tuple(shape)
        n_blocks = _positive_int(n_blocks, "n_blocks")
        blocks = [
            CNF(features, hidden=hidden, activation=activation, layer=layer, **cnf_kwargs)
            for _ in range(n_blocks)
        ]
        super().__init__(blocks, base=base, event_shape=features)

    @property
    def blocks(self) -> list[CNF]:
        return list(self.transform)

    @property
    def last_nfe(self) -> int:
        """Evaluations of the dynamics in the forward solves of the last call, all blocks."""
        return sum(b.last_nfe or 0 for b in self.blocks)
