"""Tests of the log-det estimators of residual blocks (fastflow.ops.logdet_estimators).

The exact estimator against the brute-force Jacobian (torch.autograd.functional.jacobian) and
finite differences; the power series against the exact log-det as its terms grow (deterministic,
with the scaled basis as probes: Hutchinson over ``sqrt(D) e_j`` is the exact trace) and, with
random probes, unbiased for its truncated value; the Russian roulette unbiased for the exact
log-det (D = 2 and 8: mean over many draws within a few standard errors); the Neumann-series and
the backprop gradients unbiased for the exact gradient; the memory-efficient backward equal to
the Neumann gradient it stores; a NaN sample stays in its row.

Every statistical test has a fixed seed and asserts a bound of ~4.5 standard errors per
component, and also that the standard error is small, so that the test has power.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fastflow.ops.logdet_estimators import (
    draw_roulette_n,
    jacobian,
    logdet_exact,
    logdet_roulette,
    logdet_series,
    roulette_tail_prob,
    sample_probes,
)

pytestmark = pytest.mark.usefixtures("one_thread")

Z = 4.5  # standard errors allowed per component


def branch(d: int, lip: float = 0.6, hidden: int = 16, seed: int = 0) -> nn.Module:
    """A contractive MLP, float64, whose Jacobian norm is close to its bound ``lip`` near the
    origin (so that the series' tail matters): ``g(x) = R W^T tanh(W x + b) lip + b2`` with
    ``W`` (hidden x d) orthonormal columns and ``R`` orthogonal."""
    torch.manual_seed(seed)
    g = nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, d)).double()
    gen = torch.Generator().manual_seed(seed)
    w, _ = torch.linalg.qr(torch.randn(hidden, d, generator=gen, dtype=torch.float64))
    r, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    with torch.no_grad():
        g[0].weight.copy_(w)
        g[2].weight.copy_(lip * r @ w.T)
        g[0].bias.mul_(0.5)
    return g


def points(b: int, d: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def evaluate(g: nn.Module, x: torch.Tensor):
    x = x.detach().requires_grad_()
    return x, g(x)


def basis_probes(x: torch.Tensor) -> torch.Tensor:
    """sqrt(D) e_j for j < D: the Hutchinson average over them is the exact trace."""
    b, d = x.shape
    eye = torch.eye(d, dtype=x.dtype) * math.sqrt(d)
    return eye[:, None, :].expand(d, b, d).clone()


def exact_series(J: torch.Tensor, n: int) -> torch.Tensor:
    """sum_{k<=n} (-1)^{k+1}/k tr(J^k) from the explicit Jacobian."""
    total = torch.zeros(J.shape[0], dtype=J.dtype)
    P = torch.eye(J.shape[-1], dtype=J.dtype).expand_as(J)
    for k in range(1, n + 1):
        P = P @ J
        total = total + (-1) ** (k + 1) / k * P.diagonal(dim1=1, dim2=2).sum(-1)
    return total


def grad(out: torch.Tensor, inputs) -> list[torch.Tensor]:
    """Gradients, zeros for inputs the output does not depend on (the last bias of g)."""
    got = torch.autograd.grad(out, inputs, allow_unused=True)
    return [torch.zeros_like(t) if gi is None else gi for t, gi in zip(inputs, got)]


def mean_and_se(samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = samples.shape[0]
    return samples.mean(0), samples.std(0) / math.sqrt(n)


# --------------------------------------------------------------------------------------------
# exact


@pytest.mark.parametrize("d", [2, 8])
def test_exact_matches_the_brute_force_jacobian(d):
    g = branch(d)
    x = points(5, d)
    xg, gx = evaluate(g, x)
    J = jacobian(xg, gx)
    for i in range(5):
        Ji = torch.autograd.functional.jacobian(lambda v: g(v[None])[0], x[i])
        assert torch.allclose(J[i], Ji, atol=1e-12)
    want = torch.stack(
        [torch.linalg.slogdet(torch.eye(d, dtype=x.dtype) + J[i]).logabsdet for i in range(5)]
    )
    assert torch.allclose(logdet_exact(xg, gx), want, atol=1e-12)


def test_exact_is_differentiable():
    g = branch(3)
    x = points(4, 3).requires_grad_()

    def f(x, w):
        h = torch.tanh(x @ w.T + g[0].bias)
        gx = g[2](h)
        return logdet_exact(x, gx)

    w = g[0].weight.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(f, (x, w), atol=1e-8, rtol=1e-6)


def test_create_graph_false_gives_values_only():
    g = branch(2)
    xg, gx = evaluate(g, points(3, 2))
    for ld in (
        logdet_exact(xg, gx, create_graph=False),
        logdet_series(xg, gx, 3, create_graph=False),
        logdet_roulette(xg, gx, create_graph=False),
    ):
        assert ld.grad_fn is None and ld.shape == (3,)


def test_gx_without_graph_is_rejected():
    g = branch(2)
    x = points(3, 2).requires_grad_()
    with torch.no_grad():
        gx = g(x)
    with pytest.raises(ValueError, match="gx must be computed from x with autograd"):
        logdet_exact(x, gx)
    with pytest.raises(ValueError, match="gx = g\\(x\\) must have x's shape"):
        logdet_series(x, g(x)[:, :1], 2)


# --------------------------------------------------------------------------------------------
# power series


@pytest.mark.parametrize("d", [2, 8])
def test_series_converges_to_the_exact_logdet(d):
    g = branch(d, lip=0.8)
    xg, gx = evaluate(g, points(6, d))
    exact = logdet_exact(xg, gx, create_graph=False)
    probes = basis_probes(xg)
    J = jacobian(xg, gx, create_graph=False)
    L = torch.linalg.matrix_norm(J, ord=2).max().item()
    errors = []
    for n in (1, 2, 4, 8, 16, 32, 64):
        est = logdet_series(xg, gx, n, probes=probes, create_graph=False)
        assert torch.allclose(est, exact_series(J, n), atol=1e-12)  # basis probes: exact traces
        err = (est - exact).abs().max().item()
        bound = d * (-math.log(1 - L) - sum(L**k / k for k in range(1, n + 1)))
        assert err <= bound + 1e-12
        errors.append(err)
    assert errors[-1] < 1e-8
    assert all(b <= a * 1.0001 for a, b in zip(errors[2:], errors[3:]))


@pytest.mark.parametrize("probe", ["gaussian", "rademacher"])
def test_series_with_random_probes_is_unbiased_for_its_truncation(probe):
    d, n_terms = 4, 3
    g = branch(d)
    x = points(3, d)
    reps = 64
    xg, gx = evaluate(g, x.repeat_interleave(reps, 0))
    torch.manual_seed(10)
    calls = 150
    draws = torch.stack(
        [
            logdet_series(xg, gx, n_terms, probe=probe, create_graph=False).view(3, reps).mean(1)
            for _ in range(calls)
        ]
    )
    mean, se = mean_and_se(draws)
    J = jacobian(*evaluate(g, x), create_graph=False)
    want = exact_series(J, n_terms)
    assert ((mean - want).abs() <= Z * se).all()
    assert se.max() < 0.03


def test_series_gradient_converges_to_the_exact_gradient():
    d = 3
    g = branch(d, lip=0.7)
    x = points(4, d)
    params = list(g.parameters())
    xg, gx = evaluate(g, x)
    exact = grad(logdet_exact(xg, gx).sum(), [xg, *params])
    probes = basis_probes(xg)
    errs = []
    for n in (2, 8, 40):
        xg, gx = evaluate(g, x)
        est = grad(logdet_series(xg, gx, n, probes=probes).sum(), [xg, *params])
        errs.append(max((a - b).abs().max().item() for a, b in zip(est, exact)))
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-7


# --------------------------------------------------------------------------------------------
# Russian roulette


def test_tail_probabilities():
    assert roulette_tail_prob(1) == 1.0 and roulette_tail_prob(0) == 1.0
    assert roulette_tail_prob(3, p=0.5) == 0.25
    assert roulette_tail_prob(0, "poisson", rate=2.0) == 1.0
    assert math.isclose(roulette_tail_prob(1, "poisson", rate=2.0), 1 - math.exp(-2), rel_tol=1e-12)
    cdf3 = math.exp(-2) * (1 + 2 + 2)
    assert math.isclose(roulette_tail_prob(3, "poisson", rate=2.0), 1 - cdf3, rel_tol=1e-12)
    assert 0 < roulette_tail_prob(60, "poisson", rate=2.0) < 1e-40  # no cancellation to 0 or < 0
    with pytest.raises(ValueError, match="geometric p"):
        roulette_tail_prob(2, p=0.0)
    with pytest.raises(ValueError, match="dist"):
        roulette_tail_prob(2, "uniform")


def test_draws_follow_the_distribution():
    gen = torch.Generator().manual_seed(0)
    geo = torch.tensor([draw_roulette_n(p=0.5, generator=gen) for _ in range(4000)], dtype=torch.float64)
    assert geo.min() >= 1 and abs(geo.mean().item() - 2.0) < 4 * geo.std().item() / math.sqrt(4000)
    poi = torch.tensor([draw_roulette_n("poisson", rate=2.0, generator=gen) for _ in range(4000)],
                       dtype=torch.float64)
    assert poi.min() == 0 and abs(poi.mean().item() - 2.0) < 4 * poi.std().item() / math.sqrt(4000)


def test_roulette_value_is_the_weighted_series():
    """Given N and basis probes, the estimate is sum_k (-1)^{k+1}/k tr(J^k) / P(N >= k - n_exact)."""
    d = 3
    g = branch(d)
    xg, gx = evaluate(g, points(4, d))
    J = jacobian(xg, gx, create_graph=False)
    est = logdet_roulette(xg, gx, n_exact=2, n_random=3, probes=basis_probes(xg), create_graph=False)
    want = exact_series(J, 2)
    P = torch.linalg.matrix_power(J, 2)
    for k in range(3, 6):
        P = P @ J
        want = want + (-1) ** (k + 1) / k * P.diagonal(dim1=1, dim2=2).sum(-1) / 0.5 ** (k - 3)
    assert torch.allclose(est, want, atol=1e-12)


@pytest.mark.parametrize("d,calls", [(2, 600), (8, 500)])
def test_roulette_is_unbiased(d, calls):
    g = branch(d, lip=0.6, seed=d)
    x = points(4, d, seed=d)
    reps = 32
    xg, gx = evaluate(g, x.repeat_interleave(reps, 0))
    torch.manual_seed(100 + d)
    draws = torch.stack(
        [
            logdet_roulette(xg, gx, n_exact=2, p=0.5, create_graph=False).view(4, reps).mean(1)
            for _ in range(calls)
        ]
    )
    mean, se = mean_and_se(draws)
    exact = logdet_exact(*evaluate(g, x), create_graph=False)
    assert ((mean - exact).abs() <= Z * se).all(), (mean, exact, se)
    assert se.max() < 0.02 * max(1.0, exact.abs().max().item())
    # power: the test tells the unbiased estimate from its always-computed part (2 terms)
    J = jacobian(*evaluate(g, x), create_graph=False)
    assert ((exact_series(J, 2) - exact).abs() > Z * se).any()


def test_roulette_with_poisson_is_unbiased():
    d = 2
    g = branch(d, lip=0.6, seed=3)
    x = points(3, d, seed=3)
    reps = 32
    xg, gx = evaluate(g, x.repeat_interleave(reps, 0))
    torch.manual_seed(7)
    draws = torch.stack(
        [
            logdet_roulette(xg, gx, n_exact=1, dist="poisson", rate=2.0, create_graph=False)
            .view(3, reps).mean(1)
            for _ in range(400)
        ]
    )
    mean, se = mean_and_se(draws)
    exact = logdet_exact(*evaluate(g, x), create_graph=False)
    assert ((mean - exact).abs() <= Z * se).all()


def gradient_draws(g, x, calls, **kwargs):
    params = list(g.parameters())
    out = []
    for _ in range(calls):
        xg, gx = evaluate(g, x)
        ld = logdet_roulette(xg, gx, params=params, **kwargs)
        grads = grad(ld.sum(), [xg, *params])
        out.append(torch.cat([t.reshape(-1) for t in grads]))
    return torch.stack(out)


def exact_gradient(g, x):
    params = list(g.parameters())
    xg, gx = evaluate(g, x)
    grads = grad(logdet_exact(xg, gx).sum(), [xg, *params])
    return torch.cat([t.reshape(-1) for t in grads])


@pytest.mark.parametrize(
    "d,gradient,calls", [(2, "neumann", 800), (8, "neumann", 500), (2, "backprop", 500)]
)
def test_roulette_gradient_is_unbiased(d, gradient, calls):
    g = branch(d, lip=0.5, hidden=8, seed=20 + d)
    x = points(4, d, seed=d).repeat_interleave(8, 0)  # 4 points, 8 copies: a cheap average per call
    torch.manual_seed(200 + d)
    draws = gradient_draws(g, x, calls, n_exact=2, p=0.5, gradient=gradient)
    mean, se = mean_and_se(draws)
    exact = exact_gradient(g, x)
    z = (mean - exact).abs() / se.clamp_min(1e-12)
    assert (z <= Z).all(), (z.max(), mean, exact)
    # power: the estimate pins the gradient down well within its own size
    assert (mean - exact).norm() < 0.1 * exact.norm()


def test_neumann_and_backprop_gradients_differ_per_draw_but_not_in_value():
    g = branch(3, seed=4)
    x = points(4, 3)
    probes = sample_probes(x, 1, generator=torch.Generator().manual_seed(0))
    params = list(g.parameters())
    results = {}
    for kind in ("neumann", "backprop"):
        xg, gx = evaluate(g, x)
        ld = logdet_roulette(xg, gx, n_exact=2, n_random=2, probes=probes, gradient=kind)
        results[kind] = (ld.detach(), torch.autograd.grad(ld.sum(), params[0])[0])
    assert torch.allclose(results["neumann"][0], results["backprop"][0], atol=1e-13)
    assert not torch.allclose(results["neumann"][1], results["backprop"][1])


@pytest.mark.parametrize(
    "n_exact,n_random,dist", [(2, 1, "geometric"), (2, 4, "geometric"), (0, 3, "geometric"),
                              (1, 0, "poisson"), (1, 3, "poisson")]
)
def test_neumann_gradient_equals_backprop_with_exact_traces(n_exact, n_random, dist):
    """With the scaled basis as probes the traces are exact, and then for a given N the
    Neumann surrogate's gradient sum_j (-1)^j c_{j+1} tr(J^j dJ) is the gradient of the
    weighted series itself: a deterministic check of the surrogate's weights."""
    g = branch(3, seed=9)
    x = points(4, 3)
    params = list(g.parameters())
    out = []
    for kind in ("neumann", "backprop"):
        xg, gx = evaluate(g, x)
        ld = logdet_roulette(xg, gx, n_exact=n_exact, n_random=n_random, dist=dist,
                             probes=basis_probes(xg), gradient=kind)
        out.append(torch.cat([t.reshape(-1) for t in grad(ld.sum(), [xg, *params])]))
    assert out[0].abs().max() > 1e-3
    assert torch.allclose(out[0], out[1], atol=1e-12)


def test_memory_efficient_backward_equals_the_neumann_gradient():
    g = branch(4, seed=5)
    params = list(g.parameters())
    x0 = points(6, 4)
    probes = sample_probes(x0, 2, generator=torch.Generator().manual_seed(1))
    out = {}
    for eff in (False, True):
        x = x0.clone().requires_grad_()
        h = 1.5 * x  # a non-leaf input: the gradient must flow upstream to x
        gx = g(h)
        ld = logdet_roulette(h, gx, n_exact=2, n_random=3, probes=probes,
                             memory_efficient=eff, params=params)
        loss = -ld.mean()
        grads = grad(loss, [x, *params])
        out[eff] = (ld.detach(), grads)
    assert torch.allclose(out[False][0], out[True][0], atol=1e-13)
    for a, b in zip(out[False][1], out[True][1]):
        assert torch.allclose(a, b, atol=1e-12)


def test_memory_efficient_backward_rejects_unequal_sample_weights():
    g = branch(2, seed=6)
    x = points(3, 2).requires_grad_()
    ld = logdet_roulette(x, g(x), memory_efficient=True, params=list(g.parameters()))
    with pytest.raises(RuntimeError, match="same weight"):
        (ld * torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)).sum().backward()


# --------------------------------------------------------------------------------------------
# bad values stay in their sample


@pytest.mark.parametrize("kind", ["exact", "series", "roulette"])
def test_nan_stays_in_its_row(kind):
    g = branch(3, seed=7)
    x = points(5, 3)
    x[2, 0] = float("nan")
    xg, gx = evaluate(g, x)
    fn = {
        "exact": lambda: logdet_exact(xg, gx),
        "series": lambda: logdet_series(xg, gx, 4),
        "roulette": lambda: logdet_roulette(xg, gx),
    }[kind]
    ld = fn()
    assert torch.isnan(ld[2])
    assert torch.isfinite(ld[[0, 1, 3, 4]]).all()


def test_probe_arguments():
    x = torch.zeros(4, 3)
    r = sample_probes(x, 5, "rademacher", torch.Generator().manual_seed(0))
    assert r.shape == (5, 4, 3) and set(r.unique().tolist()) == {-1.0, 1.0}
    with pytest.raises(ValueError, match="probe must be one of"):
        sample_probes(x, 1, "uniform")
    g = branch(3)
    xg, gx = evaluate(g, points(4, 3))
    with pytest.raises(ValueError, match="probes must have shape"):
        logdet_series(xg, gx, 2, probes=torch.zeros(2, 4, 2))
    with pytest.raises(ValueError, match="n_terms"):
        logdet_series(xg, gx, 0)
    with pytest.raises(ValueError, match="gradient must be one of"):
        logdet_roulette(xg, gx, gradient="exact")
