"""Flows whose log-det comes from a determinant identity, for vectors ``[B, D]``:
:class:`Planar`, :class:`Radial` and :class:`Sylvester` (orthogonal, Householder and
triangular variants).

All three are residual maps ``z = x + (a low-rank or radial term)`` (``forward`` is data to
latent, as everywhere in fastflow; REFERENCE.md 1.3):

* Planar (Rezende & Mohamed): ``z = x + u_hat tanh(w^T x + b)``, ``u_hat = u + (m(w^T u) -
  w^T u) w / |w|^2``, ``m(a) = -1 + softplus(a)``, so ``w^T u_hat = m(w^T u) > -1`` and the map is
  invertible for every value of the raw parameters; ``log|det dz/dx| = log(1 + tanh'(w^T x + b)
  w^T u_hat)`` (matrix determinant lemma).
* Radial (Rezende & Mohamed): ``z = x + beta_hat h(r) (x - z0)``, ``r = |x - z0|``,
  ``h = 1 / (alpha + r)``, ``alpha = softplus(alpha_raw) > 0``, ``beta_hat = -alpha +
  softplus(beta) > -alpha`` (invertible); ``log|det| = (D - 1) log(1 + beta_hat h) +
  log(1 + beta_hat alpha h^2)``.
* Sylvester (van den Berg et al.): ``z = x + Q R1 tanh(R2 Q^T x + b)``, ``Q`` a ``D x m``
  matrix with orthonormal columns, ``R1``, ``R2`` upper-triangular ``m x m`` whose diagonals go
  through ``tanh``, so ``R1_ii R2_ii`` lies in ``(-1, 1)`` and the map is invertible;
  ``log|det| = sum_i log(1 + tanh'(.)_i R1_ii R2_ii)`` (Sylvester's determinant identity).

Inverses. Radial has a closed form (the radius solves a quadratic). Planar and Sylvester have
none; their inverses are numerical, to a tolerance, and never silently wrong:

* Planar: with ``s = w^T x`` and ``c = w^T u_hat``, ``w^T z = s + c tanh(s + b)``, a scalar
  equation per sample whose left side is strictly increasing in ``s`` (``c > -1``); then
  ``x = z - u_hat tanh(s + b)``.
* Sylvester: with ``s = Q^T x`` and ``t = Q^T z``, ``Q^T Q = I`` gives
  ``s + R1 tanh(R2 s + b) = t`` (``m`` equations; the component of ``x`` outside the span of
  ``Q`` equals that of ``z``). The system is upper-triangular in structure (equation ``i``
  involves ``s_i .. s_m`` only), so it is solved by back substitution, ``i = m .. 1``, each step
  the scalar equation ``s_i + R1_ii tanh(R2_ii s_i + c_i) = t_i - d_i`` (``c_i``, ``d_i`` from the
  components already found), again strictly increasing (``R1_ii R2_ii > -1``). This is the same
  for the three variants; for ``"orthogonal"``, ``Q^T Q = I`` holds to the orthogonalisation's
  tolerance ``ortho_tol`` (as the log-det formula itself assumes), so the round trip is exact to
  about that.

Each scalar equation ``s + a tanh(r s + c) = t`` (``a r > -1``) is solved per sample, batched, by
Newton's method safeguarded by bisection on the bracket ``[t - |a|, t + |a|]`` (where the root
lies since ``|tanh| <= 1``): a Newton step that leaves the current bracket, or an iterate that did
not halve ``|g|``, is replaced by the bracket's midpoint, so convergence is guaranteed (plain
Newton is not enough: with ``w^T u_hat`` large, it cycles or runs away for many inputs).
Residual and stop test, per sample: ``|s + a tanh(r s + c) - t| / (1 + |t| + |a|) <= tol`` (the
scale bounds the terms of the sum, so that a ``tol`` well above the dtype's epsilon is
reachable; defaults ``1e-12`` for float64 and ``1e-5`` otherwise). A sample that converges (or
whose residual is not finite) is frozen; the host checks "is any sample still active?" every
iteration on CPU and every 8 on other devices. Stopping at ``tol`` would leave up to ``tol`` of
error where one more Newton step removes nearly all of it (quadratic convergence), so after the
loop every sample takes one more Newton step where it lowers the residual (two batched
evaluations once per solve, not counted in the iterations); what ``tol`` guarantees is unchanged, the
accuracy reached is usually near the dtype's rounding level. After the call the layer records
``inverse_iterations`` (``[B]`` int64: evaluations in the loop, summed over the ``m`` steps for
Sylvester), ``inverse_residual`` (``[B]``, the residual above at the returned solution, the
largest over the ``m`` steps) and ``inverse_converged`` (``[B]`` bool). A sample still above
``tol`` after ``max_iter`` iterations (or not finite) raises :class:`ConvergenceError`
(``on_fail="raise"``, default) or warns with :class:`ConvergenceWarning` (``on_fail="warn"``,
the values are then returned as they are), naming the worst sample.

Gradients through a numerical inverse (when autograd asks for them) come from the implicit
function theorem, without unrolling the iterations: after the solve, one Newton step with the
Jacobian held constant, ``s <- s* - J^{-1} F(s*)`` (``J`` the detached Jacobian of the equations,
upper-triangular for Sylvester: one batched triangular solve), gives ``ds/dtheta = -J^{-1}
dF/dtheta`` exactly, and its value is ``s*`` refined by one more Newton step. First order only.

The inverses are eager code (data-dependent loops); ``forward`` compiles with
``torch.compile(fullgraph=True)``.

References:
    Rezende, Mohamed. "Variational Inference with Normalizing Flows" (2015),
    https://arxiv.org/abs/1505.05770 (planar and radial flows; appendix A.1 for u_hat).
    van den Berg, Hasenclever, Tomczak, Welling. "Sylvester Normalizing Flows for Variational
    Inference" (2018), https://arxiv.org/abs/1803.05649.
    Bjorck, Bowie. "An iterative algorithm for computing the best estimate of an orthogonal
    matrix" (1971), SIAM J. Numer. Anal. 8(2) (the orthogonalisation iteration).
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fastflow.flow import ConvergenceError, ConvergenceWarning, Transform
from fastflow.nn.linear import (
    _cacheable,
    _check_vectors,
    _EvalCache,
    householder_matrix,
)
from fastflow._checks import ON_FAIL, int_at_least
from fastflow._checks import on_fail as _check_on_fail
from fastflow._checks import positive_int as _positive_int

__all__ = [
    "Planar",
    "Radial",
    "Sylvester",
    "ConvergenceError",
    "ConvergenceWarning",
]

VARIANTS = ("orthogonal", "householder", "triangular")


# --------------------------------------------------------------------------------------------
# argument checks


def _check_tol(tol: Any, name: str) -> float | None:
    if tol is None:
        return None
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not (
        math.isfinite(float(tol)) and float(tol) > 0
    ):
        raise ValueError(f"{name} must be a positive finite number or None, got {tol!r}")
    return float(tol)


def _default_tol(dtype: torch.dtype) -> float:
    return 1e-12 if dtype == torch.float64 else 1e-5


def _default_ortho_tol(dtype: torch.dtype) -> float:
    return 1e-12 if dtype == torch.float64 else 1e-6


def _uniform(shape: tuple[int, ...], bound: float) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape).uniform_(-bound, bound))


def _check_every(t: Tensor) -> int:
    # a host synchronisation costs nothing on CPU; elsewhere it stalls the queue
    return 1 if t.device.type == "cpu" else 8


# --------------------------------------------------------------------------------------------
# the scalar root find shared by Planar and Sylvester


def _solve_monotone(
    t: Tensor, a: Tensor, r: Tensor | float, c: Tensor | float, tol: float, max_iter: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Solves ``s + a tanh(r s + c) = t`` elementwise (``a r > -1``: increasing in ``s``).

    Safeguarded Newton (module docstring). ``t`` is ``[B]``; ``a``, ``r``, ``c`` broadcast to
    it. Returns ``(s, iterations, residual)``: the solution (after the final refinement), the
    evaluations spent per element in the loop (int64) and the normalised residual at ``s``
    (NaN/inf where not finite).
    """
    abs_a = a.abs()
    scale = 1 + t.abs() + abs_a
    lo, hi = t - abs_a, t + abs_a  # g(lo) <= 0 <= g(hi)
    s = t - a * torch.tanh(r * t + c)  # one fixed-point step: inside the bracket
    active = torch.ones_like(t, dtype=torch.bool)
    iterations = torch.zeros_like(t, dtype=torch.int64)
    prev = torch.full_like(t, math.inf)
    every = _check_every(t)
    for k in range(max_iter):
        th = torch.tanh(r * s + c)
        g = s + a * th - t
        res = g.abs() / scale
        iterations = torch.where(active, k + 1, iterations)
        active = active & ~(res <= tol) & torch.isfinite(res)
        if k == max_iter - 1 or ((k + 1) % every == 0 and not bool(active.any())):
            break
        hi = torch.where(g > 0, s, hi)
        lo = torch.where(g < 0, s, lo)
        newton = s - g / (1 + a * r * (1 - th * th))
        bisect = ~((newton > lo) & (newton < hi)) | (g.abs() > 0.5 * prev)
        s = torch.where(active, torch.where(bisect, 0.5 * (lo + hi), newton), s)
        prev = g.abs()
    # Refinement: stopping at tol leaves up to tol of error that one more Newton step (quadratic
    # convergence) removes; take it wherever it lowers the residual, which is then measured.
    th = torch.tanh(r * s + c)
    g = s + a * th - t
    polished = s - g / (1 + a * r * (1 - th * th))
    g_polished = polished + a * torch.tanh(r * polished + c) - t
    better = g_polished.abs() < g.abs()
    s = torch.where(better, polished, s)
    residual = torch.where(better, g_polished.abs(), g.abs()) / scale
    return s, iterations, residual


class _NumericalInverse(Transform):
    """Shared bookkeeping of the layers with a numerical inverse."""

    def _init_solver(self, tol: Any, max_iter: Any, on_fail: Any) -> None:
        self.tol = _check_tol(tol, "tol")
        self.max_iter = int_at_least(max_iter, "max_iter", 1)
        self.on_fail = _check_on_fail(on_fail)
        self.inverse_iterations: Tensor | None = None
        self.inverse_residual: Tensor | None = None
        self.inverse_converged: Tensor | None = None

    def _solver_settings(self, tol: Any, max_iter: Any, dtype: torch.dtype) -> tuple[float, int]:
        tol = _check_tol(tol, "tol")
        if tol is None:
            tol = self.tol if self.tol is not None else _default_tol(dtype)
        max_iter = self.max_iter if max_iter is None else int_at_least(max_iter, "max_iter", 1)
        return tol, max_iter

    def _fail(self, message: str) -> None:
        if self.on_fail == "raise":
            raise ConvergenceError(message)
        warnings.warn(message, ConvergenceWarning, stacklevel=4)

    def _record(self, iterations: Tensor, residual: Tensor, tol: float, max_iter: int) -> None:
        converged = residual <= tol
        self.inverse_iterations = iterations
        self.inverse_residual = residual
        self.inverse_converged = converged
        if bool(converged.all()):
            return
        bad = ~converged
        worst = torch.where(bad, residual.nan_to_num(math.inf), -1.0).argmax()
        n_nan = int(residual.isnan().sum())
        nan_note = f" ({n_nan} with a NaN residual: non-finite values in z?)" if n_nan else ""
        self._fail(
            f"{type(self).__name__}.inverse did not converge for {int(bad.sum())} of "
            f"{residual.numel()} samples of z within max_iter={max_iter} (tol={tol:g}){nan_note}: "
            f"worst residual {float(residual[worst]):.3g} at sample {int(worst)}. Raise max_iter "
            "or tol, or check the input for non-finite values."
        )


def _grad_wanted(module: nn.Module, z: Tensor) -> bool:
    return torch.is_grad_enabled() and (
        z.requires_grad or any(p.requires_grad for p in module.parameters())
    )


# --------------------------------------------------------------------------------------------
# the layers


class Planar(_NumericalInverse):
    """Planar flow ``z = x + u_hat tanh(w^T x + b)`` on vectors ``[B, D]`` (module docstring).

    ``u_hat = u + (m(w^T u) - w^T u) w / |w|^2``, ``m(a) = -1 + softplus(a)``: invertible for
    every value of the parameters; ``log|det dz/dx| = log(1 + tanh'(w^T x + b) m(w^T u))``.
    The inverse is numerical: one scalar root find per sample along ``w`` (module docstring).

    Arguments:
        features: ``D``.
        tol: default tolerance of :meth:`inverse` (None: ``1e-12`` in float64, ``1e-5``
            otherwise).
        max_iter: default iteration cap of :meth:`inverse`.
        on_fail: ``"raise"`` (:class:`ConvergenceError`) or ``"warn"``
            (:class:`ConvergenceWarning`) when the inverse does not converge.

    Attributes: ``u``, ``w`` (``[D]``), ``b`` (scalar) parameters, uniform in
    ``[-1/sqrt(D), 1/sqrt(D)]`` at construction; after :meth:`inverse`, ``inverse_iterations``,
    ``inverse_residual``, ``inverse_converged`` (``[B]`` each).

    Example:
        >>> layer = Planar(3)
        >>> x = torch.randn(8, 3)
        >>> z, logdet = layer(x)
        >>> x2, logdet_inv = layer.inverse(z)
        >>> torch.allclose(x, x2, atol=1e-5), torch.allclose(logdet, -logdet_inv, atol=1e-5)
        (True, True)
        >>> bool(layer.inverse_converged.all())
        True
    """

    def __init__(
        self, features: int, tol: float | None = None, max_iter: int = 100, on_fail: str = "raise"
    ):
        super().__init__()
        D = _positive_int(features, "features")
        self.features = D
        bound = 1 / math.sqrt(D)
        self.u = _uniform((D,), bound)
        self.w = _uniform((D,), bound)
        self.b = _uniform((), bound)
        self._init_solver(tol, max_iter, on_fail)

    def extra_repr(self) -> str:
        return f"{self.features}"

    def u_hat(self) -> tuple[Tensor, Tensor]:
        """``(u_hat, w^T u_hat)``; the second is ``m(w^T u) > -1`` (0 if ``w`` is zero)."""
        w, u = self.w, self.u
        wu = w @ u
        w2 = w @ w
        w2c = w2.clamp_min(torch.finfo(w.dtype).tiny)
        m = F.softplus(wu) - 1
        return u + ((m - wu) / w2c) * w, m * (w2 / w2c)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        _check_vectors(x, self.features, self.w.dtype, "x")
        u_hat, c = self.u_hat()
        th = torch.tanh(x @ self.w + self.b)
        return x + th[:, None] * u_hat, torch.log1p((1 - th * th) * c)

    def inverse(
        self,
        z: Tensor,
        context: Tensor | None = None,
        *,
        tol: float | None = None,
        max_iter: int | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Numerical inverse to ``tol`` within ``max_iter`` iterations (defaults: the layer's)."""
        _check_vectors(z, self.features, self.w.dtype, "z")
        tol, max_iter = self._solver_settings(tol, max_iter, z.dtype)
        u_hat, c = self.u_hat()
        t = z @ self.w
        with torch.no_grad():
            s, iterations, residual = _solve_monotone(t, c, 1.0, self.b, tol, max_iter)
        self._record(iterations, residual, tol, max_iter)
        if _grad_wanted(self, z):  # one Newton step with a constant derivative (implicit grad)
            th = torch.tanh(s + self.b)
            s = s - (s + c * th - t) / (1 + c * (1 - th * th)).detach()
        th = torch.tanh(s + self.b)
        return z - th[:, None] * u_hat, -torch.log1p((1 - th * th) * c)


class Radial(Transform):
    """Radial flow ``z = x + beta_hat h(r) (x - z0)`` on vectors ``[B, D]`` (module docstring).

    ``r = |x - z0|``, ``h = 1 / (alpha + r)``, ``alpha = softplus(alpha_raw)``,
    ``beta_hat = -alpha + softplus(beta)``: invertible for every value of the parameters.
    ``log|det dz/dx| = (D - 1) log(1 + beta_hat h) + log(1 + beta_hat alpha h^2)``.

    Inverse in closed form: ``|z - z0| = r (alpha + beta_hat + r) / (alpha + r)`` is a quadratic
    in ``r`` with one non-negative root, taken in the cancellation-free form; then
    ``x = z0 + (z - z0) (alpha + r) / (alpha + beta_hat + r)``.

    Arguments:
        features: ``D``.

    Attributes: ``z0`` (``[D]``), ``alpha_raw``, ``beta`` (scalars), uniform in
    ``[-1/sqrt(D), 1/sqrt(D)]`` at construction.

    Example:
        >>> layer = Radial(3)
        >>> x = torch.randn(8, 3)
        >>> z, logdet = layer(x)
        >>> x2, logdet_inv = layer.inverse(z)
        >>> torch.allclose(x, x2, atol=1e-5), torch.allclose(logdet, -logdet_inv, atol=1e-5)
        (True, True)
    """

    def __init__(self, features: int):
        super().__init__()
        D = _positive_int(features, "features")
        self.features = D
        bound = 1 / math.sqrt(D)
        self.z0 = _uniform((D,), bound)
        self.alpha_raw = _uniform((), bound)
        self.beta = _uniform((), bound)

    def extra_repr(self) -> str:
        return f"{self.features}"

    def alpha_beta(self) -> tuple[Tensor, Tensor]:
        """``(alpha, beta_hat)`` with ``alpha > 0`` and ``beta_hat > -alpha``."""
        alpha = F.softplus(self.alpha_raw)
        return alpha, F.softplus(self.beta) - alpha

    def _logdet(self, r: Tensor, alpha: Tensor, beta: Tensor) -> Tensor:
        h = 1 / (alpha + r)
        return (self.features - 1) * torch.log1p(beta * h) + torch.log1p(beta * alpha * h * h)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        _check_vectors(x, self.features, self.z0.dtype, "x")
        alpha, beta = self.alpha_beta()
        d = x - self.z0
        r = torch.linalg.vector_norm(d, dim=1)
        return x + (beta / (alpha + r))[:, None] * d, self._logdet(r, alpha, beta)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        _check_vectors(z, self.features, self.z0.dtype, "z")
        alpha, beta = self.alpha_beta()
        d = z - self.z0
        rz = torch.linalg.vector_norm(d, dim=1)
        # r^2 + p r - alpha rz = 0, p = alpha + beta - rz: the root >= 0, without cancellation
        p = alpha + beta - rz
        disc = torch.sqrt(p * p + 4 * alpha * rz)
        positive = p > 0
        r = torch.where(
            positive, 2 * alpha * rz / torch.where(positive, p + disc, 1.0), 0.5 * (disc - p)
        )
        tiny = torch.finfo(z.dtype).tiny
        factor = (alpha + r) / (alpha + beta + r).clamp_min(tiny)
        return self.z0 + factor[:, None] * d, -self._logdet(r, alpha, beta)


class Sylvester(_NumericalInverse):
    """Sylvester flow ``z = x + Q R1 tanh(R2 Q^T x + b)`` on vectors ``[B, D]`` (module
    docstring).

    ``R1 = strict_upper(r1) + diag(tanh(diag1))``, ``R2 = strict_upper(r2) + diag(tanh(diag2))``
    (``m x m``), so ``R1_ii R2_ii`` is in ``(-1, 1)`` and the map is invertible;
    ``log|det dz/dx| = sum_i log(1 + tanh'(R2 Q^T x + b)_i R1_ii R2_ii)``.

    Variants (how ``Q``, ``D x m`` with orthonormal columns, is made):

    * ``"orthogonal"``: from a free ``[D, m]`` parameter ``q`` (``1 <= m <= D``) by the
      iteration ``Q <- Q (I + (I - Q^T Q) / 2)`` (Bjorck; REFERENCE.md 1.3), up to
      ``ortho_max_iter`` iterations until ``max|Q^T Q - I| <= ortho_tol`` (default ``1e-12`` in
      float64, ``1e-6`` otherwise), not reaching it raises (or warns, per ``on_fail``)
      :class:`ConvergenceError`. ``q`` is first scaled by ``sqrt(|q^T q|_1)`` (an upper bound of
      its largest singular value, exact when ``q`` is orthonormal, where vae_lib uses the looser
      Frobenius norm), which makes the iteration converge. Under ``torch.compile`` all
      ``ortho_max_iter`` iterations run (no convergence test in the graph); the iterations
      after convergence leave ``Q`` where it is. After an eager call ``ortho_iterations`` and
      ``ortho_residual`` say what it took.
    * ``"householder"``: ``Q`` a product of ``n_reflections`` (default ``D``) Householder
      reflections (:func:`fastflow.nn.linear.householder_matrix`); ``m = D``.
    * ``"triangular"``: ``Q`` the identity, or with ``flip=True`` the reversal permutation
      (alternate them from layer to layer); ``m = D``.

    Inverse: numerical for all three variants, by back substitution through ``m`` safeguarded
    scalar root finds (module docstring), exact to ``tol`` for ``"householder"`` and
    ``"triangular"`` and to about ``ortho_tol`` for ``"orthogonal"``. Its cost is ``m``
    sequential batched scalar solves (a few Newton steps each).

    In eval mode ``Q`` is cached until a parameter changes (as in :mod:`fastflow.nn.linear`).

    Arguments:
        features: ``D``.
        m: ``m`` (``"orthogonal"`` only; default ``D``).
        variant: ``"orthogonal"``, ``"householder"`` or ``"triangular"``.
        n_reflections: reflections of the ``"householder"`` variant (default ``D``).
        flip: ``"triangular"`` only: ``Q`` is the reversal permutation.
        tol, max_iter, on_fail: of the numerical inverse, as in :class:`Planar`; ``on_fail``
            also applies to the orthogonalisation.
        ortho_tol, ortho_max_iter: of the orthogonalisation (``"orthogonal"`` only).

    Attributes: ``r1``, ``r2`` (``[m, m]``; only the strict upper triangles are used),
    ``diag1``, ``diag2``, ``b`` (``[m]``), uniform in ``[-1/sqrt(m), 1/sqrt(m)]`` at
    construction; ``q`` (``[D, m]``, orthonormal columns at construction) for
    ``"orthogonal"``, ``vectors`` (``[n_reflections, D]``, standard normal) for
    ``"householder"``, buffers ``perm`` and ``inverse_perm`` for ``"triangular"``.

    Example:
        >>> layer = Sylvester(4, m=2)
        >>> x = torch.randn(8, 4)
        >>> z, logdet = layer(x)
        >>> x2, logdet_inv = layer.inverse(z)
        >>> torch.allclose(x, x2, atol=1e-5), torch.allclose(logdet, -logdet_inv, atol=1e-5)
        (True, True)
    """

    def __init__(
        self,
        features: int,
        m: int | None = None,
        variant: str = "orthogonal",
        n_reflections: int | None = None,
        flip: bool = False,
        tol: float | None = None,
        max_iter: int = 100,
        on_fail: str = "raise",
        ortho_tol: float | None = None,
        ortho_max_iter: int = 100,
    ):
        super().__init__()
        D = _positive_int(features, "features")
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if m is None:
            m = D
        else:
            m = _positive_int(m, "m")
            if variant == "orthogonal" and m > D:
                raise ValueError(f"m must be at most features = {D}, got {m}")
            if variant != "orthogonal" and m != D:
                raise ValueError(f"m must equal features = {D} for variant {variant!r}, got {m}")
        if n_reflections is not None:
            if variant != "householder":
                raise ValueError(
                    f"n_reflections applies only to variant 'householder', got variant {variant!r}"
                )
            n_reflections = _positive_int(n_reflections, "n_reflections")
        if not isinstance(flip, bool):
            raise ValueError(f"flip must be a bool, got {flip!r}")
        if flip and variant != "triangular":
            raise ValueError(f"flip applies only to variant 'triangular', got variant {variant!r}")
        self.features, self.m, self.variant, self.flip = D, m, variant, flip
        self.ortho_tol = _check_tol(ortho_tol, "ortho_tol")
        self.ortho_max_iter = int_at_least(ortho_max_iter, "ortho_max_iter", 1)
        self._init_solver(tol, max_iter, on_fail)
        self.ortho_iterations: int | None = None
        self.ortho_residual: float | None = None

        if variant == "orthogonal":
            q0 = torch.linalg.qr(torch.randn(D, m, dtype=torch.float64))[0]
            self.q = nn.Parameter(q0.to(torch.get_default_dtype()))
        elif variant == "householder":
            self.n_reflections = D if n_reflections is None else n_reflections
            self.vectors = nn.Parameter(torch.randn(self.n_reflections, D))
        else:
            perm = torch.arange(D - 1, -1, -1) if flip else torch.arange(D)
            self.register_buffer("perm", perm)
            self.register_buffer("inverse_perm", torch.argsort(perm))
        bound = 1 / math.sqrt(m)
        self.r1 = _uniform((m, m), bound)
        self.r2 = _uniform((m, m), bound)
        self.diag1 = _uniform((m,), bound)
        self.diag2 = _uniform((m,), bound)
        self.b = _uniform((m,), bound)
        self._cache = _EvalCache()

    def extra_repr(self) -> str:
        extra = f", flip={self.flip}" if self.variant == "triangular" else ""
        return f"{self.features}, m={self.m}, variant={self.variant!r}{extra}"

    # -- Q ---------------------------------------------------------------------------------

    def orthogonal_matrix(self) -> Tensor:
        """``Q`` (``[D, m]``), differentiable w.r.t. its parameters (the permutation matrix for
        ``"triangular"``)."""
        if self.variant == "orthogonal":
            return self._orthogonalize()
        if self.variant == "householder":
            return householder_matrix(self.vectors)
        eye = torch.eye(self.features, dtype=self.b.dtype, device=self.b.device)
        return eye[:, self.perm]

    def _orthogonalize(self) -> Tensor:
        a = self.q
        eye = torch.eye(self.m, dtype=a.dtype, device=a.device)
        tiny = torch.finfo(a.dtype).tiny
        # |a|_2^2 = |a^T a|_2 <= |a^T a|_1: the scaled q has singular values in (0, 1]
        q = a / (a.mT @ a).abs().sum(0).max().clamp_min(tiny).sqrt()
        if torch.compiler.is_compiling():
            for _ in range(self.ortho_max_iter):
                q = q @ (1.5 * eye - 0.5 * (q.mT @ q))
            return q
        tol = self.ortho_tol if self.ortho_tol is not None else _default_ortho_tol(a.dtype)
        every = _check_every(a)
        for k in range(self.ortho_max_iter + 1):
            qtq = q.mT @ q
            if k % every == 0 or k == self.ortho_max_iter:
                err = float((qtq.detach() - eye).abs().max())
                if err <= tol:
                    break
                if k == self.ortho_max_iter:
                    self._fail(
                        f"Sylvester's orthogonalisation of q did not reach ortho_tol={tol:g} in "
                        f"ortho_max_iter={self.ortho_max_iter} iterations (max|Q^T Q - I| = "
                        f"{err:.3g}); q is (nearly) rank-deficient, or raise ortho_max_iter"
                    )
                    break
            q = q @ (1.5 * eye - 0.5 * qtq)
        self.ortho_iterations, self.ortho_residual = k, err
        return q

    def _q(self) -> Tensor | None:
        if self.variant == "triangular":
            return None
        if _cacheable(self):
            return self._cache.get(self, self.orthogonal_matrix)
        return self.orthogonal_matrix()

    def _project(self, x: Tensor, q: Tensor | None) -> Tensor:  # Q^T x
        return x.index_select(1, self.perm) if q is None else x @ q

    def _lift(self, v: Tensor, q: Tensor | None) -> Tensor:  # Q v
        return v.index_select(1, self.inverse_perm) if q is None else v @ q.mT

    def triangular_factors(self) -> tuple[Tensor, Tensor]:
        """``(R1, R2)``, upper-triangular ``[m, m]`` with ``|R_ii| < 1``, differentiable."""
        r1 = self.r1.triu(1) + torch.diag(torch.tanh(self.diag1))
        r2 = self.r2.triu(1) + torch.diag(torch.tanh(self.diag2))
        return r1, r2

    # -- the map ---------------------------------------------------------------------------

    def _branch(self, s: Tensor, r1: Tensor, r2: Tensor) -> tuple[Tensor, Tensor]:
        # (R1 h(R2 s + b), log-det) in row form
        h = torch.tanh(s @ r2.mT + self.b)
        d12 = r1.diagonal() * r2.diagonal()
        return h @ r1.mT, torch.log1p((1 - h * h) * d12).sum(1)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        _check_vectors(x, self.features, self.b.dtype, "x")
        q = self._q()
        r1, r2 = self.triangular_factors()
        v, logdet = self._branch(self._project(x, q), r1, r2)
        return x + self._lift(v, q), logdet

    def inverse(
        self,
        z: Tensor,
        context: Tensor | None = None,
        *,
        tol: float | None = None,
        max_iter: int | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Numerical inverse to ``tol`` within ``max_iter`` iterations per scalar solve
        (defaults: the layer's)."""
        _check_vectors(z, self.features, self.b.dtype, "z")
        tol, max_iter = self._solver_settings(tol, max_iter, z.dtype)
        q = self._q()
        r1, r2 = self.triangular_factors()
        t = self._project(z, q)
        with torch.no_grad():
            s, iterations, residual = self._back_substitute(t, r1, r2, tol, max_iter)
        self._record(iterations, residual, tol, max_iter)
        if _grad_wanted(self, z):  # one Newton step with a constant Jacobian (implicit grad)
            with torch.no_grad():
                hp = 1 - torch.tanh(s @ r2.mT + self.b) ** 2
                jac = torch.eye(self.m, dtype=s.dtype, device=s.device) + (r1 * hp[:, None, :]) @ r2
            v, _ = self._branch(s, r1, r2)
            step = torch.linalg.solve_triangular(jac, (s + v - t)[..., None], upper=True)
            s = s - step[..., 0]
        v, logdet = self._branch(s, r1, r2)
        return z - self._lift(v, q), -logdet

    def _back_substitute(
        self, t: Tensor, r1: Tensor, r2: Tensor, tol: float, max_iter: int
    ) -> tuple[Tensor, Tensor, Tensor]:
        # equation i: s_i + R1_ii tanh(R2_ii s_i + c_i) = t_i - d_i, i = m-1 .. 0
        s = torch.empty_like(t)
        h = torch.empty_like(t)
        iterations = torch.zeros(t.shape[0], dtype=torch.int64, device=t.device)
        residual = torch.zeros(t.shape[0], dtype=t.dtype, device=t.device)
        for i in range(self.m - 1, -1, -1):
            c = self.b[i] + s[:, i + 1 :] @ r2[i, i + 1 :]
            d = h[:, i + 1 :] @ r1[i, i + 1 :]
            si, it, res = _solve_monotone(t[:, i] - d, r1[i, i], r2[i, i], c, tol, max_iter)
            s[:, i] = si
            h[:, i] = torch.tanh(r2[i, i] * si + c)
            iterations += it
            residual = torch.maximum(residual, res)
        return s, iterations, residual
