"""Tests of the autoregressive flows: MADE's masks, MaskedAutoregressive / InverseAutoregressive
layers, Permutation, BatchNormFlow and the MAF / IAF models."""

from __future__ import annotations

import io

import pytest
import torch

import fastflow
from fastflow.models import IAF, MAF
from fastflow.nn.autoregressive import (
    MADE,
    BatchNormFlow,
    InverseAutoregressive,
    MaskedAutoregressive,
    Permutation,
)

pytestmark = pytest.mark.usefixtures("one_thread")

LAYERS = [MaskedAutoregressive, InverseAutoregressive]
ACTIVATIONS = ["exp", "sigmoid", "additive"]


def _randomise(module: torch.nn.Module, std: float = 0.3) -> torch.nn.Module:
    # the output layer starts at zero (identity map): give every parameter a value
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, std)
    return module


def _jacobian(f, x: torch.Tensor) -> torch.Tensor:
    # per-sample Jacobians of a map of [B, D], [B, D, D]
    return torch.stack([torch.autograd.functional.jacobian(lambda v: f(v[None])[0], xi) for xi in x])


@pytest.mark.parametrize("order", ["sequential", "reverse", [2, 0, 3, 1, 4]])
@pytest.mark.parametrize("hidden", [8, [16, 3, 7]])
@pytest.mark.parametrize("n_params", [1, 2])
def test_made_is_autoregressive_in_its_order(order, hidden, n_params):
    torch.manual_seed(0)
    D = 5
    made = _randomise(MADE(D, hidden, n_params, order=order)).double()
    x = torch.randn(3, D, dtype=torch.float64)
    J = _jacobian(made, x)  # [B, n_params * D, D]
    rank = torch.empty(D, dtype=torch.long)
    perm = made.order
    rank[perm] = torch.arange(D)
    allowed = rank[None, :] < rank[:, None]  # output i may depend on input j iff j comes first
    allowed = allowed.repeat(n_params, 1)
    assert (J[:, ~allowed] == 0).all()
    # and the masks connect what they may: with every hidden layer at least D - 1 wide (each
    # degree present), the paths through the masks are exactly the allowed pairs
    conn = made.output.mask
    for layer in reversed(made.hidden_layers):
        conn = conn @ layer.mask
    assert not (conn[~allowed] > 0).any()
    widths = [hidden] * 2 if isinstance(hidden, int) else hidden
    if min(widths) >= D - 1:
        assert torch.equal(conn > 0, allowed)


def test_made_without_hidden_layers_and_with_context():
    torch.manual_seed(0)
    made = _randomise(MADE(4, hidden=[], n_params=2, context_features=3)).double()
    x, c = torch.randn(2, 4, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    J = _jacobian(lambda v: made(v, c[:1].expand(len(v), -1)), x[:1])
    assert (J[0][:4].triu() == 0).all() and (J[0][4:].triu() == 0).all()
    out1 = made(x, c)
    out2 = made(x, c + 1)
    assert not torch.allclose(out1, out2)  # the context reaches the output
    with pytest.raises(ValueError, match="context"):
        made(x)


@pytest.mark.parametrize("layer_cls", LAYERS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_layer_round_trip_and_logdet_matches_jacobian(layer_cls, activation):
    torch.manual_seed(1)
    layer = _randomise(layer_cls(4, hidden=[12, 12], activation=activation, order="reverse")).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    z, logdet = layer(x)
    x2, logdet_inv = layer.inverse(z)
    torch.testing.assert_close(x2, x, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(logdet_inv, -logdet, rtol=1e-9, atol=1e-9)
    J = _jacobian(lambda v: layer(v)[0], x)
    torch.testing.assert_close(logdet, torch.linalg.slogdet(J)[1], rtol=1e-9, atol=1e-9)
    if activation == "additive":
        assert (logdet == 0).all()


@pytest.mark.parametrize("layer_cls", LAYERS)
def test_layer_with_context(layer_cls):
    torch.manual_seed(2)
    layer = _randomise(layer_cls(3, hidden=8, context_features=2)).double()
    x, c = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    z, logdet = layer(x, context=c)
    x2, _ = layer.inverse(z, context=c)
    torch.testing.assert_close(x2, x)
    z_other, _ = layer(x, context=c + 1)
    assert not torch.allclose(z, z_other)


def test_layer_starts_as_identity_and_native_matches_reference():
    torch.manual_seed(3)
    x = torch.randn(7, 5)
    layer = MaskedAutoregressive(5, hidden=16)
    z, logdet = layer(x)
    torch.testing.assert_close(z, x)
    assert (logdet == 0).all()
    _randomise(layer)
    with fastflow.backend("reference"):
        z_ref, ld_ref = layer(x)
    z_auto, ld_auto = layer(x)
    torch.testing.assert_close(z_auto, z_ref)
    torch.testing.assert_close(ld_auto, ld_ref)


def test_permutation_and_batch_norm_flow():
    torch.manual_seed(4)
    x = torch.randn(32, 4, dtype=torch.float64) * 3 + 1
    perm = Permutation(4, [2, 0, 3, 1])
    z, ld = perm(x)
    assert torch.equal(z, x[:, [2, 0, 3, 1]]) and (ld == 0).all()
    assert torch.equal(perm.inverse(z)[0], x)
    assert torch.equal(Permutation(3)(torch.eye(3))[0], torch.eye(3).flip(1))
    with pytest.raises(ValueError, match="perm"):
        Permutation(3, [0, 0, 1])

    bn = BatchNormFlow(4).double()
    with torch.no_grad():
        bn.log_gamma.normal_()
        bn.beta.normal_()
    z, ld = bn(x)  # training: batch statistics
    J = _jacobian(lambda v: (v - x.mean(0)) * torch.rsqrt(x.var(0, unbiased=False) + bn.eps)
                  * bn.log_gamma.exp() + bn.beta, x[:1])
    torch.testing.assert_close(ld[0], torch.linalg.slogdet(J[0])[1])
    assert torch.allclose(bn.running_mean, 0.1 * x.mean(0))
    bn.eval()
    z, ld = bn(x)
    x2, ld_inv = bn.inverse(z)
    torch.testing.assert_close(x2, x)
    torch.testing.assert_close(ld_inv, -ld)
    J = _jacobian(lambda v: bn(v)[0], x[:2])
    torch.testing.assert_close(ld[:2], torch.linalg.slogdet(J)[1])
    with pytest.raises(ValueError, match="momentum"):
        BatchNormFlow(3, momentum=0)


@pytest.mark.parametrize("model_cls", [MAF, IAF])
def test_model_log_prob_sample_state_dict(model_cls):
    torch.manual_seed(5)
    flow = model_cls(3, n_transforms=3, hidden=16, permutation="random", batch_norm=True)
    _randomise(flow, 0.2)
    flow.eval()
    x = torch.randn(10, 3)
    lp = flow.log_prob(x)
    assert lp.shape == (10,) and torch.isfinite(lp).all()
    s, lp_s = flow.sample_and_log_prob(4)
    torch.testing.assert_close(flow.log_prob(s), lp_s, rtol=1e-4, atol=1e-4)
    buf = io.BytesIO()
    torch.save(flow.state_dict(), buf)
    buf.seek(0)
    other = model_cls(3, n_transforms=3, hidden=16, permutation="random", batch_norm=True).eval()
    other.load_state_dict(torch.load(buf))
    torch.testing.assert_close(other.log_prob(x), lp)


def test_maf_trains_on_a_toy_density():
    torch.manual_seed(6)
    x = fastflow.data.toy_data("moons", 1024, seed=0)
    flow = MAF(2, n_transforms=4, hidden=32)
    opt = torch.optim.Adam(flow.parameters(), lr=3e-3)
    start = -flow.log_prob(x).mean().item()
    for _ in range(150):
        loss = -flow.log_prob(x).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < start - 0.5


def test_compile_fullgraph_forward_matches_eager():
    torch.manual_seed(7)
    layer = _randomise(MaskedAutoregressive(4, hidden=8))
    x = torch.randn(5, 4)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    z, ld = compiled(x)
    z_ref, ld_ref = layer(x)
    torch.testing.assert_close(z, z_ref)
    torch.testing.assert_close(ld, ld_ref)


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="features"):
        MADE(0)
    with pytest.raises(ValueError, match="order"):
        MADE(3, order=[0, 1, 1])
    with pytest.raises(ValueError, match="order"):
        MADE(3, order="random-ish")
    with pytest.raises(ValueError, match="hidden"):
        MADE(3, hidden=[4, 0])
    with pytest.raises(ValueError, match="activation"):
        MaskedAutoregressive(3, activation="tanh")
    with pytest.raises(ValueError, match=r"x must have shape \[B, 3\]"):
        MaskedAutoregressive(3)(torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"z must have shape \[B, 3\]"):
        InverseAutoregressive(3).inverse(torch.randn(2, 3, 1))
    with pytest.raises(ValueError, match="permutation"):
        MAF(3, permutation="shuffle")
    with pytest.raises(ValueError, match="n_transforms"):
        MAF(3, n_transforms=0)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("hidden", [[16, 16], [], [8]])
@pytest.mark.parametrize("context_features", [None, 3])
def test_fast_sequential_inverse_equals_the_naive_one(activation, hidden, context_features):
    # the D-pass inverse updates the first layer incrementally and computes only the output rows
    # it needs; it must equal D full MADE passes, values and gradients
    torch.manual_seed(8)
    layer = _randomise(
        MaskedAutoregressive(5, hidden=hidden, activation=activation, order=[2, 0, 4, 1, 3],
                             context_features=context_features)
    ).double()
    z = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    c = torch.randn(7, 3, dtype=torch.float64) if context_features else None
    x_fast, ld_fast = layer._generate(z, c)
    x_naive, ld_naive = layer._generate_naive(z, c)
    torch.testing.assert_close(x_fast, x_naive, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ld_fast, ld_naive, rtol=1e-12, atol=1e-12)
    g_fast = torch.autograd.grad((x_fast.sum() + ld_fast.sum()), [z] + list(layer.parameters()),
                                 allow_unused=True)
    g_naive = torch.autograd.grad((x_naive.sum() + ld_naive.sum()), [z] + list(layer.parameters()),
                                  allow_unused=True)
    for a, b in zip(g_fast, g_naive):
        if a is None or b is None:
            assert a is None or not a.any()
            assert b is None or not b.any()
        else:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "make",
    [
        lambda: _randomise(InverseAutoregressive(3, hidden=8)),
        lambda: Permutation(3, [2, 0, 1]),
        lambda: _randomise(BatchNormFlow(3)),
        lambda: _randomise(BatchNormFlow(3)).eval(),
    ],
    ids=["iaf-forward", "permutation", "batchnorm-train", "batchnorm-eval"],
)
def test_other_layers_compile_fullgraph(make):
    torch.manual_seed(9)
    layer = make()
    x = torch.randn(6, 3)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    z, ld = compiled(x)
    z_ref, ld_ref = layer(x)
    torch.testing.assert_close(z, z_ref)
    torch.testing.assert_close(ld, ld_ref)


def test_loading_a_state_dict_brings_its_order():
    torch.manual_seed(10)
    src = _randomise(MaskedAutoregressive(4, hidden=8, order=[3, 1, 0, 2]))
    dst = MaskedAutoregressive(4, hidden=8)  # sequential order, overwritten by the load
    dst.load_state_dict(src.state_dict())
    assert dst.made.order_list == [3, 1, 0, 2]
    z = torch.randn(5, 4)
    torch.testing.assert_close(dst.inverse(z)[0], src.inverse(z)[0])


@pytest.mark.parametrize("model_cls", [MAF, IAF])
def test_2d_density_integrates_to_one(model_cls):
    torch.manual_seed(11)
    flow = _randomise(model_cls(2, n_transforms=3, hidden=16), 0.3).double().eval()
    ticks = torch.linspace(-10, 10, 401, dtype=torch.float64)
    xx, yy = torch.meshgrid(ticks, ticks, indexing="xy")
    with torch.no_grad():
        p = flow.log_prob(torch.stack([xx.reshape(-1), yy.reshape(-1)], 1)).exp()
    mass = p.sum() * (ticks[1] - ticks[0]) ** 2
    assert abs(mass.item() - 1) < 2e-3
