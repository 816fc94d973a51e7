"""Tests of the Transform contract, Compose, Flow and the base distributions.

Flow: log_prob = base log-density + log-det (checked against a closed form and the brute-force
Jacobian), sample shapes, temperature ("std x T"), sample_and_log_prob == log_prob of the samples,
event shape inference, context, log-densities in float32 for bf16, state dicts, and errors that
name the argument. Run under the reference and the native backend where an operator is involved.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fastflow
from fastflow.distributions import DiagonalGaussian, StandardNormal
from fastflow.flow import Compose, Flow, InverseNotAvailable, Transform
from fastflow.nn import AffineCoupling

NATIVE = fastflow.native_available()
BACKENDS = [
    "reference",
    pytest.param("native", marks=pytest.mark.skipif("cpu" not in NATIVE, reason="fastflow._C not built")),
]


@pytest.fixture(params=BACKENDS)
def backend(request):
    with fastflow.backend(request.param):
        yield request.param


pytestmark = pytest.mark.usefixtures("one_thread")


class ElementwiseAffine(Transform):
    """z = (x - loc) / scale: the flow of N(loc, scale^2) with a standard-normal base."""

    def __init__(self, loc, scale):
        super().__init__()
        self.loc = nn.Parameter(torch.as_tensor(loc, dtype=torch.float64))
        self.scale = nn.Parameter(torch.as_tensor(scale, dtype=torch.float64))

    def forward(self, x, context=None):
        z = (x - self.loc) / self.scale
        return z, (-torch.log(self.scale)).sum().expand(x.shape[0])

    def inverse(self, z, context=None):
        return z * self.scale + self.loc, torch.log(self.scale).sum().expand(z.shape[0])


class NoInverse(Transform):
    def forward(self, x, context=None):
        return x, x.new_zeros(x.shape[0])


def randomize(module: nn.Module, seed: int = 0, scale: float = 0.3) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale)
    return module


def coupling_flow(features=3, n=3, context_features=None, **kw) -> Flow:
    kw.setdefault("event_shape", features)
    layers = [
        AffineCoupling(features, mask="alternate", flip=k % 2 == 1, hidden=8, context_features=context_features)
        for k in range(n)
    ]
    return randomize(Flow(layers, **kw))


# --------------------------------------------------------------------------------------------
# Transform and Compose


def test_inverse_not_available_names_the_class():
    assert issubclass(InverseNotAvailable, RuntimeError)
    with pytest.raises(InverseNotAvailable, match="NoInverse has no exact inverse"):
        NoInverse().inverse(torch.randn(2, 3))
    with pytest.raises(NotImplementedError, match="Transform"):
        Transform()(torch.randn(2, 3))
    # a Compose or a Flow containing it passes the error on
    with pytest.raises(InverseNotAvailable, match="NoInverse"):
        Flow([NoInverse()], event_shape=3).sample(2)


def test_compose_sums_logdets_and_inverts_in_reverse(backend):
    torch.manual_seed(0)
    a = randomize(AffineCoupling(4, hidden=8), seed=1)
    b = randomize(AffineCoupling(4, hidden=8, mask="alternate", flip=True), seed=2)
    c = ElementwiseAffine([0.5, -1.0, 2.0, 0.0], [2.0, 0.5, 1.5, 3.0]).float()
    x = torch.randn(6, 4)
    for t in (Compose(a, b, c), Compose([a, b, c])):
        assert len(t) == 3 and t[1] is b
        z, logdet = t(x)
        z1, l1 = a(x)
        z2, l2 = b(z1)
        z3, l3 = c(z2)
        torch.testing.assert_close(z, z3)
        torch.testing.assert_close(logdet, l1 + l2 + l3)
        x2, logdet_inv = t.inverse(z)
        # the reverse order: c^-1, then b^-1, then a^-1
        y3, m3 = c.inverse(z)
        y2, m2 = b.inverse(y3)
        y1, m1 = a.inverse(y2)
        torch.testing.assert_close(x2, y1)
        torch.testing.assert_close(logdet_inv, m1 + m2 + m3)
        torch.testing.assert_close(x2, x, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logdet_inv, -logdet, rtol=1e-5, atol=1e-5)
    empty = Compose()
    z, logdet = empty(x)
    assert z is x and torch.equal(logdet, torch.zeros(6))
    with pytest.raises(TypeError, match=r"transforms\[1\]"):
        Compose(a, "not a module")


# --------------------------------------------------------------------------------------------
# Flow: densities


def test_log_prob_closed_form():
    """Flow of z = (x - m) / s over N(0, I) is N(m, s^2): checks the sign of the log-det."""
    loc, scale = [1.0, -2.0], [0.5, 3.0]
    flow = Flow([ElementwiseAffine(loc, scale)], event_shape=2)
    x = torch.randn(7, 2, dtype=torch.float64) * 3
    expected = torch.distributions.Normal(torch.tensor(loc), torch.tensor(scale)).log_prob(x).sum(1)
    torch.testing.assert_close(flow.log_prob(x), expected.double())
    samples, log_prob = flow.sample_and_log_prob(5)
    torch.testing.assert_close(log_prob, torch.distributions.Normal(torch.tensor(loc), torch.tensor(scale)).log_prob(samples).sum(1).double())


def test_log_prob_matches_brute_force_jacobian(backend):
    flow = coupling_flow(3, n=4).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    log_prob = flow.log_prob(x)
    expected = []
    for i in range(4):
        jac = torch.autograd.functional.jacobian(lambda v: flow(v[None])[0][0], x[i])
        z = flow(x[i : i + 1])[0]
        log_pz = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum()
        expected.append(log_pz + torch.linalg.slogdet(jac).logabsdet)
    torch.testing.assert_close(log_prob, torch.stack(expected), rtol=1e-10, atol=1e-10)


def test_forward_inverse_contract(backend):
    flow = coupling_flow(5, n=4)
    x = torch.randn(16, 5)
    z, logdet = flow(x)
    x2, logdet_inv = flow.inverse(z)
    assert z.shape == x.shape and logdet.shape == (16,)
    torch.testing.assert_close(x2, x, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logdet_inv, -logdet, rtol=1e-5, atol=1e-5)


def test_sample_and_log_prob_is_the_untempered_density(backend):
    flow = coupling_flow(3, n=4).double()
    for temperature in (1.0, 0.6):
        torch.manual_seed(0)
        x, log_prob = flow.sample_and_log_prob(50, temperature=temperature)
        assert x.shape == (50, 3) and log_prob.shape == (50,)
        torch.testing.assert_close(log_prob, flow.log_prob(x), rtol=1e-9, atol=1e-9)
        torch.manual_seed(0)
        torch.testing.assert_close(flow.sample(50, temperature=temperature), x)


def test_sample_does_not_reinvert(monkeypatch):
    """sample_and_log_prob runs the inverse once and never the forward."""
    flow = coupling_flow(3, n=2)
    calls = {"forward": 0, "inverse": 0}
    orig_f, orig_i = AffineCoupling.forward, AffineCoupling.inverse

    def f(self, *a, **k):
        calls["forward"] += 1
        return orig_f(self, *a, **k)

    def i(self, *a, **k):
        calls["inverse"] += 1
        return orig_i(self, *a, **k)

    monkeypatch.setattr(AffineCoupling, "forward", f)
    monkeypatch.setattr(AffineCoupling, "inverse", i)
    flow.sample_and_log_prob(4)
    assert calls == {"forward": 0, "inverse": 2}


# --------------------------------------------------------------------------------------------
# Flow: sampling and temperature


@pytest.mark.parametrize("event_shape", [(2,), (2, 3, 3)])
def test_sample_shapes(event_shape):
    flow = Flow([], event_shape=event_shape)
    assert flow.sample(7).shape == (7, *event_shape)
    x, lp = flow.sample_and_log_prob(1, temperature=0.5)
    assert x.shape == (1, *event_shape) and lp.shape == (1,)
    assert Flow([], event_shape=4).sample(3).shape == (3, 4)


def test_temperature_scales_the_base_std(backend):
    torch.manual_seed(0)
    for T in (0.5, 1.0, 1.7):
        std = Flow([], event_shape=2).sample(20000, temperature=T).std(0)
        torch.testing.assert_close(std, torch.full((2,), T), rtol=0.03, atol=0)
    # the latent of a non-trivial flow's samples has std T
    flow = coupling_flow(3, n=4)
    with torch.no_grad():
        z, _ = flow(flow.sample(20000, temperature=0.7))
    torch.testing.assert_close(z.std(0), torch.full((3,), 0.7), rtol=0.03, atol=0)
    # a diagonal Gaussian base: std = T * exp(log_scale), mean = loc
    base = DiagonalGaussian(2)
    with torch.no_grad():
        base.loc.copy_(torch.tensor([1.0, -1.0]))
        base.log_scale.copy_(torch.tensor([0.0, math.log(2.0)]))
    s = Flow([], base=base).sample(20000, temperature=0.5)
    torch.testing.assert_close(s.std(0), torch.tensor([0.5, 1.0]), rtol=0.03, atol=0)
    torch.testing.assert_close(s.mean(0), torch.tensor([1.0, -1.0]), rtol=0, atol=0.03)


def test_event_shape_inferred_from_first_batch(backend):
    flow = Flow([AffineCoupling(3, hidden=8)])
    assert flow.event_shape is None
    with pytest.raises(ValueError, match="event shape is unknown"):
        flow.sample(2)
    with pytest.raises(ValueError, match="event shape is unknown"):
        flow.sample_and_log_prob(2)
    flow.log_prob(torch.randn(5, 3))
    assert flow.event_shape == (3,) and isinstance(flow.base, StandardNormal)
    assert flow.sample(4).shape == (4, 3)
    with pytest.raises(ValueError, match=r"x must have shape \[batch, 3\]"):
        flow.log_prob(torch.randn(5, 4))
    # forward infers it too, and the shape travels with the state dict
    other = Flow([AffineCoupling(3, hidden=8)])
    other(torch.randn(2, 3))
    assert other.event_shape == (3,)
    fresh = Flow([AffineCoupling(3, hidden=8)])
    fresh.load_state_dict(flow.state_dict())
    assert fresh.event_shape == (3,) and fresh.sample(2).shape == (2, 3)


def test_state_dict_round_trip(backend):
    torch.manual_seed(0)
    flow = coupling_flow(4, n=3)
    fresh = Flow([AffineCoupling(4, mask="alternate", flip=k % 2 == 1, hidden=8) for k in range(3)], event_shape=4)
    fresh.load_state_dict(flow.state_dict())
    x = torch.randn(8, 4)
    torch.testing.assert_close(fresh.log_prob(x), flow.log_prob(x))
    with pytest.raises(ValueError, match="event_shape"):
        Flow([AffineCoupling(4, mask="alternate", flip=k % 2 == 1, hidden=8) for k in range(3)], event_shape=(2, 2)).load_state_dict(flow.state_dict())


def test_device_and_dtype_follow_the_module():
    flow = coupling_flow(3, n=2).double()
    assert flow.sample(2).dtype == torch.float64
    assert flow.log_prob(torch.randn(2, 3, dtype=torch.float64)).dtype == torch.float64
    lazy = Flow([AffineCoupling(3, hidden=8)]).double()
    lazy.log_prob(torch.randn(2, 3, dtype=torch.float64))
    assert lazy.sample(2).dtype == torch.float64
    assert Flow([], base=DiagonalGaussian(3)).to(torch.float64).sample(2).dtype == torch.float64


def test_bfloat16_activations_give_float32_log_prob():
    flow = coupling_flow(4, n=3)
    x = torch.randn(16, 4)
    reference = flow.log_prob(x)
    flow_bf = flow.to(torch.bfloat16)
    with fastflow.backend("reference"):  # no bf16 kernel on the CPU
        log_prob = flow_bf.log_prob(x.to(torch.bfloat16))
        samples, lp = flow_bf.sample_and_log_prob(8)
        z, logdet = flow_bf(x.to(torch.bfloat16))
    assert log_prob.dtype == torch.float32 and lp.dtype == torch.float32 and logdet.dtype == torch.float32
    assert samples.dtype == torch.bfloat16
    torch.testing.assert_close(log_prob, reference, rtol=0.05, atol=0.3)


# --------------------------------------------------------------------------------------------
# Context


def test_conditional_flow(backend):
    flow = coupling_flow(3, n=3, context_features=2).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    c = torch.randn(5, 2, dtype=torch.float64)
    lp = flow.log_prob(x, context=c)
    assert lp.shape == (5,)
    assert not torch.allclose(lp, flow.log_prob(x, context=c.flip(0)))
    z, ld = flow(x, context=c)
    x2, ld_inv = flow.inverse(z, context=c)
    torch.testing.assert_close(x2, x)
    torch.testing.assert_close(ld_inv, -ld)
    # one context row per sample, or one row shared by all
    torch.manual_seed(0)
    s, lp_s = flow.sample_and_log_prob(5, context=c)
    torch.testing.assert_close(lp_s, flow.log_prob(s, context=c))
    s1 = flow.sample(4, context=c[:1])
    assert s1.shape == (4, 3)
    with pytest.raises(ValueError, match="context must have n = 4 rows"):
        flow.sample(4, context=c)
    with pytest.raises(ValueError, match="context is required"):
        flow.log_prob(x)


# --------------------------------------------------------------------------------------------
# Base distributions


def test_standard_normal():
    base = StandardNormal((2, 3))
    z = torch.randn(4, 2, 3, dtype=torch.float64)
    torch.testing.assert_close(base.log_prob(z), torch.distributions.Normal(0.0, 1.0).log_prob(z).sum((1, 2)))
    assert base.log_prob(z.half()).dtype == torch.float32
    assert list(base.state_dict()) == [] and list(base.parameters()) == []
    assert base.double().sample(3).dtype == torch.float64
    assert StandardNormal(5).event_shape == (5,)
    with pytest.raises(ValueError, match=r"z must have shape \[batch, 2, 3\]"):
        base.log_prob(torch.randn(4, 6))
    with pytest.raises(ValueError, match="event_shape"):
        StandardNormal(0)
    with pytest.raises(ValueError, match="event_shape"):
        StandardNormal((2, -1))


def test_diagonal_gaussian():
    base = DiagonalGaussian(3)
    assert {n for n, _ in base.named_parameters()} == {"loc", "log_scale"}
    with torch.no_grad():
        base.loc.copy_(torch.tensor([0.5, -1.0, 2.0]))
        base.log_scale.copy_(torch.tensor([0.1, -0.3, 0.7]))
    z = torch.randn(6, 3)
    ref = torch.distributions.Normal(base.loc.detach(), base.log_scale.detach().exp()).log_prob(z).sum(1)
    torch.testing.assert_close(base.log_prob(z), ref)
    z.requires_grad_(True)
    base.log_prob(z).sum().backward()
    assert base.loc.grad is not None and base.log_scale.grad is not None
    fixed = DiagonalGaussian((2, 2), learnable=False)
    assert list(fixed.parameters()) == [] and set(fixed.state_dict()) == {"loc", "log_scale"}
    assert fixed.to(torch.float64).sample(2).dtype == torch.float64
    with pytest.raises(ValueError, match="z must have shape"):
        base.log_prob(torch.randn(6, 2))


def test_flow_and_base_event_shapes_must_agree():
    with pytest.raises(ValueError, match="event_shape"):
        Flow([], base=StandardNormal(3), event_shape=4)
    flow = Flow([], base=DiagonalGaussian((2, 2)))
    assert flow.event_shape == (2, 2)
    with pytest.raises(TypeError, match="base"):
        Flow([], base=torch.distributions.Normal(0.0, 1.0))


# --------------------------------------------------------------------------------------------
# Bad arguments


@pytest.mark.parametrize("n", [0, -3, 2.5, True, "4"])
def test_bad_n(n):
    flow = Flow([], event_shape=2)
    for fn in (flow.sample, flow.sample_and_log_prob, StandardNormal(2).sample, DiagonalGaussian(2).sample):
        with pytest.raises(ValueError, match=r"^n \(number of samples\)"):
            fn(n)


@pytest.mark.parametrize("temperature", [-1.0, -1e-9, math.nan, math.inf, "hot", None])
def test_bad_temperature(temperature):
    flow = Flow([], event_shape=2)
    for fn in (flow.sample, flow.sample_and_log_prob, StandardNormal(2).sample, DiagonalGaussian(2).sample):
        with pytest.raises(ValueError, match="^temperature must be"):
            fn(3, temperature=temperature)


def test_bad_inputs_name_the_argument():
    flow = Flow([], event_shape=(2, 3))
    with pytest.raises(ValueError, match=r"^x must have shape \[batch, 2, 3\]"):
        flow.log_prob(torch.randn(4, 3, 2))
    with pytest.raises(ValueError, match=r"^x must have shape"):
        flow(torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"^z must have shape"):
        flow.inverse(torch.randn(4, 6))
    with pytest.raises(ValueError, match=r"^x must have shape \[batch, \*event_shape\]"):
        Flow([]).log_prob(torch.randn(5))
    with pytest.raises(ValueError, match="event_shape"):
        Flow([], event_shape=(2, 0))
