"""Tests of the model builders (fastflow.models): Real NVP for vectors and images.

Per model (DESIGN.md, "what tested means"): a 2-D Real NVP's density integrates to 1 over a
grid; a short training run on a toy density reaches a stated test NLL that the best Gaussian
cannot reach; round trip and brute-force Jacobian log-det of the image model; shapes,
temperature, context and state dicts.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fastflow
from fastflow.data import toy_data
from fastflow.distributions import DiagonalGaussian, StandardNormal
from fastflow.flow import Flow
from fastflow.models import RealNVP, RealNVPImage
from fastflow.nn import AdditiveCoupling, AffineCoupling

NATIVE = fastflow.native_available()
BACKENDS = [
    "reference",
    pytest.param("native", marks=pytest.mark.skipif("cpu" not in NATIVE, reason="fastflow._C not built")),
]

#: The training run of ``trained_moons``: test NLL (nats) it must reach. It reaches about 2.5
#: (seeds 0-3: 2.48-2.54); the maximum-likelihood Gaussian of the same data scores about 3.29.
MOONS_NLL_TARGET = 2.7


@pytest.fixture(params=BACKENDS)
def backend(request):
    with fastflow.backend(request.param):
        yield request.param


pytestmark = pytest.mark.usefixtures("one_thread")


def randomize(module: nn.Module, seed: int = 0, scale: float = 0.2) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale)
    return module


def gaussian_nll(train: torch.Tensor, test: torch.Tensor) -> float:
    cov = torch.cov(train.T.double())
    dist = torch.distributions.MultivariateNormal(train.mean(0).double(), covariance_matrix=cov)
    return -dist.log_prob(test.double()).mean().item()


@pytest.fixture(scope="module")
def trained_moons():
    """A Real NVP fitted to moons: 400 Adam steps, batch 256, about 3-4 s on 2 CPU cores."""
    torch.manual_seed(0)
    train = toy_data("moons", 10_000, seed=0)
    test = toy_data("moons", 5_000, seed=1)
    model = RealNVP(2, n_couplings=6, hidden=64)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(400):  # default backend: native where built
        idx = torch.randint(0, train.shape[0], (256,), generator=gen)
        loss = -model.log_prob(train[idx]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval(), train, test


# --------------------------------------------------------------------------------------------
# Real NVP on 2-D toy data


def test_training_beats_the_best_gaussian(trained_moons):
    model, train, test = trained_moons
    with torch.no_grad():
        nll = -model.log_prob(test).mean().item()
    gauss = gaussian_nll(train, test)
    assert gauss > MOONS_NLL_TARGET + 0.3  # the target is out of a Gaussian's reach
    assert nll < MOONS_NLL_TARGET, f"test NLL {nll:.3f} (best Gaussian {gauss:.3f})"


def test_density_integrates_to_one(trained_moons, backend):
    model, _, _ = trained_moons
    n = 400
    xs = torch.linspace(-6, 6, n)
    gx, gy = torch.meshgrid(xs, xs, indexing="xy")
    grid = torch.stack([gx.reshape(-1), gy.reshape(-1)], 1)
    with torch.no_grad():
        density = torch.cat([model.log_prob(part) for part in grid.split(40_000)]).double().exp()
    cell = (12 / (n - 1)) ** 2
    mass = density.sum().item() * cell
    assert abs(mass - 1) < 1e-2, mass


def test_untrained_random_density_integrates_to_one(backend):
    """A randomly initialised model (not the identity): the log-dets are what make it a density."""
    model = randomize(RealNVP(2, n_couplings=4, hidden=16), scale=0.3).double()
    n = 400
    xs = torch.linspace(-6, 6, n, dtype=torch.float64)
    gx, gy = torch.meshgrid(xs, xs, indexing="xy")
    grid = torch.stack([gx.reshape(-1), gy.reshape(-1)], 1)
    with torch.no_grad():
        mass = model.log_prob(grid).exp().sum().item() * (12 / (n - 1)) ** 2
    assert abs(mass - 1) < 1e-2, mass


@pytest.mark.skipif("cpu" not in NATIVE, reason="fastflow._C not built")
def test_native_and_reference_agree_on_the_trained_model(trained_moons):
    model, _, test = trained_moons
    with torch.no_grad():
        with fastflow.backend("native"):
            native = model.log_prob(test[:1000])
        with fastflow.backend("reference"):
            reference = model.log_prob(test[:1000])
    torch.testing.assert_close(native, reference, rtol=1e-5, atol=1e-5)


def test_trained_samples_look_like_the_data(trained_moons):
    model, _, test = trained_moons
    torch.manual_seed(0)
    with torch.no_grad():
        samples, log_prob = model.sample_and_log_prob(5000)
    assert samples.shape == (5000, 2)
    torch.testing.assert_close(samples.mean(0), test.mean(0), rtol=0, atol=0.15)
    torch.testing.assert_close(samples.std(0), test.std(0), rtol=0.1, atol=0)
    # lower temperature: samples concentrate on higher-density regions
    with torch.no_grad():
        cold = model.sample(5000, temperature=0.5)
        assert model.log_prob(cold).mean() > log_prob.mean()


# --------------------------------------------------------------------------------------------
# Real NVP structure and contract


def test_realnvp_structure():
    model = RealNVP(64, n_couplings=8, hidden=256)
    assert isinstance(model, Flow) and isinstance(model.base, StandardNormal)
    assert model.event_shape == (64,)
    layers = list(model.transform)
    assert len(layers) == 8
    assert all(isinstance(l, AffineCoupling) and l.mask == "half" for l in layers)
    assert [l.flip for l in layers] == [False, True] * 4
    mlp = layers[0].conditioner
    widths = [(m.in_features, m.out_features) for m in mlp if isinstance(m, nn.Linear)]
    assert widths == [(32, 256), (256, 256), (256, 64)]
    # coupling 0 transforms x[:, 32:] from x[:, :32]; coupling 1 the other way round
    randomize(model)
    x = torch.randn(3, 64)
    y0, _ = layers[0](x)
    assert torch.equal(y0[:, :32], x[:, :32]) and not torch.equal(y0[:, 32:], x[:, 32:])
    y1, _ = layers[1](x)
    assert torch.equal(y1[:, 32:], x[:, 32:]) and not torch.equal(y1[:, :32], x[:, :32])
    assert all(isinstance(l, AdditiveCoupling) for l in RealNVP(4, 2, 8, activation="additive").transform)


@pytest.mark.parametrize("activation", ["exp", "sigmoid", "additive"])
def test_realnvp_contract(backend, activation):
    model = randomize(RealNVP(5, n_couplings=4, hidden=16, activation=activation)).double()
    x = torch.randn(4, 5, dtype=torch.float64)
    z, logdet = model(x)
    x2, logdet_inv = model.inverse(z)
    torch.testing.assert_close(x2, x)
    torch.testing.assert_close(logdet_inv, -logdet)
    jac_logdet = torch.stack(
        [
            torch.linalg.slogdet(torch.autograd.functional.jacobian(lambda v: model(v[None])[0][0], x[i])).logabsdet
            for i in range(4)
        ]
    )
    torch.testing.assert_close(logdet, jac_logdet)
    assert model.sample(3, temperature=0.5).shape == (3, 5)


def test_realnvp_context_and_base(backend):
    model = randomize(RealNVP(3, n_couplings=2, hidden=8, context_features=2, base=DiagonalGaussian(3)))
    c = torch.randn(6, 2)
    x = torch.randn(6, 3)
    assert model.log_prob(x, context=c).shape == (6,)
    s, lp = model.sample_and_log_prob(6, context=c)
    torch.testing.assert_close(lp, model.log_prob(s, context=c), rtol=1e-4, atol=1e-4)
    assert model.sample(4, context=c[:1]).shape == (4, 3)


def test_realnvp_state_dict_round_trip(backend):
    a = randomize(RealNVP(4, n_couplings=3, hidden=8), seed=1)
    b = RealNVP(4, n_couplings=3, hidden=8)
    b.load_state_dict(a.state_dict())
    x = torch.randn(5, 4)
    torch.testing.assert_close(b.log_prob(x), a.log_prob(x))


def test_realnvp_bad_arguments():
    with pytest.raises(ValueError, match="features"):
        RealNVP(1)
    with pytest.raises(ValueError, match="features"):
        RealNVP(2.0)
    with pytest.raises(ValueError, match="n_couplings"):
        RealNVP(2, n_couplings=0)
    with pytest.raises(ValueError, match="activation"):
        RealNVP(2, activation="relu")
    with pytest.raises(ValueError, match="hidden"):
        RealNVP(2, hidden=0)
    with pytest.raises(ValueError, match="event_shape"):
        RealNVP(3, base=StandardNormal(4))
    with pytest.raises(ValueError, match="shape"):
        RealNVPImage((3, 8))
    with pytest.raises(ValueError, match="n_couplings"):
        RealNVPImage((3, 8, 8), n_couplings=-1)


# --------------------------------------------------------------------------------------------
# Real NVP for images


def test_realnvp_image_structure():
    model = RealNVPImage((3, 8, 8), n_couplings=6, hidden=8)
    masks = [(l.mask, l.flip) for l in model.transform]
    assert masks == [
        ("checkerboard", False), ("checkerboard", True), ("channel", False), ("channel", True),
        ("checkerboard", False), ("checkerboard", True),
    ]
    gray = RealNVPImage((1, 4, 4), n_couplings=4, hidden=8)
    assert all(l.mask == "checkerboard" for l in gray.transform)
    assert model.sample(2).shape == (2, 3, 8, 8)


@pytest.mark.parametrize("activation", ["exp", "sigmoid"])
def test_realnvp_image_logdet_and_round_trip(backend, activation):
    model = randomize(RealNVPImage((2, 4, 4), n_couplings=4, hidden=4, activation=activation), scale=0.2).double()
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    for layout in ("contiguous", "channels_last"):
        xl = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x
        z, logdet = model(xl)
        if layout == "channels_last":
            assert z.is_contiguous(memory_format=torch.channels_last)
        x2, logdet_inv = model.inverse(z)
        torch.testing.assert_close(x2, x)
        torch.testing.assert_close(logdet_inv, -logdet)
        jac = [
            torch.autograd.functional.jacobian(lambda v: model(v.reshape(1, 2, 4, 4))[0].reshape(-1), x[i].reshape(-1))
            for i in range(2)
        ]
        torch.testing.assert_close(logdet, torch.stack([torch.linalg.slogdet(j).logabsdet for j in jac]))


def test_realnvp_image_sampling_and_state_dict(backend):
    torch.manual_seed(0)
    model = randomize(RealNVPImage((3, 4, 4), n_couplings=4, hidden=8, context_features=2), scale=0.1)
    c = torch.randn(1, 2)
    with torch.no_grad():
        samples, lp = model.sample_and_log_prob(3, temperature=0.7, context=c)
        assert samples.shape == (3, 3, 4, 4) and lp.shape == (3,)
        torch.testing.assert_close(lp, model.log_prob(samples, context=c.expand(3, 2)), rtol=1e-4, atol=1e-4)
        z, _ = model(model.sample(4000, temperature=0.7, context=c), context=c.expand(4000, 2))
    assert abs(z.std().item() - 0.7) < 0.02
    fresh = RealNVPImage((3, 4, 4), n_couplings=4, hidden=8, context_features=2)
    fresh.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(fresh.log_prob(x, context=c.expand(2, 2)), model.log_prob(x, context=c.expand(2, 2)))
    assert not math.isnan(model.log_prob(x, context=c.expand(2, 2)).sum().item())
