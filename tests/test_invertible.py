"""Invertible backpropagation (fastflow.nn.InvertibleBackprop): the gradients are those of
standard backpropagation, layers that are not exactly invertible are checkpointed or refused,
the check mode reports reconstruction errors, and the peak memory does not grow with depth."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fastflow.nn.invertible as invertible_mod
from fastflow import Compose, Flow, Transform
from fastflow.memory import track_peak_memory
from fastflow.models import Glow, RealNVP, RealNVPImage
from fastflow.nn import AffineCoupling, InvertibleBackprop

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = {torch.float64: 1e-8, torch.float32: 1e-4}


def _perturb(model: nn.Module, scale: float = 0.05) -> None:
    # the zero-initialised last layers make every coupling the identity: move off it
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def _ready(model: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> nn.Module:
    model = model.to(dtype)
    with torch.no_grad():
        model(x)  # ActNorm's data-dependent initialisation
    _perturb(model)
    return model


def _state(model: nn.Module) -> dict:
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in model.state_dict().items()}


def _grads(model: nn.Module, loss_fn, x: torch.Tensor, context=None):
    model.zero_grad(set_to_none=True)
    xr = x.clone().requires_grad_(True)
    args = (xr,) if context is None else (xr, context)
    loss = loss_fn(*args)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), xr.grad.clone(), grads


def _assert_close_rel(a: torch.Tensor, b: torch.Tensor, tol: float, what: str) -> None:
    err = (a - b).norm().item()
    ref = b.norm().item()
    assert err <= tol * ref + 1e-12, f"{what}: |diff| = {err:.3g}, |ref| = {ref:.3g}, tol {tol:g}"


def _compare(model, x, dtype, wrapper=None):
    x = x.to(dtype)
    wrapper = InvertibleBackprop(model) if wrapper is None else wrapper
    loss_s, gx_s, g_s = _grads(model, lambda v: -model.log_prob(v).mean(), x)
    loss_i, gx_i, g_i = _grads(model, lambda v: -wrapper.log_prob(v).mean(), x)
    tol = TOL[dtype]
    assert torch.allclose(loss_s, loss_i, rtol=tol, atol=0)
    assert g_s.keys() == g_i.keys() and len(g_s) == len(list(model.parameters()))
    for name in g_s:
        _assert_close_rel(g_i[name], g_s[name], tol, name)
    _assert_close_rel(gx_i, gx_s, tol, "x")
    return wrapper


DTYPES = [torch.float64, torch.float32]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n_couplings", [2, 6])
@pytest.mark.parametrize("activation", ["exp", "sigmoid", "additive"])
def test_realnvp_vector_gradients(dtype, n_couplings, activation):
    x = torch.randn(16, 4)
    model = _ready(RealNVP(4, n_couplings=n_couplings, hidden=16, activation=activation), x.to(dtype), dtype)
    _compare(model, x, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n_couplings", [2, 4])
def test_realnvp_image_gradients(dtype, n_couplings):
    x = torch.randn(3, 2, 6, 6)
    model = _ready(RealNVPImage((2, 6, 6), n_couplings=n_couplings, hidden=8), x.to(dtype), dtype)
    _compare(model, x, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("levels,depth", [(1, 2), (2, 1), (2, 3), (3, 2)])
def test_glow_gradients(dtype, levels, depth):
    x = torch.randn(3, 3, 8, 8)
    model = _ready(Glow((3, 8, 8), levels=levels, depth=depth, hidden=8), x.to(dtype), dtype)
    # the split priors and the top prior start at the standard normal: move them too
    wrapper = _compare(model, x, dtype)
    z_s, ld_s = model(x.to(dtype))
    z_i, ld_i = wrapper(x.to(dtype))
    assert torch.allclose(z_s, z_i, atol=1e-6) and torch.allclose(ld_s, ld_i, atol=1e-4)


@pytest.mark.parametrize("variant", [
    dict(coupling="additive"),
    dict(activation="exp", invconv=False),  # multi-scale Real NVP
    dict(lu=False),
])
def test_glow_variants_gradients(variant):
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    model = _ready(Glow((3, 8, 8), levels=2, depth=2, hidden=8, **variant), x, torch.float64)
    _compare(model, x, torch.float64)


def test_fused_coupling_backward_runs_the_conditioner_once(monkeypatch):
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    model = _ready(Glow((3, 8, 8), levels=2, depth=2, hidden=8), x, torch.float64)
    conditioners = [m.conditioner for m in model.modules() if isinstance(m, AffineCoupling)]
    calls = []
    for c in conditioners:
        c.register_forward_hook(lambda *_: calls.append(1))
    wrapper = InvertibleBackprop(model)
    loss = -wrapper.log_prob(x).mean()
    assert len(calls) == len(conditioners)  # the forward pass
    calls.clear()
    loss.backward()
    assert len(calls) == len(conditioners)  # one pass per coupling: inverse and recompute share it
    fused = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    monkeypatch.setattr(invertible_mod, "_FUSE_COUPLINGS", False)
    calls.clear()
    (-wrapper.log_prob(x).mean()).backward()
    assert len(calls) == 3 * len(conditioners)  # forward, inverse, recompute
    for n, p in model.named_parameters():
        _assert_close_rel(fused[n], p.grad, 1e-10, n)


def test_autograd_grad_and_parameter_hooks():
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    model = _ready(Glow((3, 8, 8), levels=2, depth=2, hidden=8), x, torch.float64)
    wrapper = InvertibleBackprop(model)
    params = list(model.parameters())
    ref = torch.autograd.grad(-model.log_prob(x).mean(), params)
    # torch.autograd.grad: the gradients are returned, .grad is left alone
    got = torch.autograd.grad(-wrapper.log_prob(x).mean(), params)
    assert all(p.grad is None for p in params)
    for a, b in zip(got, ref):
        _assert_close_rel(a, b, 1e-10, "autograd.grad")
    # .backward(): accumulated into .grad (twice: summed) and the parameters' hooks run
    seen = []
    params[0].register_hook(lambda g: seen.append(g.shape))  # first ActNorm: in the chain
    (-wrapper.log_prob(x).mean()).backward()
    (-wrapper.log_prob(x).mean()).backward()
    assert seen == [params[0].shape] * 2
    for p, b in zip(params, ref):
        _assert_close_rel(p.grad, 2 * b, 1e-10, "accumulated")
    # .backward(inputs=...): only those get gradients
    model.zero_grad(set_to_none=True)
    (-wrapper.log_prob(x).mean()).backward(inputs=params[:3])
    assert all(p.grad is not None for p in params[:3]) and all(p.grad is None for p in params[3:])
    for p, b in zip(params[:3], ref):
        _assert_close_rel(p.grad, b, 1e-10, "inputs=")


def test_context_gradient():
    torch.manual_seed(0)
    dtype = torch.float64
    model = RealNVP(3, n_couplings=4, hidden=16, context_features=2).to(dtype)
    _perturb(model)
    x = torch.randn(8, 3, dtype=dtype)
    c = torch.randn(8, 2, dtype=dtype)
    wrapper = InvertibleBackprop(model)
    results = []
    for f in (model.log_prob, wrapper.log_prob):
        cr = c.clone().requires_grad_(True)
        model.zero_grad(set_to_none=True)
        f(x, context=cr).sum().backward()
        results.append((cr.grad, [p.grad.clone() for p in model.parameters()]))
    _assert_close_rel(results[1][0], results[0][0], 1e-10, "context")
    for a, b in zip(results[1][1], results[0][1]):
        _assert_close_rel(a, b, 1e-10, "param")


def test_checkpoint_every_and_level():
    x = torch.randn(2, 3, 8, 8)
    model = _ready(Glow((3, 8, 8), levels=3, depth=2, hidden=8), x, torch.float32)
    for every in (1, 2, 5, "level"):
        _compare(model, x, torch.float32, InvertibleBackprop(model, checkpoint_every=every))
    # the stored inputs are used: with every layer stored nothing is reconstructed
    w = InvertibleBackprop(model, checkpoint_every=1)
    assert w._anchors == {i for i, op in enumerate(w._ops) if op.kind == "inverse"}
    levels = InvertibleBackprop(model, checkpoint_every="level")
    assert len(levels._anchors) == 3


def test_no_grad_and_forward_contract():
    x = torch.randn(4, 3, 8, 8)
    model = _ready(Glow((3, 8, 8), levels=2, depth=2, hidden=8), x, torch.float32)
    wrapper = InvertibleBackprop(model)
    with torch.no_grad():
        assert torch.allclose(wrapper.log_prob(x), model.log_prob(x), atol=1e-4)
        z, logdet = wrapper(x)
        x2, logdet_inv = wrapper.inverse(z)
    assert torch.allclose(x2, x, atol=1e-4) and torch.allclose(logdet, -logdet_inv, atol=1e-3)
    assert wrapper.sample(2, temperature=0.5).shape == (2, 3, 8, 8)
    layers = wrapper.layers
    assert len(layers) == 2 * 2 * 3 and all(kind == "reconstructed" for _, kind in layers)


def test_state_dict_round_trip():
    x = torch.randn(4, 2, 6, 6)
    model = _ready(RealNVPImage((2, 6, 6), n_couplings=2, hidden=8), x, torch.float32)
    wrapper = InvertibleBackprop(model)
    keys = set(model.state_dict())
    assert set(wrapper.state_dict()) == {"model." + k for k in keys}
    fresh = RealNVPImage((2, 6, 6), n_couplings=2, hidden=8)
    fresh.load_state_dict(wrapper.model.state_dict())
    w2 = InvertibleBackprop(fresh)
    w2.load_state_dict(wrapper.state_dict())
    assert torch.allclose(w2.log_prob(x), model.log_prob(x), atol=1e-5)


# -- refusal and fallback ------------------------------------------------------------------


class _Halve(nn.Module):
    """A plain module, not a Transform."""

    def forward(self, x, context=None):
        return x / 2, x.new_zeros(x.shape[0])


class _Undeclared(Transform):
    def forward(self, x, context=None):
        return x * 2, x.new_full((x.shape[0],), x[0].numel() * math.log(2))

    def inverse(self, z, context=None):
        return z / 2, z.new_full((z.shape[0],), -z[0].numel() * math.log(2))


class _Lossy(_Undeclared):
    """Claims to be invertible, but forgets the sign (|x| is not invertible)."""

    exactly_invertible = True

    def forward(self, x, context=None):
        return x.abs() * 2, x.new_full((x.shape[0],), x[0].numel() * math.log(2))


class _Declared(_Undeclared):
    exactly_invertible = False


def test_non_transform_is_refused_by_name():
    flow = Flow([AffineCoupling(4, hidden=8), _Halve()], event_shape=4)
    with pytest.raises(TypeError, match=r"'transform\.transforms\.1' \(_Halve\).*not a fastflow Transform"):
        InvertibleBackprop(flow)


def test_undeclared_transform_is_refused_by_name():
    flow = Flow([AffineCoupling(4, hidden=8), Compose(_Undeclared())], event_shape=4)
    with pytest.raises(
        ValueError, match=r"'transform\.transforms\.1\.transforms\.0' \(_Undeclared\).*exactly_invertible"
    ):
        InvertibleBackprop(flow)


def test_declared_not_invertible_is_refused_or_checkpointed():
    flow = Flow([AffineCoupling(4, hidden=8), _Declared()], event_shape=4).double()
    with pytest.raises(
        ValueError, match=r"'transform\.transforms\.1' \(_Declared\) is not exactly invertible"
    ):
        InvertibleBackprop(flow, fallback="error")
    wrapper = InvertibleBackprop(flow)  # default fallback: checkpointed
    assert wrapper.layers[1] == ("transform.transforms.1", "checkpointed")
    _perturb(flow)
    _compare(flow, torch.randn(8, 4), torch.float64, wrapper)


def test_lossy_layer_is_caught_by_check_mode():
    flow = Flow([AffineCoupling(4, hidden=8), _Lossy(), AffineCoupling(4, hidden=8, flip=True)],
                event_shape=4)
    _perturb(flow)
    x = torch.randn(8, 4)
    wrapper = InvertibleBackprop(flow, check=True, check_tol=1e-4)
    with pytest.raises(RuntimeError, match=r"'transform\.transforms\.1' \(_Lossy\) reconstructed its input"):
        (-wrapper.log_prob(x).mean()).backward()


class _Vanishing(Transform):
    """Claims to be invertible, but its scale underflows: exp(-200) is 0 in float32."""

    exactly_invertible = True

    def forward(self, x, context=None):
        return x * math.exp(-200.0), x.new_full((x.shape[0],), -200.0 * x[0].numel())

    def inverse(self, z, context=None):
        return z * math.exp(200.0), z.new_full((z.shape[0],), 200.0 * z[0].numel())


def test_reconstruction_that_overflows_is_an_error_not_nan():
    flow = Flow([AffineCoupling(4, hidden=8), _Vanishing(), AffineCoupling(4, hidden=8, flip=True)],
                event_shape=4)
    wrapper = InvertibleBackprop(flow)
    x = torch.randn(8, 4)
    loss = -wrapper.log_prob(x).mean()
    assert torch.isfinite(loss)
    with pytest.raises(RuntimeError, match=r"'transform\.transforms\.0' \(AffineCoupling\) is not finite"):
        loss.backward()
    # float64 holds exp(-200): the same flow trains
    flow.double().zero_grad(set_to_none=True)
    (-InvertibleBackprop(flow).log_prob(x.double()).mean()).backward()
    assert all(torch.isfinite(p.grad).all() for p in flow.parameters())


def test_iresblock_falls_back_to_checkpointing():
    from fastflow.nn import iResBlock, residual_mlp

    torch.manual_seed(0)
    dtype = torch.float64
    block = iResBlock(residual_mlp(2, hidden=16, n_hidden=1), estimator="roulette")
    flow = Flow([AffineCoupling(2, hidden=8), block, AffineCoupling(2, hidden=8, flip=True)],
                event_shape=2).to(dtype)
    _perturb(flow, 0.02)
    wrapper = InvertibleBackprop(flow)
    assert [kind for _, kind in wrapper.layers] == ["reconstructed", "checkpointed", "reconstructed"]
    with pytest.raises(ValueError, match=r"'transform\.transforms\.1' \(iResBlock\)"):
        InvertibleBackprop(flow, fallback="error")
    # the roulette estimator draws random numbers and the spectral norms update their buffers
    # in training mode: the recomputation replays the draws and the buffers are updated once
    x = torch.randn(32, 2, dtype=dtype)
    state = _state(flow)
    torch.manual_seed(5)
    loss_s, gx_s, g_s = _grads(flow, lambda v: -flow.log_prob(v).mean(), x)
    after_standard = _state(flow)
    flow.load_state_dict(state)
    torch.manual_seed(5)
    loss_i, gx_i, g_i = _grads(flow, lambda v: -wrapper.log_prob(v).mean(), x)
    assert torch.allclose(loss_s, loss_i, rtol=1e-10)
    for n in g_s:
        _assert_close_rel(g_i[n], g_s[n], 1e-8, n)
    _assert_close_rel(gx_i, gx_s, 1e-8, "x")
    for k, v in flow.state_dict().items():
        assert not isinstance(v, torch.Tensor) or torch.equal(v, after_standard[k]), k


def test_running_buffers_updated_once_and_dropout_replayed():
    # a conditioner with batch norm (running statistics) and dropout, in training mode
    def conditioner():
        net = nn.Sequential(nn.Linear(2, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3),
                            nn.Linear(16, 4))
        return net.double()

    flow = Flow([AffineCoupling(4, conditioner=conditioner()),
                 AffineCoupling(4, conditioner=conditioner(), flip=True)], event_shape=4).double()
    _perturb(flow)
    x = torch.randn(32, 4, dtype=torch.float64)
    state = _state(flow)
    torch.manual_seed(3)
    _, gx_s, g_s = _grads(flow, lambda v: -flow.log_prob(v).mean(), x)
    after = _state(flow)
    flow.load_state_dict(state)
    torch.manual_seed(3)
    wrapper = InvertibleBackprop(flow)
    _, gx_i, g_i = _grads(flow, lambda v: -wrapper.log_prob(v).mean(), x)
    for n in g_s:
        _assert_close_rel(g_i[n], g_s[n], 1e-10, n)
    _assert_close_rel(gx_i, gx_s, 1e-10, "x")
    for k, v in flow.state_dict().items():
        # e.g. num_batches_tracked == 1, not 3
        assert not isinstance(v, torch.Tensor) or torch.equal(v, after[k]), k
    assert int(flow.state_dict()["transform.transforms.0.conditioner.1.num_batches_tracked"]) == 1


def test_actnorm_must_be_initialised_first():
    model = Glow((3, 8, 8), levels=2, depth=1, hidden=8)
    wrapper = InvertibleBackprop(model)
    x = torch.randn(4, 3, 8, 8)
    first = r"transform\.transforms\.0\.steps\.0\.transforms\.0\.transforms\.0"
    with pytest.raises(RuntimeError, match=rf"ActNorm '{first}' is not initialised"):
        wrapper.log_prob(x)
    assert wrapper.initialize(x) == 2
    wrapper.log_prob(x).sum().backward()


def test_bad_arguments_name_the_argument():
    model = RealNVP(2, n_couplings=2, hidden=8)
    with pytest.raises(ValueError, match="checkpoint_every"):
        InvertibleBackprop(model, checkpoint_every=0)
    with pytest.raises(ValueError, match="checkpoint_every"):
        InvertibleBackprop(model, checkpoint_every="levels")
    with pytest.raises(ValueError, match="fallback"):
        InvertibleBackprop(model, fallback="ignore")
    with pytest.raises(ValueError, match="check_tol"):
        InvertibleBackprop(model, check=True, check_tol=-1.0)
    with pytest.raises(TypeError, match="model"):
        InvertibleBackprop("not a model")
    with pytest.raises(TypeError, match="log_prob needs a Flow"):
        InvertibleBackprop(Compose(AffineCoupling(2, hidden=4))).log_prob(torch.randn(2, 2))
    with pytest.raises(ValueError, match="x must have shape"):
        InvertibleBackprop(model).log_prob(torch.randn(2, 3))


# -- check mode and numerical error ----------------------------------------------------------


def _errors(depth: int, dtype: torch.dtype) -> list[tuple[str, float]]:
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8, dtype=dtype)
    model = _ready(Glow((3, 8, 8), levels=1, depth=depth, hidden=16), x, dtype)
    wrapper = InvertibleBackprop(model, check=True)
    (-wrapper.log_prob(x).mean()).backward()
    return wrapper.reconstruction_errors


def test_check_mode_reports_every_layer():
    errors = _errors(4, torch.float64)
    model_layers = 4 * 3  # ActNorm, 1x1 convolution, coupling per step
    assert len(errors) == model_layers
    assert errors[0][0] == "transform.transforms.0.steps.0.transforms.0.transforms.0"
    assert all(0 <= e < 1e-12 for _, e in errors)
    errors32 = _errors(4, torch.float32)
    assert all(0 <= e < 1e-4 for _, e in errors32)
    # float32 rounding is visible, and the first layer (reconstructed last) carries the most
    assert max(e for _, e in errors32) > 1e-8
    assert errors32[0][1] >= errors32[-1][1]


def test_check_mode_error_grows_with_depth_in_float32():
    shallow = max(e for _, e in _errors(2, torch.float32))
    deep = max(e for _, e in _errors(16, torch.float32))
    assert deep > shallow


# -- memory ------------------------------------------------------------------------------------


def _peak_bytes(depth: int, invertible: bool) -> int:
    torch.manual_seed(0)
    x = torch.randn(4, 3, 16, 16)
    model = Glow((3, 16, 16), levels=2, depth=depth, hidden=32)
    with torch.no_grad():
        model(x)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # gradients live between steps, like the parameters
    f = InvertibleBackprop(model).log_prob if invertible else model.log_prob
    (-f(x).mean()).backward()  # warm up
    with track_peak_memory() as mem:
        (-f(x).mean()).backward()
    return mem.peak_bytes


def test_peak_memory_is_lower_and_flat_in_depth():
    std2, std8 = _peak_bytes(2, False), _peak_bytes(8, False)
    inv2, inv8 = _peak_bytes(2, True), _peak_bytes(8, True)
    assert std8 > 3 * std2  # standard backprop: linear in depth
    assert inv8 <= 1.1 * inv2  # invertible: flat
    assert inv8 < 0.3 * std8
