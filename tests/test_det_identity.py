"""Tests of the det-identity flows: Planar, Radial and Sylvester (orthogonal, Householder and
triangular variants), their numerical inverses and 2-D densities."""

from __future__ import annotations

import io
import math
import warnings

import pytest
import torch

import fastflow
from fastflow.nn.det_identity import (
    ConvergenceError,
    ConvergenceWarning,
    Planar,
    Radial,
    Sylvester,
)

pytestmark = pytest.mark.usefixtures("one_thread")

D = 4
MAKERS = {
    "planar": lambda: Planar(D),
    "radial": lambda: Radial(D),
    "sylvester-orthogonal": lambda: Sylvester(D),
    "sylvester-orthogonal-m2": lambda: Sylvester(D, m=2),
    "sylvester-householder": lambda: Sylvester(D, variant="householder"),
    "sylvester-householder-k2": lambda: Sylvester(D, variant="householder", n_reflections=2),
    "sylvester-triangular": lambda: Sylvester(D, variant="triangular"),
    "sylvester-triangular-flip": lambda: Sylvester(D, variant="triangular", flip=True),
}
NUMERICAL = [n for n in MAKERS if n != "radial"]


def _randomise(layer: torch.nn.Module, std: float = 1.0) -> torch.nn.Module:
    # raw parameters well away from their small initial values
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, std)
    return layer


def _make(name: str, dtype: torch.dtype = torch.float64, seed: int = 0, std: float = 1.0):
    torch.manual_seed(seed)
    return _randomise(MAKERS[name](), std).to(dtype)


def _per_sample_jacobian(f, x: torch.Tensor) -> torch.Tensor:
    # rows are independent: the Jacobian of the batch sum is [D, B, D]
    J = torch.autograd.functional.jacobian(lambda v: f(v).sum(0), x, vectorize=True)
    return J.permute(1, 0, 2)


@pytest.mark.parametrize("name", MAKERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_round_trip_and_logdet_matches_jacobian(name, dtype):
    layer = _make(name, dtype)
    x = torch.randn(6, D, dtype=dtype) * 1.5
    z, logdet = layer(x)
    x2, logdet_inv = layer.inverse(z)
    # float64: the solver's default tol is 1e-12; float32: 1e-5 (ill-conditioned draws lose more)
    tol = 1e-9 if dtype == torch.float64 else 5e-5
    torch.testing.assert_close(x2, x, rtol=tol, atol=tol)
    torch.testing.assert_close(logdet_inv, -logdet, rtol=tol, atol=tol)
    if dtype == torch.float64:
        J = _per_sample_jacobian(lambda v: layer(v)[0], x)
        sign, logabs = torch.linalg.slogdet(J)
        assert (sign > 0).all()
        torch.testing.assert_close(logdet, logabs, rtol=1e-10, atol=1e-10)
    if name != "radial":
        assert layer.inverse_converged.all() and layer.inverse_iterations.shape == (6,)
        assert (layer.inverse_residual <= (1e-12 if dtype == torch.float64 else 1e-5)).all()


@pytest.mark.parametrize("name", MAKERS)
def test_invertible_for_random_raw_parameters(name):
    # the reparametrisations (u_hat, beta_hat, tanh diagonals) keep det J > 0 for any raw values
    torch.manual_seed(1)
    layer = MAKERS[name]().double()
    for draw in range(25):
        _randomise(layer, std=3.0 if draw % 2 else 1.0)
        x = torch.randn(16, D, dtype=torch.float64) * 2
        J = _per_sample_jacobian(lambda v: layer(v)[0], x)
        sign, logabs = torch.linalg.slogdet(J)
        assert (sign > 0).all(), draw
        z, logdet = layer(x)
        assert torch.isfinite(logdet).all()
        torch.testing.assert_close(logdet, logabs, rtol=1e-8, atol=1e-8)
    if isinstance(layer, Planar):
        # the worst case of the bound: w^T u very negative, so w^T u_hat -> -1
        with torch.no_grad():
            layer.w.copy_(torch.tensor([1.0, 0, 0, 0]))
            layer.u.copy_(torch.tensor([-30.0, 0, 0, 0]))
        assert layer.u_hat()[1].item() > -1
    if isinstance(layer, Sylvester):
        r1, r2 = layer.triangular_factors()
        assert ((r1.diagonal() * r2.diagonal()).abs() < 1).all()


@pytest.mark.parametrize("name", MAKERS)
def test_state_dict_round_trip(name):
    layer = _make(name, torch.float32, seed=2)
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    torch.manual_seed(99)
    other = MAKERS[name]()
    other.load_state_dict(torch.load(buf))
    x = torch.randn(5, D)
    for a, b in zip(layer(x), other(x)):
        torch.testing.assert_close(a, b)
    for a, b in zip(layer.inverse(x), other.inverse(x)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "name", ["planar", "radial", "sylvester-orthogonal-m2", "sylvester-householder",
             "sylvester-triangular-flip"]
)
def test_compile_fullgraph_forward_matches_eager(name):
    layer = _make(name, torch.float32, seed=3)
    if name == "sylvester-orthogonal-m2":
        # all ortho_max_iter iterations run under compile: start q near orthonormal, where a
        # few iterations reach float32's precision, and keep the trace short
        with torch.no_grad():
            layer.q.copy_(torch.linalg.qr(layer.q)[0] + 0.01 * torch.randn_like(layer.q))
        layer.ortho_max_iter = 8
    x = torch.randn(5, D)
    z, ld = torch.compile(layer, fullgraph=True, backend="aot_eager")(x)
    z_ref, ld_ref = layer(x)
    torch.testing.assert_close(z, z_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ld, ld_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", MAKERS)
def test_gradients_reach_every_parameter(name):
    layer = _make(name, torch.float32, seed=4, std=0.5)
    x = torch.randn(8, D)
    z, logdet = layer(x)
    (z.pow(2).sum() + logdet.sum()).backward()
    for pname, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, pname


class _Method(torch.nn.Module):
    # calls layer.<method>, so that torch.func.functional_call can substitute the parameters
    def __init__(self, layer, method):
        super().__init__()
        self.layer, self.method = layer, method

    def forward(self, x):
        return getattr(self.layer, self.method)(x)


@pytest.mark.parametrize("name", ["planar", "radial", "sylvester-orthogonal-m2",
                                  "sylvester-householder-k2"])
def test_gradients_through_the_inverse_are_exact(name):
    # the implicit-function gradient of the numerical inverse against finite differences
    layer = _make(name, seed=5, std=0.7)
    wrapped = _Method(layer, "inverse")
    names = ["layer." + n for n, _ in layer.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in layer.parameters())
    z = torch.randn(3, D, dtype=torch.float64, requires_grad=True)

    def f(z, *ps):
        return torch.func.functional_call(wrapped, dict(zip(names, ps)), (z,))

    assert torch.autograd.gradcheck(f, (z, *params), atol=1e-6)


@pytest.mark.parametrize("name", ["planar", "sylvester-householder"])
def test_non_convergence_is_reported(name):
    layer = _make(name, seed=6)
    z = torch.randn(5, D, dtype=torch.float64) * 3
    with pytest.raises(ConvergenceError, match="did not converge.*max_iter=1"):
        layer.inverse(z, max_iter=1)
    assert not layer.inverse_converged.all()
    assert (layer.inverse_residual[~layer.inverse_converged] > 1e-12).all()
    warn = MAKERS[name]().double()
    warn.load_state_dict(layer.state_dict())
    warn.on_fail = "warn"
    with pytest.warns(ConvergenceWarning, match="did not converge"):
        warn.inverse(z, max_iter=1)
    # a NaN stays in its sample and is reported
    z[2] = float("nan")
    with pytest.raises(ConvergenceError, match="sample 2"):
        layer.inverse(z)
    assert layer.inverse_converged.tolist() == [True, True, False, True, True]
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        x, _ = warn.inverse(z)
    assert torch.isfinite(x[[0, 1, 3, 4]]).all()
    torch.testing.assert_close(warn(x[[0, 1, 3, 4]])[0], z[[0, 1, 3, 4]])


@pytest.mark.parametrize("u0, b, atol", [(40.0, 6.9, 1e-9), (-8.0, 0.0, 1e-5)])
def test_planar_solver_converges_where_newton_alone_would_not(u0, b, atol):
    # w^T u_hat = m(40) ~ 39: the scalar equation is steep near w^T x = -b and flat away from
    # it, and plain Newton steps cycle or run away for many inputs (about half of random
    # (c, b, t) draws with c up to 200 fail in 100 steps); m(-8) ~ -0.9997: nearly flat at its
    # root (det ~ 3e-4, hence the looser atol). The bisection safeguard must reach tol in both.
    layer = Planar(2).double()
    with torch.no_grad():
        layer.w.copy_(torch.tensor([1.0, 0.0]))
        layer.u.copy_(torch.tensor([u0, 0.0]))
        layer.b.fill_(b)
    x = torch.linspace(-12, 12, 97, dtype=torch.float64)[:, None] * torch.tensor([1.0, 0.5])
    z, _ = layer(x)
    x2, _ = layer.inverse(z, tol=1e-14)
    torch.testing.assert_close(x2, x, rtol=atol, atol=atol)
    assert layer.inverse_iterations.max() < 100


def test_sylvester_q_and_orthogonalisation():
    torch.manual_seed(7)
    layer = Sylvester(6, m=3).double()
    with torch.no_grad():
        layer.q.normal_()  # far from orthonormal: the iteration has work to do
    Q = layer.orthogonal_matrix().detach()
    assert (Q.T @ Q - torch.eye(3, dtype=torch.float64)).abs().max() <= 1e-12
    assert 1 < layer.ortho_iterations < 100 and layer.ortho_residual <= 1e-12
    # Q is the orthonormal polar factor of q: same column space
    proj = Q @ Q.T
    torch.testing.assert_close(proj @ layer.q.detach(), layer.q.detach())
    with torch.no_grad():
        layer.q[:, 1] = 0  # rank-deficient: cannot be orthonormalised
    with pytest.raises(ConvergenceError, match="orthogonalisation"):
        layer(torch.randn(2, 6, dtype=torch.float64))
    tri = Sylvester(3, variant="triangular", flip=True)
    assert torch.equal(tri.orthogonal_matrix(), torch.eye(3).flip(1))


def test_sylvester_eval_cache():
    layer = _make("sylvester-orthogonal-m2", torch.float32, seed=8)
    x = torch.randn(4, D)
    z_train, _ = layer(x)
    layer.eval()
    with torch.no_grad():
        z_eval, _ = layer(x)
        x_eval, _ = layer.inverse(z_eval)
        layer.q.add_(0.2)
        z_new, _ = layer(x)
    torch.testing.assert_close(z_eval, z_train)
    torch.testing.assert_close(x_eval, x, rtol=1e-4, atol=1e-4)
    layer.train()
    torch.testing.assert_close(z_new, layer(x)[0])


@pytest.mark.parametrize(
    "stack",
    [
        lambda: [Planar(2) for _ in range(4)],
        lambda: [Radial(2) for _ in range(3)],
        lambda: [Sylvester(2), Sylvester(2, variant="householder"),
                 Sylvester(2, variant="triangular"), Sylvester(2, variant="triangular", flip=True)],
    ],
    ids=["planar", "radial", "sylvester"],
)
def test_2d_density_integrates_to_one(stack):
    torch.manual_seed(9)
    layers = stack()
    for layer in layers:
        _randomise(layer, 0.8)
    flow = fastflow.Flow(layers, event_shape=2).double()
    n, lim = 401, 8.0
    g = torch.linspace(-lim, lim, n, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    with torch.no_grad():
        mass = flow.log_prob(grid).exp().sum().item() * (g[1] - g[0]).item() ** 2
    assert abs(mass - 1) < 2e-3, mass
    x, log_prob = flow.sample_and_log_prob(16)
    torch.testing.assert_close(flow.log_prob(x), log_prob, rtol=1e-8, atol=1e-8)


def test_bad_arguments_name_the_argument():
    for cls in (Planar, Radial, Sylvester):
        with pytest.raises(ValueError, match="features"):
            cls(0)
        layer = cls(3)
        with pytest.raises(ValueError, match=r"x must have shape \[B, 3\]"):
            layer(torch.randn(2, 4))
        with pytest.raises(ValueError, match=r"z must have shape \[B, 3\]"):
            layer.inverse(torch.randn(2, 3, 1))
        with pytest.raises(ValueError, match="x must have the layer's dtype"):
            layer(torch.randn(2, 3, dtype=torch.float64))
    for cls in (Planar, Sylvester):
        with pytest.raises(ValueError, match="tol"):
            cls(3, tol=-1.0)
        with pytest.raises(ValueError, match="max_iter"):
            cls(3, max_iter=0)
        with pytest.raises(ValueError, match="on_fail"):
            cls(3, on_fail="ignore")
        with pytest.raises(ValueError, match="tol"):
            cls(3).inverse(torch.randn(2, 3), tol=math.nan)
        with pytest.raises(ValueError, match="max_iter"):
            cls(3).inverse(torch.randn(2, 3), max_iter=1.5)
    with pytest.raises(ValueError, match="variant"):
        Sylvester(3, variant="diagonal")
    with pytest.raises(ValueError, match="m must be at most"):
        Sylvester(3, m=4)
    with pytest.raises(ValueError, match="m must equal"):
        Sylvester(3, m=2, variant="householder")
    with pytest.raises(ValueError, match="n_reflections"):
        Sylvester(3, variant="householder", n_reflections=0)
    with pytest.raises(ValueError, match="n_reflections"):
        Sylvester(3, n_reflections=2)
    with pytest.raises(ValueError, match="flip"):
        Sylvester(3, flip=True)
    with pytest.raises(ValueError, match="ortho_tol"):
        Sylvester(3, ortho_tol=0)
    with pytest.raises(ValueError, match="ortho_max_iter"):
        Sylvester(3, ortho_max_iter=0)


@pytest.mark.parametrize("variant", [None, "orthogonal", "householder", "triangular"])
def test_models_sample_and_log_prob_agree(variant):
    from fastflow.models import PlanarFlow, SylvesterFlow

    torch.manual_seed(0)
    if variant is None:
        flow = PlanarFlow(3, n_transforms=3).double()
    else:
        flow = SylvesterFlow(3, n_transforms=2, variant=variant).double()
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x, lp = flow.sample_and_log_prob(5)
    torch.testing.assert_close(flow.log_prob(x), lp, rtol=1e-8, atol=1e-8)
    with pytest.raises(ValueError, match="n_transforms"):
        (PlanarFlow if variant is None else SylvesterFlow)(3, n_transforms=0)
