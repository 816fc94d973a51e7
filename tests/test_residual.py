"""Tests of the invertible residual block (fastflow.nn.residual): iResBlock, residual_mlp and the
vector ResidualFlow.

Per layer (DESIGN.md, "what tested means"): inverse(forward(x)) within 1e-5 at c = 0.9 (weights
scaled so that the spectral normalisation is active: Lip of every layer is exactly 0.9); the
exact log-det equals log|det| of the brute-force Jacobian of the block's own forward; the
inverse's log-det is minus the forward's; gradients of the inverse (implicit function theorem)
against finite differences; the estimator switchable at run time and absent from the state
dict; diagnostics as attributes; NaN in, NaN out for that sample only; c >= 1 rejected;
non-convergence reported. Per model: a 2-D Residual Flow's density integrates to 1, a short
training run lowers the NLL, samples and round trips.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fastflow
from fastflow.flow import Flow
from fastflow.nn.actnorm import ActNorm
from fastflow.nn.residual import ESTIMATORS, ResidualFlow, iResBlock, residual_mlp
from fastflow.ops.fixed_point import FixedPointError, FixedPointWarning

pytestmark = pytest.mark.usefixtures("one_thread")


def saturate(module: nn.Module, factor: float = 50.0) -> nn.Module:
    """Blows the raw weights up so that every spectral norm clips: each SN layer then has
    Lipschitz constant exactly ``coeff`` (a freshly initialised branch is far from its bound,
    and one iteration would invert it)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("weight"):
                p.mul_(factor)
    return module


def tight_block(d: int, dtype=torch.float32, seed: int = 0, **kwargs) -> iResBlock:
    """A block whose branch has Lip = 0.9 and |J| = 0.9 wherever ELU' = 1:
    ELU -> SNLinear(d, d, c=0.9) with an orthogonal raw weight (every singular value clipped to
    0.9, so the iteration contracts at 0.9 per step, not faster)."""
    torch.manual_seed(seed)
    g = residual_mlp(d, n_hidden=0, coeff=0.9, activation="elu")
    q, _ = torch.linalg.qr(torch.randn(d, d))
    with torch.no_grad():
        g[1].weight.copy_(50 * q)
        g[1].power_iteration(50)
    return iResBlock(g.to(dtype), **kwargs)


def mlp_block(d: int, dtype=torch.float64, seed: int = 0, hidden: int = 16, **kwargs) -> iResBlock:
    torch.manual_seed(seed)
    g = saturate(residual_mlp(d, hidden=hidden, n_hidden=2, coeff=0.9)).to(dtype)
    return iResBlock(g, **kwargs)


def data(b: int, d: int, dtype=torch.float32, seed: int = 1, scale: float = 1.5) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return scale * torch.randn(b, d, generator=gen, dtype=torch.float64).to(dtype)


# --------------------------------------------------------------------------------------------
# inverse


@pytest.mark.parametrize(
    "kind,dtype,tol,bound",
    [
        # |J| = 0.9: the stop test's step bounds the error by 0.9/0.1 * tol * (1 + |y|), and
        # float32 itself cannot do better than ~eps |y| / (1 - 0.9) ~ 3e-6 at |y| ~ 5
        ("tight", torch.float64, 1e-7, 1e-5),
        ("tight", torch.float32, 1e-6, 1e-4),
        ("mlp", torch.float32, 1e-6, 1e-5),
    ],
)
def test_round_trip_at_c_0_9(kind, dtype, tol, bound):
    d = 8
    block = tight_block(d, dtype) if kind == "tight" else mlp_block(d, dtype)
    x = data(256, d, dtype)
    with torch.no_grad():
        y, logdet = block(x)
        x2, logdet_inv = block.inverse(y, tol=tol)
    err = (x2 - x).abs().max().item()
    assert err < bound, err
    assert block.last_converged.all()
    its = block.last_iterations
    assert its.shape == (256,) and its.dtype == torch.long
    assert (block.last_residual <= tol).all()
    if kind == "tight":  # |J| = 0.9 where ELU' = 1: tens of iterations (log(tol)/log(0.9) ~ 150)
        assert its.float().mean() > 40 and its.max() < 200
    assert torch.isfinite(logdet).all() and logdet_inv.shape == (256,)


def test_inverse_log_det_is_minus_the_forward_one():
    block = mlp_block(3, estimator="exact")
    x = data(16, 3, torch.float64)
    y, logdet = block(x)
    x2, logdet_inv = block.inverse(y, tol=1e-12)
    assert torch.allclose(x2, x, atol=1e-10)
    assert torch.allclose(logdet_inv, -logdet, atol=1e-10)


def test_inverse_gradients_by_the_implicit_function_theorem():
    block = mlp_block(3, estimator="exact", tol=1e-13, hidden=8)
    y = data(4, 3, torch.float64).requires_grad_()

    def f(y):
        x, logdet_inv = block.inverse(y)
        return x, logdet_inv

    assert torch.autograd.gradcheck(f, (y,), atol=1e-6, rtol=1e-5)
    # the parameters get gradients too, and the backward solve is recorded
    x, ld = block.inverse(y)
    (x.sum() + ld.sum()).backward()
    assert all(p.grad is not None for p in block.g.parameters() if p.requires_grad)
    assert block.last_solve.backward_converged.all()


def test_inverse_leaves_the_branch_untouched():
    block = mlp_block(4, dtype=torch.float32)
    block.train()
    before = {k: v.clone() for k, v in block.state_dict().items()}
    y = data(8, 4)
    block.inverse(y)
    after = block.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # no power-iteration update
    assert block.training and all(m.training for m in block.g.modules())
    block(y)  # a training forward does update u, v
    assert not all(torch.equal(before[k], block.state_dict()[k]) for k in before)


def test_non_convergence_is_reported():
    block = tight_block(4, on_fail="raise", max_iter=3)
    y = data(8, 4)
    with pytest.raises(FixedPointError, match="worst residual"):
        block.inverse(y)
    block.on_fail = "warn"
    with pytest.warns(FixedPointWarning, match="worst residual"):
        block.inverse(y)
    assert not block.last_converged.all()
    x, _ = block.inverse(y, max_iter=1000, tol=1e-6)  # per-call settings
    assert block.last_converged.all()


def test_anderson_in_the_block():
    block = tight_block(8, anderson=5)
    x = data(64, 8)
    with torch.no_grad():
        y, _ = block(x)
        x2, _ = block.inverse(y, tol=1e-6)
    assert (x2 - x).abs().max() < 1e-5
    plain = tight_block(8)
    with torch.no_grad():
        plain.inverse(y, tol=1e-6)
    assert block.last_iterations.float().mean() < plain.last_iterations.float().mean()


# --------------------------------------------------------------------------------------------
# log-det


@pytest.mark.parametrize("d", [2, 5])
def test_exact_logdet_is_the_brute_force_jacobian(d):
    block = mlp_block(d, estimator="exact")
    x = data(6, d, torch.float64)
    _, logdet = block(x)
    for i in range(6):
        J = torch.autograd.functional.jacobian(lambda v: block(v[None])[0][0], x[i])
        assert torch.allclose(logdet[i], torch.linalg.slogdet(J).logabsdet, atol=1e-10)


def test_estimates_agree_with_the_exact_logdet_on_average():
    block = mlp_block(2, estimator="roulette")
    x = data(4, 2, torch.float64).repeat_interleave(64, 0)
    torch.manual_seed(0)
    draws = torch.stack([block(x)[1].detach().view(4, 64).mean(1) for _ in range(200)])
    mean, se = draws.mean(0), draws.std(0) / math.sqrt(200)
    block.estimator = "exact"
    exact = block(x)[1].detach().view(4, 64)[:, 0]
    assert ((mean - exact).abs() <= 4.5 * se).all()


def test_estimator_is_switchable_and_validated():
    block = mlp_block(2)
    x = data(5, 2, torch.float64)
    assert block.estimator == "roulette"
    block(x)
    assert block.last_estimator == "roulette" and block.last_terms >= block.n_exact + 1
    block.estimator = "series"
    block(x)
    assert block.last_estimator == "series" and block.last_terms == block.n_terms
    block.estimator = "exact"
    a, b = block(x)[1], block(x)[1]
    assert torch.equal(a, b) and block.last_terms == 2
    with pytest.raises(ValueError, match="estimator must be one of"):
        block.estimator = "hutchinson"
    with pytest.raises(ValueError, match="eval_estimator must be one of"):
        iResBlock(nn.Identity(), eval_estimator="nope")
    assert ESTIMATORS == ("exact", "series", "roulette")


def test_eval_estimator_defaults():
    small = mlp_block(4).eval()
    small(data(3, 4, torch.float64))
    assert small.last_estimator == "exact"
    big = mlp_block(20).eval()
    big(data(3, 20, torch.float64))
    assert big.last_estimator == "series" and big.last_terms == big.eval_n_terms
    big.eval_estimator = "roulette"
    big(data(3, 20, torch.float64))
    assert big.last_estimator == "roulette" and big.last_terms > big.eval_n_terms
    big.train()
    big(data(3, 20, torch.float64))
    assert big.last_estimator == "roulette" and big.last_terms < big.eval_n_terms


def test_state_dict_does_not_depend_on_the_estimator():
    a = mlp_block(3, estimator="roulette", seed=0)
    b = mlp_block(3, estimator="exact", eval_estimator="series", seed=1)
    assert a.state_dict().keys() == b.state_dict().keys()
    b.load_state_dict(a.state_dict())
    b.eval_estimator = None  # both: exact in eval (D = 3)
    x = data(4, 3, torch.float64)
    assert torch.equal(a.eval()(x)[1], b.eval()(x)[1])


def test_memory_efficient_block_gives_the_same_gradients():
    grads = []
    for eff in (False, True):
        block = mlp_block(3, memory_efficient=eff, seed=2)
        x = data(8, 3, torch.float64).requires_grad_()
        torch.manual_seed(5)
        y, logdet = block(x)
        loss = -(logdet - 0.5 * y.square().sum(1)).mean()
        loss.backward()
        grads.append([x.grad] + [p.grad for p in block.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-12)


# --------------------------------------------------------------------------------------------
# autograd modes, bad input


def test_no_grad_and_inference_mode():
    block = mlp_block(3)
    x = data(4, 3, torch.float64)
    with torch.no_grad():
        y, logdet = block(x)
        x2, ld2 = block.inverse(y)
    assert not y.requires_grad and not logdet.requires_grad and not x2.requires_grad
    with torch.inference_mode():
        y3, logdet3 = block.eval()(x)
        x3, _ = block.inverse(y3, tol=1e-10)
    assert torch.allclose(x3, x, atol=1e-8) and torch.isfinite(logdet3).all()


def test_nan_in_nan_out_for_that_sample_only():
    block = mlp_block(3, estimator="exact").eval()  # eval: no power-iteration update between calls
    x = data(5, 3, torch.float64)
    x_bad = x.clone()
    x_bad[1, 2] = float("nan")
    y, logdet = block(x_bad)
    y_ok, logdet_ok = block(x)
    rows = [0, 2, 3, 4]
    assert torch.isnan(y[1]).all() and torch.isnan(logdet[1])
    assert torch.equal(y[rows], y_ok[rows]) and torch.allclose(logdet[rows], logdet_ok[rows])
    with pytest.warns(FixedPointWarning, match=r"samples \[1\]"):
        x2, ld = block.inverse(y.detach(), tol=1e-10)
    assert torch.isnan(x2[1]).all() and torch.isnan(ld[1])
    assert torch.allclose(x2[rows], x[rows], atol=1e-8) and torch.isfinite(ld[rows]).all()


def test_bad_input():
    block = mlp_block(3)
    with pytest.raises(ValueError, match="x must have shape"):
        block(torch.zeros(3))
    with pytest.raises(ValueError, match="floating-point"):
        block(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="g must return a tensor of its input's shape"):
        iResBlock(nn.Linear(3, 2))(torch.zeros(2, 3))
    with pytest.raises(TypeError, match="g must be an nn.Module"):
        iResBlock(lambda x: x)
    for kwargs, name in [({"tol": 0}, "tol"), ({"max_iter": 0}, "max_iter"),
                         ({"geometric_p": 0.0}, "geometric_p"), ({"on_fail": "x"}, "on_fail"),
                         ({"n_terms": 0}, "n_terms"), ({"probe": "x"}, "probe")]:
        with pytest.raises(ValueError, match=name):
            iResBlock(nn.Identity(), **kwargs)


@pytest.mark.parametrize("coeff", [1.0, 1.5, 0.0, -0.5])
def test_coeff_outside_0_1_is_rejected(coeff):
    with pytest.raises(ValueError, match="coeff must be in \\(0, 1\\)"):
        residual_mlp(2, coeff=coeff)
    with pytest.raises(ValueError, match="coeff"):
        ResidualFlow(2, n_blocks=1, coeff=coeff)


def test_residual_mlp_is_contractive():
    torch.manual_seed(0)
    g = saturate(residual_mlp(3, hidden=16, n_hidden=2, coeff=0.9, activation="lipswish"))
    linears = [m for m in g if hasattr(m, "normalized_weight")]
    assert len(linears) == 3 and not isinstance(g[-1], nn.ELU)
    for lin in linears:
        assert torch.linalg.matrix_norm(lin.normalized_weight(update=False), ord=2) <= 0.9 + 1e-4
    g_elu = residual_mlp(3, n_hidden=1, activation="elu", preact=False)
    assert isinstance(g_elu[1], nn.ELU) and not isinstance(g_elu[0], nn.ELU)
    with pytest.raises(ValueError, match="activation"):
        residual_mlp(3, activation="relu")


class _Wrapped(nn.Module):
    """A branch that is not MLP-structured (the same function): the autograd estimators."""

    def __init__(self, g: nn.Module):
        super().__init__()
        self.g = g

    def forward(self, x):
        return self.g(x)


def test_torch_compile_runs_the_block_eagerly():
    """A compiled block whose log-det runs on the autograd estimators (a branch that is not
    MLP-structured) gives the eager values and gradients: that part runs eagerly (module
    docstring: double backward). MLP-structured branches compile into one graph
    (tests/test_compile_export.py)."""
    block = mlp_block(2, estimator="exact", dtype=torch.float32).eval()
    block.g = _Wrapped(block.g)
    x = data(8, 2)
    compiled = torch.compile(block, backend="aot_eager")
    grads = []
    for fn in (block, compiled):
        xr = x.clone().requires_grad_()
        y, logdet = fn(xr)
        (y.square().sum() + logdet.sum()).backward()
        grads.append((y.detach(), logdet.detach(), xr.grad))
    for u, v in zip(*grads):
        assert torch.allclose(u, v, atol=1e-6)


# --------------------------------------------------------------------------------------------
# the vector model


def test_residual_flow_structure_and_round_trip():
    torch.manual_seed(0)
    flow = ResidualFlow(3, n_blocks=3, hidden=16, n_hidden=1, estimator="series", n_terms=3)
    assert isinstance(flow, Flow) and len(flow.blocks) == 3
    kinds = [type(t) for t in flow.transform]
    assert kinds == [iResBlock, ActNorm] * 3
    x = data(32, 3)
    lp = flow.log_prob(x)  # training mode: initialises the ActNorms
    assert lp.shape == (32,) and torch.isfinite(lp).all()
    flow.eval()
    with torch.no_grad():
        z, _ = flow(x)
        x2, _ = flow.inverse(z)
        s = flow.sample(5)
    assert (x2 - x).abs().max() < 1e-4
    assert s.shape == (5, 3)
    flow.set_estimator("exact", eval_estimator="series")
    assert all(b.estimator == "exact" and b.eval_estimator == "series" for b in flow.blocks)
    assert [type(t) for t in ResidualFlow(2, n_blocks=2, actnorm=False).transform] == [iResBlock] * 2


def test_residual_flow_density_integrates_to_one():
    torch.manual_seed(0)
    flow = ResidualFlow(2, n_blocks=3, hidden=16, n_hidden=1, actnorm=False)
    saturate(flow)  # non-trivial blocks: every layer at its spectral bound
    flow = flow.double().eval()  # eval: the exact log-det in 2-D
    n = 240
    lo, hi = -7.0, 7.0
    grid = torch.linspace(lo, hi, n, dtype=torch.float64)
    xx, yy = torch.meshgrid(grid, grid, indexing="ij")
    pts = torch.stack([xx.reshape(-1), yy.reshape(-1)], 1)
    with torch.no_grad():
        logp = flow.log_prob(pts)
    cell = ((hi - lo) / (n - 1)) ** 2
    mass = logp.exp().sum().item() * cell
    assert abs(mass - 1) < 0.01, mass
    # not the base density: the blocks moved the mass
    base = torch.distributions.Normal(0.0, 1.0).log_prob(pts).sum(1)
    assert (logp - base).abs().max() > 0.1


def test_residual_flow_learns_a_toy_density():
    from fastflow.data import toy_data

    torch.manual_seed(0)
    train = toy_data("moons", 2000, seed=0)
    test = toy_data("moons", 1000, seed=1)
    flow = ResidualFlow(2, n_blocks=4, hidden=32, n_hidden=2)
    flow.eval()
    opt = torch.optim.Adam(flow.parameters(), lr=5e-3)
    flow.train()
    gen = torch.Generator().manual_seed(0)
    for _ in range(60):
        idx = torch.randint(0, train.shape[0], (128,), generator=gen)
        loss = -flow.log_prob(train[idx]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    flow.eval()
    with torch.no_grad():
        nll = -flow.log_prob(test).mean().item()  # exact log-det in eval (2-D)
    gaussian = torch.distributions.MultivariateNormal(
        train.mean(0).double(), covariance_matrix=torch.cov(train.T.double())
    )
    nll_gauss = -gaussian.log_prob(test.double()).mean().item()
    assert math.isfinite(nll) and nll < nll_gauss + 0.05, (nll, nll_gauss)


def test_series_with_the_neumann_gradient():
    # value: the same truncated series as series_grad="backprop" (same probes); gradient: the
    # Neumann surrogate, whose mean over probes is the exact log-det's gradient up to the
    # truncation (Lip^n_terms, negligible at 40 terms)
    reps = 256
    x0 = data(3, 2, torch.float64)
    x = x0.repeat_interleave(reps, 0)
    values, grads = {}, {}
    for grad_kind in ("backprop", "neumann"):
        block = mlp_block(2, estimator="series", n_terms=40, series_grad=grad_kind)
        xg = x.clone().requires_grad_()
        torch.manual_seed(3)
        _, logdet = block(xg)
        logdet.sum().backward()
        values[grad_kind], grads[grad_kind] = logdet.detach(), xg.grad
    torch.testing.assert_close(values["neumann"], values["backprop"], rtol=1e-12, atol=1e-12)
    block = mlp_block(2, estimator="exact")
    xe = x0.clone().requires_grad_()
    block(xe)[1].sum().backward()
    g = grads["neumann"].view(3, reps, 2)
    mean, se = g.mean(1), g.std(1) / math.sqrt(reps)
    assert ((mean - xe.grad).abs() <= 4.5 * se + 1e-9).all()
    assert not torch.allclose(grads["neumann"], grads["backprop"])  # a different estimator
    # with few terms the value is still exactly the truncated series
    short = {}
    for grad_kind in ("backprop", "neumann"):
        block = mlp_block(2, estimator="series", n_terms=3, series_grad=grad_kind)
        torch.manual_seed(4)
        short[grad_kind] = block(x0.clone().requires_grad_())[1].detach()
    torch.testing.assert_close(short["neumann"], short["backprop"], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="series_grad"):
        mlp_block(2, series_grad="exact")


# --------------------------------------------------------------------------------------------
# the image model


def _image_flow(**kwargs):
    from fastflow.nn.residual import ResidualFlowImage

    torch.manual_seed(0)
    flow = ResidualFlowImage((1, 4, 4), levels=2, blocks_per_level=2, hidden=8, coeff=0.9,
                             **kwargs).double()
    x = torch.randn(5, 1, 4, 4, dtype=torch.float64)
    from fastflow.nn import initialize_actnorm

    initialize_actnorm(flow, x)
    return flow, x


def test_image_flow_round_trip_and_exact_logdet():
    flow, x = _image_flow(tol=1e-11)
    flow.eval()
    z, _ = flow(x)
    assert z.shape == x.shape
    x2, _ = flow.inverse(z)
    torch.testing.assert_close(x2, x, rtol=1e-8, atol=1e-8)
    flow.set_estimator("exact", "exact")
    _, logdet = flow(x)
    J = torch.autograd.functional.jacobian(lambda v: flow(v[None])[0][0].reshape(-1), x[0])
    torch.testing.assert_close(logdet[0], torch.linalg.slogdet(J.reshape(16, 16))[1])
    assert flow.sample(2).shape == (2, 1, 4, 4)


def test_image_flow_state_dict_and_bad_shape():
    flow, x = _image_flow()
    flow.eval()
    other, _ = _image_flow()
    other.load_state_dict(flow.state_dict())
    other.eval()
    flow.set_estimator("exact", "exact")
    other.set_estimator("exact", "exact")
    torch.testing.assert_close(other.log_prob(x), flow.log_prob(x))
    from fastflow.nn.residual import ResidualFlowImage, residual_cnn

    with pytest.raises(ValueError, match="divisible"):
        ResidualFlowImage((1, 6, 4), levels=3)
    with pytest.raises(ValueError, match="coeff"):
        residual_cnn(2, coeff=1.0)


def test_residual_cnn_is_contractive():
    # every convolution's operator norm at the input's size (brute force) is within coeff, so
    # Lip(g) <= coeff**3 with 1-Lipschitz activations
    from fastflow.nn.lipschitz import SpectralNormConv2d
    from fastflow.nn.residual import residual_cnn

    torch.manual_seed(1)
    g = saturate(residual_cnn(2, hidden=8, coeff=0.9)).double()
    g(torch.randn(1, 2, 4, 4, dtype=torch.float64))  # sizes the 3x3 spectral norms
    g.eval()
    convs = [m for m in g if isinstance(m, SpectralNormConv2d)]
    assert [m.kernel_size for m in convs] == [3, 1, 3]
    for conv in convs:
        x = torch.zeros(conv.in_channels, 4, 4, dtype=torch.float64)
        J = torch.autograd.functional.jacobian(lambda v: conv(v[None])[0].reshape(-1), x)
        # the power iteration approaches sigma from below: allow its last 0.1%
        assert torch.linalg.matrix_norm(J.reshape(-1, x.numel()), ord=2) <= 0.9 * (1 + 1e-3)


# --------------------------------------------------------------------------------------------
# the native path (fastflow.ops.mlp_trace): MLP-structured branches


def test_mlp_structure_is_recognised_only_where_the_operators_apply():
    from fastflow.nn.lipschitz import LipSwish
    from fastflow.nn.residual import mlp_structure

    act, preact, lins, acts = mlp_structure(residual_mlp(3, hidden=8, n_hidden=2))
    assert (act, preact, len(lins), len(acts)) == ("lipswish", True, 3, 3)
    act, preact, lins, acts = mlp_structure(residual_mlp(3, hidden=8, n_hidden=1, activation="elu",
                                                         preact=False))
    assert (act, preact, len(lins), len(acts)) == ("elu", False, 2, 1)
    assert mlp_structure(nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 2))) is None
    assert mlp_structure(nn.Sequential(nn.Linear(2, 4), LipSwish(), nn.Linear(4, 2), nn.ELU())) is None
    assert mlp_structure(nn.Sequential(nn.Linear(2, 4), nn.ELU(alpha=0.5), nn.Linear(4, 2))) is None
    assert mlp_structure(nn.Sequential(nn.Linear(2, 4), nn.ELU(), nn.Linear(4, 2, bias=False))) is None
    assert mlp_structure(nn.Linear(2, 2)) is None


@pytest.mark.skipif(not fastflow.native_available(), reason="fastflow._C is not built")
@pytest.mark.parametrize("kind,kwargs", [
    ("roulette", {}), ("series", dict(series_grad="neumann", n_terms=4)),
    ("series", dict(series_grad="neumann", n_terms=1)),
])
def test_native_block_matches_the_reference_block(kind, kwargs):
    """Same draws, same values; with one term the surrogate is the value and the gradients are
    the same too (with more, native and reference are different unbiased estimators: the native
    psi is a sum of J^j v, the reference's of v^T J^j)."""
    block = mlp_block(3, estimator=kind, **kwargs)
    x = data(6, 3, torch.float64)
    out = {}
    for backend in ("native", "reference"):
        xg = x.clone().requires_grad_()
        block.zero_grad()
        torch.manual_seed(5)
        with fastflow.backend(backend):
            y, logdet = block(xg)
        (y.square().sum() + 3 * logdet.sum()).backward()
        out[backend] = (y.detach(), logdet.detach(), block.last_terms, xg.grad,
                        [p.grad.clone() for p in block.g.parameters()])
    (yn, ln, tn, gxn, gpn), (yr, lr, tr, gxr, gpr) = out["native"], out["reference"]
    torch.testing.assert_close(yn, yr, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ln, lr, rtol=1e-10, atol=1e-12)
    assert tn == tr
    if kwargs.get("n_terms") == 1:  # float64, different orders of the same sums
        torch.testing.assert_close(gxn, gxr, rtol=1e-7, atol=1e-10)
        for a, b in zip(gpn, gpr):
            torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10)


@pytest.mark.skipif(not fastflow.native_available(), reason="fastflow._C is not built")
def test_native_roulette_gradient_is_unbiased():
    """The native Neumann gradient w.r.t. x and every parameter (weights through the spectral
    norm, biases, LipSwish betas), averaged over draws, is the exact log-det's gradient."""
    block = mlp_block(2, estimator="roulette", hidden=8)
    block.eval()  # no power-iteration update between draws
    block.eval_estimator = "roulette"
    x0 = data(2, 2, torch.float64)
    reps = 1024
    x = x0.repeat_interleave(reps, 0).requires_grad_()
    torch.manual_seed(0)
    n_draws = 8
    gx = torch.zeros_like(x)
    gp = [torch.zeros_like(p) for p in block.g.parameters()]
    with fastflow.backend("native"):
        for _ in range(n_draws):
            block.zero_grad()
            x.grad = None
            block(x)[1].sum().backward()
            gx += x.grad / n_draws
            for acc, p in zip(gp, block.g.parameters()):
                acc += p.grad / n_draws
    block.eval_estimator = "exact"
    xe = x0.clone().requires_grad_()
    block.zero_grad()
    block(xe)[1].sum().backward()
    g = gx.view(2, reps, 2)
    mean, se = g.mean(1), g.std(1) / math.sqrt(reps)
    assert ((mean - xe.grad).abs() <= 4.5 * se + 1e-9).all()
    # parameters: the per-draw sums over 2 * reps samples estimate reps * the exact gradient
    for acc, p in zip(gp, block.g.parameters()):
        exact = (torch.zeros_like(p) if p.grad is None else p.grad) * reps  # last bias: no effect
        assert float((acc - exact).norm()) <= 0.1 * float(exact.norm()) + 1e-6, p.shape


@pytest.mark.skipif(not fastflow.native_available(), reason="fastflow._C is not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_native_inverse_matches_the_reference(dtype):
    block = mlp_block(4, dtype=dtype, hidden=16)
    x = data(32, 4, dtype)
    with torch.no_grad():
        y, _ = block(x)
    got = {}
    for backend in ("native", "reference"):
        with fastflow.backend(backend):
            x2, _ = block.inverse(y, tol=1e-9 if dtype == torch.float64 else 1e-6)
        got[backend] = (x2, block.last_iterations.clone(), block.last_residual.clone())
        assert bool(block.last_converged.all())
        assert float((x2.detach() - x).abs().max()) < (1e-7 if dtype == torch.float64 else 1e-4)
    assert int((got["native"][1] - got["reference"][1]).abs().max()) <= 1
    # the implicit-function gradient is unchanged by the native solve
    yg = y.clone().requires_grad_()
    with fastflow.backend("native"):
        x2, _ = block.inverse(yg, tol=1e-9 if dtype == torch.float64 else 1e-6)
    x2.sum().backward()
    assert torch.isfinite(yg.grad).all()


@pytest.mark.skipif(not fastflow.native_available(), reason="fastflow._C is not built")
def test_native_path_in_no_grad_and_inference_mode():
    block = mlp_block(3, estimator="roulette").eval()
    block.eval_estimator = "roulette"  # eval mode: no power-iteration update between the calls
    x = data(5, 3, torch.float64)
    torch.manual_seed(2)
    with torch.no_grad(), fastflow.backend("native"):
        y1, l1 = block(x)
    torch.manual_seed(2)
    with torch.inference_mode(), fastflow.backend("native"):
        y2, l2 = block(x)
    torch.manual_seed(2)
    with torch.no_grad(), fastflow.backend("reference"):
        y3, l3 = block(x)
    assert not l1.requires_grad and not l2.requires_grad
    torch.testing.assert_close(l1, l2)
    torch.testing.assert_close(l1, l3, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(y1, y3)


# --------------------------------------------------------------------------------------------
# the roulette's draw, and the MLP paths against the autograd estimators


def test_geometric_draw_and_roulette_coefficients():
    from fastflow.ops.logdet_estimators import (
        draw_geometric_n, geometric_max_n, roulette_coefficients, roulette_tail_prob,
    )

    gen = torch.Generator().manual_seed(0)
    n = torch.stack([draw_geometric_n(0.4, generator=gen) for _ in range(4000)])
    assert n.dtype == torch.int64 and n.shape == (4000,) and int(n.min()) >= 1
    for m in (1, 2, 3, 5):  # P(N >= m) = 0.6^(m-1), within 4.5 standard errors
        p_m = 0.6 ** (m - 1)
        assert abs(float((n >= m).double().mean()) - p_m) <= 4.5 * math.sqrt(p_m * (1 - p_m) / 4000) + 1e-9
    # the same seed, the same draw; the cap is the largest value the draw can take
    torch.manual_seed(3)
    a = draw_geometric_n(0.5)
    torch.manual_seed(3)
    assert torch.equal(a, draw_geometric_n(0.5))
    assert geometric_max_n(0.5) == 54 and geometric_max_n(1.0) == 1
    assert int(torch.stack([draw_geometric_n(0.1, max_n=3) for _ in range(50)]).max()) <= 3
    assert int(draw_geometric_n(1.0)) == 1
    # the weights of logdet_roulette for N = 3 after 2 exact terms, zero past them
    value, psi = roulette_coefficients(torch.tensor(3), n_exact=2, p=0.5)
    assert value.shape == psi.shape == (2 + 54,) and value.dtype == torch.float64
    want_v = [(-1) ** (k + 1) / k / roulette_tail_prob(k - 2, "geometric", 0.5) for k in range(1, 6)]
    want_p = [(-1) ** j / roulette_tail_prob(j - 1, "geometric", 0.5) for j in range(5)]
    assert value[:5].tolist() == want_v and psi[:5].tolist() == want_p
    assert not value[5:].any() and not psi[5:].any()
    with pytest.raises(ValueError, match="n_random must be a 0-d tensor"):
        roulette_coefficients(3, n_exact=2)
    with pytest.raises(ValueError, match="max_n"):
        draw_geometric_n(0.5, max_n=0)
    with pytest.raises(ValueError, match="geometric p"):
        draw_geometric_n(1.5)


@pytest.mark.parametrize("kind,kwargs", [
    ("exact", {}), ("series", dict(n_terms=4)), ("series", dict(n_terms=3, n_probes=2)),
])
@pytest.mark.parametrize("train", [True, False])
def test_mlp_paths_match_the_autograd_estimators(kind, kwargs, train):
    """The exact log-det by the forward-mode Jacobian and the series with the backpropagated
    gradient by forward-mode products (MLP-structured branch) give the autograd estimators'
    values, gradients (x and every parameter) and spectral-norm state, with the same probes."""
    block = mlp_block(3, estimator=kind, eval_estimator=kind, **kwargs).train(train)
    _compare_with_autograd_path(block, data(6, 3, torch.float64))


# --------------------------------------------------------------------------------------------
# convolutional branches: the autograd estimators' numbers by transposed convolutions


def conv_block(estimator, **kwargs):
    torch.manual_seed(0)
    from fastflow.nn.residual import residual_cnn

    block = iResBlock(residual_cnn(2, hidden=4, coeff=0.9), estimator, estimator, **kwargs).double()
    block(torch.randn(2, 2, 4, 4, dtype=torch.float64))  # the 3x3 spectral norms are sized
    return block


def _compare_with_autograd_path(block, x, rtol=1e-9):
    """The block against a copy whose branch is hidden from the structured paths (the autograd
    estimators), same seed: outputs, last_terms, gradients (x and every parameter), state."""
    import copy

    other = copy.deepcopy(block)
    other.g = _Wrapped(other.g)
    out = []
    for b in (block, other):
        xg = x.clone().requires_grad_()
        torch.manual_seed(5)
        y, logdet = b(xg)
        (y.square().sum() + 3 * logdet.sum()).backward()
        out.append((y.detach(), logdet.detach(), b.last_terms, xg.grad,
                    [p.grad for p in b.parameters()], [t.clone() for t in b.buffers()]))
    (y1, l1, t1, gx1, gp1, s1), (y2, l2, t2, gx2, gp2, s2) = out
    torch.testing.assert_close(y1, y2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(l1, l2, rtol=rtol, atol=1e-11)
    assert t1 == t2
    torch.testing.assert_close(gx1, gx2, rtol=rtol, atol=1e-11)
    for a, b in zip(gp1 + s1, gp2 + s2):
        torch.testing.assert_close(a, b, rtol=rtol, atol=1e-11)


@pytest.mark.parametrize("kind,kwargs", [
    ("exact", {}),
    ("series", dict(n_terms=3)),
    ("series", dict(n_terms=3, series_grad="neumann", n_probes=2)),
    ("roulette", {}),
    ("roulette", dict(n_probes=2, probe="rademacher")),
    ("roulette", dict(neumann_grad=False)),
])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("compiling", [False, True], ids=["eager", "graph-path"])
def test_conv_paths_match_the_autograd_estimators(kind, kwargs, train, compiling, monkeypatch):
    """A convolutional branch (residual_cnn) runs the autograd estimators' computation with its
    vector-Jacobian products as transposed convolutions: the same values, draws, gradients
    and spectral-norm state. ``graph-path``: the path a compiled graph takes (the draw as a
    tensor, the Neumann surrogate on the products), run eagerly."""
    import fastflow.nn.residual as residual

    if compiling:
        monkeypatch.setattr(residual, "_compiling", lambda: True)
    block = conv_block(kind, **kwargs).train(train)
    _compare_with_autograd_path(block, torch.randn(3, 2, 4, 4, dtype=torch.float64))


@pytest.mark.parametrize("kind,kwargs", [
    ("roulette", dict(n_probes=2)), ("series", dict(n_terms=3, series_grad="neumann")),
])
@pytest.mark.parametrize("train", [True, False])
def test_mlp_neumann_products_without_the_native_operator(kind, kwargs, train, monkeypatch):
    """The path a compiled graph takes for an MLP branch's Neumann gradients where the native
    operator is not used (fastflow.backend("reference")): the surrogate on the MLP's
    products, run eagerly, against the autograd estimators."""
    import fastflow.nn.residual as residual

    monkeypatch.setattr(residual, "_compiling", lambda: True)
    block = mlp_block(3, estimator=kind, eval_estimator=kind, **kwargs).train(train)
    with fastflow.backend("reference"):
        assert block._mlp_route(kind, data(6, 3, torch.float64), True) == "neumann"
        _compare_with_autograd_path(block, data(6, 3, torch.float64))


def test_mlp_roulette_backprop_matches_the_autograd_estimator():
    """The MLP branch's roulette with the backpropagated gradient (forward-mode products in
    PyTorch operations) against the autograd estimator."""
    block = mlp_block(3, estimator="roulette", eval_estimator="roulette", neumann_grad=False,
                      n_probes=2)
    _compare_with_autograd_path(block, data(6, 3, torch.float64))


def test_conv_structure_and_products():
    """conv_structure takes what the transposed convolution inverts (stride 1, "same" padding,
    no groups or dilation) and nothing else; the linearisation's J t, J^T u and Jacobian
    equal autograd's."""
    from fastflow.nn._branch_products import ConvLinearization, conv_structure
    from fastflow.nn.lipschitz import LipSwish
    from fastflow.nn.residual import residual_cnn

    torch.manual_seed(0)
    conv = lambda **kw: nn.Conv2d(2, 2, 3, padding=1, **kw)  # noqa: E731
    good = nn.Sequential(nn.Tanh(), conv(), nn.ELU(), nn.Conv2d(2, 2, (1, 3), padding=(0, 1)),
                         nn.Softplus(), conv(bias=False))
    assert conv_structure(good) is not None and len(conv_structure(good)) == 3
    assert conv_structure(residual_cnn(2, hidden=4)) is not None
    bad = [
        nn.Sequential(nn.Conv2d(2, 2, 3, padding=1, stride=2)),
        nn.Sequential(nn.Conv2d(2, 2, 3, padding=2, dilation=2)),
        nn.Sequential(nn.Conv2d(2, 2, 3, padding=1, groups=2)),
        nn.Sequential(nn.Conv2d(2, 2, 3, padding=0)),
        nn.Sequential(nn.Conv2d(2, 2, 3, padding=1, padding_mode="circular")),
        nn.Sequential(nn.Conv2d(2, 2, 2, padding="same")),
        nn.Sequential(conv(), nn.Tanh()),  # a trailing activation
        nn.Sequential(conv(), nn.Tanh(), nn.ELU(), conv()),  # two activations in a row
        nn.Sequential(conv(), nn.ReLU(), conv()),  # an activation the products do not know
        nn.Sequential(conv(), nn.BatchNorm2d(2)),
        conv(),
    ]
    for g in bad:
        assert conv_structure(g) is None, g
    g = nn.Sequential(LipSwish(), conv(), nn.ELU(), conv()).double()
    x = torch.randn(3, 2, 4, 5, dtype=torch.float64)
    lin = ConvLinearization(conv_structure(g), x)
    torch.testing.assert_close(lin.out, g(x))
    t = torch.randn(2, 3, 2, 4, 5, dtype=torch.float64)  # two tangents per sample
    for p in range(2):
        _, jt = torch.func.jvp(g, (x,), (t[p],))
        torch.testing.assert_close(lin.jvp(t)[p], jt)
        _, vjp = torch.func.vjp(g, x)
        torch.testing.assert_close(lin.vjp(t)[p], vjp(t[p])[0])
    J = torch.autograd.functional.jacobian(lambda v: g(v[None])[0], x[0]).reshape(40, 40)
    torch.testing.assert_close(lin.jacobian()[0], J)


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("loops", [True, False])
def test_power_sums_with_a_tensor_count(grad, loops):
    """power_sums with the count as a tensor (the compiled roulette: a while_loop with autograd
    off, every capped product with zero weights past the draw with autograd on or with
    ``loops=False``) equals the Python loop: values, psi, and gradients."""
    from fastflow.nn._branch_products import power_sums
    from fastflow.ops.logdet_estimators import roulette_coefficients

    torch.manual_seed(0)
    A = (0.3 * torch.randn(3, 3, dtype=torch.float64)).requires_grad_()
    probes = torch.randn(2, 4, 3, dtype=torch.float64)
    apply = lambda u: u @ A.T  # noqa: E731
    for n_random in (1, 3, 7, 54):  # 54: the cap (p = 0.5)
        value_t, psi_t = roulette_coefficients(torch.tensor(n_random), 2)
        n = n_random + 2
        with torch.set_grad_enabled(grad):
            want, want_psi = power_sums(apply, probes, value_t[:n].tolist(), n,
                                        None if grad else psi_t[:n].tolist())
            got, got_psi = power_sums(apply, probes, value_t, torch.tensor(n),
                                      None if grad else psi_t, loops=loops)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
        if grad:
            (ga,) = torch.autograd.grad(got.sum(), A)
            (wa,) = torch.autograd.grad(want.sum(), A)
            torch.testing.assert_close(ga, wa, rtol=1e-12, atol=1e-14)
        else:
            torch.testing.assert_close(got_psi, want_psi, rtol=1e-12, atol=1e-14)
    if grad:
        with pytest.raises(ValueError, match="psi_coeffs"):
            power_sums(apply, probes, value_t, torch.tensor(3), psi_t)
