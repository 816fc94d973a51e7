"""Tests of the continuous normalizing flows: the dynamics nets (vector and convolutional), the
divergence functions, the CNF layer on vectors and on images (log-det against the brute-force
Jacobian of the flow map, round trip, Hutchinson unbiasedness, adjoint against direct gradients)
and the FFJORD model (density integrates to 1)."""

from __future__ import annotations

import io

import pytest
import torch

pytest.importorskip("torchdiffeq")

import fastflow  # noqa: E402
from fastflow.nn.continuous import (  # noqa: E402
    CNF,
    FFJORD,
    ConcatConv2d,
    ConcatLinear,
    ConcatSquashConv2d,
    ConcatSquashLinear,
    ODEConvNet,
    ODEnet,
    divergence_exact,
    divergence_hutchinson,
)

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64


def _tiny_cnf(D=3, **kwargs) -> CNF:
    torch.manual_seed(1)
    kwargs.setdefault("hidden", (8, 8))
    cnf = CNF(D, **kwargs).double()
    with torch.no_grad():
        for p in cnf.net.parameters():
            p.mul_(2.5)  # a flow map far enough from the identity to test something
    return cnf


# -- dynamics nets ----------------------------------------------------------------------------


def test_concatsquash_formula():
    torch.manual_seed(0)
    layer = ConcatSquashLinear(3, 4).double()
    h, t = torch.randn(5, 3, dtype=F64), torch.tensor(0.7, dtype=F64)
    expected = (h @ layer.linear.weight.T + layer.linear.bias) * torch.sigmoid(
        0.7 * layer.hyper_gate.weight[:, 0] + layer.hyper_gate.bias
    ) + 0.7 * layer.hyper_bias.weight[:, 0]
    torch.testing.assert_close(layer(t, h), expected)
    assert layer.hyper_bias.bias is None


def test_concat_layer_and_odenet_shapes():
    torch.manual_seed(0)
    h = torch.randn(5, 3)
    assert ConcatLinear(3, 4)(0.2, h).shape == (5, 4)
    for layer in ("concatsquash", "concat"):
        for act in ("tanh", "softplus"):
            net = ODEnet(3, hidden=(8, 6), activation=act, layer=layer)
            assert len(net.layers) == 3
            assert net(torch.tensor(0.1), h).shape == (5, 3)
    # time enters the output
    net = ODEnet(3, hidden=8)
    assert not torch.allclose(net(0.0, h), net(1.0, h))


# -- divergence -------------------------------------------------------------------------------


def test_divergence_exact_matches_jacobian_trace():
    torch.manual_seed(0)
    net = ODEnet(4, hidden=(8,)).double()
    z = torch.randn(3, 4, dtype=F64, requires_grad=True)
    div = divergence_exact(net(0.3, z), z)
    J = torch.stack([torch.autograd.functional.jacobian(lambda v: net(0.3, v[None])[0], zi) for zi in z])
    torch.testing.assert_close(div, J.diagonal(dim1=1, dim2=2).sum(-1))
    # differentiable (create_graph): a gradient w.r.t. the weights exists
    div.sum().backward()
    assert net.layers[0].linear.weight.grad is not None


@pytest.mark.parametrize("probe", ["gaussian", "rademacher"])
def test_divergence_hutchinson_is_unbiased(probe):
    torch.manual_seed(0)
    net = ODEnet(4, hidden=(8,)).double()
    z0 = torch.randn(1, 4, dtype=F64)
    n = 4000
    z = z0.expand(n, 4).clone().requires_grad_(True)
    eps = torch.randn(n, 4, dtype=F64) if probe == "gaussian" else torch.randint(0, 2, (n, 4)).to(F64) * 2 - 1
    f = net(0.3, z)
    est = divergence_hutchinson(f, z, eps)
    exact = divergence_exact(f, z)[0]
    se = est.std() / n**0.5
    assert abs(est.mean() - exact) < 4 * se + 1e-12
    with pytest.raises(ValueError, match="eps"):
        divergence_hutchinson(f, z, eps[:, :2])


def test_divergence_argument_checks():
    z = torch.randn(3, 2)
    with pytest.raises(ValueError, match="z must require grad"):
        divergence_exact(z * 2, z)
    zr = z.clone().requires_grad_(True)
    with pytest.raises(ValueError, match="f_out"):
        divergence_exact(zr[:, :1], zr)


# -- the CNF layer ----------------------------------------------------------------------------


def test_logdet_matches_bruteforce_jacobian():
    cnf = _tiny_cnf(3, T=1.5, estimator="exact", atol=1e-8, rtol=1e-8, adjoint=False)
    x = torch.randn(3, 3, dtype=F64)
    z, logdet = cnf(x)
    assert z.shape == x.shape and logdet.shape == (3,)
    assert (z - x).abs().max() > 0.1 and logdet.abs().min() > 0.05  # far from the identity
    for i in range(3):
        J = torch.autograd.functional.jacobian(lambda v: cnf(v[None])[0][0], x[i])
        torch.testing.assert_close(logdet[i], torch.linalg.slogdet(J)[1], atol=1e-6, rtol=1e-6)


def test_round_trip_and_inverse_logdet():
    cnf = _tiny_cnf(3, estimator="exact", atol=1e-8, rtol=1e-8)
    x = torch.randn(6, 3, dtype=F64)
    with torch.no_grad():
        z, logdet = cnf(x)
        x2, logdet_inv = cnf.inverse(z)
    torch.testing.assert_close(x2, x, atol=1e-6, rtol=0)
    torch.testing.assert_close(logdet_inv, -logdet, atol=1e-6, rtol=0)
    assert cnf.last_nfe > 0


def test_hutchinson_logdet_averages_to_exact():
    cnf = _tiny_cnf(3, estimator="hutchinson", atol=1e-6, rtol=1e-6)
    x0 = torch.randn(1, 3, dtype=F64)
    n = 2000  # one solve: every row has its own probe
    with torch.no_grad():
        _, est = cnf(x0.expand(n, 3))
        cnf.estimator = "exact"
        _, exact = cnf(x0)
    assert cnf.last_estimator == "exact"
    se = est.std() / n**0.5
    assert se > 0
    assert abs(est.mean() - exact[0]) < 4 * se


@pytest.mark.parametrize("estimator", ["exact", "hutchinson"])
def test_adjoint_and_direct_gradients_agree(estimator):
    x = torch.randn(4, 2, dtype=F64)
    grads = []
    for adjoint in (True, False):
        cnf = _tiny_cnf(2, estimator=estimator, atol=1e-8, rtol=1e-8, adjoint=adjoint)
        xi = x.clone().requires_grad_(True)
        torch.manual_seed(5)  # the same probes in both runs
        z, logdet = cnf(xi)
        (z.pow(2).sum() - logdet.sum()).backward()
        assert cnf.last_nfe_backward > 0 if adjoint else cnf.last_nfe_backward == 0
        grads.append([xi.grad] + [p.grad for p in cnf.parameters()])
    assert all(g is not None for g in grads[0])  # x, the net's weights and sqrt_T
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert any(n == "sqrt_T" for n, _ in cnf.named_parameters())


def test_end_time_is_learned_or_fixed():
    cnf = CNF(2, hidden=(8,), T=0.7)
    assert torch.isclose(cnf.end_time, torch.tensor(0.7))
    assert "sqrt_T" in dict(cnf.named_parameters())
    fixed = CNF(2, hidden=(8,), T=0.7, train_T=False)
    assert "sqrt_T" not in dict(fixed.named_parameters()) and "sqrt_T" in fixed.state_dict()


def test_eval_estimator_defaults_and_switching():
    cnf = CNF(2, hidden=(8,))
    assert cnf.active_estimator() == "hutchinson"
    cnf.eval()
    assert cnf.active_estimator() == "exact"  # D = 2 <= exact_max_dim
    big = CNF(5, hidden=(8,)).eval()
    assert big.active_estimator() == "hutchinson"
    big.eval_estimator = "exact"
    assert big.active_estimator() == "exact"
    with pytest.raises(ValueError, match="estimator"):
        cnf.estimator = "roulette"
    # the kind is not part of the state dict
    assert CNF(2, hidden=(8,), estimator="exact").state_dict().keys() == CNF(2, hidden=(8,)).state_dict().keys()


def test_fixed_step_solver_and_no_grad_modes():
    cnf = _tiny_cnf(2, estimator="exact", solver="rk4", step_size=0.05)
    x = torch.randn(5, 2, dtype=F64)
    z, logdet = cnf(x)
    assert cnf.last_nfe == 4 * 10  # T = 0.5, 10 steps of rk4
    ref = _tiny_cnf(2, estimator="exact", atol=1e-8, rtol=1e-8)
    z_ref, logdet_ref = ref(x)
    torch.testing.assert_close(z, z_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(logdet, logdet_ref, atol=1e-5, rtol=0)
    with torch.no_grad():
        z1, l1 = cnf(x)
    with torch.inference_mode():
        z2, l2 = cnf(x)
    assert not z1.requires_grad and not l1.requires_grad and not l2.requires_grad
    torch.testing.assert_close(l1, logdet.detach())
    torch.testing.assert_close(l2, logdet.detach())


@pytest.mark.parametrize("adjoint", [False, True])
def test_regularisers(adjoint):
    cnf = _tiny_cnf(2, kinetic=True, jacobian_frobenius=True, adjoint=adjoint)
    x = torch.randn(4, 2, dtype=F64)
    z, logdet = cnf(x)
    assert cnf.last_kinetic.shape == (4,) and (cnf.last_kinetic > 0).all()
    assert cnf.last_jacobian_frobenius.shape == (4,) and (cnf.last_jacobian_frobenius >= 0).all()
    (cnf.last_kinetic.mean() + cnf.last_jacobian_frobenius.mean()).backward()
    assert cnf.net.layers[0].linear.weight.grad is not None
    cnf.eval()
    with torch.no_grad():
        cnf(x)
    assert cnf.last_kinetic is None and cnf.last_jacobian_frobenius is None


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_raises_before_integrating(bad):
    cnf = CNF(2, hidden=(8,))
    x = torch.randn(3, 2)
    x[1, 0] = bad
    with pytest.raises(ValueError, match="non-finite"):
        cnf(x)
    assert cnf.last_nfe is None  # nothing was integrated
    with pytest.raises(ValueError, match="non-finite"):
        cnf.inverse(x)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(features=0), "features"),
        (dict(features=2, T=0.0), "T"),
        (dict(features=2, T=-1.0), "T"),
        (dict(features=2, estimator="series"), "estimator"),
        (dict(features=2, eval_estimator="x"), "eval_estimator"),
        (dict(features=2, probe="uniform"), "probe"),
        (dict(features=2, solver="leapfrog"), "solver"),
        (dict(features=2, solver="rk4"), "step_size"),
        (dict(features=2, atol=0), "atol"),
        (dict(features=2, rtol=-1e-5), "rtol"),
        (dict(features=2, hidden=(8, 0)), "hidden"),
        (dict(features=2, activation="relu"), "activation"),
        (dict(features=2, layer="conv"), "layer"),
        (dict(features=2, exact_max_dim=-1), "exact_max_dim"),
        (dict(features=2, net=lambda t, z: z), "net"),
        (dict(features=2, adjoint="yes"), "adjoint"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, name):
    with pytest.raises(ValueError, match=name):
        CNF(**kwargs)


def test_bad_input_shape_names_argument():
    cnf = CNF(2, hidden=(8,))
    with pytest.raises(ValueError, match="x must have shape"):
        cnf(torch.randn(3, 3))
    with pytest.raises(ValueError, match="z must have shape"):
        cnf.inverse(torch.randn(3))


def test_state_dict_round_trip():
    torch.manual_seed(0)
    flow = FFJORD(2, n_blocks=2, hidden=(8,), T=0.3)
    keys = set(flow.state_dict())
    flow.log_prob(torch.randn(3, 2)).sum().backward()
    assert set(flow.state_dict()) == keys  # a call leaves no extra state behind
    buf = io.BytesIO()
    torch.save(flow.state_dict(), buf)
    buf.seek(0)
    other = FFJORD(2, n_blocks=2, hidden=(8,), estimator="exact")
    other.load_state_dict(torch.load(buf))
    x = torch.randn(5, 2)
    flow.eval(), other.eval()
    with torch.no_grad():
        torch.testing.assert_close(flow.log_prob(x), other.log_prob(x))
    assert torch.isclose(other.transform[0].end_time, torch.tensor(0.3))


# -- the model --------------------------------------------------------------------------------


def test_ffjord_density_integrates_to_one():
    torch.manual_seed(0)
    flow = FFJORD(2, hidden=(8, 8), atol=1e-5, rtol=1e-5).double().eval()
    with torch.no_grad():
        for p in flow.transform[0].net.parameters():
            p.mul_(1.5)
        n, L = 80, 7.0
        g = torch.linspace(-L, L, n, dtype=F64)
        grid = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
        logp = flow.log_prob(grid)
    assert flow.transform[0].last_estimator == "exact"
    mass = logp.exp().sum() * (g[1] - g[0]) ** 2
    assert abs(mass.item() - 1.0) < 1e-3


def test_ffjord_sample_and_nfe():
    torch.manual_seed(0)
    flow = FFJORD(2, n_blocks=2, hidden=(8,))
    x, logp = flow.sample_and_log_prob(6)
    assert x.shape == (6, 2) and logp.shape == (6,)
    assert flow.last_nfe > 0
    assert isinstance(flow, fastflow.Flow)
    with pytest.raises(ValueError, match="n_blocks"):
        FFJORD(2, n_blocks=0)


class _Linear(torch.nn.Module):
    # f(t, z) = A z + c: z(T) = expm(T A) x + ..., log|det dz/dx| = T tr(A), kinetic known for A = 0
    def __init__(self, A, c):
        super().__init__()
        self.A = torch.nn.Parameter(A)
        self.c = torch.nn.Parameter(c)

    def forward(self, t, z):
        return z @ self.A.T + self.c


@pytest.mark.parametrize("estimator", ["exact", "hutchinson"])
def test_linear_dynamics_closed_form(estimator):
    torch.manual_seed(0)
    A = torch.randn(3, 3, dtype=F64) * 0.5
    cnf = CNF(3, net=_Linear(A, torch.zeros(3, dtype=F64)), T=0.8, estimator=estimator,
              atol=1e-9, rtol=1e-9).double()
    x = torch.randn(4, 3, dtype=F64)
    with torch.no_grad():
        z, logdet = cnf(x)
    torch.testing.assert_close(z, x @ torch.linalg.matrix_exp(0.8 * A).T, atol=1e-7, rtol=0)
    if estimator == "exact":  # Hutchinson is exact only in expectation
        torch.testing.assert_close(logdet, torch.full((4,), 0.8 * A.trace().item(), dtype=F64))
    # constant velocity: kinetic energy int_0^T |c|^2 dt = T |c|^2, zero log-det
    c = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    cnf = CNF(3, net=_Linear(torch.zeros(3, 3, dtype=F64), c), T=0.8, kinetic=True).double()
    z, logdet = cnf(x)
    torch.testing.assert_close(z, x + 0.8 * c)
    torch.testing.assert_close(cnf.last_kinetic, torch.full((4,), 0.8 * c.pow(2).sum().item(), dtype=F64))
    torch.testing.assert_close(logdet, torch.zeros(4, dtype=F64))


# -- convolutional dynamics (images) ------------------------------------------------------------


def _tiny_image_cnf(shape=(1, 3, 3), **kwargs) -> CNF:
    torch.manual_seed(1)
    kwargs.setdefault("hidden", (4, 4))
    cnf = CNF(shape, **kwargs).double()
    with torch.no_grad():
        for p in cnf.net.parameters():
            p.mul_(2.0)  # a flow map far enough from the identity to test something
    return cnf


def test_concatsquash_conv_formula():
    torch.manual_seed(0)
    layer = ConcatSquashConv2d(2, 3).double()
    h, t = torch.randn(4, 2, 5, 6, dtype=F64), torch.tensor(0.7, dtype=F64)
    gate = torch.sigmoid(0.7 * layer.hyper_gate.weight[:, 0] + layer.hyper_gate.bias)
    conv = torch.nn.functional.conv2d(h, layer.conv.weight, layer.conv.bias, padding=1)
    expected = conv * gate.view(1, 3, 1, 1) + 0.7 * layer.hyper_bias.weight[:, 0].view(1, 3, 1, 1)
    torch.testing.assert_close(layer(t, h), expected)
    assert layer.hyper_bias.bias is None
    # concat: the time is one more input channel, constant over the pixels
    cat = ConcatConv2d(2, 3, kernel_size=5).double()
    t_channel = torch.full((4, 1, 5, 6), 0.7, dtype=F64)
    expected = torch.nn.functional.conv2d(torch.cat([t_channel, h], 1), cat.conv.weight, cat.conv.bias, padding=2)
    torch.testing.assert_close(cat(0.7, h), expected)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_odeconvnet_shapes_and_time(dtype):
    torch.manual_seed(0)
    z = torch.randn(2, 3, 5, 4, dtype=dtype)
    for layer in ("concatsquash", "concat"):
        for act in ("tanh", "softplus"):
            net = ODEConvNet(3, hidden=(6, 5), activation=act, layer=layer).to(dtype)
            assert len(net.layers) == 3 and net.layers[1].in_channels == 6
            out = net(torch.tensor(0.1), z)
            assert out.shape == z.shape and out.dtype == dtype
            assert not torch.allclose(net(0.0, z), net(1.0, z))  # time enters the output
            act_fn = torch.tanh if act == "tanh" else torch.nn.functional.softplus
            h = act_fn(net.layers[1](0.1, act_fn(net.layers[0](0.1, z))))
            torch.testing.assert_close(out, net.layers[2](0.1, h))  # activation on all but the last
    net = ODEConvNet(3, hidden=4, kernel_size=5)
    assert [tuple(m.conv.weight.shape) for m in net.layers] == [(4, 3, 5, 5), (3, 4, 5, 5)]
    assert ODEConvNet(3, hidden=4).layers[0].conv.weight.shape[-2:] == (3, 3)
    assert ConcatSquashConv2d(3, 4, kernel_size=1).to(dtype)(0.0, z).shape == (2, 4, 5, 4)
    assert ConcatConv2d(3, 4, kernel_size=3, padding=0).to(dtype)(0.0, z).shape == (2, 4, 3, 2)


def _brute_force_trace(net, t, z):
    traces = []
    for zi in z:
        J = torch.autograd.functional.jacobian(lambda v: net(t, v[None])[0], zi)
        traces.append(J.reshape(zi.numel(), zi.numel()).trace())
    return torch.stack(traces)


@pytest.mark.parametrize("layer", ["concatsquash", "concat"])
def test_conv_divergence_exact_matches_jacobian_trace(layer):
    torch.manual_seed(0)
    net = ODEConvNet(2, hidden=(5,), activation="softplus", layer=layer).double()
    z = torch.randn(3, 2, 3, 4, dtype=F64, requires_grad=True)
    div = divergence_exact(net(0.3, z), z)
    assert div.shape == (3,)
    torch.testing.assert_close(div, _brute_force_trace(net, 0.3, z.detach()))
    div.sum().backward()  # create_graph: differentiable w.r.t. the conv weights
    assert net.layers[0].conv.weight.grad is not None


@pytest.mark.parametrize("probe", ["gaussian", "rademacher"])
def test_conv_divergence_hutchinson_is_unbiased(probe):
    torch.manual_seed(0)
    net = ODEConvNet(1, hidden=(6,)).double()
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(2.0)
    z0 = torch.randn(1, 1, 3, 3, dtype=F64)
    n = 4000
    z = z0.expand(n, 1, 3, 3).clone().requires_grad_(True)
    shape = (n, 1, 3, 3)
    eps = torch.randn(shape, dtype=F64) if probe == "gaussian" else torch.randint(0, 2, shape).to(F64) * 2 - 1
    f = net(0.3, z)
    est = divergence_hutchinson(f, z, eps)
    exact = divergence_exact(f, z)[0]
    torch.testing.assert_close(exact, _brute_force_trace(net, 0.3, z0)[0])
    se = est.std() / n**0.5
    assert se > 0 and abs(est.mean() - exact) < 4 * se
    with pytest.raises(ValueError, match="eps"):
        divergence_hutchinson(f, z, eps.reshape(n, 9))


def test_image_cnf_logdet_matches_bruteforce_jacobian():
    cnf = _tiny_image_cnf((1, 2, 3), T=1.0, estimator="exact", atol=1e-8, rtol=1e-8, adjoint=False)
    assert isinstance(cnf.net, ODEConvNet)
    x = torch.randn(2, 1, 2, 3, dtype=F64)
    z, logdet = cnf(x)
    assert z.shape == x.shape and logdet.shape == (2,)
    assert (z - x).abs().max() > 0.1 and logdet.abs().min() > 0.05  # far from the identity
    for i in range(2):
        J = torch.autograd.functional.jacobian(lambda v: cnf(v[None])[0][0], x[i]).reshape(6, 6)
        torch.testing.assert_close(logdet[i], torch.linalg.slogdet(J)[1], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("estimator", ["exact", "hutchinson"])
def test_image_cnf_round_trip(estimator):
    cnf = _tiny_image_cnf((2, 3, 3), estimator=estimator, atol=1e-8, rtol=1e-8)
    x = torch.randn(4, 2, 3, 3, dtype=F64)
    with torch.no_grad():
        z, logdet = cnf(x)
        x2, logdet_inv = cnf.inverse(z)
    assert z.shape == x.shape and (z - x).abs().max() > 0.1
    torch.testing.assert_close(x2, x, atol=1e-6, rtol=0)
    if estimator == "exact":  # Hutchinson draws fresh probes per solve
        torch.testing.assert_close(logdet_inv, -logdet, atol=1e-6, rtol=0)
    assert cnf.last_estimator == estimator and cnf.last_nfe > 0


def test_image_cnf_hutchinson_averages_to_exact():
    cnf = _tiny_image_cnf((1, 2, 2), estimator="hutchinson", atol=1e-6, rtol=1e-6)
    x0 = torch.randn(1, 1, 2, 2, dtype=F64)
    n = 2000  # one solve: every sample has its own probe
    with torch.no_grad():
        _, est = cnf(x0.expand(n, 1, 2, 2))
        cnf.estimator = "exact"
        _, exact = cnf(x0)
    se = est.std() / n**0.5
    assert se > 0 and abs(est.mean() - exact[0]) < 4 * se


def test_image_cnf_gradients_float32_and_adjoint():
    torch.manual_seed(0)
    x = torch.randn(3, 1, 4, 4)
    grads = []
    for adjoint in (True, False):
        torch.manual_seed(1)
        cnf = CNF((1, 4, 4), hidden=(4,), adjoint=adjoint, atol=1e-6, rtol=1e-6)
        torch.manual_seed(5)  # the same probes in both runs
        z, logdet = cnf(x)
        assert z.dtype == torch.float32 and logdet.dtype == torch.float32
        (0.5 * z.pow(2).sum() - logdet.sum()).backward()
        assert cnf.last_nfe_backward > 0 if adjoint else cnf.last_nfe_backward == 0
        grads.append([p.grad for p in cnf.parameters()])
    assert all(g is not None and torch.isfinite(g).all() for g in grads[0])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=2e-3)


def test_image_cnf_eval_estimator_follows_image_size():
    cnf = CNF((1, 4, 4), hidden=(4,)).eval()
    assert cnf.features == 16 and cnf.active_estimator() == "hutchinson"
    assert CNF((1, 4, 4), hidden=(4,), exact_max_dim=16).eval().active_estimator() == "exact"
    assert CNF((1, 2, 2), hidden=(4,), exact_max_dim=4).eval().active_estimator() == "exact"


def test_image_ffjord_state_dict_round_trip_and_sample():
    torch.manual_seed(0)
    flow = FFJORD((1, 3, 3), n_blocks=2, hidden=(4,), T=0.3)
    keys = set(flow.state_dict())
    x = torch.randn(3, 1, 3, 3)
    flow.log_prob(x).sum().backward()
    assert set(flow.state_dict()) == keys
    buf = io.BytesIO()
    torch.save(flow.state_dict(), buf)
    buf.seek(0)
    other = FFJORD((1, 3, 3), n_blocks=2, hidden=(4,))
    other.load_state_dict(torch.load(buf))
    flow.eval(), other.eval()
    for f in (flow, other):
        for b in f.blocks:
            b.eval_estimator = "exact"
    with torch.no_grad():
        torch.testing.assert_close(flow.log_prob(x), other.log_prob(x))
        assert other.sample(2).shape == (2, 1, 3, 3)
    assert torch.isclose(other.transform[0].end_time, torch.tensor(0.3))
    assert flow.event_shape == (1, 3, 3)


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda: ConcatSquashConv2d(0, 4), "in_channels"),
        (lambda: ConcatConv2d(3, 0), "out_channels"),
        (lambda: ConcatSquashConv2d(3, 4, kernel_size=0), "kernel_size"),
        (lambda: ConcatSquashConv2d(3, 4, kernel_size=2), "kernel_size"),
        (lambda: ConcatConv2d(3, 4, padding=-1), "padding"),
        (lambda: ODEConvNet(0), "channels"),
        (lambda: ODEConvNet(1, hidden=(4, 0)), "hidden"),
        (lambda: ODEConvNet(1, activation="relu"), "activation"),
        (lambda: ODEConvNet(1, layer="linear"), "layer"),
        (lambda: ODEConvNet(1, kernel_size=4), "kernel_size"),
        (lambda: CNF((1, 0, 4)), "features"),
        (lambda: CNF((4, 4)), "features"),
        (lambda: CNF("1x4x4"), "features"),
        (lambda: FFJORD((1, -4, 4)), "features"),
    ],
)
def test_conv_bad_arguments_name_themselves(make, name):
    with pytest.raises(ValueError, match=name):
        make()


def test_conv_bad_inputs_name_the_argument():
    layer = ConcatSquashConv2d(3, 4)
    with pytest.raises(ValueError, match=r"h must be a tensor \[B, 3, H, W\]"):
        layer(0.1, torch.randn(2, 2, 5, 5))
    with pytest.raises(ValueError, match="h must be"):
        ConcatConv2d(3, 4)(0.1, torch.randn(3, 5, 5))
    with pytest.raises(ValueError, match="t must be a scalar"):
        layer(torch.zeros(2), torch.randn(2, 3, 5, 5))
    with pytest.raises(ValueError, match="z must be"):
        ODEConvNet(1, hidden=(4,))(0.0, torch.randn(2, 4, 4))
    cnf = CNF((1, 4, 4), hidden=(4,))
    with pytest.raises(ValueError, match=r"x must have shape \[batch, 1, 4, 4\]"):
        cnf(torch.randn(2, 1, 4, 5))
    with pytest.raises(ValueError, match="z must have shape"):
        cnf.inverse(torch.randn(2, 16))
    x = torch.randn(2, 1, 4, 4)
    x[1, 0, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        cnf(x)
    assert cnf.last_nfe is None


# -- the benchmark case (python -m bench --filter ffjord) ---------------------------------------


def test_bench_case_runs_and_records_nfe(capsys):
    # tiny workload: checks the machinery and the NFE bookkeeping, says nothing about speed
    import os
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in sys.path:
        sys.path.insert(0, root)
    from bench import harness
    from bench.cases import ffjord as case

    cpu = torch.device("cpu")
    group, eval_group, image_group = case.groups(cpu, torch.float32, quick=True)
    assert group.case.startswith("ffjord/") and set(group.impls) == {"native", "reference", "zuko"}
    assert (group.pass_, eval_group.pass_) == ("train-step", "eval-nll")
    # the image group: compiled (native; its compilation is not repeated here) against eager
    assert image_group.case.startswith("ffjord-image/") and set(image_group.impls) == {"native", "reference"}
    notes_image: list[str] = []
    records = harness.run_group(image_group, cpu, torch.float32, repeat=1, warmup=1, min_sample_ms=0,
                                impls=["reference"], log=lambda _: None, notes=notes_image)
    assert not [n for n in notes_image if n.startswith("FAILED")], notes_image
    assert records and records[0].params["nfe_forward_reference"] > 0
    notes_eval: list[str] = []
    harness.run_group(eval_group, cpu, torch.float32, repeat=1, warmup=1, min_sample_ms=0,
                      impls=["native", "reference", "zuko"], log=lambda _: None, notes=notes_eval)
    assert not [n for n in notes_eval if n.startswith("FAILED")], notes_eval
    notes: list[str] = []
    records = harness.run_group(group, cpu, torch.float32, repeat=1, warmup=1, min_sample_ms=0,
                                impls=["reference", "zuko"], log=lambda _: None, notes=notes)
    assert not [n for n in notes if n.startswith("FAILED")], notes
    assert "reference" in {r.impl for r in records}
    for r in records:
        assert r.params[f"nfe_forward_{r.impl}"] > 0 and r.params[f"nfe_backward_{r.impl}"] > 0
    rows = case.nfe_table(cpu, torch.float32, quick=True, steps=2, impls=("reference",))
    assert len(rows[0]["nfe_forward"]) == len(rows[0]["nfe_backward"]) == 2
    assert all(n > 0 for n in rows[0]["nfe_forward"] + rows[0]["nfe_backward"])
    assert case.main(["--nfe", "--quick", "--steps", "1", "--impl", "reference"]) == 0
    assert "| reference |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        case.main(["--nfe", "--impl", "nflows"])
