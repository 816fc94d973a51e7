"""Batched fixed-point inversion of ``y = x + g(x)`` with per-sample convergence, and its
gradient by the implicit-function theorem (the generic path: any callable ``g``).

For a contractive ``g`` (``Lip(g) < 1``) the map ``x -> y - g(x)`` is a contraction whose fixed
point is the unique ``x`` with ``x + g(x) = y`` (Banach). :func:`fixed_point_inverse` iterates it
from ``x = y`` (so the first iterate is ``x_1 = y - g(y)``, REFERENCE.md 1.5 and 4.4) on the whole
batch at once, each sample stopping on its own test.

Residual and stop test (per sample ``i``, after iteration ``k``):

    ``r_i = max_j |x_k - x_{k-1}|_ij / (1 + |y_ij|)``, converged when ``r_i <= tol``.

The step ``x_k - x_{k-1} = y - g(x_{k-1}) - x_{k-1}`` is minus the forward residual
``x_{k-1} + g(x_{k-1}) - y`` of the previous iterate, so ``r`` is a mixed absolute/relative
(``atol = rtol = tol``), elementwise measure of how far the iteration is from inverting ``y``.
The returned ``x_k`` is within about ``Lip/(1 - Lip)`` times its last step of the exact inverse
(exactly so in the norm in which ``g`` is ``Lip``-contractive): up to ``9 tol (1 + |y|)`` at
``Lip = 0.9``, so ask for a smaller ``tol`` when the error itself must be below a bound. Whatever
``tol``, float32 cannot do better than about ``eps |y| / (1 - Lip)`` (~3e-6 at ``|y| ~ 5``,
``Lip = 0.9``); a ``tol`` below ~1e-6 may then be out of reach and is reported as
non-convergence. Iterations per sample are about ``log(tol) / log(rate)`` for the actual
contraction rate near the solution (109 at 0.9, 37 at ``0.9^3``, for ``tol = 1e-5``).

Per-sample convergence without a host synchronisation per iteration (DESIGN.md, "Performance
rules"). Each iteration evaluates ``g`` on the working batch and updates, with ``torch.where``
masks on the device, only the samples still active: a sample that has converged (or whose
residual is not finite) is frozen from that iteration on, its iteration count and residual
stop there. The only host synchronisation is the test "is any sample still active?", done every
``check_every`` iterations (default: every iteration on CPU, where it costs nothing, every 8 on
other devices). The trade-off: after the last sample converges, up to ``check_every - 1``
iterations of ``g`` run for nothing (their results are masked out, so the answer is the same);
checking every iteration would instead stall the device queue once per iteration. At each check,
when at most half the working rows are still active and ``compact=True``, the working set is
compacted to the active rows (one gather), so that a few slow samples do not keep paying for the
converged ones; this assumes that ``g`` treats the rows of its input independently (true of any
residual block: no batch statistics), which is also what makes per-sample convergence meaningful.

Anderson acceleration (``anderson=m``, per sample, optional): with the last ``m`` evaluations
``G_l = y - g(x_l)`` and residuals ``F_l = (G_l - x_l) / (1 + |y|)``, each sample's next iterate
is ``sum_l alpha_l G_l`` with ``alpha = argmin |sum_l alpha_l F_l|`` subject to ``sum alpha = 1``
(``alpha ~ H^{-1} 1``, ``H = F F^T`` + a tiny ridge, a batched ``m x m`` solve with no error
checking, so no synchronisation); a sample whose mixture is not finite takes the plain step.
The stop test is the same (``r = |G_k - x_k|``), and a converged sample takes the plain step
``G_k``, so the error bound above holds with or without acceleration.

Non-convergence is never silent: samples still above ``tol`` after ``max_iter`` iterations, and
samples whose iterates are not finite (a NaN/inf in ``y``, or divergence when ``Lip(g) >= 1``)
give a :class:`FixedPointWarning` (``on_fail="warn"``) or a :class:`FixedPointError`
(``on_fail="raise"``) naming the worst residual and its sample. A NaN stays in its sample: the
other samples converge as they would alone.

Gradients (REFERENCE.md 4.4). When autograd needs them (grad mode on and ``y`` or a parameter of
``g`` requires grad) the solve runs inside an ``autograd.Function``: differentiating
``x* + g(x*) = y`` gives ``(I + J) dx = dy - (dg/dtheta) dtheta`` with ``J = dg/dx`` at ``x*``, so
for an upstream gradient ``gx = dL/dx*``:

    ``w = (I + J^T)^{-1} gx``, found by the fixed point ``w <- gx - J^T w`` (vector-Jacobian
    products on one graph of ``g(x*)``, contraction since ``|J| < 1``);
    ``dL/dy = w``;  ``dL/dtheta = -w^T dg/dtheta`` (one more vector-Jacobian product).

No iteration is unrolled; the forward keeps one graph of ``g(x*)`` (built once, after the solve).
The backward solve has its own per-sample test, relative to the upstream gradient:
``r_i = max_j |w_k - w_{k-1}|_ij / max_j |gx_ij|`` (gradients are often tiny, e.g. ``1/B``, so an
absolute test would be meaningless), with ``backward_tol`` (default ``tol``) and
``backward_max_iter`` (default ``max_iter``); non-convergence is reported as in the forward. The
backward is first-order only (no double backward through the inverse).

References:
    Behrmann, Grathwohl, Chen, Duvenaud, Jacobsen. "Invertible Residual Networks" (2019),
    https://arxiv.org/abs/1811.00995 (the fixed-point inverse).
    Chen, Behrmann, Duvenaud, Jacobsen. "Residual Flows for Invertible Generative Modeling"
    (2019), https://arxiv.org/abs/1906.02735.
    Walker, Ni. "Anderson acceleration for fixed-point iterations" (2011),
    SIAM J. Numer. Anal. 49(4).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from fastflow.flow import ConvergenceError, ConvergenceWarning
from fastflow._checks import ON_FAIL
from fastflow._checks import int_at_least as _check_int
from fastflow._checks import on_fail as _check_on_fail
from fastflow._checks import positive_float as _check_positive_float

__all__ = [
    "FixedPointError",
    "FixedPointResult",
    "FixedPointWarning",
    "fixed_point_inverse",
]



class FixedPointError(ConvergenceError):
    """A fixed-point solve did not converge (``on_fail="raise"``)."""


class FixedPointWarning(ConvergenceWarning):
    """A fixed-point solve did not converge (``on_fail="warn"``)."""


@dataclass(eq=False)
class FixedPointResult:
    """What :func:`fixed_point_inverse` returns.

    Attributes:
        x: the solution ``[B, ...]`` (differentiable by the implicit-function theorem when
            autograd asked for it).
        iterations: ``[B]`` int64, evaluations of ``g`` spent on each sample (the first iterate
            ``y - g(y)`` counts as one).
        residual: ``[B]``, each sample's last residual (module docstring; float32 or wider;
            NaN/inf for a non-finite sample).
        converged: ``[B]`` bool, ``residual <= tol``.
        tol, max_iter: the settings of the solve.
        backward_iterations, backward_residual, backward_converged: the same for the last
            backward solve (``w = gx - J^T w``), filled in when a backward has run; ``None``
            before.
    """

    x: Tensor
    iterations: Tensor
    residual: Tensor
    converged: Tensor
    tol: float
    max_iter: int
    backward_iterations: Tensor | None = None
    backward_residual: Tensor | None = None
    backward_converged: Tensor | None = None

    def __iter__(self):  # x, info = fixed_point_inverse(...) also works
        yield self.x
        yield self


# --------------------------------------------------------------------------------------------
# argument checks


# --------------------------------------------------------------------------------------------
# the solver core (no autograd)


def _wide(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


class _Anderson:
    """Per-sample Anderson mixing over the last ``m`` evaluations (module docstring)."""

    def __init__(self, m: int):
        self.m = m
        self.G: Tensor | None = None  # [Bw, m, N] evaluations y - g(x_l)
        self.F: Tensor | None = None  # [Bw, m, N] scaled residuals
        self.count = 0

    def mix(self, x: Tensor, gx: Tensor, denom: Tensor) -> Tensor:
        b = x.shape[0]
        g_flat = gx.reshape(b, -1)
        f_flat = ((gx - x) / denom).reshape(b, -1)
        if self.G is None:
            self.G = g_flat.new_zeros(b, self.m, g_flat.shape[1])
            self.F = f_flat.new_zeros(b, self.m, f_flat.shape[1])
        slot = self.count % self.m
        self.G[:, slot] = g_flat
        self.F[:, slot] = f_flat
        self.count += 1
        n = min(self.count, self.m)
        if n < 2:
            return gx
        F = self.F[:, :n]
        H = F @ F.transpose(1, 2)  # [Bw, n, n], symmetric PSD
        eye = torch.eye(n, dtype=H.dtype, device=H.device)
        ridge = H.diagonal(dim1=1, dim2=2).mean(-1) * (100 * torch.finfo(H.dtype).eps)
        H = H + (ridge + torch.finfo(H.dtype).tiny)[:, None, None] * eye
        alpha, _ = torch.linalg.solve_ex(H, H.new_ones(b, n, 1))  # no error check: no sync
        alpha = alpha.squeeze(-1)
        alpha = alpha / alpha.sum(-1, keepdim=True)
        mixed = (alpha.unsqueeze(1) @ self.G[:, :n]).squeeze(1)
        ok = torch.isfinite(mixed).all(1)
        view = (b,) + (1,) * (x.dim() - 1)
        return torch.where(ok.view(view), mixed.view_as(x), gx)

    def gather(self, sel: Tensor) -> None:
        if self.G is not None:
            self.G = self.G[sel]
            self.F = self.F[sel]


def _solve(
    g: Callable[[Tensor], Tensor],
    y: Tensor,
    x: Tensor,
    denom: Tensor,
    tol: float,
    max_iter: int,
    check_every: int,
    anderson: int,
    compact: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Iterates ``x <- y - g(x)`` per sample; returns ``(x, iterations, residual, converged)``.

    ``denom`` (batch dimension ``B``, broadcastable to ``y``) scales the step in the residual.
    """
    b = y.shape[0]
    device = y.device
    wide = _wide(y.dtype)
    view = (-1,) + (1,) * (y.dim() - 1)

    x = x.clone()
    iterations = torch.zeros(b, dtype=torch.long, device=device)
    residual = torch.full((b,), math.inf, dtype=wide, device=device)
    active = torch.ones(b, dtype=torch.bool, device=device)

    # the working set: all rows, or (after compaction) the rows ``rows`` of the full tensors
    rows: Tensor | None = None
    xw, yw, dw = x, y, denom
    itw, rw, aw = iterations, residual, active
    accel = _Anderson(anderson) if anderson >= 2 else None

    def write_back() -> None:
        if rows is not None:
            x.index_copy_(0, rows, xw)
            iterations.index_copy_(0, rows, itw)
            residual.index_copy_(0, rows, rw)
            active.index_copy_(0, rows, aw)

    done = 0
    while done < max_iter:
        for _ in range(min(check_every, max_iter - done)):
            xn = yw - g(xw)
            r = ((xn - xw).abs() / dw).reshape(xw.shape[0], -1).amax(1).to(wide)
            conv = r <= tol
            if accel is not None:
                xn = torch.where(conv.view(view), xn, accel.mix(xw, xn, dw))
            xw = torch.where(aw.view(view), xn, xw)
            rw = torch.where(aw, r, rw)
            itw = itw + aw
            aw = aw & ~conv & torch.isfinite(r)
            done += 1
        # the only host synchronisation: once per ``check_every`` iterations
        n_active = int(aw.sum())
        if n_active == 0:
            break
        if compact and n_active <= xw.shape[0] // 2 and done < max_iter:
            if rows is None:
                x, iterations, residual, active = xw, itw, rw, aw
            else:
                write_back()
            sel = aw.nonzero().squeeze(1)
            rows = sel if rows is None else rows[sel]
            xw, yw, dw = xw[sel], yw[sel], dw[sel]
            itw, rw, aw = itw[sel], rw[sel], aw[sel]
            if accel is not None:
                accel.gather(sel)
    if rows is None:
        x, iterations, residual = xw, itw, rw
    else:
        write_back()
    converged = residual <= tol
    return x, iterations, residual, converged


def _report(
    what: str, residual: Tensor, converged: Tensor, tol: float, max_iter: int, on_fail: str
) -> None:
    """Warns or raises when some sample did not converge (one host synchronisation)."""
    n_bad = int((~converged).sum())
    if n_bad == 0:
        return
    b = residual.shape[0]
    finite = torch.isfinite(residual)
    slow = ~converged & finite
    parts = [f"{what} did not converge for {n_bad} of {b} sample(s) (tol={tol:g}, max_iter={max_iter})"]
    if bool(slow.any()):
        worst = residual.masked_fill(~slow, -math.inf)
        i = int(worst.argmax())
        parts.append(f"worst residual {float(residual[i]):.3g} at sample {i}")
    nonfinite = (~finite).nonzero().squeeze(1).tolist()
    if nonfinite:
        shown = ", ".join(map(str, nonfinite[:8])) + (", ..." if len(nonfinite) > 8 else "")
        parts.append(
            f"{len(nonfinite)} sample(s) non-finite (NaN/inf input, or divergence: Lip(g) >= 1?): "
            f"samples [{shown}]"
        )
    msg = "; ".join(parts)
    if on_fail == "raise":
        raise FixedPointError(msg)
    warnings.warn(msg, FixedPointWarning, stacklevel=4)


# --------------------------------------------------------------------------------------------
# the implicit-function gradient


@dataclass(eq=False)
class _Settings:
    g: Callable[[Tensor], Tensor]
    x_init: Tensor | None
    tol: float
    max_iter: int
    check_every: int
    anderson: int
    compact: bool
    on_fail: str
    backward_tol: float
    backward_max_iter: int
    solver: Callable[[Tensor, float, int], tuple[Tensor, Tensor, Tensor]] | None = None
    result: FixedPointResult | None = None


def _forward_solve(s: _Settings, y: Tensor) -> FixedPointResult:
    with torch.no_grad():
        y0 = y.detach()
        x0 = y0 if s.x_init is None else s.x_init.detach().to(dtype=y.dtype)
        if s.solver is not None:
            x, iterations, residual = s.solver(y0, s.tol, s.max_iter)
            converged = residual <= s.tol
        else:
            denom = 1 + y0.abs()
            x, iterations, residual, converged = _solve(
                s.g, y0, x0, denom, s.tol, s.max_iter, s.check_every, s.anderson, s.compact
            )
    result = FixedPointResult(x, iterations, residual, converged, s.tol, s.max_iter)
    s.result = result
    _report("fixed_point_inverse", residual, converged, s.tol, s.max_iter, s.on_fail)
    return result


class _ImplicitInverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s: _Settings, y: Tensor, *params: Tensor) -> Tensor:
        result = _forward_solve(s, y)
        # one graph of g at the solution, for the backward's vector-Jacobian products
        with torch.enable_grad():
            xs = result.x.detach().requires_grad_()
            gout = s.g(xs)
        ctx.settings = s
        ctx.xs, ctx.gout, ctx.params = xs, gout, params
        return result.x

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_x: Tensor):
        s: _Settings = ctx.settings
        xs, gout, params = ctx.xs, ctx.gout, ctx.params

        def jt(w: Tensor) -> Tensor:  # J^T w, per sample
            (out,) = torch.autograd.grad(gout, xs, w, retain_graph=True)
            return out

        b = grad_x.shape[0]
        scale = grad_x.abs().reshape(b, -1).amax(1).clamp_min(torch.finfo(grad_x.dtype).tiny)
        denom = scale.view((-1,) + (1,) * (grad_x.dim() - 1))
        with torch.no_grad():
            w, iterations, residual, converged = _solve(
                jt, grad_x, grad_x, denom, s.backward_tol, s.backward_max_iter,
                s.check_every, s.anderson, False,
            )
        if s.result is not None:
            s.result.backward_iterations = iterations
            s.result.backward_residual = residual
            s.result.backward_converged = converged
        _report(
            "fixed_point_inverse (backward)", residual, converged, s.backward_tol,
            s.backward_max_iter, s.on_fail,
        )
        grad_y = w if ctx.needs_input_grad[1] else None
        wanted = [i for i, need in enumerate(ctx.needs_input_grad[2:]) if need]
        grads: list[Tensor | None] = [None] * len(params)
        if wanted:
            got = torch.autograd.grad(
                gout, [params[i] for i in wanted], -w, retain_graph=True, allow_unused=True
            )
            for i, gi in zip(wanted, got):
                grads[i] = gi
        return (None, grad_y, *grads)


# --------------------------------------------------------------------------------------------
# the public entry point


def fixed_point_inverse(
    g: Callable[[Tensor], Tensor],
    y: Tensor,
    *,
    tol: float = 1e-5,
    max_iter: int = 1000,
    on_fail: str = "warn",
    anderson: int = 0,
    check_every: int | None = None,
    compact: bool = True,
    params: Sequence[Tensor] | None = None,
    x_init: Tensor | None = None,
    backward_tol: float | None = None,
    backward_max_iter: int | None = None,
    solver: Callable[[Tensor, float, int], tuple[Tensor, Tensor, Tensor]] | None = None,
) -> FixedPointResult:
    """Solves ``x + g(x) = y`` for every sample of the batch ``y`` by fixed-point iteration.

    Stop test, synchronisation, compaction, Anderson mixing, failure reports and gradients:
    module docstring.

    Arguments:
        g: a callable (typically the residual branch, an ``nn.Module``) mapping ``[B, ...]`` to
            the same shape, row by row, with ``Lip(g) < 1``.
        y: ``[B, ...]`` floating point.
        tol: per-sample stop test ``max_j |x_k - x_{k-1}| / (1 + |y|) <= tol``.
        max_iter: at most this many evaluations of ``g`` per sample.
        on_fail: ``"warn"`` (:class:`FixedPointWarning`) or ``"raise"`` (:class:`FixedPointError`)
            when a sample does not converge or is not finite.
        anderson: ``0`` (plain iteration) or the memory ``m >= 2`` of per-sample Anderson mixing.
        check_every: iterations between the convergence checks on the host (default: 1 on CPU,
            8 elsewhere).
        compact: shrink the working batch to the active samples at a check when at most half
            of them are still active (requires ``g`` to treat rows independently).
        params: the tensors ``g`` depends on that should receive gradients (default:
            ``g.parameters()`` that require grad when ``g`` is an ``nn.Module``, else none).
        x_init: starting point (default ``y``, so the first iterate is ``y - g(y)``).
        backward_tol, backward_max_iter: the backward solve's settings (default: ``tol``,
            ``max_iter``).
        solver: a faster forward solve of the same iteration, ``solver(y, tol, max_iter) ->
            (x, iterations, residual)`` with this function's stop test (e.g.
            :func:`fastflow.ops.mlp_trace.mlp_fixed_point` for an MLP-structured ``g``, which
            :class:`~fastflow.nn.iResBlock` passes); only with ``x_init=None`` and
            ``anderson=0``. Failures are reported and gradients taken as without it.

    Returns:
        a :class:`FixedPointResult` (``x``, per-sample ``iterations``, ``residual``,
        ``converged``; unpacks as ``x, result``).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> lin = torch.nn.Linear(3, 3)
        >>> with torch.no_grad():
        ...     _ = lin.weight.mul_(0.5 / torch.linalg.matrix_norm(lin.weight, ord=2))
        >>> g = lambda x: torch.tanh(lin(x))
        >>> x = torch.randn(5, 3)
        >>> res = fixed_point_inverse(g, x + g(x), tol=1e-6)
        >>> bool((res.x - x).abs().max() < 1e-5), bool(res.converged.all())
        (True, True)
    """
    if not isinstance(y, Tensor):
        raise TypeError(f"y must be a Tensor, got {type(y).__name__}")
    if not y.is_floating_point():
        raise ValueError(f"y must be a floating-point tensor, got {y.dtype}")
    if y.dim() < 1 or y.shape[0] == 0:
        raise ValueError(f"y must have a non-empty batch dimension, got shape {tuple(y.shape)}")
    if not callable(g):
        raise TypeError(f"g must be callable, got {type(g).__name__}")
    tol = _check_positive_float(tol, "tol")
    max_iter = _check_int(max_iter, "max_iter", 1)
    on_fail = _check_on_fail(on_fail)
    anderson = _check_int(anderson, "anderson", 0)
    if check_every is None:
        check_every = 1 if y.device.type == "cpu" else 8
    check_every = _check_int(check_every, "check_every", 1)
    backward_tol = tol if backward_tol is None else _check_positive_float(backward_tol, "backward_tol")
    backward_max_iter = (
        max_iter if backward_max_iter is None else _check_int(backward_max_iter, "backward_max_iter", 1)
    )
    if x_init is not None and (not isinstance(x_init, Tensor) or x_init.shape != y.shape):
        raise ValueError(
            f"x_init must be a tensor of y's shape {tuple(y.shape)}, got "
            f"{tuple(x_init.shape) if isinstance(x_init, Tensor) else type(x_init).__name__}"
        )
    if params is None:
        params = tuple(p for p in g.parameters() if p.requires_grad) if isinstance(g, nn.Module) else ()
    else:
        params = tuple(params)
        for i, p in enumerate(params):
            if not isinstance(p, Tensor):
                raise TypeError(f"params[{i}] must be a Tensor, got {type(p).__name__}")

    if solver is not None:
        if not callable(solver):
            raise TypeError(f"solver must be callable, got {type(solver).__name__}")
        if x_init is not None or anderson:
            raise ValueError("solver runs the plain iteration from x = y: it takes neither x_init nor anderson")
    settings = _Settings(
        g, x_init, tol, max_iter, check_every, anderson, bool(compact), on_fail,
        backward_tol, backward_max_iter, solver,
    )
    needs_grad = torch.is_grad_enabled() and (y.requires_grad or any(p.requires_grad for p in params))
    if not needs_grad:
        return _forward_solve(settings, y)
    x = _ImplicitInverse.apply(settings, y, *params)
    result = settings.result
    result.x = x
    return result
