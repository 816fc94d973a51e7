"""Tests of the multi-scale pieces (fastflow.nn.multiscale): Squeeze, ZeroConv2d, SplitPrior.

Squeeze: inverse(forward(x)) == x, the documented channel order, log-det 0 equal to the
brute-force Jacobian's (float64), an error naming the dimension that does not divide.
ZeroConv2d: zero output at initialisation, the exp(3 * logs) output scale. SplitPrior: log_prob
equals a Normal(mu, exp(log_std)) log-prob summed per sample; the sample's standard deviation
scales with the temperature; bad input raises an error naming the argument.
"""

from __future__ import annotations

import math

import pytest
import torch

from fastflow.nn import SplitPrior, Squeeze, ZeroConv2d


pytestmark = pytest.mark.usefixtures("one_thread")


def randomize(module: torch.nn.Module, seed: int = 0, scale: float = 0.3) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale)
    return module


# --------------------------------------------------------------------------------------------
# Squeeze


@pytest.mark.parametrize("factor, shape", [(2, (2, 3, 4, 6)), (3, (1, 2, 6, 3)), (1, (2, 2, 3, 3))])
def test_squeeze_round_trip_and_channel_order(factor, shape):
    x = torch.randn(shape)
    layer = Squeeze(factor)
    z, logdet = layer(x)
    b, c, h, w = shape
    assert z.shape == (b, c * factor**2, h // factor, w // factor)
    assert logdet.shape == (b,) and logdet.dtype == torch.float32 and not logdet.any()
    # output channel c * f^2 + i * f + j holds x[:, c, i::f, j::f]
    for ci in range(c):
        for i in range(factor):
            for j in range(factor):
                assert torch.equal(z[:, ci * factor**2 + i * factor + j], x[:, ci, i::factor, j::factor])
    x2, logdet_inv = layer.inverse(z)
    assert torch.equal(x2, x)
    assert logdet_inv.shape == (b,) and not logdet_inv.any()


def test_squeeze_logdet_matches_jacobian():
    layer = Squeeze(2)
    x = torch.randn(2, 2, 4, 2, dtype=torch.float64)
    _, logdet = layer(x)
    assert logdet.dtype == torch.float64
    for i in range(x.shape[0]):
        xi = x[i : i + 1]
        jac = torch.autograd.functional.jacobian(lambda v: layer(v.reshape(xi.shape))[0].reshape(-1), xi.reshape(-1))
        sign, logabsdet = torch.linalg.slogdet(jac)
        assert sign.abs() == 1
        torch.testing.assert_close(logdet[i], logabsdet)


def test_squeeze_half_input_float32_logdet():
    z, logdet = Squeeze()(torch.randn(2, 1, 4, 4).half())
    assert z.dtype == torch.float16 and logdet.dtype == torch.float32


def test_squeeze_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="factor"):
        Squeeze(0)
    with pytest.raises(ValueError, match="factor"):
        Squeeze(2.0)
    layer = Squeeze(2)
    with pytest.raises(ValueError, match=r"height H and width W .* divisible by factor=2.*H, W = 5, 4"):
        layer(torch.randn(1, 3, 5, 4))
    with pytest.raises(ValueError, match=r"H, W = 4, 3"):
        layer(torch.randn(1, 3, 4, 3))
    with pytest.raises(ValueError, match=r"x must have shape \[batch, C, H, W\]"):
        layer(torch.randn(3, 4, 4))
    with pytest.raises(ValueError, match=r"z's channels C must be divisible by factor\^2 = 4"):
        layer.inverse(torch.randn(1, 6, 2, 2))


# --------------------------------------------------------------------------------------------
# ZeroConv2d


def test_zero_conv_starts_at_zero_and_scales_by_exp_3_logs():
    conv = ZeroConv2d(3, 4)
    x = torch.randn(2, 3, 5, 5)
    out = conv(x)
    assert out.shape == (2, 4, 5, 5) and not out.any()
    randomize(conv)
    plain = torch.nn.functional.conv2d(x, conv.conv.weight, conv.conv.bias, padding=1)
    expected = plain * torch.exp(3 * conv.logs).view(1, -1, 1, 1)
    torch.testing.assert_close(conv(x), expected)
    with pytest.raises(ValueError, match="kernel_size"):
        ZeroConv2d(3, 4, kernel_size=2)
    with pytest.raises(ValueError, match="out_channels"):
        ZeroConv2d(3, 0)


# --------------------------------------------------------------------------------------------
# SplitPrior


def test_split_prior_starts_as_standard_normal():
    prior = SplitPrior(3)
    z1, z2 = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(z2).flatten(1).sum(1)
    torch.testing.assert_close(prior.log_prob(z2, z1), expected)


@pytest.mark.parametrize("channels, out_channels", [(3, None), (2, 5)])
def test_split_prior_log_prob_is_the_conditional_normal(channels, out_channels):
    prior = randomize(SplitPrior(channels, out_channels)).double()
    c2 = out_channels or channels
    z1 = torch.randn(3, channels, 4, 5, dtype=torch.float64)
    z2 = torch.randn(3, c2, 4, 5, dtype=torch.float64)
    h = prior.conv(z1)
    mu, log_std = h[:, :c2], h[:, c2:]
    assert log_std.std() > 0.05  # a non-trivial prior
    expected = torch.distributions.Normal(mu, log_std.exp()).log_prob(z2).flatten(1).sum(1)
    log_prob = prior.log_prob(z2, z1)
    assert log_prob.shape == (3,)
    torch.testing.assert_close(log_prob, expected)
    torch.testing.assert_close(prior.params(z1), (mu, log_std))
    # gradients reach the prior's parameters
    log_prob.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in prior.parameters())


def test_split_prior_half_input_float32_log_prob():
    prior = randomize(SplitPrior(2)).half()
    z1, z2 = torch.randn(2, 2, 3, 3).half(), torch.randn(2, 2, 3, 3).half()
    assert prior.log_prob(z2, z1).dtype == torch.float32


def test_split_prior_sample_std_scales_with_temperature():
    prior = randomize(SplitPrior(2), seed=3).double()
    z1 = torch.randn(1, 2, 6, 6, dtype=torch.float64).expand(4000, -1, -1, -1)
    mu, log_std = prior.params(z1[:1])
    for temperature in (1.0, 0.5):
        gen = torch.Generator().manual_seed(7)
        z2 = prior.sample(z1, temperature=temperature, generator=gen)
        assert z2.shape == (4000, 2, 6, 6)
        u = (z2 - mu) / log_std.exp()  # standard normal scaled by the temperature
        # 4000 draws per element: the std of an element's std estimate is about 1.1%
        per_element_std = u.std(0)
        assert abs(per_element_std.mean().item() - temperature) < 0.01 * temperature
        assert abs(u.mean().item()) < 0.01
    # the same noise at two temperatures: deviations from the mean scale exactly
    z_1 = prior.sample(z1[:5], generator=torch.Generator().manual_seed(1))
    z_07 = prior.sample(z1[:5], temperature=0.7, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(z_07 - mu, 0.7 * (z_1 - mu))


def test_split_prior_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="channels"):
        SplitPrior(0)
    with pytest.raises(ValueError, match="out_channels"):
        SplitPrior(2, out_channels=-1)
    prior = SplitPrior(3)
    z1 = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"z1 must have channels=3"):
        prior.log_prob(torch.randn(2, 3, 4, 4), torch.randn(2, 4, 4, 4))
    with pytest.raises(ValueError, match=r"z1 must have shape \[batch, C, H, W\]"):
        prior.sample(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match=r"z2 must have shape .*\(2, 3, 4, 4\)"):
        prior.log_prob(torch.randn(2, 3, 4, 5), z1)
    with pytest.raises(ValueError, match=r"z2 must have shape"):
        prior.log_prob(torch.randn(3, 3, 4, 4), z1)
    for bad in (-0.5, -1.0, math.inf):
        with pytest.raises(ValueError, match="temperature"):
            prior.sample(z1, temperature=bad)
