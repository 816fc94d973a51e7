"""Tests of the invertible 1x1 convolution over PLU: the operator (native == reference, gradients,
opcheck, bad input) and the InvertibleConv1x1 layer (log-det vs Jacobian, round trip, cache)."""

from __future__ import annotations

import pytest
import torch

import fastflow
from fastflow.nn import InvertibleConv1x1
from fastflow.ops import (
    invconv_plu,
    invconv_plu_backward_reference,
    invconv_plu_inverse,
    invconv_plu_reference,
    plu_weight,
)

from _devices import DEVICES, NATIVE, dtypes, native_on, requires_native

SHAPES = [(1, 1), (3, 5), (17, 33), (2, 3, 4, 5), (5, 6, 7, 3), (2, 7, 1, 1), (4, 3, 5)]


pytestmark = pytest.mark.usefixtures("one_thread")


def _tol(dtype: torch.dtype) -> dict:
    return {
        torch.float64: dict(rtol=1e-9, atol=1e-9),
        torch.float32: dict(rtol=1e-4, atol=1e-4),
        torch.float16: dict(rtol=2e-2, atol=2e-2),
        torch.bfloat16: dict(rtol=1e-1, atol=1e-1),
    }[dtype]


def _params(C, dtype=torch.float64, device="cpu", seed=0):
    """perm, lower, upper, sign, log_s of a well-conditioned random W (factors in `dtype`)."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(C, generator=gen)
    lower = torch.randn(C, C, generator=gen, dtype=torch.float64) * 0.3
    upper = torch.randn(C, C, generator=gen, dtype=torch.float64) * 0.3
    sign = torch.where(torch.rand(C, generator=gen) < 0.5, -1.0, 1.0).double()
    log_s = torch.randn(C, generator=gen, dtype=torch.float64) * 0.2
    pd = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    return [perm.to(device)] + [t.to(device=device, dtype=pd) for t in (lower, upper, sign, log_s)]


def _x(shape, dtype=torch.float64, device="cpu", layout="contiguous", seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = torch.cat([x, x], dim=-1)[..., ::2]
    return x


def _run(fn, backend, *args):
    with fastflow.backend(backend):
        return fn(*args)


# --------------------------------------------------------------------------------------------
# native == reference, forward and backward


@requires_native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_native_matches_reference(device, inverse, shape):
    if not native_on(device):
        pytest.skip(f"no native kernel for {device}")
    fn = invconv_plu_inverse if inverse else invconv_plu
    for dtype in dtypes(device):
        perm, *ps = _params(shape[1], dtype, device)
        x = _x(shape, dtype, device).requires_grad_(True)
        ps = [p.requires_grad_(True) for p in ps]
        out_n, ld_n = _run(fn, "native", x, perm, *ps)
        out_r, ld_r = _run(fn, "reference", x, perm, *ps)
        tol = _tol(dtype)
        assert out_n.dtype == dtype and out_n.shape == x.shape
        assert ld_n.dtype == ps[0].dtype and ld_n.shape == (shape[0],)
        torch.testing.assert_close(out_n, out_r, **tol)
        torch.testing.assert_close(ld_n, ld_r, **tol)
        gy, gl = torch.randn_like(out_r), torch.randn_like(ld_r)
        wrt = (x, ps[0], ps[1], ps[3])
        grads_n = torch.autograd.grad([out_n, ld_n], wrt, [gy, gl])
        grads_r = torch.autograd.grad([out_r, ld_r], wrt, [gy, gl])
        for name, gn, gr in zip(("x", "lower", "upper", "log_s"), grads_n, grads_r):
            torch.testing.assert_close(gn, gr, **tol, msg=lambda m: f"grad {name}: {m}")


@requires_native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize(
    "layout, shape", [("channels_last", (3, 5, 4, 6)), ("strided", (3, 5, 4, 6)), ("strided", (3, 5))]
)
def test_layouts(device, inverse, layout, shape):
    if not native_on(device):
        pytest.skip(f"no native kernel for {device}")
    fn = invconv_plu_inverse if inverse else invconv_plu
    perm, *ps = _params(shape[1], torch.float32, device)
    x = _x(shape, torch.float32, device, layout=layout).requires_grad_(True)
    y_n, ld_n = _run(fn, "native", x, perm, *ps)
    xr = x.detach().contiguous().requires_grad_(True)
    y_r, ld_r = _run(fn, "reference", xr, perm, *ps)
    torch.testing.assert_close(y_n, y_r, **_tol(torch.float32))
    torch.testing.assert_close(ld_n, ld_r, **_tol(torch.float32))
    if layout == "channels_last":
        assert y_n.is_contiguous(memory_format=torch.channels_last)
    gy = _x(shape, torch.float32, device, layout=layout, seed=3)
    (gx,) = torch.autograd.grad(y_n, x, gy)
    (gxr,) = torch.autograd.grad(y_r, xr, gy.contiguous())
    torch.testing.assert_close(gx, gxr, **_tol(torch.float32))


@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("shape", [(4, 3), (2, 4, 3, 2)])
def test_backward_formulas_match_autograd(inverse, shape):
    """The hand-derived backward (reference and native op) == autograd through the reference."""
    perm, lower, upper, sign, log_s = _params(shape[1])
    x = _x(shape)
    g, gl = _x(shape, seed=5), torch.randn(shape[0], dtype=torch.float64)
    leaves = [t.clone().requires_grad_(True) for t in (x, lower, upper, log_s)]
    out, ld = invconv_plu_reference(
        leaves[0], perm, leaves[1], leaves[2], sign, leaves[3], inverse=inverse
    )
    expected = torch.autograd.grad([out, ld], leaves, [g, gl])
    got = [invconv_plu_backward_reference(g, gl, x, perm, lower, upper, sign, log_s, inverse)]
    if NATIVE:
        got.append(
            torch.ops.fastflow.invconv_plu_backward(g, gl, x, perm, lower, upper, sign, log_s, inverse)
        )
    for grads in got:
        for name, a, b in zip(("input", "lower", "upper", "log_s"), grads, expected):
            torch.testing.assert_close(a, b, msg=lambda m: f"grad {name}: {m}")
        # masked entries of lower/upper get exactly zero gradient
        assert torch.count_nonzero(grads[1].triu()) == 0
        assert torch.count_nonzero(grads[2].tril()) == 0


# --------------------------------------------------------------------------------------------
# gradcheck / gradgradcheck in float64, through each backend


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("shape", [(3, 3), (2, 3, 2, 2)])
def test_gradcheck(backend, inverse, shape):
    if backend == "native" and not NATIVE:
        pytest.skip("fastflow._C is not built")
    fn = invconv_plu_inverse if inverse else invconv_plu
    perm, lower, upper, sign, log_s = _params(shape[1])
    inputs = [t.clone().requires_grad_(True) for t in (_x(shape), lower, upper, log_s)]

    def f(x, lo, up, ls):
        with fastflow.backend(backend):
            return fn(x, perm, lo, up, sign, ls)

    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


# --------------------------------------------------------------------------------------------
# opcheck: schema, fake (torch.compile) and autograd registration


@requires_native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("inverse", [False, True])
def test_opcheck(device, inverse):
    if not native_on(device):
        pytest.skip(f"no native kernel for {device}")
    for shape, layout in [((4, 3), "contiguous"), ((2, 3, 4, 5), "channels_last"), ((3, 4), "strided")]:
        perm, *ps = _params(shape[1], torch.float32, device)
        x = _x(shape, torch.float32, device, layout=layout)
        for requires_grad in (False, True):
            args = [x.detach().requires_grad_(requires_grad), perm]
            args += [p.detach().requires_grad_(requires_grad) for p in ps]
            torch.library.opcheck(torch.ops.fastflow.invconv_plu.default, (*args, inverse))
        g = _x(shape, torch.float32, device, layout=layout, seed=4)
        gl = torch.randn(shape[0], device=device)
        torch.library.opcheck(
            torch.ops.fastflow.invconv_plu_backward.default, (g, gl, x, perm, *ps, inverse)
        )


@requires_native
def test_compile_fullgraph():
    perm, *ps = _params(4, torch.float32)
    x = _x((8, 4, 3, 3), torch.float32)

    def f(a, lo, up, sg, ls):
        y, ld = invconv_plu(a, perm, lo, up, sg, ls)
        x2, ld2 = invconv_plu_inverse(y, perm, lo, up, sg, ls)
        return x2, ld + ld2

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    x2, zero = compiled(x, *ps)
    torch.testing.assert_close(x2, x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(zero, torch.zeros(8), rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------
# the layer


@pytest.mark.parametrize("lu", [True, False])
@pytest.mark.parametrize("shape", [(3, 4), (2, 3, 2, 2)])
def test_layer_logdet_matches_jacobian(lu, shape):
    torch.manual_seed(0)
    layer = InvertibleConv1x1(shape[1], lu=lu).double()
    with torch.no_grad():  # move off the rotation so that log|det| != 0
        if lu:
            layer.log_s.add_(torch.linspace(-0.5, 0.7, shape[1], dtype=torch.float64))
        else:
            layer.weight.mul_(torch.linspace(0.5, 2.0, shape[1], dtype=torch.float64))
    x = _x(shape)
    _, logdet = layer(x)
    x0 = x[:1]
    jac = torch.autograd.functional.jacobian(lambda v: layer(v)[0], x0).reshape(x0.numel(), x0.numel())
    expected = torch.linalg.slogdet(jac)[1]
    torch.testing.assert_close(logdet, expected.expand(shape[0]))
    assert abs(logdet[0].item()) > 0.1
    _, logdet_inv = layer.inverse(x)
    torch.testing.assert_close(logdet_inv, -logdet)


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("lu", [True, False])
@pytest.mark.parametrize("train", [True, False])
def test_layer_round_trip(backend, lu, train):
    if backend == "native" and not NATIVE:
        pytest.skip("fastflow._C is not built")
    layer = InvertibleConv1x1(6, lu=lu).train(train)
    for shape in [(5, 6), (3, 6, 4, 4)]:
        x = _x(shape, torch.float32)
        with fastflow.backend(backend):
            z, ld = layer(x)
            x2, ld_inv = layer.inverse(z)
        torch.testing.assert_close(x2, x, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ld_inv, -ld)
        assert ld.shape == (shape[0],)


def test_lu_and_dense_agree_from_the_same_weight():
    torch.manual_seed(1)
    w = torch.randn(5, 5, dtype=torch.float64)
    plu = InvertibleConv1x1(5, lu=True, weight=w)
    dense = InvertibleConv1x1(5, lu=False, weight=w)
    assert plu.log_s.dtype == torch.float64
    torch.testing.assert_close(plu.weight_matrix(), w)
    torch.testing.assert_close(dense.weight_matrix(), w)
    x = _x((3, 5, 2, 3))
    y1, ld1 = plu(x)
    y2, ld2 = dense(x)
    torch.testing.assert_close(y1, y2)
    torch.testing.assert_close(ld1, ld2)
    torch.testing.assert_close(ld1[0], 6 * torch.linalg.slogdet(w)[1])
    torch.testing.assert_close(plu.inverse(y1)[0], dense.inverse(y2)[0])


def test_layer_random_rotation_init():
    layer = InvertibleConv1x1(8)
    w = layer.weight_matrix().detach().double()
    torch.testing.assert_close(w @ w.t(), torch.eye(8, dtype=torch.float64), rtol=0, atol=1e-5)
    assert abs(layer.log_s.sum().item()) < 1e-5  # log|det| of a rotation is 0
    assert sorted(layer.perm.tolist()) == list(range(8)) and layer.perm.dtype == torch.int64
    assert set(layer.sign.tolist()) <= {-1.0, 1.0}


@pytest.mark.parametrize("lu", [True, False])
def test_eval_inverse_cache(lu):
    layer = InvertibleConv1x1(4, lu=lu)
    x = _x((6, 4, 3, 3), torch.float32)
    layer.eval()
    with torch.no_grad():
        z, _ = layer(x)
        x1, _ = layer.inverse(z)
        cached = layer._inverse_cache[1]
        layer.inverse(z)
        assert layer._inverse_cache[1] is cached  # reused while the parameters are unchanged
        torch.testing.assert_close(x1, x, rtol=1e-5, atol=1e-5)
        # an in-place update (as an optimiser step) invalidates it
        for p in layer.parameters():
            p.add_(0.05 * torch.randn_like(p))
        z, _ = layer(x)
        x2, _ = layer.inverse(z)
        assert layer._inverse_cache[1] is not cached
        torch.testing.assert_close(x2, x, rtol=1e-5, atol=1e-5)
        # so does load_state_dict
        other = InvertibleConv1x1(4, lu=lu)
        layer.load_state_dict(other.state_dict())
        z, _ = other(x)
        torch.testing.assert_close(layer.inverse(z)[0], x, rtol=1e-5, atol=1e-5)
    assert "_inverse_cache" not in "".join(layer.state_dict())
    # with gradients wanted for the parameters the cache is bypassed, so they flow
    layer.zero_grad()
    x3, ld = layer.inverse(z)
    (x3.sum() + ld.sum()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())


def test_layer_trains():
    torch.manual_seed(0)
    layer = InvertibleConv1x1(3)
    opt = torch.optim.SGD(layer.parameters(), lr=0.05)
    x = torch.randn(64, 3, 2, 2) * torch.tensor([3.0, 1.0, 0.3]).view(1, 3, 1, 1)

    def nll():
        z, ld = layer(x)
        return (0.5 * z.pow(2).flatten(1).sum(1) - ld).mean()

    start = nll().item()
    for _ in range(30):
        opt.zero_grad()
        loss = nll()
        loss.backward()
        opt.step()
    assert nll().item() < start - 0.5


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("inverse", [False, True])
def test_nan_stays_in_its_sample(backend, inverse):
    if backend == "native" and not NATIVE:
        pytest.skip("fastflow._C is not built")
    fn = invconv_plu_inverse if inverse else invconv_plu
    perm, *ps = _params(4, torch.float32)
    x = _x((3, 4, 2, 2), torch.float32)
    x[1, 2, 1, 0] = float("nan")
    y, ld = _run(fn, backend, x, perm, *ps)
    assert torch.isnan(y[1, :, 1, 0]).all()
    assert torch.isfinite(y[[0, 2]]).all() and torch.isfinite(ld).all()


# --------------------------------------------------------------------------------------------
# bad input, backend selection


def _bad_calls():
    perm, lower, upper, sign, log_s = _params(3, torch.float32)
    x = torch.randn(2, 3, 4, 4)
    return [
        ((torch.randn(3), perm, lower, upper, sign, log_s), "x"),  # rank 1
        ((torch.randn(0, 3), perm, lower, upper, sign, log_s), "empty batch"),
        ((torch.randn(2, 4), perm, lower, upper, sign, log_s), "perm"),  # channels
        ((x, perm.float(), lower, upper, sign, log_s), "perm"),
        ((x, perm, torch.randn(3, 4), upper, sign, log_s), "lower"),
        ((x, perm, lower, upper.double(), sign, log_s), "upper"),
        ((x, perm, lower, upper, torch.ones(4), log_s), "sign"),
        ((x, perm, lower, upper, sign, log_s.double()), "log_s"),
        ((x.int(), perm, lower, upper, sign, log_s), "floating"),
    ]


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_input_names_the_argument(backend, case):
    if backend == "native" and not NATIVE:
        pytest.skip("fastflow._C is not built")
    args, word = _bad_calls()[case]
    with fastflow.backend(backend), pytest.raises((ValueError, RuntimeError), match=word):
        invconv_plu(*args)


@requires_native
def test_native_op_checks_arguments_itself():
    """The C++ kernel refuses bad input too (torch.ops.fastflow called directly)."""
    perm, lower, upper, sign, log_s = _params(3, torch.float32)
    x = torch.randn(2, 3, 4, 4)
    op, backward = torch.ops.fastflow.invconv_plu, torch.ops.fastflow.invconv_plu_backward
    for args, word in _bad_calls():
        with pytest.raises(RuntimeError, match=word):
            op(*args, False)
    with pytest.raises(RuntimeError, match="grad_logdet"):
        backward(x, torch.randn(3), x, perm, lower, upper, sign, log_s, False)
    with pytest.raises(RuntimeError, match="grad_out"):
        backward(torch.randn(2, 3, 4, 5), torch.randn(2), x, perm, lower, upper, sign, log_s, False)
    with pytest.raises(RuntimeError, match="float32 and float64"):
        op(x.half(), perm, lower, upper, sign, log_s, False)


def test_layer_bad_input():
    with pytest.raises(ValueError, match="num_channels"):
        InvertibleConv1x1(0)
    with pytest.raises(ValueError, match="weight"):
        InvertibleConv1x1(3, weight=torch.randn(3, 4))
    with pytest.raises(ValueError, match="singular"):
        InvertibleConv1x1(2, weight=torch.zeros(2, 2))
    with pytest.raises(ValueError, match="x must have shape"):
        InvertibleConv1x1(3)(torch.randn(2, 4))
    with pytest.raises(ValueError, match="z must have shape"):
        InvertibleConv1x1(3, lu=False).inverse(torch.randn(2, 4, 2, 2))


@requires_native
def test_backend_fallback_bf16_cpu(monkeypatch):
    # "auto" warns once per operator and dtype per process: start from a process that has not
    # warned yet (another test may have fallen back on bf16 first)
    monkeypatch.setattr(fastflow._native, "_warned", set())
    perm, lower, upper, sign, log_s = _params(3, torch.bfloat16)
    x = torch.randn(2, 3, dtype=torch.bfloat16)
    with fastflow.backend("native"), pytest.raises(RuntimeError, match="bfloat16"):
        invconv_plu(x, perm, lower, upper, sign, log_s)
    with pytest.warns(RuntimeWarning, match="reference"):
        y, ld = invconv_plu(x, perm, lower, upper, sign, log_s)
    assert y.dtype == torch.bfloat16 and ld.dtype == torch.float32
    expected = x.float() @ plu_weight(perm, lower, upper, sign, log_s).t()
    torch.testing.assert_close(y.float(), expected, rtol=2e-2, atol=2e-2)



@pytest.mark.parametrize("lu", [True, False])
@pytest.mark.parametrize("train", [True, False])
def test_singular_looking_weight_is_reported(lu, train):
    # eval mode under no_grad takes the cached inverse weight, training mode the operator
    layer = InvertibleConv1x1(3, lu=lu).train(train)
    layer.requires_grad_(train)
    z = torch.randn(2, 3, 4, 4)
    layer.inverse(z)  # fine (and, in eval mode, cached) before the weight degenerates
    with torch.no_grad():
        if lu:
            layer.log_s[1] = -120.0  # |s| = exp(-120) underflows float32
        else:
            layer.weight[2] = 0.0
    match = "singular in torch.float32.*channels \\[1\\]" if lu else "determinant is zero"
    with pytest.raises(ValueError, match=match):
        layer.inverse(z)
    with pytest.raises(ValueError, match=match):
        layer.check_invertible()
    layer(z)  # the forward does not check: a training step stays free of host synchronisation


def test_singular_check_names_rows_of_an_overflowing_inverse():
    # det != 0, yet W^-1 has an entry 1e39 that float32 cannot hold
    w = torch.eye(2)
    w[1, 1] = 1e-39
    layer = InvertibleConv1x1(2, lu=False, weight=w)
    with pytest.raises(ValueError, match="rows \\[1\\] of its inverse are not finite"):
        layer.inverse(torch.randn(3, 2))


def test_constructor_rejects_a_pivot_the_dtype_cannot_invert():
    w = torch.eye(3)
    w[2, 2] = 1e-39  # a float32 subnormal: 1 / 1e-39 overflows
    with pytest.raises(ValueError, match="weight is numerically singular in torch.float32"):
        InvertibleConv1x1(3, weight=w)
    InvertibleConv1x1(3, weight=w.double())  # float64 holds it
