"""Image utilities: bit reduction, dequantisation, bits/dim, logit pre-processing; any number of
levels (``n_bins``, e.g. the 17 of the 8x8 digits) besides ``2**n_bits``."""

import math

import pytest
import torch

from fastflow import Flow
from fastflow.images import Logit, bits_per_dim, dequantize, reduce_bits

pytestmark = pytest.mark.usefixtures("one_thread")


def test_reduce_bits_and_dequantize_stay_in_their_bins():
    pixels = torch.arange(256).reshape(1, 1, 16, 16)
    levels = reduce_bits(pixels, 5)
    assert levels.min() == 0 and levels.max() == 31
    assert torch.equal(levels, pixels // 8)
    x = dequantize(levels, n_bits=5, generator=torch.Generator().manual_seed(0))
    assert x.dtype == torch.float32 and (x >= 0).all() and (x < 1).all()
    assert torch.equal(torch.floor(x * 32).long(), levels)  # noise stays inside each bin
    assert (x * 32 - levels).std() > 0.2  # and is spread over it (uniform: std 0.29)


def test_bits_per_dim_of_the_uniform_density_is_n_bits():
    # The uniform density on [0, 1)^D has log p = 0; each integer image then has probability
    # 2^(-n_bits D): exactly n_bits bits per dimension.
    for n_bits in (1, 5, 8):
        bpd = bits_per_dim(torch.zeros(3), num_dims=3 * 8 * 8, n_bits=n_bits)
        torch.testing.assert_close(bpd, torch.full((3,), float(n_bits)))


@pytest.mark.parametrize("alpha", [0.0, 0.05])
def test_logit_round_trip_and_logdet(alpha):
    layer = Logit(alpha)
    x = torch.rand(2, 3, 2, 2, dtype=torch.float64) * 0.98 + 0.01
    y, logdet = layer(x)
    x2, logdet_inv = layer.inverse(y)
    torch.testing.assert_close(x2, x)
    torch.testing.assert_close(logdet_inv, -logdet)
    for i in range(2):
        jac = torch.autograd.functional.jacobian(lambda v: layer(v.reshape(1, 3, 2, 2))[0].reshape(-1), x[i].reshape(-1))
        torch.testing.assert_close(logdet[i], torch.linalg.slogdet(jac)[1])
    assert torch.allclose(layer(torch.full((1, 4), 0.5))[0], torch.zeros(1, 4))


def test_logit_in_a_flow_gives_bits_per_dim():
    flow = Flow([Logit(0.05)], event_shape=(1, 4, 4))
    x = dequantize(torch.randint(0, 256, (5, 1, 4, 4)), generator=torch.Generator().manual_seed(1))
    bpd = bits_per_dim(flow.log_prob(x), num_dims=16)
    assert bpd.shape == (5,) and torch.isfinite(bpd).all()


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="n_bits"):
        reduce_bits(torch.tensor([1]), 9)
    with pytest.raises(ValueError, match="x must hold integer"):
        reduce_bits(torch.tensor([1.0]), 3)
    with pytest.raises(ValueError, match="x must hold integer pixel values"):
        reduce_bits(torch.tensor([256]), 3)
    with pytest.raises(ValueError, match="0..7"):
        dequantize(torch.tensor([8]), n_bits=3)
    with pytest.raises(ValueError, match="num_dims"):
        bits_per_dim(torch.zeros(2), num_dims=0)
    with pytest.raises(ValueError, match="alpha"):
        Logit(0.5)
    with pytest.raises(ValueError, match="x must have a batch"):
        Logit()(torch.rand(4))
    assert math.isfinite(float(Logit(0.0)(torch.tensor([[0.3]]))[1]))


# --------------------------------------------------------------------------------------------
# Any number of levels: n_bins


@pytest.mark.parametrize("n_bins", [2, 17, 100, 256, 300])
def test_dequantize_with_n_bins_stays_in_its_bins(n_bins):
    levels = torch.arange(n_bins).repeat(40).reshape(40, 1, n_bins)
    x = dequantize(levels, n_bins=n_bins, generator=torch.Generator().manual_seed(0))
    assert x.dtype == torch.float32 and x.shape == levels.shape
    assert (x >= 0).all() and (x < 1).all()
    assert torch.equal(torch.floor(x.double() * n_bins).long(), levels)  # noise stays inside each bin
    assert 0.25 < (x.double() * n_bins - levels).std() < 0.33  # and is uniform over it (std 0.289)
    assert x[..., -1].min() >= (n_bins - 1) / n_bins  # the top level fills the top of [0, 1)


def test_dequantize_n_bins_on_uint8_digits_levels():
    levels = torch.tensor([[0, 5, 16]], dtype=torch.uint8)
    x = dequantize(levels, n_bins=17, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert x.dtype == torch.float64
    assert torch.equal(torch.floor(x * 17).long(), levels.long())
    # n_bins equal to 2**n_bits is the n_bits path, noise and all
    a = dequantize(levels, n_bins=32, generator=torch.Generator().manual_seed(2))
    b = dequantize(levels, n_bits=5, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)


def test_bits_per_dim_uses_log_n_bins():
    # the uniform density on [0, 1)^D (log p = 0) gives each integer image probability n_bins^-D:
    # log2(n_bins) bits per dimension
    for n_bins in (2, 17, 256, 1000):
        bpd = bits_per_dim(torch.zeros(3), num_dims=64, n_bins=n_bins)
        torch.testing.assert_close(bpd, torch.full((3,), math.log2(n_bins)))
    log_prob = torch.tensor([-10.0, 0.0, 25.0], dtype=torch.float64)
    expected = -(log_prob - 64 * math.log(17)) / (64 * math.log(2))
    torch.testing.assert_close(bits_per_dim(log_prob, num_dims=64, n_bins=17), expected)
    # n_bins = 2**n_bits is the same as n_bits
    torch.testing.assert_close(bits_per_dim(log_prob, 64, n_bins=8), bits_per_dim(log_prob, 64, n_bits=3))
    # explicit n_bits=8 (the default) with n_bins: n_bins decides
    torch.testing.assert_close(bits_per_dim(log_prob, 64, 8, n_bins=17), expected)


def test_n_bins_bad_input_names_the_argument():
    x = torch.tensor([3])
    for bad in (1, 0, -4, 2.0, 17.5, True, "17"):
        with pytest.raises(ValueError, match="^n_bins must be an int >= 2"):
            dequantize(x, n_bins=bad)
        with pytest.raises(ValueError, match="^n_bins must be an int >= 2"):
            bits_per_dim(torch.zeros(1), num_dims=4, n_bins=bad)
    with pytest.raises(ValueError, match="either n_bits or n_bins"):
        dequantize(x, n_bits=5, n_bins=17)
    with pytest.raises(ValueError, match="either n_bits or n_bins"):
        bits_per_dim(torch.zeros(1), num_dims=4, n_bits=3, n_bins=17)
    with pytest.raises(ValueError, match=r"0\.\.16 for n_bins=17"):
        dequantize(torch.tensor([17]), n_bins=17)
    with pytest.raises(ValueError, match="n_bits"):  # n_bits is still checked
        dequantize(x, n_bits=9, n_bins=17)
    with pytest.raises(TypeError):  # keyword-only
        dequantize(x, 8, None, torch.float32, 17)
