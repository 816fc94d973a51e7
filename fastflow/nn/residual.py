"""Invertible residual blocks (i-ResNet, Residual Flows): :class:`iResBlock`, the contractive
branch builder :func:`residual_mlp` and the vector model :class:`ResidualFlow`.

A block maps ``x -> y = x + g(x)`` with ``Lip(g) < 1``, which makes it invertible (the inverse is
the fixed point of ``x <- y - g(x)``, :func:`fastflow.ops.fixed_point.fixed_point_inverse`) with
``log|det dy/dx| = log det(I + J_g(x))``, estimated by one of the estimators of
:mod:`fastflow.ops.logdet_estimators` (exact, truncated power series, Russian roulette).

The block is generic: ``g`` is any ``nn.Module`` mapping a batch ``[B, ...]`` to the same shape
row by row (no batch statistics) with ``Lip(g) < 1``; the block does not check the Lipschitz
constant itself (:func:`residual_mlp` guarantees it by construction, with spectrally normalised
linear layers and 1-Lipschitz activations).

Contract (DESIGN.md, "Points the contract settles"):

* ``forward(x) -> (y, logdet)``, ``logdet`` an estimate of ``log det(I + J)``, ``[B]``, of the
  kind ``block.estimator`` in training mode and ``block.eval_estimator`` in eval mode (default:
  ``"exact"`` when a sample has at most ``exact_max_dim`` elements, else ``"series"`` with
  ``eval_n_terms`` terms). Both are plain attributes, switchable at run time
  (``block.estimator = "exact"``) and not part of the state dict, which holds ``g``'s tensors
  only.
* ``inverse(y, tol=..., max_iter=...)`` -> ``(x, -logdet(x))`` by the batched fixed-point solve,
  differentiable by the implicit-function theorem; ``g`` runs with its training flags off for
  the whole inverse (no power-iteration update of spectral norms, no dropout), so an inverse
  never changes the module's state.
* Diagnostics, as attributes after a call: ``last_estimator`` and ``last_terms`` (the kind used
  and its number of power-series terms per probe, ``D`` for the exact Jacobian; a 0-d tensor for
  the roulette inside a compiled graph, see below) after a forward
  or an inverse; ``last_solve`` (a :class:`~fastflow.ops.fixed_point.FixedPointResult`),
  ``last_iterations``, ``last_residual`` and ``last_converged`` (per sample) after an inverse.

Under ``torch.no_grad()`` and ``torch.inference_mode()`` the block returns tensors without a
graph; the autograd estimators (below) need vector-Jacobian products, so they turn autograd on
for their own computation there.

MLP-structured branches: when ``g`` is an MLP the operators of :mod:`fastflow.ops.mlp_trace`
take (:func:`mlp_structure`: what :func:`residual_mlp` builds) and the input is ``[B, D]``, the
block reads the layers' tensors once (spectral norms normalised, with their power-iteration
update in training mode) and never calls ``torch.autograd.grad``:

* ``"exact"``: the per-sample Jacobian by forward-mode products in PyTorch operations
  (:func:`~fastflow.ops.mlp_trace.mlp_jacobian`) and ``slogdet(I + J)``;
* ``"roulette"`` (with ``neumann_grad``), ``"series"`` with ``series_grad="neumann"``, and any
  kind's value without a gradient: the native trace operator (forward-mode products through the
  known layers, a hand-written Neumann-series backward that keeps only each layer's
  pre-activation input; ``memory_efficient`` has nothing left to save there and is ignored);
* ``"series"`` with the backpropagated gradient (i-ResNet): the truncated series' forward-mode
  products in PyTorch operations (:func:`~fastflow.ops.mlp_trace.mlp_power_traces`),
  differentiated by ordinary autograd;
* ``"roulette"`` with the backpropagated gradient (``neumann_grad=False``): its products in
  PyTorch operations, differentiated by ordinary autograd.

Convolutional branches (:func:`~fastflow.nn._branch_products.conv_structure`: what
:func:`residual_cnn` builds, stride-1 "same" convolutions and the activations above) on image
inputs run the autograd estimators' computation with the branch's vector-Jacobian products
written out as transposed convolutions (:class:`~fastflow.nn._branch_products.ConvLinearization`):
the same numbers, without ``torch.autograd.grad``. In eager mode the Neumann gradients (the
roulette's default, the series with ``series_grad="neumann"``) keep the autograd estimator:
its surrogate reuses the forward's graph, which measured less peak memory at the same speed
(bench ``residual-image``); a compiled graph runs them on the products. The exact log-det, the
series with the backpropagated gradient and the roulette with ``neumann_grad=False`` run on the
products in eager mode too (faster and smaller than the autograd estimators there).

The inverse's forward solve runs on the native fixed-point operator. In eager mode, other
branches (any other module), autocast on convolutional branches, and the Neumann gradients of
MLP branches where the native operator is not used (``fastflow.backend("reference")``, no
extension) use the autograd estimators of :mod:`fastflow.ops.logdet_estimators`. A compiled
graph runs those Neumann gradients on the MLP's products in PyTorch operations (the
vector-Jacobian products by the transposed weights), as it does for convolutional branches,
and the other branches and autocast on the products of ``torch.func``
(:func:`~fastflow.nn._branch_products.func_products`): the same estimators, each product a
:func:`torch.func.vjp` of a second call of the branch at ``x`` with fastflow's spectral
norms' updates off.

Roulette draws: the number of extra terms ``N`` is geometric, drawn by
:func:`~fastflow.ops.logdet_estimators.draw_geometric_n` as a 0-d CPU tensor (one
``torch.rand`` draw from torch's default CPU generator, the same on every path, so a seed gives
the same ``N`` natively, in the reference and in a compiled graph) and capped at
:func:`~fastflow.ops.logdet_estimators.geometric_max_n` (``54`` for ``p = 0.5``; the largest
value the draw can take, so the cap never changes the estimate). On the native path the term
weights are fixed-length tensors that are zero past the drawn terms
(:func:`~fastflow.ops.logdet_estimators.roulette_coefficients`).

``torch.compile``: on MLP-structured branches with 2-D inputs and convolutional branches with
image inputs, ``forward`` of the block, and ``forward`` and ``log_prob`` of :class:`ResidualFlow`
and :class:`ResidualFlowImage`, compile into one graph (``fullgraph=True`` works) in training
and eval mode for every estimator, and match eager: the same seed gives the same roulette draw,
values and gradients, and the same spectral-norm buffers after the call (their
power-iteration update is part of the graph). The roulette's ``N`` stays a tensor in the graph
(no recompilation per draw); ``last_terms`` is then a 0-d int64 tensor (an ``int`` in eager
mode). Where the number of products follows the draw inside the graph:

* without autograd through the series (values, the Neumann surrogate's vectors), a
  ``while_loop`` runs exactly the drawn number of products;
* the roulette with the backpropagated gradient runs every product up to the cap
  (:func:`~fastflow.ops.logdet_estimators.geometric_max_n`, ``n_exact + 54`` for ``p = 0.5``)
  with zero weights past the draw: one graph, but that many products per call. Where a
  ``while_loop``'s backward is right (:func:`fastflow.compile`, :mod:`fastflow.nn._loops`), a
  ``while_loop`` runs exactly the drawn number here too. The Neumann gradient (the default) has
  no such cost.
* memory-efficient Neumann gradients of convolutional branches are not taken in the forward
  inside a graph (the plain surrogate runs; same gradients).

* a branch of another kind compiles into the graph on ``torch.func`` products (above),
  in training and eval mode, for every estimator, and matches eager; its backpropagated
  roulette always runs the capped products (never a ``while_loop`` with autograd: over
  ``torch.func`` products its values came out wrong, even under ``aot_eager``). Its
  training-mode call may depend on the mode through fastflow's spectral norms
  (:class:`~fastflow.nn.SpectralNormLinear`, :class:`~fastflow.nn.SpectralNormConv2d`),
  whose updates the products switch off, and torch's parametrizations
  (``torch.nn.utils.parametrizations.spectral_norm``), which the products take from the
  branch's own call; not otherwise.

A branch with a submodule whose call the products cannot repeat (in training mode dropout or
batch norm; torch's hook-based ``torch.nn.utils.spectral_norm`` in any mode:
:func:`~fastflow.nn._repeat.unrepeatable_submodule`) runs the autograd estimators
eagerly inside a compiled model (``torch.compiler.disable``): a plain ``torch.compile`` breaks
the graph around them, and ``fullgraph=True`` raises an error that names the reason. Their
``torch.autograd.grad`` with ``create_graph`` is not traced by dynamo, and AOT-compiled graphs
do not differentiate twice. :meth:`iResBlock.inverse` (the fixed-point solve) always runs
eagerly.

References:
    Behrmann, Grathwohl, Chen, Duvenaud, Jacobsen. "Invertible Residual Networks" (2019),
    https://arxiv.org/abs/1811.00995.
    Chen, Behrmann, Duvenaud, Jacobsen. "Residual Flows for Invertible Generative Modeling"
    (2019), https://arxiv.org/abs/1906.02735.
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from fastflow.flow import Flow, Transform
from fastflow.nn.actnorm import ActNorm
from fastflow._checks import int_at_least as _check_int
from fastflow._checks import on_fail as _check_on_fail
from fastflow._checks import positive_float as _check_positive_float
from fastflow.ops.fixed_point import FixedPointResult, fixed_point_inverse
from fastflow.ops.logdet_estimators import PROBES, logdet_exact, logdet_roulette, logdet_series
from fastflow.ops.logdet_estimators import logdet_identity_plus
from fastflow.ops.logdet_estimators import draw_geometric_n, roulette_coefficients, sample_probes
from fastflow.ops.mlp_trace import mlp_fixed_point, mlp_jacobian, mlp_power_traces, mlp_trace
from fastflow.ops.mlp_trace import MLP_ACTIVATIONS
from fastflow.ops.mlp_trace import _jvp as _mlp_jvp, _linearize as _mlp_linearize, _vjp as _mlp_vjp
from fastflow.nn._branch_products import ConvLinearization, _wide_dot, conv_structure, power_sums
from fastflow.nn._branch_products import func_products, jacobian_from_vjp
from fastflow.nn._repeat import unrepeatable_submodule
from fastflow import _native

__all__ = [
    "ESTIMATORS", "iResBlock", "residual_mlp", "residual_cnn", "ResidualFlow", "ResidualFlowImage",
]

#: The log-det estimators of a residual block.
ESTIMATORS = ("exact", "series", "roulette")
_RESIDUAL_ACTIVATIONS = ("lipswish", "elu")
_KEEP: Any = object()  # set_estimator: leave the eval estimator as it is


class _Draws(NamedTuple):
    """A call's estimator kind and random numbers (:meth:`iResBlock._draw`): the roulette's
    ``N`` (a 0-d int64 CPU tensor; None for the other kinds) and the probes (None for the
    exact log-det). ``repeat``: the call repeats an earlier one under ``torch.func``
    (:class:`~fastflow.nn.InvertibleBackprop`'s recomputation): it takes the gradient's path,
    records no diagnostics and runs no ``while_loop``.

    The Neumann gradients' left vectors (``psi``, module docstring): ``sink``, a list that a
    first call without autograd appends them to (its series computes them beside the value,
    on the branch's vector-Jacobian products); ``left``, those vectors given to a repeated
    call, whose surrogate then takes one product instead of running the series again."""

    kind: str
    n_random: Tensor | None
    probes: Tensor | None
    repeat: bool = False
    sink: list | None = None
    left: Tensor | None = None


def _repeat(draws: _Draws | None) -> bool:
    """Whether a call repeats an earlier one under ``torch.func`` (:class:`_Draws`)."""
    return draws is not None and draws.repeat


def _check_estimator(value: Any, name: str, allow_none: bool = False) -> str | None:
    if value is None and allow_none:
        return None
    if value not in ESTIMATORS:
        extra = " or None" if allow_none else ""
        raise ValueError(f"{name} must be one of {ESTIMATORS}{extra}, got {value!r}")
    return value


@contextlib.contextmanager
def _frozen(module: nn.Module) -> Iterator[None]:
    """Training flags off for every submodule (restored afterwards)."""
    modes = [(m, m.training) for m in module.modules()]
    try:
        for m, _ in modes:
            m.training = False
        yield
    finally:
        for m, mode in modes:
            m.training = mode


@contextlib.contextmanager
def _autograd_on() -> Iterator[bool]:
    """Autograd on for the log-det's products; yields whether inference mode was on."""
    if torch.is_inference_mode_enabled():
        with torch.inference_mode(False), torch.enable_grad():
            yield True
    else:
        with torch.enable_grad():
            yield False


def _series_coefficients(n: int) -> tuple[list[float], list[float]]:
    """The truncated series' term weights ``(-1)^(k+1) / k`` (``k = 1..n``) and its Neumann
    gradient's ``(-1)^j`` (``j = 0..n-1``)."""
    return [(-1) ** (k + 1) / k for k in range(1, n + 1)], [float((-1) ** j) for j in range(n)]


def _compiling() -> bool:
    """Whether this call is being traced by ``torch.compile`` (a seam for the tests, which run
    the compiled paths eagerly through it)."""
    return torch.compiler.is_compiling()


def _activation_kind(m: nn.Module) -> str | None:
    """The native operators' name of an activation module, or None when they do not have it."""
    from fastflow.nn.lipschitz import LipSwish

    if type(m) is LipSwish:
        return "lipswish"
    if type(m) is nn.ELU and m.alpha == 1.0:
        return "elu"
    if type(m) is nn.Tanh:
        return "tanh"
    if type(m) is nn.Softplus and m.beta == 1.0 and m.threshold == 20.0:
        return "softplus"
    return None


def mlp_structure(g: nn.Module) -> tuple[str, bool, list[nn.Module], list[nn.Module]] | None:
    """``(activation, preact, linears, activations)`` when ``g`` is an MLP the native operators
    of :mod:`fastflow.ops.mlp_trace` take, else None.

    That is an ``nn.Sequential`` ``[act ->] Linear -> act -> Linear ... -> Linear`` of
    ``nn.Linear`` / :class:`~fastflow.nn.SpectralNormLinear` layers (all with a bias or all
    without) and one kind of activation (LipSwish, ELU with ``alpha = 1``, Tanh, Softplus with
    ``beta = 1``): what :func:`residual_mlp` builds.
    """
    from fastflow.nn.lipschitz import SpectralNormLinear

    if type(g) is not nn.Sequential or len(g) == 0:
        return None
    mods = list(g)
    preact = type(mods[0]) not in (nn.Linear, SpectralNormLinear)
    lins, acts = (mods[1::2], mods[0::2]) if preact else (mods[0::2], mods[1::2])
    if len(mods) != 2 * len(lins) - (0 if preact else 1):
        return None
    if any(type(m) not in (nn.Linear, SpectralNormLinear) for m in lins):
        return None
    kinds = {_activation_kind(a) for a in acts}
    if None in kinds or len(kinds) > 1:
        return None
    if len({m.bias is None for m in lins}) > 1:
        return None
    return (kinds.pop() if kinds else "identity"), preact, lins, acts


def _mlp_tensors(
    structure: tuple[str, bool, list[nn.Module], list[nn.Module]], dtype: torch.dtype
) -> tuple[list[Tensor], list[Tensor], Tensor | None] | None:
    """The layers' tensors as the branch's forward would use them (spectral norms normalised,
    with the power-iteration update in training mode), or None unless all have ``dtype``."""
    from fastflow.nn.lipschitz import SpectralNormLinear

    act, _, lins, acts = structure
    biases = [m.bias for m in lins] if lins[0].bias is not None else []
    if any(t.dtype != dtype for t in [m.weight for m in lins] + biases):
        return None
    weights = [m.normalized_weight() if isinstance(m, SpectralNormLinear) else m.weight for m in lins]
    betas = None
    if act == "lipswish":
        betas = torch.cat([torch.nn.functional.softplus(a.beta_raw) for a in acts]).to(dtype)
    return weights, biases, betas


class iResBlock(Transform):  # noqa: N801 (the name of the papers and of normflows)
    r"""Invertible residual block ``y = x + g(x)`` with an estimated log-det (module docstring).

    Arguments:
        g: the residual branch, an ``nn.Module`` with ``Lip(g) < 1`` mapping ``[B, ...]`` to the
            same shape row by row (e.g. :func:`residual_mlp`).
        estimator: log-det kind in training mode, one of :data:`ESTIMATORS`: ``"roulette"``
            (Residual Flows, unbiased, default), ``"series"`` (i-ResNet, biased) or ``"exact"``.
        eval_estimator: kind in eval mode (None: ``"exact"`` when a sample has at most
            ``exact_max_dim`` elements, else ``"series"``).
        n_terms: power-series terms of ``"series"`` in training mode (i-ResNet: 5).
        n_exact: terms always computed by ``"roulette"`` in training mode (Residual Flows: 2).
        geometric_p: success probability of the roulette's geometric number of extra terms
            (0.5: ``n_exact + 2`` terms on average; drawn as a tensor and capped at
            :func:`~fastflow.ops.logdet_estimators.geometric_max_n`, module docstring).
        n_probes: Hutchinson probes per estimate.
        probe: ``"gaussian"`` or ``"rademacher"``.
        eval_n_terms: in eval mode, the terms of ``"series"`` and the exact terms of
            ``"roulette"`` (Residual Flows: 20).
        exact_max_dim: the largest sample size for which the default eval estimator is exact.
        neumann_grad: roulette gradients by the Neumann-series surrogate (else backpropagation
            through every term).
        series_grad: the gradient of ``"series"``: ``"backprop"`` (i-ResNet: the gradient of
            the truncated series, backpropagated through its ``n_terms`` products) or
            ``"neumann"`` (the Neumann surrogate truncated after the same terms, one
            graph-keeping product; with ``memory_efficient`` taken in the forward. normflows
            does this with ``n_power_series``). The value is the same truncated series.
        memory_efficient: a Neumann gradient (roulette, or series with
            ``series_grad="neumann"``) computes the gradients inside the forward and frees the
            estimator's graph; only valid when every sample's log-det enters the loss with the
            same weight (mean NLL), checked in the backward.
        tol, max_iter, anderson, on_fail, check_every: the inverse's fixed-point settings
            (:func:`~fastflow.ops.fixed_point.fixed_point_inverse`); ``tol`` and ``max_iter``
            can also be given per call to :meth:`inverse`.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> g = nn.Sequential(nn.Linear(2, 16), nn.ELU(), nn.Linear(16, 2))
        >>> with torch.no_grad():  # make Lip(g) <= 0.9 (residual_mlp does this for real)
        ...     for lin in (g[0], g[2]):
        ...         _ = lin.weight.mul_(0.95 / torch.linalg.matrix_norm(lin.weight, ord=2))
        >>> block = iResBlock(g, estimator="roulette")
        >>> x = torch.randn(8, 2)
        >>> y, logdet = block(x)                    # roulette estimate (training mode)
        >>> x2, logdet_inv = block.inverse(y, tol=1e-6)
        >>> bool((x2 - x).abs().max() < 1e-5), block.last_iterations.shape
        (True, torch.Size([8]))
        >>> block.estimator = "exact"               # switch the kind at run time
        >>> y, logdet = block(x)
        >>> x2, logdet_inv = block.inverse(y, tol=1e-6)
        >>> torch.allclose(logdet, -logdet_inv, atol=1e-5)
        True
    """

    def __init__(
        self,
        g: nn.Module,
        estimator: str = "roulette",
        eval_estimator: str | None = None,
        *,
        n_terms: int = 5,
        n_exact: int = 2,
        geometric_p: float = 0.5,
        n_probes: int = 1,
        probe: str = "gaussian",
        eval_n_terms: int = 20,
        exact_max_dim: int = 16,
        neumann_grad: bool = True,
        series_grad: str = "backprop",
        memory_efficient: bool = False,
        tol: float = 1e-5,
        max_iter: int = 1000,
        anderson: int = 0,
        on_fail: str = "warn",
        check_every: int | None = None,
    ):
        super().__init__()
        if not isinstance(g, nn.Module):
            raise TypeError(f"g must be an nn.Module (the residual branch), got {type(g).__name__}")
        self.g = g
        self.estimator = estimator
        self.eval_estimator = eval_estimator
        self.n_terms = _check_int(n_terms, "n_terms", 1)
        self.n_exact = _check_int(n_exact, "n_exact", 0)
        p = geometric_p
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0 < p <= 1:
            raise ValueError(f"geometric_p must be in (0, 1], got {geometric_p!r}")
        self.geometric_p = float(geometric_p)
        self.n_probes = _check_int(n_probes, "n_probes", 1)
        if probe not in PROBES:
            raise ValueError(f"probe must be one of {PROBES}, got {probe!r}")
        self.probe = probe
        self.eval_n_terms = _check_int(eval_n_terms, "eval_n_terms", 1)
        self.exact_max_dim = _check_int(exact_max_dim, "exact_max_dim", 0)
        self.neumann_grad = bool(neumann_grad)
        if series_grad not in ("backprop", "neumann"):
            raise ValueError(f"series_grad must be 'backprop' or 'neumann', got {series_grad!r}")
        self.series_grad = series_grad
        self.memory_efficient = bool(memory_efficient)
        self.tol = _check_positive_float(tol, "tol")
        self.max_iter = _check_int(max_iter, "max_iter", 1)
        self.anderson = _check_int(anderson, "anderson", 0)
        self.on_fail = _check_on_fail(on_fail)
        self.check_every = None if check_every is None else _check_int(check_every, "check_every", 1)
        # diagnostics of the last call
        self.last_estimator: str | None = None
        self.last_terms: int | None = None
        self.last_solve: FixedPointResult | None = None

    # -- the estimator kinds (plain attributes, validated) ---------------------------------------

    @property
    def estimator(self) -> str:
        return self._estimator

    @estimator.setter
    def estimator(self, value: str) -> None:
        self._estimator = _check_estimator(value, "estimator")

    @property
    def eval_estimator(self) -> str | None:
        return self._eval_estimator

    @eval_estimator.setter
    def eval_estimator(self, value: str | None) -> None:
        self._eval_estimator = _check_estimator(value, "eval_estimator", allow_none=True)

    def active_estimator(self, dim: int) -> str:
        """The kind a call uses now, for samples of ``dim`` elements (training or eval mode)."""
        if self.training:
            return self._estimator
        if self._eval_estimator is not None:
            return self._eval_estimator
        return "exact" if dim <= self.exact_max_dim else "series"

    # -- diagnostics of the last inverse ----------------------------------------------------

    @property
    def last_iterations(self) -> Tensor | None:
        """Evaluations of ``g`` per sample in the last inverse, ``[B]`` (None before one)."""
        return None if self.last_solve is None else self.last_solve.iterations

    @property
    def last_residual(self) -> Tensor | None:
        """Final fixed-point residual per sample in the last inverse, ``[B]``."""
        return None if self.last_solve is None else self.last_solve.residual

    @property
    def last_converged(self) -> Tensor | None:
        """Whether each sample converged in the last inverse, ``[B]`` bool."""
        return None if self.last_solve is None else self.last_solve.converged

    def extra_repr(self) -> str:
        return (
            f"estimator={self._estimator!r}, eval_estimator={self._eval_estimator!r}, "
            f"n_terms={self.n_terms}, n_exact={self.n_exact}, geometric_p={self.geometric_p}, "
            f"n_probes={self.n_probes}, tol={self.tol:g}, max_iter={self.max_iter}"
        )

    # -- the transform ----------------------------------------------------------------------

    def _check(self, x: Any, name: str) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(x).__name__}")
        if x.dim() < 2 or x.shape[0] == 0:
            raise ValueError(
                f"{name} must have shape [batch, ...] with a non-empty batch, got {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
        param = next(self.g.parameters(), None)
        if param is not None and x.dtype != param.dtype and not torch.is_autocast_enabled(x.device.type):
            raise ValueError(
                f"{name} must have the dtype of the block's parameters ({param.dtype}; convert the "
                f"block with .to(dtype) or use torch.autocast), got {x.dtype}"
            )
        structure = mlp_structure(self.g)
        if structure is not None and x.dim() == 2 and x.shape[1] != structure[2][0].in_features:
            raise ValueError(
                f"{name} must have shape [batch, {structure[2][0].in_features}] (the branch's "
                f"input width), got {tuple(x.shape)}"
            )

    def _params(self) -> tuple[Tensor, ...]:
        return tuple(p for p in self.g.parameters() if p.requires_grad)

    def _estimate(
        self, kind: str, x: Tensor, gx: Tensor, create_graph: bool, params: tuple[Tensor, ...]
    ) -> tuple[Tensor, int]:
        if kind == "exact":
            return logdet_exact(x, gx, create_graph=create_graph), x[0].numel()
        if kind == "series":
            n = self.n_terms if self.training else self.eval_n_terms
            if self.series_grad == "neumann" and create_graph:
                # the truncated series is the roulette with n exact terms and no random ones
                ld = logdet_roulette(
                    x, gx, n_exact=n, n_random=0, n_probes=self.n_probes, probe=self.probe,
                    gradient="neumann", memory_efficient=self.memory_efficient, params=params,
                    create_graph=True,
                )
                return ld, n
            ld = logdet_series(
                x, gx, n, n_probes=self.n_probes, probe=self.probe, create_graph=create_graph
            )
            return ld, n
        n_exact = self.n_exact if self.training else self.eval_n_terms
        n_random = int(draw_geometric_n(self.geometric_p))  # the MLP path's draw (same RNG use)
        ld = logdet_roulette(
            x, gx, n_exact=n_exact, p=self.geometric_p, n_random=n_random,
            n_probes=self.n_probes, probe=self.probe,
            gradient="neumann" if self.neumann_grad else "backprop",
            memory_efficient=self.memory_efficient, params=params, create_graph=create_graph,
        )
        return ld, n_exact + n_random

    def _neumann_gradient(self, kind: str) -> bool:
        """Whether a call of ``kind`` takes the Neumann gradient (the roulette with
        ``neumann_grad``, the series with ``series_grad="neumann"``)."""
        return (kind == "roulette" and self.neumann_grad) or (
            kind == "series" and self.series_grad == "neumann")

    def _mlp_route(self, kind: str, x: Tensor, need: bool, draws: _Draws | None = None
                   ) -> str | None:
        """How this call runs when ``g`` is MLP-structured (:func:`mlp_structure`): ``"jacobian"``
        (exact, forward-mode Jacobian), ``"native"`` (the trace operator: any kind's value, the
        Neumann gradients), ``"series"`` (the truncated series in PyTorch operations,
        backpropagated gradient), or None (the autograd estimators, eagerly)."""
        if x.dim() != 2 or mlp_structure(self.g) is None:
            return None
        if kind == "exact":
            return "jacobian"
        neumann = self._neumann_gradient(kind)
        if neumann and draws is not None and draws.sink is not None:
            return "neumann"  # the left vectors of the vector-Jacobian form, kept (_Draws)
        if (neumann or not need) and _native.use_native("mlp_trace", x):
            return "native"
        if kind == "series" and not (need and neumann):
            return "series"
        if kind == "roulette" and not neumann:
            return "power"  # the roulette's gradient backpropagated through its products
        # the Neumann gradients without the native operator: the autograd estimators in eager
        # mode (the surrogate reuses the forward's graph), the products in a compiled graph
        return "neumann" if _compiling() else None

    def _native_solver(self, y: Tensor):
        """The native fixed-point solve of an MLP-structured branch (fastflow.ops.mlp_trace),
        or None: a branch of another kind, Anderson mixing, or no native kernel."""
        if self.anderson or y.dim() != 2:
            return None
        structure = mlp_structure(self.g)
        if structure is None or not _native.use_native("mlp_fixed_point", y):
            return None
        with torch.no_grad():
            tensors = _mlp_tensors(structure, y.dtype)
        if tensors is None:
            return None
        weights, biases, betas = tensors
        act, preact = structure[0], structure[1]

        def solve(y0: Tensor, tol: float, max_iter: int):
            return mlp_fixed_point(y0, weights, biases, betas, act, preact, tol=tol, max_iter=max_iter)

        return solve

    def _transform_mlp(self, kind: str, x: Tensor, need: bool, draws: _Draws | None = None
                       ) -> tuple[Tensor, Tensor] | None:
        """The call on an MLP-structured branch (:meth:`_mlp_route`), in operations that
        ``torch.compile`` traces into one graph; None where it does not apply."""
        route = self._mlp_route(kind, x, need, draws)
        if route is None:
            return None
        structure = mlp_structure(self.g)
        tensors = _mlp_tensors(structure, x.dtype)
        if tensors is None:
            return None  # mixed dtypes (autocast): the autograd estimators
        weights, biases, betas = tensors
        act, preact = structure[0], structure[1]
        n_series = self.n_terms if self.training else self.eval_n_terms
        terms: int | Tensor
        if route == "jacobian":
            gx, J = mlp_jacobian(x, weights, biases, betas, act, preact)
            logdet = logdet_identity_plus(J)
            terms = x.shape[1]
        elif route in ("power", "neumann"):
            code = MLP_ACTIVATIONS[act]
            gx, derivs = _mlp_linearize(x, weights, biases, (), (), betas, code, preact)
            if route == "power":
                apply = lambda t: _mlp_jvp(t, weights, (), derivs)  # noqa: E731
                logdet, terms = self._roulette_backprop(x, apply, draws=draws)
            else:
                vjp = lambda u: _mlp_vjp(u, weights, (), derivs)  # noqa: E731
                logdet, terms = self._series_on_products(kind, x, vjp, need, draws)
        elif route == "series":
            probes = self._probes(x, draws)
            gx, traces = mlp_power_traces(
                x, weights, biases, betas, act, preact, probes=probes, n_terms=n_series
            )
            coeffs = torch.tensor(
                _series_coefficients(n_series)[0], dtype=traces.dtype, device=traces.device
            )
            logdet = (coeffs[:, None] * traces).sum(0)
            terms = n_series
        else:
            if kind == "series":
                value, psi = _series_coefficients(n_series)
                terms = n_series
            else:
                terms, value, psi = self._roulette_draw(draws)
            probes = self._probes(x, draws)
            gx, logdet = mlp_trace(
                x, weights, biases, (), (), betas, act, preact,
                probes=probes, value_coeffs=value, psi_coeffs=psi,
            )
        self._record(kind, terms, draws)
        return x + gx, logdet

    def _record(self, kind: str, terms: int | Tensor, draws: _Draws | None) -> None:
        """``last_estimator``, ``last_terms`` of this call; a repeated call records nothing
        (its graph may not store tensors on the module)."""
        if not _repeat(draws):
            self.last_estimator, self.last_terms = kind, terms

    def _draw(self, x: Tensor) -> _Draws:
        """The random numbers a call on ``x`` draws in the current mode, drawn now in the
        order the call draws them (the roulette's ``N``, then the probes): passed to
        :meth:`_transform`, the call uses them instead, so that a second call can repeat the
        first (:class:`~fastflow.nn.InvertibleBackprop`'s recomputation in a compiled graph)."""
        kind = self.active_estimator(x[0].numel())
        n_random = draw_geometric_n(self.geometric_p) if kind == "roulette" else None
        probes = None if kind == "exact" else sample_probes(x, self.n_probes, self.probe)
        return _Draws(kind, n_random, probes, sink=[] if self._neumann_gradient(kind) else None)

    def _probes(self, x: Tensor, draws: _Draws | None) -> Tensor:
        if draws is not None and draws.probes is not None:
            return draws.probes
        return sample_probes(x, self.n_probes, self.probe)

    def _roulette_draw(self, draws: _Draws | None = None
                       ) -> tuple[int | Tensor, list[float] | Tensor, list[float] | Tensor]:
        """The roulette's ``(n_total, value coefficients, psi coefficients)`` for this call
        (``N`` from ``draws`` when given, :meth:`_draw`).

        Inside a compiled graph the number of terms stays a tensor (a Python int would be a
        graph break, or a recompilation per draw) with fixed-length coefficients that are zero
        past the draw; in eager mode Python values, ``n_total`` coefficients each."""
        n_exact = self.n_exact if self.training else self.eval_n_terms
        if draws is not None and draws.n_random is not None:
            n_random = draws.n_random
        else:
            n_random = draw_geometric_n(self.geometric_p)
        value, psi = roulette_coefficients(n_random, n_exact, self.geometric_p)
        n_total = n_random + n_exact
        if _compiling():
            return n_total, value, psi
        n = int(n_total)  # CPU tensors: no device synchronisation
        return n, value[:n].tolist(), psi[:n].tolist()

    def _roulette_backprop(self, x: Tensor, apply: Any, convolutions: bool = False,
                           loop_gradients: bool = True, draws: _Draws | None = None
                           ) -> tuple[Tensor, int | Tensor]:
        """The roulette's value with its gradient backpropagated through every product
        ``apply`` (``J`` or ``J^T``; ``convolutions``: of a convolutional branch) of a branch in
        PyTorch operations (``loop_gradients``: :func:`power_sums`'s): ``(logdet, terms)``.
        In a repeated call (``draws.repeat``, differentiated by ``torch.func``), never a
        ``while_loop``: the capped products."""
        n_total, value, _ = self._roulette_draw(draws)
        probes = self._probes(x, draws)
        logdet, _ = power_sums(apply, probes, value, n_total, convolutions=convolutions,
                               loop_gradients=loop_gradients, loops=not _repeat(draws))
        return logdet, n_total

    def _conv_route(self, kind: str, x: Tensor, need: bool) -> list | None:
        """The steps of a convolutional branch (:func:`~fastflow.nn._branch_products.conv_structure`)
        when this call runs on its products in PyTorch operations, else None (the autograd
        estimators): an image input, the parameters in its dtype, no autocast, and, in eager
        mode, not a Neumann gradient (module docstring)."""
        if x.dim() != 4 or torch.is_autocast_enabled(x.device.type):
            return None
        steps = conv_structure(self.g)
        if steps is None or any(p.dtype != x.dtype for p in self.g.parameters()):
            return None
        if need and self._neumann_gradient(kind) and not _compiling():
            return None  # eager: the autograd surrogate reuses the forward's graph (less memory)
        return steps

    def _transform_conv(self, kind: str, x: Tensor, need: bool, draws: _Draws | None = None
                        ) -> tuple[Tensor, Tensor] | None:
        """The call on a convolutional branch (:meth:`_conv_route`): the estimators of the
        autograd path, with the branch's vector-Jacobian products as transposed convolutions
        (the same numbers), in operations that ``torch.compile`` traces; None where it does not
        apply."""
        steps = self._conv_route(kind, x, need)
        if steps is None:
            return None
        with contextlib.nullcontext() if need else torch.no_grad():
            lin = ConvLinearization(steps, x)
            logdet, terms = self._estimate_on_products(kind, x, lin.out, lin.vjp, need, True, True,
                                                       draws)
        self._record(kind, terms, draws)
        return x + lin.out, logdet

    def _transform_func(self, kind: str, x: Tensor, need: bool, draws: _Draws | None = None
                        ) -> tuple[Tensor, Tensor]:
        """Inside a compiled graph, a branch of another kind (or autocast): the estimators of
        the autograd path on products by ``torch.func``
        (:func:`~fastflow.nn._branch_products.func_products`)."""
        with contextlib.nullcontext() if need else torch.no_grad():
            with func_products(self.g, x) as (gx, vjp):
                logdet, terms = self._estimate_on_products(
                    kind, x, gx, vjp, need, convolutions=False, loop_gradients=False, draws=draws
                )
        self._record(kind, terms, draws)
        return x + gx, logdet

    def _estimate_on_products(
        self, kind: str, x: Tensor, gx: Tensor, vjp: Any, need: bool, convolutions: bool,
        loop_gradients: bool = True, draws: _Draws | None = None,
    ) -> tuple[Tensor, int | Tensor]:
        """The estimate of ``kind`` on a branch's product ``vjp`` (``u -> J^T u``) in
        PyTorch operations, ``gx = g(x)``: ``(logdet, terms)``."""
        if kind == "exact":
            return logdet_identity_plus(jacobian_from_vjp(vjp, gx)), x[0].numel()
        if kind == "roulette" and need and not self.neumann_grad:
            return self._roulette_backprop(x, vjp, convolutions, loop_gradients, draws)
        return self._series_on_products(kind, x, vjp, need, draws)

    def _series_on_products(
        self, kind: str, x: Tensor, vjp: Any, need: bool, draws: _Draws | None = None
    ) -> tuple[Tensor, int | Tensor]:
        """The series or the roulette on a branch's products ``vjp`` (``u -> J^T u``) in
        PyTorch operations: the value, with the gradient (``need``) backpropagated through the
        series' products or, for the Neumann gradients, by the surrogate. ``(logdet, terms)``."""
        n_series = self.n_terms if self.training else self.eval_n_terms
        terms: int | Tensor
        value: list[float] | Tensor
        psi: list[float] | Tensor
        if kind == "series":
            terms = n_series
            value, psi = _series_coefficients(n_series)
        else:
            terms, value, psi = self._roulette_draw(draws)
        probes = self._probes(x, draws)
        neumann = kind == "roulette" or self.series_grad == "neumann"
        if _repeat(draws) and draws.left is not None:
            # a repeated call for its gradient only: the surrogate on the first call's vectors
            s = _wide_dot(vjp(draws.left), probes).mean(0)
            return s - s.detach(), terms
        surrogate = need and neumann
        keep = neumann and draws is not None and draws.sink is not None
        loops = not _repeat(draws)
        if not (surrogate or keep):
            return power_sums(vjp, probes, value, terms, loops=loops)[0], terms
        # the Neumann surrogate: the series' vectors without a graph, one product with one
        # (module docstring)
        with torch.no_grad():
            logdet, left = power_sums(vjp, probes, value, terms, psi, loops=loops)
        if keep:
            draws.sink.append(left)
        if not surrogate:
            return logdet, terms
        s = _wide_dot(vjp(left), probes).mean(0)
        return logdet + (s - s.detach()), terms

    # Eager under torch.compile: the autograd estimators differentiate g's graph again (VJPs
    # with create_graph), which dynamo does not capture and AOT-compiled graphs do not support
    # (no double backward, donated buffers).
    @torch.compiler.disable(
        reason="fastflow iResBlock: this branch has a submodule whose call cannot be repeated "
        "for the log-det's products (dropout or batch norm in training mode, torch's "
        "hook-based torch.nn.utils.spectral_norm: "
        "fastflow.nn._repeat.unrepeatable_submodule), so its log-det runs on the "
        "autograd estimators (torch.autograd.grad with create_graph), which torch.compile does "
        "not trace; torch.nn.utils.parametrizations.spectral_norm or fastflow's "
        "SpectralNormLinear/SpectralNormConv2d compile into one graph (fastflow.nn.residual "
        "docstring)"
    )
    def _transform_autograd(
        self, kind: str, x: Tensor, need: bool, params: tuple[Tensor, ...]
    ) -> tuple[Tensor, Tensor]:
        with _autograd_on() as inference:
            if need and x.requires_grad:
                xg = x
            else:
                xg = (x.clone() if inference else x.detach()).requires_grad_()
            gx = self.g(xg)
            if not isinstance(gx, Tensor) or gx.shape != x.shape:
                raise ValueError(
                    f"g must return a tensor of its input's shape {tuple(x.shape)}, got "
                    f"{tuple(gx.shape) if isinstance(gx, Tensor) else type(gx).__name__}"
                )
            logdet, terms = self._estimate(kind, xg, gx, need, params)
        self.last_estimator, self.last_terms = kind, terms
        if need:
            return x + gx, logdet
        return (x + gx.detach()), logdet.detach()

    def _transform(self, x: Tensor, draws: _Draws | None = None) -> tuple[Tensor, Tensor]:
        """The call; with ``draws`` (:meth:`_draw`, inside a compiled graph), their estimator
        kind and random numbers."""
        kind = self.active_estimator(x[0].numel()) if draws is None else draws.kind
        params = self._params()
        # a repeated call is differentiated by torch.func, whose inputs do not show
        # requires_grad to a compiled graph's tracing: it always takes the gradient's path
        need = _repeat(draws) or (
            torch.is_grad_enabled() and (x.requires_grad or bool(params)))
        out = self._transform_mlp(kind, x, need, draws)
        if out is None:
            out = self._transform_conv(kind, x, need, draws)
        if out is not None:
            return out
        if _compiling() and unrepeatable_submodule(self.g) is None:
            return self._transform_func(kind, x, need, draws)
        if draws is not None:
            raise RuntimeError("iResBlock: given draws apply inside a compiled graph only")
        return self._transform_autograd(kind, x, need, params)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(x + g(x), log det(I + J_g(x)))``, the log-det an estimate of the active kind."""
        self._check(x, "x")
        return self._transform(x)

    @torch.compiler.disable
    def inverse(
        self,
        y: Tensor,
        context: Tensor | None = None,
        *,
        tol: float | None = None,
        max_iter: int | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``(x, -log det(I + J_g(x)))`` with ``x + g(x) = y`` by the fixed-point solve.

        ``tol`` and ``max_iter`` override the block's settings for this call; per-sample
        iterations and residuals are in :attr:`last_solve` afterwards.
        """
        self._check(y, "y")
        tol = self.tol if tol is None else tol
        max_iter = self.max_iter if max_iter is None else max_iter
        with _frozen(self.g):
            result = fixed_point_inverse(
                self.g, y, tol=tol, max_iter=max_iter, on_fail=self.on_fail,
                anderson=self.anderson, check_every=self.check_every, params=self._params(),
                solver=self._native_solver(y),
            )
            self.last_solve = result
            _, logdet = self._transform(result.x)
        return result.x, -logdet


# --------------------------------------------------------------------------------------------
# the contractive branch


def _branch_args(coeff: Any, activation: Any, n_power_iter: Any):
    """Checks a contractive branch's arguments; returns ``(coeff, activation factory,
    n_power_iter)``."""
    if isinstance(coeff, bool) or not isinstance(coeff, numbers.Real) or not 0 < coeff < 1:
        raise ValueError(
            f"coeff must be in (0, 1) so that Lip(g) < 1 and the block is invertible, got {coeff!r}"
        )
    if activation not in _RESIDUAL_ACTIVATIONS:
        raise ValueError(f"activation must be one of {_RESIDUAL_ACTIVATIONS}, got {activation!r}")
    n_power_iter = _check_int(n_power_iter, "n_power_iter", 0)
    from fastflow.nn.lipschitz import LipSwish

    def act() -> nn.Module:
        return LipSwish() if activation == "lipswish" else nn.ELU()

    return float(coeff), act, n_power_iter


def residual_mlp(
    dim: int,
    hidden: int = 128,
    n_hidden: int = 3,
    coeff: float = 0.9,
    activation: str = "lipswish",
    n_power_iter: int = 5,
    preact: bool = True,
) -> nn.Sequential:
    """A contractive MLP for :class:`iResBlock`: spectrally normalised linear layers (each with
    ``Lip <= coeff``) and 1-Lipschitz activations, so ``Lip(g) <= coeff ** (n_hidden + 1) < 1``.

    ``[act ->] SNLinear(dim, hidden) -> act -> ... -> SNLinear(hidden, dim)`` with ``n_hidden``
    hidden layers; the leading activation (``preact``) is Residual Flows' pre-activation.

    Arguments:
        dim: input and output width.
        hidden: width of the hidden layers.
        n_hidden: number of hidden layers (0: a single linear layer).
        coeff: the spectral-norm bound of each linear layer, in ``(0, 1)`` (i-ResNet 0.9,
            Residual Flows 0.98).
        activation: ``"lipswish"`` (Residual Flows) or ``"elu"`` (i-ResNet).
        n_power_iter: power iterations per training forward of each spectral norm.
        preact: start with an activation.

    Raises:
        ValueError: ``coeff`` not in ``(0, 1)`` (``Lip(g) >= 1`` would not be invertible), or a
            bad size or activation.
    """
    dim = _check_int(dim, "dim", 1)
    hidden = _check_int(hidden, "hidden", 1)
    n_hidden = _check_int(n_hidden, "n_hidden", 0)
    coeff, act, n_power_iter = _branch_args(coeff, activation, n_power_iter)
    from fastflow.nn.lipschitz import SpectralNormLinear

    widths = [dim] + [hidden] * n_hidden + [dim]
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        if i > 0 or preact:
            layers.append(act())
        layers.append(
            SpectralNormLinear(widths[i], widths[i + 1], coeff=coeff, n_power_iter=n_power_iter)
        )
    return nn.Sequential(*layers)


def residual_cnn(
    channels: int,
    hidden: int = 64,
    coeff: float = 0.98,
    activation: str = "lipswish",
    n_power_iter: int = 5,
    preact: bool = True,
) -> nn.Sequential:
    """A contractive convolutional branch for :class:`iResBlock` on images ``[B, C, H, W]``:
    ``[act ->] SNConv3x3(C, hidden) -> act -> SNConv1x1(hidden, hidden) -> act ->
    SNConv3x3(hidden, C)`` (Residual Flows' branch; each convolution's operator norm at the
    input's spatial size bounded by ``coeff``, so ``Lip(g) <= coeff**3 < 1``).

    Arguments:
        channels: ``C``, in and out.
        hidden: channels of the hidden layers.
        coeff: the spectral-norm bound of each convolution, in ``(0, 1)`` (Residual Flows
            0.98).
        activation: ``"lipswish"`` or ``"elu"``.
        n_power_iter: power iterations per training forward of each spectral norm.
        preact: start with an activation.

    Raises:
        ValueError: ``coeff`` not in ``(0, 1)``, or a bad size or activation.
    """
    channels = _check_int(channels, "channels", 1)
    hidden = _check_int(hidden, "hidden", 1)
    coeff, act, n_power_iter = _branch_args(coeff, activation, n_power_iter)
    from fastflow.nn.lipschitz import SpectralNormConv2d

    def conv(c_in: int, c_out: int, k: int) -> nn.Module:
        return SpectralNormConv2d(c_in, c_out, k, coeff=coeff, n_power_iter=n_power_iter)

    layers: list[nn.Module] = [act()] if preact else []
    layers += [conv(channels, hidden, 3), act(), conv(hidden, hidden, 1), act(), conv(hidden, channels, 3)]
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------------------------
# the vector model


class ResidualFlow(Flow):
    """Residual Flow for vectors ``[B, D]``: ``n_blocks`` :class:`iResBlock`\\ s on
    :func:`residual_mlp` branches, each followed by an :class:`~fastflow.nn.ActNorm`
    (Residual Flows' order; ``actnorm=False`` leaves them out).

    Log-dets: ``estimator`` in training (default the unbiased roulette with the Neumann
    gradient), ``eval_estimator`` in eval mode (default exact up to ``exact_max_dim`` features,
    else a 20-term series); :meth:`set_estimator` changes every block. Sampling inverts every
    block by the fixed-point solve.

    Chen, Behrmann, Duvenaud, Jacobsen. "Residual Flows for Invertible Generative Modeling"
    (2019), https://arxiv.org/abs/1906.02735; Behrmann et al. "Invertible Residual Networks"
    (2019), https://arxiv.org/abs/1811.00995.

    Arguments:
        dim: ``D``.
        n_blocks: residual blocks.
        hidden, n_hidden, coeff, activation, n_power_iter, preact: each block's branch
            (:func:`residual_mlp`).
        actnorm: an ActNorm after every block.
        estimator, eval_estimator: the blocks' log-det kinds.
        base: base distribution (None: standard normal over ``D``).
        **block_kwargs: further :class:`iResBlock` arguments (``n_exact``, ``geometric_p``,
            ``n_terms``, ``n_probes``, ``tol``, ``max_iter``, ``memory_efficient``, ...).

    Example:
        >>> flow = ResidualFlow(2, n_blocks=2, hidden=32)
        >>> flow.log_prob(torch.randn(16, 2)).shape          # training: roulette estimate
        torch.Size([16])
        >>> flow.eval().sample(4).shape
        torch.Size([4, 2])
    """

    def __init__(
        self,
        dim: int,
        n_blocks: int = 10,
        hidden: int = 128,
        n_hidden: int = 3,
        coeff: float = 0.9,
        activation: str = "lipswish",
        actnorm: bool = True,
        estimator: str = "roulette",
        eval_estimator: str | None = None,
        n_power_iter: int = 5,
        preact: bool = True,
        base: nn.Module | None = None,
        **block_kwargs: Any,
    ):
        dim = _check_int(dim, "dim", 1)
        n_blocks = _check_int(n_blocks, "n_blocks", 1)
        layers: list[nn.Module] = []
        for _ in range(n_blocks):
            g = residual_mlp(dim, hidden, n_hidden, coeff, activation, n_power_iter, preact)
            layers.append(iResBlock(g, estimator, eval_estimator, **block_kwargs))
            if actnorm:
                layers.append(ActNorm(dim))
        super().__init__(layers, base=base, event_shape=dim)

    @property
    def blocks(self) -> list[iResBlock]:
        """The residual blocks, in data -> latent order."""
        return [t for t in self.transform if isinstance(t, iResBlock)]

    def set_estimator(self, estimator: str | None = None, eval_estimator: Any = _KEEP) -> None:
        """Sets the training log-det kind of every block (None: unchanged) and, when given, the
        eval kind (None: the default, exact up to ``exact_max_dim`` features)."""
        if estimator is not None:
            _check_estimator(estimator, "estimator")
        if eval_estimator is not _KEEP:
            _check_estimator(eval_estimator, "eval_estimator", allow_none=True)
        for block in self.blocks:
            if estimator is not None:
                block.estimator = estimator
            if eval_estimator is not _KEEP:
                block.eval_estimator = eval_estimator


class _Unsqueeze(Transform):
    """The inverse of a :class:`~fastflow.nn.Squeeze` as a transform (log-det 0)."""

    def __init__(self, factor: int = 2):
        super().__init__()
        from fastflow.nn.multiscale import Squeeze

        self.squeeze = Squeeze(factor)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.squeeze.inverse(x)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.squeeze(z)


class ResidualFlowImage(Flow):
    """Residual Flow for images ``[B, C, H, W]``: ``levels`` levels of ``blocks_per_level``
    residual blocks (:class:`iResBlock`) on :func:`residual_cnn` branches, each followed by an
    :class:`~fastflow.nn.ActNorm`, with a :class:`~fastflow.nn.Squeeze` before every level but
    the first (i-ResNet's multi-scale layout, without factoring out).

    The latent is returned in the input's shape (the squeezes are undone at the end; a
    squeeze is a permutation, log-det 0), so the flow has the input's event shape and a standard
    normal base over it. Log-dets and inverses as in :class:`ResidualFlow`; the spectral norms
    of the 3x3 convolutions are sized for each level's spatial size on their first call.

    Chen, Behrmann, Duvenaud, Jacobsen. "Residual Flows for Invertible Generative Modeling"
    (2019), https://arxiv.org/abs/1906.02735.

    Arguments:
        shape: ``(C, H, W)``, ``H`` and ``W`` divisible by ``2**(levels - 1)``.
        levels: number of levels.
        blocks_per_level: residual blocks per level.
        hidden, coeff, activation, n_power_iter, preact: each branch (:func:`residual_cnn`).
        actnorm: an ActNorm after every block.
        estimator, eval_estimator: the blocks' log-det kinds.
        base: base distribution (None: standard normal over ``shape``).
        **block_kwargs: further :class:`iResBlock` arguments.

    Example:
        >>> flow = ResidualFlowImage((1, 4, 4), levels=2, blocks_per_level=1, hidden=8)
        >>> flow.log_prob(torch.randn(3, 1, 4, 4)).shape
        torch.Size([3])
    """

    def __init__(
        self,
        shape: Any = (3, 32, 32),
        levels: int = 3,
        blocks_per_level: int = 4,
        hidden: int = 64,
        coeff: float = 0.98,
        activation: str = "lipswish",
        actnorm: bool = True,
        estimator: str = "roulette",
        eval_estimator: str | None = None,
        n_power_iter: int = 5,
        preact: bool = True,
        base: nn.Module | None = None,
        **block_kwargs: Any,
    ):
        from fastflow.distributions import _event_shape
        from fastflow.nn.multiscale import Squeeze

        shape = _event_shape(shape, "shape")
        if len(shape) != 3:
            raise ValueError(f"shape must be an image shape (C, H, W), got {tuple(shape)}")
        levels = _check_int(levels, "levels", 1)
        blocks_per_level = _check_int(blocks_per_level, "blocks_per_level", 1)
        c, h, w = shape
        if h % 2 ** (levels - 1) or w % 2 ** (levels - 1):
            raise ValueError(
                f"shape's H and W must be divisible by 2**(levels - 1) = {2 ** (levels - 1)}, "
                f"got H, W = {h}, {w}"
            )
        layers: list[nn.Module] = []
        for level in range(levels):
            if level > 0:
                layers.append(Squeeze(2))
                c = c * 4
            for _ in range(blocks_per_level):
                g = residual_cnn(c, hidden, coeff, activation, n_power_iter, preact)
                layers.append(iResBlock(g, estimator, eval_estimator, **block_kwargs))
                if actnorm:
                    layers.append(ActNorm(c))
        layers += [_Unsqueeze(2) for _ in range(levels - 1)]
        super().__init__(layers, base=base, event_shape=shape)

    blocks = ResidualFlow.blocks
    set_estimator = ResidualFlow.set_estimator
