"""Log-determinant estimators for residual blocks ``y = x + g(x)`` with ``Lip(g) < 1``:
the pure-PyTorch reference (vector-Jacobian products by ``torch.autograd.grad``).

Every estimator takes ``x`` (``[B, ...]``, requiring grad) and ``gx = g(x)`` computed from it with
autograd on, and returns ``log|det(I + J)|`` per sample, ``[B]``, where ``J = dg/dx`` (the
Jacobian of one sample, ``D x D`` with ``D`` the number of elements of a sample). Three kinds
(DESIGN.md, "Points the contract settles": the kind is the caller's choice):

* :func:`logdet_exact`: the brute-force Jacobian (``D`` vector-Jacobian products) and
  ``slogdet(I + J)``; differentiable; for small ``D``.
* :func:`logdet_series` (i-ResNet): the power series
  ``log det(I + J) = tr log(I + J) = sum_{k>=1} (-1)^{k+1}/k tr(J^k)`` truncated after
  ``n_terms``, each trace by Hutchinson's estimator ``tr(A) = E[v^T A v]`` with
  ``v^T J^k = ((v^T J) J)...``, ``k`` chained vector-Jacobian products. Biased by the truncation
  (at most ``D (-log(1 - L) - sum_{k<=n} L^k/k)`` for ``Lip(g) <= L``); gradients by
  backpropagating through the products (``create_graph``).
* :func:`logdet_roulette` (Residual Flows): the first ``n_exact`` terms always, then a random
  number ``N`` of further terms, each term ``k`` weighted by ``1/P(N >= k - n_exact)``
  ("Russian roulette"); unbiased for the infinite series whenever it converges. ``N`` is
  geometric on ``{1, 2, ...}`` (``P(N >= m) = (1 - p)^(m-1)``; ``p = 0.5`` and ``n_exact = 2``
  give 4 terms on average) or Poisson on ``{0, 1, ...}``. One ``N`` is drawn per call, shared by
  the batch (each sample's estimate is unbiased; samples of one batch are correlated through
  ``N``). Gradients by the Neumann-series surrogate (below), or by backpropagation through the
  terms (``gradient="backprop"``, also unbiased, memory ``O(terms)``).

Neumann-series gradient (REFERENCE.md 1.5; derived here again). ``d log det(I + J) =
tr((I + J)^{-1} dJ)`` and ``(I + J)^{-1} = sum_{j>=0} (-1)^j J^j``. With the same ``N`` and
weights ``c_k`` as the value (``c_k = 1`` for ``k <= n_exact``, else ``1/P(N >= k - n_exact)``)
and ``u_j = v^T J^j`` (no graph kept),

    ``psi = sum_{j=0}^{K-1} (-1)^j c_{j+1} u_j``,  ``K = n_exact + N``,

the surrogate ``S = (psi^T J) v`` (one vector-Jacobian product with a graph, ``psi`` held
constant) has ``dS = psi^T dJ v``, whose expectation over ``v`` and ``N`` is
``sum_j (-1)^j tr(J^j dJ) = tr((I + J)^{-1} dJ)``: the exact gradient, for ``theta`` and for
``x`` alike. The returned tensor has the estimate's value and ``S``'s gradient
(``value + S - S.detach()``).

Memory-efficient backward ("backward-in-forward", ``memory_efficient=True``): the gradients of
``sum_batch S`` w.r.t. ``x`` and ``params`` are taken at once inside the call, the surrogate's
graph is freed, and the returned tensor's backward multiplies the stored gradients by the
upstream gradient ``gl``: ``dx_i = gl_i dS_i/dx_i`` (exact per sample, since ``g`` treats rows
independently) and ``dtheta = mean(gl) * d(sum S)/dtheta``, which is only right when every
sample's log-det enters the loss with the same weight (a mean or sum of log-densities); the
backward checks that (one host synchronisation) and raises ``RuntimeError`` otherwise.
Gradients reach ``x`` and ``params`` only (not other tensors ``g`` may read).

Probes: ``"gaussian"`` (``N(0, I)``) or ``"rademacher"`` (``+-1``), ``n_probes`` independent
ones averaged, drawn from torch's generator (``generator=`` for a private one, on ``x``'s
device), or given explicitly as ``probes`` (``[n_probes, *x.shape]``) so that another
implementation (the native Hutchinson operator) can be compared exactly. ``N`` is drawn on the
CPU (``generator`` when it is a CPU generator, else torch's default CPU generator), so drawing it
never synchronises with an accelerator.

For a compiled graph, where a per-call random Python value would be a graph break or a
recompilation: :func:`draw_geometric_n` draws a geometric ``N`` as a 0-d CPU tensor (by the
inverse CDF of one ``torch.rand`` draw, capped at :func:`geometric_max_n`, a value the draw
never exceeds), and :func:`roulette_coefficients` turns it into fixed-length weight tensors that
are zero past the drawn terms (the tensor-coefficient form of
:func:`fastflow.ops.mlp_trace.mlp_trace`). :class:`~fastflow.nn.iResBlock` draws its ``N`` this
way on every path.

References:
    Behrmann, Grathwohl, Chen, Duvenaud, Jacobsen. "Invertible Residual Networks" (2019),
    https://arxiv.org/abs/1811.00995.
    Chen, Behrmann, Duvenaud, Jacobsen. "Residual Flows for Invertible Generative Modeling"
    (2019), https://arxiv.org/abs/1906.02735 (section 3, appendix E).
    Hutchinson. "A stochastic estimator of the trace of the influence matrix for Laplacian
    smoothing splines" (1989).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from fastflow._checks import int_at_least as _check_int

__all__ = [
    "PROBES",
    "ROULETTE_DISTRIBUTIONS",
    "ROULETTE_GRADIENTS",
    "jacobian",
    "logdet_exact",
    "logdet_identity_plus",
    "logdet_series",
    "logdet_roulette",
    "roulette_tail_prob",
    "draw_roulette_n",
    "geometric_max_n",
    "draw_geometric_n",
    "roulette_coefficients",
    "sample_probes",
]

PROBES = ("gaussian", "rademacher")
ROULETTE_DISTRIBUTIONS = ("geometric", "poisson")
ROULETTE_GRADIENTS = ("neumann", "backprop")


# --------------------------------------------------------------------------------------------
# helpers


def _check_pair(x: Any, gx: Any) -> None:
    if not isinstance(x, Tensor) or not isinstance(gx, Tensor):
        raise TypeError(
            f"x and gx must be Tensors, got {type(x).__name__} and {type(gx).__name__}"
        )
    if x.dim() < 2 or x.shape[0] == 0:
        raise ValueError(f"x must have shape [batch, ...] with a non-empty batch, got {tuple(x.shape)}")
    if gx.shape != x.shape:
        raise ValueError(f"gx = g(x) must have x's shape {tuple(x.shape)}, got {tuple(gx.shape)}")
    if not x.requires_grad or gx.grad_fn is None:
        raise ValueError(
            "gx must be computed from x with autograd on (x.requires_grad and gx.grad_fn): "
            "the estimators differentiate g through it"
        )


def _wide(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample inner product, float32 or wider, ``[B]``."""
    return (a * b).reshape(a.shape[0], -1).sum(1, dtype=_wide(a.dtype))


def _vjp(gx: Tensor, x: Tensor, u: Tensor, create_graph: bool) -> Tensor:
    (out,) = torch.autograd.grad(gx, x, u, retain_graph=True, create_graph=create_graph)
    return out


def _default_create_graph(create_graph: bool | None) -> bool:
    return torch.is_grad_enabled() if create_graph is None else bool(create_graph)


def sample_probes(
    x: Tensor, n_probes: int = 1, kind: str = "gaussian", generator: torch.Generator | None = None
) -> Tensor:
    """``n_probes`` probe vectors of ``x``'s shape, dtype and device: ``[n_probes, *x.shape]``.

    ``kind``: ``"gaussian"`` (``N(0, I)``) or ``"rademacher"`` (``+-1`` with probability 1/2).
    """
    n_probes = _check_int(n_probes, "n_probes", 1)
    if kind not in PROBES:
        raise ValueError(f"probe must be one of {PROBES}, got {kind!r}")
    shape = (n_probes, *x.shape)
    if kind == "gaussian":
        return torch.randn(shape, generator=generator, dtype=x.dtype, device=x.device)
    bits = torch.randint(0, 2, shape, generator=generator, device=x.device)
    return (bits * 2 - 1).to(x.dtype)


def _probes(
    x: Tensor, n_probes: int, kind: str, probes: Tensor | None, generator: torch.Generator | None
) -> Tensor:
    if probes is None:
        return sample_probes(x, n_probes, kind, generator)
    if not isinstance(probes, Tensor):
        raise TypeError(f"probes must be a Tensor, got {type(probes).__name__}")
    if probes.shape == x.shape:
        probes = probes.unsqueeze(0)
    if probes.dim() != x.dim() + 1 or probes.shape[1:] != x.shape:
        raise ValueError(
            f"probes must have shape [n_probes, {', '.join(map(str, x.shape))}] (or x's shape), "
            f"got {tuple(probes.shape)}"
        )
    return probes.to(dtype=x.dtype, device=x.device)


# --------------------------------------------------------------------------------------------
# exact


def jacobian(x: Tensor, gx: Tensor, create_graph: bool | None = None) -> Tensor:
    """The per-sample Jacobian ``J[b, i, j] = d gx[b, i] / d x[b, j]`` (flattened), ``[B, D, D]``.

    ``D`` vector-Jacobian products on the graph of ``gx`` (``g`` must treat rows independently,
    as a residual branch does). Differentiable when ``create_graph`` (default: grad mode).
    """
    _check_pair(x, gx)
    create_graph = _default_create_graph(create_graph)
    b = x.shape[0]
    d = x[0].numel()
    rows = []
    basis = gx.new_zeros(b, d)
    for i in range(d):
        basis.zero_()
        basis[:, i] = 1
        rows.append(_vjp(gx, x, basis.view_as(gx).clone(), create_graph).reshape(b, d))
    return torch.stack(rows, 1)


def logdet_exact(x: Tensor, gx: Tensor, create_graph: bool | None = None) -> Tensor:
    """``log|det(I + J)|`` per sample from the brute-force Jacobian (:func:`jacobian`), ``[B]``.

    Float32 or wider; differentiable (w.r.t. ``x`` and ``g``'s parameters) when
    ``create_graph`` (default: grad mode). Costs ``D`` vector-Jacobian products and a batched
    ``D x D`` determinant: for small ``D`` (2-D toy data, tests, evaluation).
    """
    return logdet_identity_plus(jacobian(x, gx, create_graph))


def logdet_identity_plus(J: Tensor) -> Tensor:
    """``log|det(I + J)|`` of per-sample Jacobians ``J`` ``[B, D, D]``, ``[B]``, float32 or wider
    (differentiable)."""
    J = J.to(_wide(J.dtype))
    eye = torch.eye(J.shape[-1], dtype=J.dtype, device=J.device)
    A = eye + J
    if not (torch.compiler.is_compiling() and A.requires_grad):
        return torch.linalg.slogdet(A).logabsdet
    # In a compiled graph, the gradient is written out: d log|det A| / dA = A^{-T}. Inductor
    # (torch 2.13) differentiates slogdet and det wrongly when A is laid out column-major per
    # matrix, as the Jacobian of mlp_jacobian is (values right, gradients off by O(1)).
    # The term ((A - A.detach()) * A^{-T}) is zero in value and carries that gradient.
    constant = A.detach()
    grad = torch.linalg.inv(constant).mT
    return torch.linalg.slogdet(constant).logabsdet + ((A - constant) * grad).sum((-2, -1))


# --------------------------------------------------------------------------------------------
# truncated power series (i-ResNet)


def logdet_series(
    x: Tensor,
    gx: Tensor,
    n_terms: int = 5,
    *,
    n_probes: int = 1,
    probe: str = "gaussian",
    probes: Tensor | None = None,
    create_graph: bool | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """i-ResNet's truncated series ``sum_{k=1}^{n_terms} (-1)^{k+1}/k v^T J^k v``, ``[B]``.

    Averaged over ``n_probes`` probes (module docstring). Differentiable by backpropagation
    through the ``n_terms`` vector-Jacobian products when ``create_graph`` (default: grad mode);
    memory grows with ``n_terms``. Biased by the truncation.
    """
    _check_pair(x, gx)
    n_terms = _check_int(n_terms, "n_terms", 1)
    create_graph = _default_create_graph(create_graph)
    vs = _probes(x, n_probes, probe, probes, generator)
    total = None
    for v in vs:
        u = v
        for k in range(1, n_terms + 1):
            u = _vjp(gx, x, u, create_graph)
            term = _dot(u, v) * ((-1) ** (k + 1) / k)
            total = term if total is None else total + term
    return total / vs.shape[0]


# --------------------------------------------------------------------------------------------
# Russian roulette (Residual Flows)


def _check_dist(dist: str, p: float, rate: float) -> None:
    if dist not in ROULETTE_DISTRIBUTIONS:
        raise ValueError(f"dist must be one of {ROULETTE_DISTRIBUTIONS}, got {dist!r}")
    if dist == "geometric":
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0 < p <= 1:
            raise ValueError(f"geometric p must be in (0, 1], got {p!r}")
    elif isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0 < rate < math.inf:
        raise ValueError(f"poisson rate must be positive and finite, got {rate!r}")


def roulette_tail_prob(m: int, dist: str = "geometric", p: float = 0.5, rate: float = 2.0) -> float:
    """``P(N >= m)`` for the roulette's ``N``: geometric on ``{1, 2, ...}`` with success
    probability ``p`` (``(1 - p)^(m - 1)``), or Poisson(``rate``) on ``{0, 1, ...}``."""
    _check_dist(dist, p, rate)
    if dist == "geometric":
        return 1.0 if m <= 1 else (1.0 - p) ** (m - 1)
    if m <= 0:
        return 1.0
    # the tail summed directly (1 - cdf cancels for large m)
    log_pmf = -rate + m * math.log(rate) - math.lgamma(m + 1)
    total, i = 0.0, m
    while True:
        term = math.exp(log_pmf)
        total += term
        if term < 1e-17 * total and i > rate:
            return total
        i += 1
        log_pmf += math.log(rate) - math.log(i)


def draw_roulette_n(
    dist: str = "geometric", p: float = 0.5, rate: float = 2.0, generator: torch.Generator | None = None
) -> int:
    """One draw of the roulette's ``N`` (on the CPU; ``generator`` if it is a CPU generator)."""
    _check_dist(dist, p, rate)
    gen = generator if generator is not None and generator.device.type == "cpu" else None
    if dist == "geometric":
        if p == 1:
            return 1
        return int(torch.empty((), dtype=torch.float64).geometric_(p, generator=gen))
    return int(torch.poisson(torch.tensor(float(rate), dtype=torch.float64), generator=gen))


def geometric_max_n(p: float) -> int:
    """The largest value :func:`draw_geometric_n` can return for success probability ``p``.

    The draw inverts the CDF at ``u = 1 - torch.rand(())`` (float64, a multiple of ``2^-53`` in
    ``(0, 1]``), so ``N <= 1 + floor(53 log 2 / -log(1 - p))`` (54 for ``p = 0.5``): a cap at
    this value never changes a draw, and the roulette stays unbiased.
    """
    _check_dist("geometric", p, 1.0)
    if p == 1:
        return 1
    return 1 + int(math.floor(53 * math.log(2) / -math.log1p(-p)))


def draw_geometric_n(
    p: float = 0.5, max_n: int | None = None, generator: torch.Generator | None = None
) -> Tensor:
    """One draw of the roulette's geometric ``N`` on ``{1, 2, ...}`` (``P(N >= m) = (1 -
    p)^(m - 1)``) as a 0-d int64 CPU tensor: no Python value, so a compiled graph can hold it.

    By the inverse CDF, ``N = 1 + floor(log(u) / log(1 - p))`` with ``u = 1 - torch.rand(())``
    in float64 on the CPU (``generator`` when it is a CPU generator; drawing never synchronises
    with an accelerator), capped at ``max_n`` (default and largest: :func:`geometric_max_n`).
    """
    _check_dist("geometric", p, 1.0)
    cap = geometric_max_n(p)
    if max_n is not None:
        cap = min(_check_int(max_n, "max_n", 1), cap)
    if p == 1:
        return torch.ones((), dtype=torch.int64)
    gen = generator if generator is not None and generator.device.type == "cpu" else None
    u = 1 - torch.rand((), dtype=torch.float64, generator=gen)
    n = 1 + torch.floor(torch.log(u) / math.log1p(-p))
    return n.clamp(1, cap).to(torch.int64)


def roulette_coefficients(
    n_random: Tensor, n_exact: int, p: float = 0.5, max_n: int | None = None
) -> tuple[Tensor, Tensor]:
    """The geometric roulette's term weights as fixed-length float64 CPU tensors, zero past the
    drawn number of terms: ``(value, psi)``, each ``[n_exact + max_n]``.

    ``value[k-1] = (-1)^(k+1) / k / P(N >= k - n_exact)`` and ``psi[j] = (-1)^j / P(N >= j + 1 -
    n_exact)`` (the Neumann gradient's weights, module docstring) for ``k, j + 1 <= n_exact +
    n_random``, else 0: the coefficients of :func:`fastflow.ops.mlp_trace.mlp_trace` with tensor
    coefficients, whose trailing zeros do not count. ``n_random`` is a 0-d integer tensor
    (:func:`draw_geometric_n`), ``max_n`` the largest it can be (default
    :func:`geometric_max_n`). Traceable by ``torch.compile``: no value of ``n_random`` is read.
    """
    n_exact = _check_int(n_exact, "n_exact", 0)
    _check_dist("geometric", p, 1.0)
    max_n = geometric_max_n(p) if max_n is None else _check_int(max_n, "max_n", 1)
    if not isinstance(n_random, Tensor) or n_random.dim() != 0:
        raise ValueError(
            f"n_random must be a 0-d tensor (draw_geometric_n), got "
            f"{tuple(n_random.shape) if isinstance(n_random, Tensor) else type(n_random).__name__}"
        )
    size = n_exact + max_n
    value = [(-1) ** (k + 1) / k / roulette_tail_prob(k - n_exact, "geometric", p)
             for k in range(1, size + 1)]
    psi = [(-1) ** j / roulette_tail_prob(j + 1 - n_exact, "geometric", p) for j in range(size)]
    n_total = n_random.to(torch.int64) + n_exact
    k = torch.arange(1, size + 1)
    zero = torch.zeros((), dtype=torch.float64)
    value_t = torch.where(k <= n_total, torch.tensor(value, dtype=torch.float64), zero)
    psi_t = torch.where(k <= n_total, torch.tensor(psi, dtype=torch.float64), zero)
    return value_t, psi_t


class _GradInForward(torch.autograd.Function):
    """Returns ``value``; its backward applies gradients computed in the forward (module doc)."""

    @staticmethod
    def forward(ctx, value: Tensor, grads: tuple, x: Tensor, *params: Tensor) -> Tensor:
        ctx.grads = grads
        return value.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, gl: Tensor):
        grad_x, grad_params = ctx.grads
        b = gl.shape[0]
        gl_mean = gl.mean()
        if grad_params and any(gp is not None for gp in grad_params) and b > 1:
            spread = float((gl - gl_mean).abs().max())
            if spread > 1e-6 * float(gl.abs().max()):
                raise RuntimeError(
                    "the memory-efficient roulette backward (memory_efficient=True) needs every "
                    "sample's log-det to enter the loss with the same weight (e.g. a mean or sum "
                    f"of log-densities), got upstream gradients that differ by {spread:.3g}; use "
                    "memory_efficient=False"
                )
        out_x = None
        if ctx.needs_input_grad[2] and grad_x is not None:
            out_x = grad_x * gl.to(grad_x.dtype).view((-1,) + (1,) * (grad_x.dim() - 1))
        out_params = [
            None if gp is None or not need else gp * gl_mean.to(gp.dtype)
            for gp, need in zip(grad_params, ctx.needs_input_grad[3:])
        ]
        return (None, None, out_x, *out_params)


def logdet_roulette(
    x: Tensor,
    gx: Tensor,
    *,
    n_exact: int = 2,
    dist: str = "geometric",
    p: float = 0.5,
    rate: float = 2.0,
    n_random: int | None = None,
    n_probes: int = 1,
    probe: str = "gaussian",
    probes: Tensor | None = None,
    gradient: str = "neumann",
    memory_efficient: bool = False,
    params: Sequence[Tensor] = (),
    create_graph: bool | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Residual Flows' unbiased Russian-roulette estimate of ``log det(I + J)``, ``[B]``.

    ``sum_{k=1}^{n_exact + N} (-1)^{k+1}/k c_k v^T J^k v`` with ``c_k = 1/P(N >= k - n_exact)``
    (module docstring), averaged over the probes.

    Arguments:
        x, gx: the input (requiring grad) and ``g(x)`` with its graph.
        n_exact: terms always included.
        dist, p, rate: ``N``'s distribution: ``"geometric"`` with success probability ``p``
            or ``"poisson"`` with ``rate``.
        n_random: the value of ``N`` to use instead of drawing it (the weights stay those of
            ``dist``): draw it with :func:`draw_roulette_n` to know the number of terms,
            ``n_exact + N``, or to reproduce a call.
        n_probes, probe, probes, generator: the probes (module docstring).
        gradient: ``"neumann"`` (the surrogate, one graph-keeping product) or ``"backprop"``
            (through every product).
        memory_efficient: with ``"neumann"``, take the gradients w.r.t. ``x`` and ``params`` in
            the call and free the surrogate's graph (valid for losses that weight every
            sample's log-det the same).
        params: the tensors that get gradients with ``memory_efficient`` (``g``'s parameters).
        create_graph: make the result differentiable (default: grad mode).
    """
    _check_pair(x, gx)
    n_exact = _check_int(n_exact, "n_exact", 0)
    _check_dist(dist, p, rate)
    if gradient not in ROULETTE_GRADIENTS:
        raise ValueError(f"gradient must be one of {ROULETTE_GRADIENTS}, got {gradient!r}")
    create_graph = _default_create_graph(create_graph)
    if n_random is None:
        n_random = draw_roulette_n(dist, p, rate, generator)
    n_random = _check_int(n_random, "n_random", 0)
    n_total = n_exact + n_random
    coeffs = [
        (-1) ** (k + 1) / k / roulette_tail_prob(k - n_exact, dist, p, rate)
        for k in range(1, n_total + 1)
    ]
    vs = _probes(x, n_probes, probe, probes, generator)
    n_probes = vs.shape[0]
    backprop = create_graph and gradient == "backprop"
    neumann = create_graph and gradient == "neumann"

    value = x.new_zeros(x.shape[0], dtype=_wide(x.dtype))
    surrogate = None
    for v in vs:
        u = v
        # psi starts with its j = 0 term c_1 u_0 (c_1 = 1 unless n_exact = 0)
        psi = v / roulette_tail_prob(1 - n_exact, dist, p, rate) if neumann else None
        for k in range(1, n_total + 1):
            u = _vjp(gx, x, u, backprop)  # u = v^T J^k
            value = value + _dot(u, v) * coeffs[k - 1]
            if neumann and k < n_total:
                # psi += (-1)^k c_{k+1} u_k
                psi = psi + u * ((-1) ** k / roulette_tail_prob(k + 1 - n_exact, dist, p, rate))
        if neumann and n_total > 0:
            s = _dot(_vjp(gx, x, psi, True), v)
            surrogate = s if surrogate is None else surrogate + s
    value = value / n_probes
    if not create_graph:
        return value.detach()
    if backprop or surrogate is None:
        return value
    surrogate = surrogate / n_probes
    if not memory_efficient:
        return value.detach() + (surrogate - surrogate.detach())
    params = tuple(params)
    inputs = (x, *params)
    got = torch.autograd.grad(surrogate.sum(), inputs, retain_graph=True, allow_unused=True)
    del surrogate
    grads = (got[0], tuple(got[1:]))
    return _GradInForward.apply(value.detach(), grads, x, *params)
