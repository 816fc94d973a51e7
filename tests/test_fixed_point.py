"""Tests of the batched fixed-point inverse (fastflow.ops.fixed_point), generic path.

Accuracy at Lip(g) = 0.9 (float32 and float64); per-sample convergence (each sample its own
iteration count, converged samples frozen: the batched solve equals each sample solved alone,
bit for bit, with and without compaction and with sparse host checks); non-convergence and
non-finite samples reported as a warning or an error naming the worst residual; NaN in one
sample stays there; Anderson acceleration; implicit-function gradients against autograd through
a long unrolled iteration and against finite differences (gradcheck, float64).
"""

from __future__ import annotations

import math

import pytest
import torch

from fastflow.ops.fixed_point import (
    FixedPointError,
    FixedPointResult,
    FixedPointWarning,
    fixed_point_inverse,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def orthogonal(d: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    return q.to(dtype)


def tanh_branch(d: int, c: float, seed: int = 0, dtype=torch.float64):
    """g(x) = c tanh(Q x + b), Q orthogonal: Lip(g) = c, |J| close to c near the origin."""
    q = orthogonal(d, seed, dtype)
    b = 0.1 * torch.randn(d, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64).to(dtype)
    return lambda x: c * torch.tanh(x @ q.T + b)


# --------------------------------------------------------------------------------------------
# accuracy


@pytest.mark.parametrize("dtype,tol,err", [(torch.float32, 1e-6, 1e-5), (torch.float64, 1e-11, 1e-10)])
def test_inverts_a_lip_0_9_branch(dtype, tol, err):
    g = tanh_branch(8, 0.9, dtype=dtype)
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(3), dtype=dtype)
    y = x + g(x)
    res = fixed_point_inverse(g, y, tol=tol)
    assert isinstance(res, FixedPointResult)
    assert (res.x - x).abs().max() < err
    assert res.converged.all()
    assert (res.residual <= tol).all()
    assert res.iterations.dtype == torch.long and res.iterations.shape == (64,)
    # about log(tol) / log(0.9) iterations where |J| is near 0.9
    assert res.iterations.max() <= 2 * math.log(tol) / math.log(0.9)
    assert res.iterations.min() >= 10


def test_x_init_and_unpacking():
    torch.manual_seed(0)
    g = tanh_branch(4, 0.8)
    x = torch.randn(5, 4, dtype=torch.float64)
    y = x + g(x)
    x1, res = fixed_point_inverse(g, y, tol=1e-12)
    res2 = fixed_point_inverse(g, y, tol=1e-12, x_init=x1)
    assert torch.equal(x1, res.x)
    # restarted at the solution, a step is already below tol, up to rounding at 1e-12: the
    # solve stops after one iteration, or two where rounding made the first step look too big
    assert (res2.iterations <= 2).all() and (res2.iterations < res.iterations).all()
    assert (res2.x - x).abs().max() < 1e-11


# --------------------------------------------------------------------------------------------
# per-sample convergence


SCALES = [0.0, 0.2, 0.5, 0.8, 0.9, 0.97]


def expected_iterations(s: float, y: float, tol: float) -> int:
    """First k with |x_k - x_{k-1}| / (1 + |y|) = s^k |y| / (1 + |y|) <= tol (g = s x)."""
    k = 1
    while s**k * abs(y) / (1 + abs(y)) > tol:
        k += 1
    return k


def indexed_linear(scales: torch.Tensor, calls: list[int]):
    """g(x) = s_i x for sample i, the index i carried in an inert last column (a fixed point
    of the iteration), so that rows keep their rate when the working batch is compacted."""

    def g(x):
        calls.append(x.shape[0])
        out = scales[x[:, -1].long(), None] * x
        out[:, -1] = 0
        return out

    return g


@pytest.mark.parametrize("compact", [True, False])
@pytest.mark.parametrize("check_every", [1, 5])
def test_each_sample_stops_on_its_own_test(compact, check_every):
    tol = 1e-6
    n = len(SCALES)
    s = torch.tensor(SCALES, dtype=torch.float64)
    y = torch.tensor([0.7, -1.3, 0.7], dtype=torch.float64).repeat(n, 1)
    y = torch.cat([y, torch.arange(n, dtype=torch.float64)[:, None]], 1)
    calls: list[int] = []
    g = indexed_linear(s, calls)

    res = fixed_point_inverse(g, y, tol=tol, compact=compact, check_every=check_every)
    want = [expected_iterations(si, 1.3, tol) for si in SCALES]  # |y| = 1.3 is the slowest column
    assert res.iterations.tolist() == want
    assert len(set(want)) == n  # every sample its own count
    assert res.converged.all()
    assert len(calls) < max(want) + check_every  # the slowest sample bounds the work
    if compact:
        assert min(calls) < n  # the working batch shrank to the slow samples
        assert sum(calls) < n * max(want)
    else:
        assert set(calls) == {n}
    # frozen once converged: each sample equals the same sample solved alone, bit for bit
    for i in range(n):
        alone = fixed_point_inverse(g, y[i : i + 1], tol=tol)
        assert torch.equal(alone.x[0], res.x[i])
        assert alone.iterations.item() == res.iterations[i].item()


def test_converged_samples_are_not_updated():
    """With compact=False every row is still evaluated; the converged rows must not move."""
    tol = 1e-6
    s = torch.tensor([0.1, 0.95], dtype=torch.float64)
    y = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    seen: list[torch.Tensor] = []

    def g(x):
        seen.append(x[0].clone())
        rate = s[x[:, 1].long(), None]
        out = rate * x
        out[:, 1] = 0
        return out

    res = fixed_point_inverse(g, y, tol=tol, compact=False)
    k0 = res.iterations[0].item()
    assert k0 < res.iterations[1].item()
    # after sample 0 converged (its k0-th evaluation), every later input of row 0 is the same
    frozen = seen[k0:]
    assert len(frozen) > 10
    assert all(torch.equal(t, frozen[0]) for t in frozen)
    assert torch.equal(res.x[0], frozen[0])


def test_sparse_checks_give_the_same_answer():
    g = tanh_branch(6, 0.9, seed=5)
    y = 3 * torch.randn(33, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    a = fixed_point_inverse(g, y, tol=1e-9, check_every=1)
    b = fixed_point_inverse(g, y, tol=1e-9, check_every=7)
    assert torch.equal(a.x, b.x) and torch.equal(a.iterations, b.iterations)
    assert torch.equal(a.residual, b.residual)


# --------------------------------------------------------------------------------------------
# failures are reported


def test_non_convergence_warns_with_the_worst_residual():
    g = lambda x: 0.999 * x  # noqa: E731
    y = torch.ones(4, 2, dtype=torch.float64)
    y[2] = 5.0
    with pytest.warns(FixedPointWarning, match=r"4 of 4 sample\(s\).*worst residual .* at sample 2"):
        res = fixed_point_inverse(g, y, tol=1e-8, max_iter=10)
    assert not res.converged.any()
    assert (res.iterations == 10).all()


def test_non_convergence_raises_when_asked():
    g = lambda x: 0.999 * x  # noqa: E731
    with pytest.raises(FixedPointError, match="worst residual"):
        fixed_point_inverse(g, torch.ones(3, 2), tol=1e-8, max_iter=10, on_fail="raise")


def test_divergence_is_reported_as_non_finite():
    g = lambda x: 3.0 * x  # noqa: E731  (Lip >= 1: the iteration blows up)
    with pytest.warns(FixedPointWarning, match="non-finite"):
        res = fixed_point_inverse(g, torch.ones(2, 2), max_iter=1000)
    assert not res.converged.any()
    assert res.iterations.max() < 1000  # frozen when it stopped being finite


def test_nan_stays_in_its_sample():
    g = tanh_branch(4, 0.9, seed=2)
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    y = x + g(x)
    y_bad = y.clone()
    y_bad[3, 1] = float("nan")
    clean = fixed_point_inverse(g, y, tol=1e-10)
    with pytest.warns(FixedPointWarning, match=r"1 sample\(s\) non-finite.*samples \[3\]"):
        res = fixed_point_inverse(g, y_bad, tol=1e-10)
    others = [0, 1, 2, 4, 5]
    assert torch.equal(res.x[others], clean.x[others])
    assert torch.equal(res.iterations[others], clean.iterations[others])
    assert torch.isnan(res.x[3]).all()
    assert res.converged.tolist() == [True, True, True, False, True, True]
    assert res.iterations[3] == 1  # stopped at once, no budget spent on it
    with pytest.raises(FixedPointError, match="non-finite"):
        fixed_point_inverse(g, y_bad, tol=1e-10, on_fail="raise")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"tol": 0.0}, "tol"),
        ({"tol": float("nan")}, "tol"),
        ({"max_iter": 0}, "max_iter"),
        ({"on_fail": "ignore"}, "on_fail"),
        ({"anderson": -1}, "anderson"),
        ({"check_every": 0}, "check_every"),
        ({"x_init": torch.zeros(3)}, "x_init"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fixed_point_inverse(lambda x: 0.5 * x, torch.ones(2, 3), **kwargs)


def test_bad_y():
    with pytest.raises(ValueError, match="y must be a floating-point"):
        fixed_point_inverse(lambda x: x, torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="y must have a non-empty batch"):
        fixed_point_inverse(lambda x: x, torch.ones(0, 3))


# --------------------------------------------------------------------------------------------
# Anderson acceleration


def test_anderson_reaches_the_same_point_in_fewer_iterations():
    g = tanh_branch(8, 0.97, seed=7)
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    y = x + g(x)
    plain = fixed_point_inverse(g, y, tol=1e-10)
    fast = fixed_point_inverse(g, y, tol=1e-10, anderson=5)
    assert fast.converged.all()
    assert (fast.x - x).abs().max() < 1e-8
    assert (fast.x - plain.x).abs().max() < 1e-8
    assert fast.iterations.float().mean() < 0.5 * plain.iterations.float().mean()


def test_anderson_keeps_nan_in_its_sample():
    g = tanh_branch(4, 0.9, seed=2)
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    y = x + g(x)
    y[1, 0] = float("nan")
    with pytest.warns(FixedPointWarning, match=r"samples \[1\]"):
        res = fixed_point_inverse(g, y, tol=1e-10, anderson=4)
    ok = [0, 2, 3, 4, 5]
    assert (res.x[ok] - x[ok]).abs().max() < 1e-8
    assert torch.isnan(res.x[1]).all()


# --------------------------------------------------------------------------------------------
# implicit-function gradients


def make_params(d: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(d, d, generator=gen, dtype=torch.float64)
    w = w / torch.linalg.matrix_norm(w, ord=2)
    b = 0.3 * torch.randn(d, generator=gen, dtype=torch.float64)
    return w.requires_grad_(), b.requires_grad_()


def branch(w, b, c=0.9):
    return lambda x: c * torch.tanh(x @ w.T + b)


def test_implicit_gradient_matches_unrolled_iteration():
    d = 5
    w, b = make_params(d, 0)
    gen = torch.Generator().manual_seed(1)
    y = torch.randn(7, d, generator=gen, dtype=torch.float64).requires_grad_()
    r = torch.randn(7, d, generator=gen, dtype=torch.float64)
    g = branch(w, b)

    res = fixed_point_inverse(g, y, tol=1e-13, params=(w, b))
    grads = torch.autograd.grad((res.x * r).sum(), (y, w, b))

    x = y
    for _ in range(400):  # autograd through the iteration itself
        x = y - g(x)
    unrolled = torch.autograd.grad((x * r).sum(), (y, w, b))
    assert (res.x - x).abs().max() < 1e-12
    for a, u in zip(grads, unrolled):
        assert torch.allclose(a, u, atol=1e-10, rtol=1e-9)
    assert res.backward_converged.all()
    assert res.backward_iterations.shape == (7,) and res.backward_iterations.min() > 1


def test_implicit_gradient_gradcheck():
    w, b = make_params(3, 2)
    y = torch.randn(4, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    y.requires_grad_()

    def f(y, w, b):
        return fixed_point_inverse(branch(w, b, 0.8), y, tol=1e-14, params=(w, b)).x

    assert torch.autograd.gradcheck(f, (y, w, b), atol=1e-7, rtol=1e-5)


def test_module_parameters_get_gradients_by_default():
    lin = torch.nn.Linear(3, 3).double()
    with torch.no_grad():
        lin.weight.mul_(0.5 / torch.linalg.matrix_norm(lin.weight, ord=2))
    g = torch.nn.Sequential(lin, torch.nn.Tanh())
    y = torch.randn(4, 3, dtype=torch.float64)
    res = fixed_point_inverse(g, y, tol=1e-13)  # params default to g.parameters()
    res.x.sum().backward()
    assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0
    assert res.backward_iterations is not None


def test_no_graph_without_grad():
    w, b = make_params(3, 4)
    y = torch.randn(4, 3, dtype=torch.float64)
    with torch.no_grad():
        res = fixed_point_inverse(branch(w, b), y, params=(w, b))
    assert res.x.grad_fn is None and not res.x.requires_grad


def test_backward_non_convergence_is_reported():
    w, b = make_params(4, 5)
    y = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    res = fixed_point_inverse(branch(w, b, 0.95), y, tol=1e-12, params=(w, b), backward_max_iter=2)
    with pytest.warns(FixedPointWarning, match=r"\(backward\).*worst residual"):
        res.x.sum().backward()
    assert (res.backward_iterations == 2).all()
