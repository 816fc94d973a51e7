"""Tests of Glow: fastflow.nn.GlowStep, fastflow.nn.MultiScale and fastflow.models.Glow.

GlowStep: the layer order, inverse(forward(x)) == x, log-det equal to the brute-force
Jacobian's (float64). Glow (and its multi-scale Real NVP configuration): one latent of the
input's shape in the documented layout, round trip x -> z -> x, log-det of forward equal to the
brute-force Jacobian's (float64, tiny input), log_prob equal to a manual sum of the top prior,
the split priors and the log-det, temperature scaling every prior's standard deviation (top and
splits), sample_and_log_prob consistent with log_prob, state-dict round trip without ActNorm
re-initialisation, a few Adam steps lowering the NLL, reference and default backends agreeing,
and bad input raising errors that name the problem.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import fastflow
from fastflow.models import Glow
from fastflow.nn import ActNorm, AffineCoupling, GlowStep, InvertibleConv1x1, MultiScale, initialize_actnorm


pytestmark = pytest.mark.usefixtures("one_thread")


def perturb(module: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Adds small noise to every parameter, so that zero-initialised layers and priors act.

    The 1x1 convolutions' triangular factors are left alone (they start as a random rotation;
    noise on them makes the inverse ill-conditioned at 48 channels and sampling overflow)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith((".lower", ".upper")):
                continue
            p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) * scale)
    return module


def make_glow(shape=(3, 8, 8), levels=2, depth=2, hidden=8, seed=0, randomize=True, **kwargs) -> Glow:
    torch.manual_seed(seed)
    model = Glow(shape, levels=levels, depth=depth, hidden=hidden, **kwargs).double()
    gen = torch.Generator().manual_seed(seed + 100)
    batch = 0.5 + 2 * torch.randn((16, *shape), generator=gen, dtype=torch.float64)
    assert initialize_actnorm(model, batch) == levels * depth * (1 if kwargs.get("actnorm", True) else 0)
    if randomize:
        perturb(model, seed)
    return model.eval()


def brute_force_logdet(fn, x: torch.Tensor) -> torch.Tensor:
    """log|det J| per sample of fn (x of shape [B, ...], samples independent), float64."""
    out = []
    for i in range(x.shape[0]):
        xi = x[i : i + 1]
        jac = torch.autograd.functional.jacobian(lambda v: fn(v).reshape(-1), xi)
        out.append(torch.linalg.slogdet(jac.reshape(xi.numel(), xi.numel()))[1])
    return torch.stack(out)


def normal_log_prob(z, mu, log_std):
    return torch.distributions.Normal(mu, log_std.exp()).log_prob(z).flatten(1).sum(1)


VARIANTS = {
    "glow": {},
    "realnvp": {"activation": "exp", "invconv": False},
    "additive": {"coupling": "additive"},
}


# --------------------------------------------------------------------------------------------
# GlowStep


def test_glow_step_layers_round_trip_and_logdet():
    torch.manual_seed(0)
    step = GlowStep((4, 2, 2), hidden=8).double()
    assert isinstance(step.actnorm, ActNorm) and isinstance(step.invconv, InvertibleConv1x1)
    assert isinstance(step.coupling, AffineCoupling)
    assert step.invconv.lu and step.coupling.activation == "sigmoid" and step.coupling.mask == "channel"
    # the conditioner's last convolution starts at zero
    last = step.coupling.conditioner[-1]
    assert not last.weight.any() and not last.bias.any()
    x = torch.randn(3, 4, 2, 2, dtype=torch.float64)
    initialize_actnorm(step, x)
    perturb(step)
    step.eval()
    z, logdet = step(x)
    assert z.shape == x.shape and logdet.shape == (3,) and logdet.dtype == torch.float64
    torch.testing.assert_close(logdet, brute_force_logdet(lambda v: step(v)[0], x))
    x2, logdet_inv = step.inverse(z)
    torch.testing.assert_close(x2, x)
    torch.testing.assert_close(logdet_inv, -logdet)
    # the composition, layer by layer
    h = x
    for layer in (step.actnorm, step.invconv, step.coupling):
        h = layer(h)[0]
    torch.testing.assert_close(z, h)


def test_glow_step_realnvp_configuration_and_errors():
    step = GlowStep((4, 2, 2), hidden=8, activation="exp", invconv=False, flip=True)
    assert step.invconv is None and step.coupling.activation == "exp" and step.coupling.flip
    with pytest.raises(ValueError, match="shape"):
        GlowStep(4)
    with pytest.raises(ValueError, match="coupling"):
        GlowStep((4, 2, 2), coupling="spline")


# --------------------------------------------------------------------------------------------
# The multi-scale model


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_round_trip_and_latent_layout(variant):
    model = make_glow(**VARIANTS[variant])
    assert model.top_shape == (24, 2, 2)
    ms = model.multiscale
    assert isinstance(ms, MultiScale) and len(ms.priors) == 1
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    z, logdet = model(x)
    assert z.shape == x.shape and logdet.shape == (2,) and logdet.dtype == torch.float64
    # the layout: the pieces of encode put back in place
    z_top, z2s, z1s, logdet2 = ms.encode(x)
    torch.testing.assert_close(logdet2, logdet)
    assert z_top.shape == (2, 24, 2, 2) and z2s[0].shape == (2, 6, 4, 4) and z1s[0].shape == (2, 6, 4, 4)
    s0 = F.pixel_unshuffle(z, 2)  # level 0: squeeze, then [z1-position, z2]
    torch.testing.assert_close(s0[:, 6:], z2s[0])
    torch.testing.assert_close(F.pixel_unshuffle(s0[:, :6], 2), z_top)
    top, parts = ms.split_latent(z)
    torch.testing.assert_close(top, z_top)
    torch.testing.assert_close(ms.merge_latent(top, parts), z)
    # round trip
    x2, logdet_inv = model.inverse(z)
    torch.testing.assert_close(x2, x)
    torch.testing.assert_close(logdet_inv, -logdet)


@pytest.mark.parametrize("variant", ["glow", "realnvp"])
def test_logdet_matches_jacobian(variant):
    model = make_glow(shape=(2, 4, 4), levels=2, depth=1, hidden=4, **VARIANTS[variant])
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    _, logdet = model(x)
    torch.testing.assert_close(logdet, brute_force_logdet(lambda v: model(v)[0], x))


def test_log_prob_is_top_plus_splits_plus_logdet():
    model = make_glow(levels=3, shape=(3, 8, 8))  # two split priors
    ms = model.multiscale
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    z, logdet = model(x)
    z_top, z2s = ms.split_latent(z)
    _, _, z1s, _ = ms.encode(x)
    expected = normal_log_prob(z_top, model.base.loc, model.base.log_scale) + logdet
    for prior, z2, z1 in zip(ms.priors, z2s, z1s):
        mu, log_std = prior.params(z1)
        assert mu.abs().max() > 0  # perturbed: a non-trivial prior
        expected = expected + normal_log_prob(z2, mu, log_std)
    torch.testing.assert_close(model.log_prob(x), expected)


def test_sample_shapes_and_sample_and_log_prob():
    model = make_glow()
    assert model.sample(5).shape == (5, 3, 8, 8)
    assert model.sample(1, temperature=0.3).dtype == torch.float64
    for t in (1.0, 0.6):
        x, log_prob = model.sample_and_log_prob(4, temperature=t)
        assert x.shape == (4, 3, 8, 8) and log_prob.shape == (4,)
        torch.testing.assert_close(log_prob, model.log_prob(x), rtol=1e-9, atol=1e-8)


def test_temperature_scales_every_prior():
    # zero-initialised priors: the latent is T * eps, top and split parts alike
    model = make_glow(randomize=False)
    torch.manual_seed(3)
    x1 = model.sample(64, temperature=1.0)
    torch.manual_seed(3)
    x5 = model.sample(64, temperature=0.5)
    z1, z5 = model(x1)[0], model(x5)[0]
    torch.testing.assert_close(z5, 0.5 * z1, rtol=1e-7, atol=1e-9)
    top, parts = model.multiscale.split_latent(z1)
    assert 0.8 < top.std().item() < 1.2 and 0.8 < parts[0].std().item() < 1.2
    # learned priors: the standardised noise (z - mu) / sigma of every prior scales with T
    model = make_glow(levels=3)
    ms = model.multiscale
    noises = {}
    for t in (1.0, 0.5):
        torch.manual_seed(4)
        x = model.sample(8, temperature=t)
        z_top, z2s, z1s, _ = ms.encode(x)
        eps = [(z_top - model.base.loc) / model.base.log_scale.exp()]
        for prior, z2, z1 in zip(ms.priors, z2s, z1s):
            mu, log_std = prior.params(z1)
            assert mu.abs().max() > 0
            eps.append((z2 - mu) / log_std.exp())
        noises[t] = eps
    assert len(noises[1.0]) == 3
    for e1, e5 in zip(noises[1.0], noises[0.5]):
        torch.testing.assert_close(e5, 0.5 * e1, rtol=1e-6, atol=1e-8)


def test_state_dict_round_trip_keeps_actnorm():
    model = make_glow()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    expected = model.log_prob(x)
    fresh = Glow((3, 8, 8), levels=2, depth=2, hidden=8).double()
    fresh.load_state_dict(model.state_dict())
    fresh.train()  # a training forward must not re-initialise the loaded ActNorms
    torch.testing.assert_close(fresh.log_prob(x + 5.0), model.log_prob(x + 5.0))
    torch.testing.assert_close(fresh.log_prob(x), expected)
    assert all(m._initialized for m in fresh.modules() if isinstance(m, ActNorm))


def test_adam_steps_lower_the_nll():
    torch.manual_seed(0)
    model = Glow((3, 8, 8), levels=2, depth=2, hidden=16)
    gen = torch.Generator().manual_seed(1)
    data = 0.3 * torch.randn(64, 3, 8, 8, generator=gen) + torch.linspace(-1, 1, 8).view(1, 1, 1, 8)
    model.train()
    with torch.no_grad():
        model.log_prob(data)  # the ActNorms initialise on the first training batch
    actnorms = [m for m in model.modules() if isinstance(m, ActNorm)]
    assert len(actnorms) == 4 and all(m._initialized for m in actnorms)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    with torch.no_grad():
        before = -model.log_prob(data).mean().item()
    for _ in range(15):
        opt.zero_grad()
        loss = -model.log_prob(data).mean()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = -model.log_prob(data).mean().item()
    assert math.isfinite(after) and after < before - 10, (before, after)


class _FastflowOps(TorchDispatchMode):
    """Records the fastflow native operators that run."""

    def __init__(self):
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name.startswith("fastflow."):
            self.ops.add(name.split(".")[1])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_reference_and_default_backends_agree(dtype):
    model = make_glow().to(dtype)
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64).to(dtype)
    tol = {} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-3}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "auto" may warn once that it falls back
        with _FastflowOps() as default_ops:
            default = model.log_prob(x)
            torch.manual_seed(5)
            x_default = model.sample(2, temperature=0.7)
        with fastflow.backend("reference"), _FastflowOps() as reference_ops:
            reference = model.log_prob(x)
            torch.manual_seed(5)
            x_reference = model.sample(2, temperature=0.7)
    assert not reference_ops.ops
    if fastflow.native_available():  # the default really ran the native operators
        assert {"affine_coupling", "invconv_plu"} <= default_ops.ops
    torch.testing.assert_close(default, reference, **tol)
    torch.testing.assert_close(x_default, x_reference, **tol)


def test_bad_input_and_uninitialised_sampling():
    with pytest.raises(ValueError, match="divisible"):
        Glow((3, 6, 8), levels=2, depth=1, hidden=4)
    with pytest.raises(ValueError, match="shape"):
        Glow((8, 8), levels=1, depth=1, hidden=4)
    model = Glow((3, 8, 8), levels=2, depth=1, hidden=4)
    with pytest.raises(RuntimeError, match="ActNorm is not initialised"):
        model.sample(2)
    with pytest.raises(ValueError, match=r"x must have shape \[batch, 3, 8, 8\]"):
        model.log_prob(torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match="context"):
        model.log_prob(torch.randn(2, 3, 8, 8), context=torch.randn(2, 1))
    with pytest.raises(ValueError, match="temperature"):
        make_glow().sample(2, temperature=-0.5)


def test_temperature_zero_decodes_the_zero_latent():
    """At T = 0 every prior gives its mean; with Glow's zero-initialised priors that is the zero
    latent, so the sample is the decoder of z = 0 (the issue's check)."""
    model = make_glow(randomize=False)
    x0 = model.sample(3, temperature=0.0)
    decoded, _ = model.inverse(torch.zeros(3, 3, 8, 8, dtype=torch.float64))
    torch.testing.assert_close(x0, decoded)
    assert torch.isfinite(x0).all()


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_glow_step_compiles_fullgraph_after_init_and_matches_eager(backend):
    """After ActNorm's initialisation a Glow step has no graph break: forward and inverse compile
    with ``fullgraph=True`` (reference operators, and the default backend's native ones) and
    agree with eager, outputs and gradients through the compiled forward alike."""
    from torch._dynamo.testing import AotEagerAndRecordGraphs

    torch.manual_seed(0)
    step = GlowStep((4, 4, 4), hidden=8)
    x = 0.5 + 2 * torch.randn(6, 4, 4, 4)
    assert initialize_actnorm(step, x) == 1
    perturb(step)  # the coupling's zero-initialised last convolution would make it the identity
    x = torch.randn(5, 4, 4, 4)
    weight = torch.randn(5, 4, 4, 4)
    tol = {"rtol": 1e-4, "atol": 1e-5}

    def loss_and_grads(fn):
        xr = x.clone().requires_grad_()
        z, logdet = fn(xr)
        loss = (z * weight).sum() + logdet.sum()
        params = [p for p in step.parameters()]
        grads = torch.autograd.grad(loss, [xr, *params])
        return z.detach(), logdet.detach(), grads

    torch._dynamo.reset()
    with warnings.catch_warnings(), fastflow.backend(backend):
        warnings.simplefilter("ignore")  # "auto" may warn once that it falls back
        # aot_eager (the fake and autograd registrations, no code generation), recording graphs
        forward_graphs, inverse_graphs = AotEagerAndRecordGraphs(), AotEagerAndRecordGraphs()
        forward = torch.compile(step, fullgraph=True, backend=forward_graphs)
        inverse = torch.compile(step.inverse, fullgraph=True, backend=inverse_graphs)
        z_eager, logdet_eager, grads_eager = loss_and_grads(step)
        z, logdet, grads = loss_and_grads(forward)
        torch.testing.assert_close(z, z_eager, **tol)
        torch.testing.assert_close(logdet, logdet_eager, **tol)
        assert len(grads) == len(grads_eager) == 1 + len(list(step.parameters()))
        for g, g_eager in zip(grads, grads_eager):
            torch.testing.assert_close(g, g_eager, **tol)
        with torch.no_grad():
            x2_eager, logdet_inv_eager = step.inverse(z_eager)
            x2, logdet_inv = inverse(z_eager)
    torch.testing.assert_close(x2, x2_eager, **tol)
    torch.testing.assert_close(logdet_inv, logdet_inv_eager, **tol)
    torch.testing.assert_close(x2, x, **tol)
    torch.testing.assert_close(logdet_inv, -logdet_eager, **tol)
    assert bool(step.actnorm.initialized)
    # one graph each (no recompilation), with the native operators where the default has them
    assert len(forward_graphs.graphs) == 1 and len(inverse_graphs.graphs) == 1
    forward_code = "".join(g.code for g in forward_graphs.fw_graphs + forward_graphs.bw_graphs)
    inverse_code = "".join(g.code for g in inverse_graphs.fw_graphs)
    native = backend == "auto" and "cpu" in fastflow.native_available()
    assert ("fastflow.affine_coupling" in forward_code) == native
    assert ("fastflow.invconv_plu" in forward_code) == native
    backward_code = "".join(g.code for g in forward_graphs.bw_graphs)
    assert ("fastflow.affine_coupling_backward" in backward_code) == native
    assert ("fastflow." in inverse_code) == native, inverse_code
    torch._dynamo.reset()
