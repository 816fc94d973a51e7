"""Tests of the coupling layers (fastflow.nn.coupling): every mask, activation and layout.

What each layer must do (DESIGN.md, "what tested means"): inverse(forward(x)) == x; the log-det
equals log|det| of the brute-force Jacobian (float64); forward log-det == -inverse log-det;
channels-last input gives the contiguous result in channels-last; context; state dicts; bad
input raises an error naming the argument. Run under the reference and the native backend.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fastflow
import fastflow.nn.coupling as coupling_module
from fastflow.nn import MLP, AdditiveCoupling, AffineCoupling, ConvNet

NATIVE = fastflow.native_available()
BACKENDS = [
    "reference",
    pytest.param("native", marks=pytest.mark.skipif("cpu" not in NATIVE, reason="fastflow._C not built")),
]
# (activation, clamp): the soft-clamped and unclamped exp, Glow's sigmoid, NICE's additive
ACTIVATIONS = [("exp", 2.0), ("exp", math.inf), ("sigmoid", 2.0), ("additive", None)]
ACT_IDS = ["exp", "exp-noclamp", "sigmoid", "additive"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    with fastflow.backend(request.param):
        yield request.param


pytestmark = pytest.mark.usefixtures("one_thread")


def make_layer(features, mask, flip, activation, clamp, hidden=8, **kw) -> nn.Module:
    if activation == "additive":
        return AdditiveCoupling(features, mask=mask, flip=flip, hidden=hidden, **kw)
    return AffineCoupling(features, mask=mask, flip=flip, hidden=hidden, activation=activation, clamp=clamp, **kw)


def randomize(module: nn.Module, seed: int = 0, scale: float = 0.4) -> nn.Module:
    """Non-trivial parameters: the default conditioner starts at zero (the identity layer)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale)
    return module


def brute_force_logdet(fn, x: torch.Tensor) -> torch.Tensor:
    """log|det d fn(x_i, i)/d x_i| per sample ``i``, from the full float64 Jacobian."""
    out = []
    for i in range(x.shape[0]):
        xi = x[i : i + 1]

        def flat(v, xi=xi, i=i):
            return fn(v.reshape(xi.shape), i).reshape(-1)

        jac = torch.autograd.functional.jacobian(flat, xi.reshape(-1))
        out.append(torch.linalg.slogdet(jac).logabsdet)
    return torch.stack(out)


def check_layer(layer: nn.Module, x: torch.Tensor, context=None, layout="contiguous") -> None:
    """Round trip, -inverse log-det and brute-force Jacobian log-det, all in float64."""
    layer = layer.double()
    x = x.double()
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)

    def fwd(v, i):
        if layout == "channels_last":
            v = v.contiguous(memory_format=torch.channels_last)
        return layer(v, context=None if context is None else context[i : i + 1])[0]

    y, logdet = layer(x, context=context)
    assert y.shape == x.shape and logdet.shape == (x.shape[0],)
    assert logdet.dtype == torch.float64
    x2, logdet_inv = layer.inverse(y, context=context)
    torch.testing.assert_close(x2, x, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(logdet_inv, -logdet, rtol=1e-10, atol=1e-10)
    expected = brute_force_logdet(fwd, x)
    torch.testing.assert_close(logdet, expected, rtol=1e-8, atol=1e-8)


# --------------------------------------------------------------------------------------------
# Round trip and log-det against the Jacobian


@pytest.mark.parametrize("activation,clamp", ACTIVATIONS, ids=ACT_IDS)
@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("mask", ["half", "alternate"])
def test_vector_logdet_matches_jacobian(backend, mask, flip, activation, clamp):
    layer = randomize(make_layer(5, mask, flip, activation, clamp))  # odd D: unequal parts
    x = torch.randn(3, 5, dtype=torch.float64) * 1.5
    check_layer(layer, x)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("activation,clamp", ACTIVATIONS, ids=ACT_IDS)
@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("mask", ["checkerboard", "channel", "half", "alternate"])
def test_image_logdet_matches_jacobian(backend, mask, flip, activation, clamp, layout):
    shape = (3, 3, 4)  # odd C and odd H: unequal parts everywhere
    layer = randomize(make_layer(shape, mask, flip, activation, clamp, hidden=4), scale=0.3)
    x = torch.randn(2, *shape, dtype=torch.float64)
    check_layer(layer, x, layout=layout)


@pytest.mark.parametrize("activation,clamp", ACTIVATIONS, ids=ACT_IDS)
@pytest.mark.parametrize(
    "features,mask",
    [(7, "half"), (6, "alternate"), ((4, 6, 6), "checkerboard"), ((4, 6, 6), "channel"), ((5, 2, 3), "alternate")],
)
def test_round_trip_float32(backend, features, mask, activation, clamp):
    for flip in (False, True):
        layer = randomize(make_layer(features, mask, flip, activation, clamp, hidden=16), seed=1, scale=0.2)
        x = torch.randn(64, *((features,) if isinstance(features, int) else features))
        y, logdet = layer(x)
        x2, logdet_inv = layer.inverse(y)
        assert logdet.dtype == torch.float32
        torch.testing.assert_close(x2, x, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(logdet_inv, -logdet, rtol=1e-5, atol=1e-4)
        assert not torch.equal(y, x)


def test_partition_is_the_documented_one(backend):
    """flip=False transforms the second half / odd features / odd-parity pixels / last channels."""
    cases = [
        (6, "half", [0, 1, 2]),
        (7, "half", [0, 1, 2]),
        (6, "alternate", [0, 2, 4]),
    ]
    for features, mask, kept in cases:
        for flip in (False, True):
            layer = randomize(AffineCoupling(features, mask=mask, flip=flip, hidden=8))
            x = torch.randn(4, features)
            y, _ = layer(x)
            unchanged = [i for i in range(features) if torch.equal(y[:, i], x[:, i])]
            expect = kept if not flip else [i for i in range(features) if i not in kept]
            assert unchanged == expect, (features, mask, flip)
    parity = (torch.arange(4)[:, None] + torch.arange(5)[None, :]) % 2
    for flip in (False, True):
        layer = randomize(AffineCoupling((2, 4, 5), mask="checkerboard", flip=flip, hidden=4))
        x = torch.randn(3, 2, 4, 5)
        y, _ = layer(x)
        same = (y == x).all(0).all(0)
        assert torch.equal(same, parity == (1 if flip else 0))
        layer = randomize(AffineCoupling((5, 2, 2), mask="channel", flip=flip, hidden=4))
        x = torch.randn(3, 5, 2, 2)
        y, _ = layer(x)
        same = [c for c in range(5) if torch.equal(y[:, c], x[:, c])]
        assert same == ([2, 3, 4] if flip else [0, 1])


@pytest.mark.parametrize("activation,clamp", ACTIVATIONS, ids=ACT_IDS)
def test_zero_initialised_conditioner(backend, activation, clamp):
    """The default conditioners end in a zero layer: exp/additive start as the identity."""
    for features, mask in [(4, "half"), ((2, 4, 4), "checkerboard"), ((2, 4, 4), "channel")]:
        layer = make_layer(features, mask, False, activation, clamp)
        x = torch.randn(5, *((features,) if isinstance(features, int) else features))
        y, logdet = layer(x)
        if activation == "sigmoid":
            # y_b = (x_b + 0) * sigmoid(2) on the transformed half (numel / 2 elements each)
            n_b = x[0].numel() // 2
            torch.testing.assert_close(logdet, torch.full((5,), n_b * math.log(torch.sigmoid(torch.tensor(2.0)).item())))
        else:
            torch.testing.assert_close(y, x)
            torch.testing.assert_close(logdet, torch.zeros(5))


# --------------------------------------------------------------------------------------------
# Layouts, context, conditioners


@pytest.mark.parametrize("activation,clamp", ACTIVATIONS, ids=ACT_IDS)
@pytest.mark.parametrize("mask", ["checkerboard", "channel", "alternate"])
def test_channels_last_matches_contiguous(backend, mask, activation, clamp):
    shape = (4, 5, 6)
    layer = randomize(make_layer(shape, mask, False, activation, clamp, hidden=8), scale=0.2)
    x = torch.randn(3, *shape)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    assert not x_cl.is_contiguous()
    y, ld = layer(x)
    y_cl, ld_cl = layer(x_cl)
    assert y_cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y_cl, y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ld_cl, ld, rtol=1e-5, atol=1e-5)
    x2, ld_inv = layer.inverse(y_cl)
    assert x2.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(x2, x, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ld_inv, -ld, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    "features,mask", [(4, "half"), (5, "alternate"), ((2, 3, 4), "checkerboard"), ((3, 3, 4), "channel")]
)
def test_context(backend, features, mask):
    layer = randomize(AffineCoupling(features, mask=mask, hidden=6, context_features=3), scale=0.3)
    shape = (features,) if isinstance(features, int) else features
    x = torch.randn(2, *shape, dtype=torch.float64)
    c1, c2 = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    check_layer(layer, x, context=c1)
    y1, _ = layer(x, context=c1)
    y2, _ = layer(x, context=c2)
    assert not torch.allclose(y1, y2)  # the context reaches the conditioner
    with pytest.raises(ValueError, match="context is required"):
        layer(x)
    with pytest.raises(ValueError, match="context must have shape"):
        layer(x, context=torch.randn(2, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="context must have shape"):
        layer.inverse(x, context=torch.randn(3, 3, dtype=torch.float64))
    plain = AffineCoupling(features, mask=mask, hidden=6)
    with pytest.raises(ValueError, match="context"):
        plain(x.float(), context=c1.float())


def test_custom_conditioner(backend):
    # vectors: x_a [B, 2] + context [B, 1] -> [B, 2 * 3]
    layer = AffineCoupling(5, conditioner=nn.Linear(3, 6), context_features=1)
    randomize(layer)
    x = torch.randn(4, 5, dtype=torch.float64)
    check_layer(layer, x, context=torch.randn(4, 1, dtype=torch.float64))
    # checkerboard: the whole (masked) image -> 2C channels; additive: the shift alone
    conv = nn.Conv2d(2, 4, 3, padding=1)
    check_layer(randomize(AffineCoupling((2, 4, 4), mask="checkerboard", conditioner=conv)), torch.randn(2, 2, 4, 4))
    check_layer(randomize(AdditiveCoupling(4, conditioner=nn.Linear(2, 2))), torch.randn(3, 4))
    bad = AffineCoupling(5, conditioner=nn.Linear(2, 5))
    with pytest.raises(ValueError, match="conditioner's output must have shape"):
        bad(torch.randn(4, 5))


def test_default_conditioners():
    mlp = MLP(3, 4, hidden=16, n_hidden_layers=3)
    assert [type(m) for m in mlp] == [nn.Linear, nn.ReLU] * 3 + [nn.Linear]
    assert mlp[-1].weight.abs().sum() == 0 and mlp[-1].bias.abs().sum() == 0
    cnn = ConvNet(3, 6, hidden=8)
    kinds = [(type(m), getattr(m, "kernel_size", None)) for m in cnn]
    assert kinds == [
        (nn.Conv2d, (3, 3)), (nn.ReLU, None), (nn.Conv2d, (1, 1)), (nn.ReLU, None), (nn.Conv2d, (3, 3))
    ]
    assert cnn[-1].weight.abs().sum() == 0
    assert cnn(torch.randn(2, 3, 5, 7)).shape == (2, 6, 5, 7)
    layer = AffineCoupling(6, hidden=32, n_hidden_layers=1)
    assert layer.conditioner[0].in_features == 3 and layer.conditioner[-1].out_features == 6
    layer = AffineCoupling((3, 4, 4), mask="checkerboard", hidden=5, context_features=2)
    assert layer.conditioner[0].in_channels == 5 and layer.conditioner[-1].out_channels == 6
    layer = AdditiveCoupling((5, 4, 4), mask="channel", hidden=5, flip=True)
    assert layer.conditioner[0].in_channels == 3 and layer.conditioner[-1].out_channels == 2


def test_elementwise_part_goes_through_the_operator(monkeypatch):
    calls = []

    def spy(fn, name):
        def wrapped(*args, **kwargs):
            calls.append((name, kwargs.get("activation")))
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(coupling_module, "affine_coupling", spy(coupling_module.affine_coupling, "fwd"))
    monkeypatch.setattr(
        coupling_module, "affine_coupling_inverse", spy(coupling_module.affine_coupling_inverse, "inv")
    )
    for layer, x in [
        (AffineCoupling(4, activation="sigmoid"), torch.randn(2, 4)),
        (AdditiveCoupling((2, 4, 4), mask="checkerboard", hidden=4), torch.randn(2, 2, 4, 4)),
    ]:
        y, _ = layer(x)
        layer.inverse(y)
    assert calls == [("fwd", "sigmoid"), ("inv", "sigmoid"), ("fwd", "additive"), ("inv", "additive")]


def test_state_dict_round_trip(backend):
    for features, mask in [(5, "alternate"), ((2, 4, 4), "checkerboard")]:
        torch.manual_seed(0)
        a = randomize(AffineCoupling(features, mask=mask, hidden=8, flip=True), seed=3)
        torch.manual_seed(1)
        b = AffineCoupling(features, mask=mask, hidden=8, flip=True)
        # only the conditioner's parameters: masks are rebuilt from the constructor arguments
        assert all(k.startswith("conditioner.") for k in a.state_dict())
        b.load_state_dict(a.state_dict())
        x = torch.randn(3, *((features,) if isinstance(features, int) else features))
        torch.testing.assert_close(b(x), a(x))
        torch.testing.assert_close(b.inverse(x), a.inverse(x))


def test_gradients_reach_every_parameter(backend):
    layer = randomize(AffineCoupling((2, 4, 4), mask="checkerboard", hidden=4, context_features=2), scale=0.3)
    x = torch.randn(3, 2, 4, 4, requires_grad=True)
    y, logdet = layer(x, context=torch.randn(3, 2))
    (y.square().sum() - logdet.sum()).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.skipif("cpu" not in NATIVE, reason="fastflow._C not built")
@pytest.mark.parametrize("activation,clamp", ACTIVATIONS, ids=ACT_IDS)
def test_native_matches_reference(activation, clamp):
    for features, mask in [(6, "alternate"), ((3, 4, 5), "checkerboard")]:
        layer = randomize(make_layer(features, mask, False, activation, clamp, hidden=8), scale=0.3)
        x = torch.randn(4, *((features,) if isinstance(features, int) else features))
        results = {}
        for name in ("native", "reference"):
            layer.zero_grad()
            with fastflow.backend(name):
                y, ld = layer(x)
                x2, ld_inv = layer.inverse(y)
                (y.sin().sum() + ld.sum() + x2.cos().sum()).backward()
            results[name] = [y, ld, x2, ld_inv] + [p.grad.clone() for p in layer.parameters()]
        for a, b in zip(results["native"], results["reference"]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Bad input


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="mask must be one of"):
        AffineCoupling(4, mask="stripes")
    with pytest.raises(ValueError, match="checkerboard"):
        AffineCoupling(4, mask="checkerboard")
    with pytest.raises(ValueError, match="channel"):
        AffineCoupling(4, mask="channel")
    with pytest.raises(ValueError, match="at least 2 channels"):
        AffineCoupling((1, 4, 4), mask="channel")
    with pytest.raises(ValueError, match="at least 2 features"):
        AffineCoupling(1)
    with pytest.raises(ValueError, match="features"):
        AffineCoupling((3, 4))
    with pytest.raises(ValueError, match="features"):
        AffineCoupling(0)
    with pytest.raises(ValueError, match="activation"):
        AffineCoupling(4, activation="additive")
    with pytest.raises(ValueError, match="activation"):
        AffineCoupling(4, activation="softplus")
    with pytest.raises(ValueError, match="clamp"):
        AffineCoupling(4, clamp=0.0)
    with pytest.raises(ValueError, match="context_features"):
        AffineCoupling(4, context_features=0)
    with pytest.raises(ValueError, match="hidden"):
        AffineCoupling(4, hidden=0)
    with pytest.raises(ValueError, match="n_hidden_layers"):
        AffineCoupling(4, n_hidden_layers=-1)
    with pytest.raises(TypeError, match="conditioner"):
        AffineCoupling(4, conditioner=lambda x: x)


def test_bad_input_names_the_argument(backend):
    layer = AffineCoupling(4, hidden=4)
    with pytest.raises(ValueError, match=r"^x must have shape \[batch, 4\]"):
        layer(torch.randn(3, 5))
    with pytest.raises(ValueError, match=r"^x must have shape"):
        layer(torch.randn(4))
    with pytest.raises(ValueError, match=r"^z must have shape"):
        layer.inverse(torch.randn(3, 4, 1))
    image = AffineCoupling((2, 4, 4), mask="checkerboard", hidden=4)
    with pytest.raises(ValueError, match=r"^x must have shape \[batch, 2, 4, 4\]"):
        image(torch.randn(3, 2, 4, 5))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_convnet_channels_last_path_matches_and_keeps_the_layout(layout):
    torch.manual_seed(0)
    plain = ConvNet(3, 6, hidden=8, zero_init=False, channels_last=False).double()
    fast = ConvNet(3, 6, hidden=8, zero_init=False).double()  # default: channels-last on CPU
    fast.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = plain(x1), fast(x2)
    torch.testing.assert_close(y2, y1)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert y2.is_contiguous(memory_format=fmt)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x2.grad, x1.grad)
    for p1, p2 in zip(plain.parameters(), fast.parameters()):
        torch.testing.assert_close(p2.grad, p1.grad)
    assert "channels_last=False" in repr(plain)
    with pytest.raises(ValueError, match="channels_last"):
        ConvNet(3, 6, channels_last="yes")
