"""Tests of the fused affine-coupling operator: native == reference, gradients, opcheck, bad input."""

from __future__ import annotations

import math

import pytest
import torch

import fastflow
from fastflow.ops import (
    affine_coupling,
    affine_coupling_backward_reference,
    affine_coupling_inverse,
    affine_coupling_reference,
)

from _devices import DEVICES, NATIVE, dtypes, native_on, requires_native

ACTIVATIONS = ["exp", "sigmoid", "additive"]
CLAMPS = [2.0, math.inf]
SHAPES = [(1, 1), (1, 7), (3, 5), (17, 33), (1000, 9), (2, 3, 4, 5), (5, 6, 7, 3)]


def _tol(dtype: torch.dtype) -> dict:
    return {
        torch.float64: dict(rtol=1e-10, atol=1e-10),
        torch.float32: dict(rtol=2e-5, atol=2e-5),
        torch.float16: dict(rtol=2e-3, atol=2e-3),
        torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
    }[dtype]


def _inputs(shape, dtype, device, layout="contiguous", scale=1.5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ts = [(torch.randn(shape, generator=gen, dtype=torch.float64) * scale) for _ in range(3)]
    ts = [t.to(device=device, dtype=dtype) for t in ts]
    if layout == "channels_last":
        ts = [t.contiguous(memory_format=torch.channels_last) for t in ts]
    elif layout == "strided":
        # every other column of a wider tensor: neither contiguous nor channels-last
        ts = [torch.cat([t, t], dim=-1)[..., ::2] for t in ts]
    elif layout == "row_slice":
        # the second half of a conditioner's output: samples dense but 2N apart (read in place)
        ts = [torch.cat([torch.zeros_like(t), t], dim=1)[:, t.shape[1]:] for t in ts]
    return ts


def _run(fn, backend, *args, **kwargs):
    with fastflow.backend(backend):
        return fn(*args, **kwargs)


# --------------------------------------------------------------------------------------------
# native == reference, forward and backward


@requires_native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_native_matches_reference(device, activation, inverse, shape):
    if not native_on(device):
        pytest.skip(f"no native kernel for {device}")
    fn = affine_coupling_inverse if inverse else affine_coupling
    for dtype in dtypes(device):
        for clamp in CLAMPS if activation == "exp" else [2.0]:
            x, h, t = _inputs(shape, dtype, device)
            for v in (x, h, t):
                v.requires_grad_(True)
            out_n, ld_n = _run(fn, "native", x, h, t, activation, clamp)
            out_r, ld_r = _run(fn, "reference", x, h, t, activation, clamp)
            tol = _tol(dtype)
            assert out_n.dtype == dtype and out_n.shape == x.shape
            expect_ld = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
            assert ld_n.dtype == expect_ld and ld_n.shape == (shape[0],)
            torch.testing.assert_close(out_n, out_r, **tol)
            torch.testing.assert_close(ld_n, ld_r.to(ld_n.dtype), **tol)
            gy = torch.randn_like(out_r)
            gl = torch.randn_like(ld_n)
            outs_r = [out_r] + ([ld_r] if ld_r.requires_grad else [])
            grads_r = torch.autograd.grad(outs_r, (x, h, t), [gy, gl][: len(outs_r)], allow_unused=True)
            outs_n = [out_n] + ([ld_n] if ld_n.requires_grad else [])
            grads_n = torch.autograd.grad(outs_n, (x, h, t), [gy, gl][: len(outs_n)], allow_unused=True)
            for name, gn, gr in zip(("x", "log_scale", "shift"), grads_n, grads_r):
                if gr is None:
                    assert gn is None or torch.count_nonzero(gn) == 0, name
                    continue
                torch.testing.assert_close(gn, gr, **tol, msg=lambda m: f"grad {name}: {m}")


@requires_native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["channels_last", "strided", "row_slice"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_layouts(device, layout, activation):
    if not native_on(device):
        pytest.skip(f"no native kernel for {device}")
    shape = (3, 5, 4, 6) if layout == "channels_last" else (4, 9)
    x, h, t = _inputs(shape, torch.float32, device, layout=layout)
    y_n, ld_n = _run(affine_coupling, "native", x, h, t, activation)
    y_r, ld_r = _run(affine_coupling, "reference", x.contiguous(), h.contiguous(), t.contiguous(), activation)
    torch.testing.assert_close(y_n, y_r, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(ld_n, ld_r, rtol=2e-5, atol=2e-5)
    if layout == "channels_last":
        assert y_n.is_contiguous(memory_format=torch.channels_last)
    # the backward takes channels-last and strided upstream gradients too
    x.requires_grad_(True)
    y_n, ld_n = _run(affine_coupling, "native", x, h, t, activation)
    if layout == "channels_last":
        gy = torch.randn_like(y_n).contiguous(memory_format=torch.channels_last)
    else:
        gy = torch.randn(4, 18, device=device)[:, ::2] if layout == "strided" else torch.randn(4, 18, device=device)[:, 9:]
    (gx,) = torch.autograd.grad(y_n, x, gy)
    xr = x.detach().contiguous().requires_grad_(True)
    y_r, _ = _run(affine_coupling, "reference", xr, h.contiguous(), t.contiguous(), activation)
    (gxr,) = torch.autograd.grad(y_r, xr, gy.contiguous())
    torch.testing.assert_close(gx, gxr, rtol=2e-5, atol=2e-5)


@requires_native
@pytest.mark.parametrize("activation", ["exp", "sigmoid"])
def test_extreme_values(activation):
    """Large |h| saturates the scale without overflow; values match the reference."""
    h = torch.tensor([[-80.0, -20.0, -3.0, -1e-4, 0.0, 1e-4, 3.0, 20.0, 80.0]])
    x = torch.linspace(-3, 3, 9).reshape(1, 9)
    t = torch.zeros_like(x)
    for dtype in (torch.float32, torch.float64):
        args = [v.to(dtype) for v in (x, h, t)]
        y_n, ld_n = _run(affine_coupling, "native", *args, activation)
        y_r, ld_r = _run(affine_coupling, "reference", *args, activation)
        assert torch.isfinite(y_n).all() and torch.isfinite(ld_n).all()
        torch.testing.assert_close(y_n, y_r, **_tol(dtype))
        torch.testing.assert_close(ld_n, ld_r, **_tol(dtype))


@requires_native
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("inverse", [False, True])
def test_native_op_matches_reference_formula(activation, inverse):
    """The native operators called directly (the only way "additive" reaches its kernel, see
    fastflow.ops.affine_coupling) against the reference and the hand-derived backward."""
    x, h, t = _inputs((6, 37), torch.float64, "cpu")
    g, _, _ = _inputs((6, 37), torch.float64, "cpu", seed=1)
    gl = torch.randn(6, dtype=torch.float64)
    code = fastflow.ops.ACTIVATIONS[activation]
    ls = None if activation == "additive" else h
    for clamp in CLAMPS:
        out, logdet, scale = torch.ops.fastflow.affine_coupling(x, ls, t, code, clamp, inverse, True)
        out_r, logdet_r = affine_coupling_reference(x, ls, t, activation, clamp, inverse=inverse)
        torch.testing.assert_close(out, out_r)
        torch.testing.assert_close(logdet, logdet_r)
        dn = torch.ops.fastflow.affine_coupling_backward(g, gl, x, scale, t, code, clamp, inverse)
        dr = affine_coupling_backward_reference(g, gl, x, ls, t, activation, clamp, inverse)
        torch.testing.assert_close(dn[0], dr[0])
        if ls is None:
            assert dn[1].numel() == 0 and dr[1] is None
        else:
            torch.testing.assert_close(dn[1], dr[1])


# --------------------------------------------------------------------------------------------
# gradcheck / gradgradcheck in float64, through each backend


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("clamp", CLAMPS)
def test_gradcheck(backend, activation, inverse, clamp):
    if backend == "native" and not NATIVE:
        pytest.skip("fastflow._C is not built")
    if activation != "exp" and math.isinf(clamp):
        pytest.skip("clamp only applies to the exp activation")
    fn = affine_coupling_inverse if inverse else affine_coupling
    x, h, t = _inputs((3, 2, 2, 2), torch.float64, "cpu", scale=0.7)
    inputs = [v.requires_grad_(True) for v in (x, h, t)]

    def f(a, b, c):
        with fastflow.backend(backend):
            return fn(a, b, c, activation, clamp)

    if activation == "additive":
        inputs = inputs[0:1] + inputs[2:]

        def f(a, c, _h=h.detach()):  # noqa: F811 (log_scale is ignored by "additive")
            with fastflow.backend(backend):
                return fn(a, _h, c, activation, clamp)

    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


# --------------------------------------------------------------------------------------------
# opcheck: schema, fake (torch.compile) and autograd registration


@requires_native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("inverse", [False, True])
def test_opcheck(device, activation, inverse):
    if not native_on(device):
        pytest.skip(f"no native kernel for {device}")
    code = fastflow.ops.ACTIVATIONS[activation]
    for shape, layout in [
        ((4, 6), "contiguous"),
        ((2, 3, 4, 5), "channels_last"),
        ((3, 10), "strided"),
        ((3, 2, 5), "row_slice"),
    ]:
        x, h, t = _inputs(shape, torch.float32, device, layout=layout)
        ls = None if activation == "additive" else h
        for requires_grad in (False, True):
            for save_scale in (False, True):
                args = [v.detach().requires_grad_(requires_grad) for v in (x, t)]
                ls_arg = None if ls is None else ls.detach().requires_grad_(requires_grad)
                torch.library.opcheck(
                    torch.ops.fastflow.affine_coupling.default,
                    (args[0], ls_arg, args[1], code, 2.0, inverse, save_scale),
                )
        scale = torch.ops.fastflow.affine_coupling(x, ls, t, code, 2.0, inverse, True)[2]
        g = torch.randn(shape, device=device)
        gl = torch.randn(shape[0], device=device)
        torch.library.opcheck(
            torch.ops.fastflow.affine_coupling_backward.default,
            (g, gl, x, scale, t, code, 2.0, inverse),
        )


@requires_native
@pytest.mark.parametrize("activation", ["exp", "sigmoid"])
def test_compile_fullgraph(activation):
    x, h, t = _inputs((8, 3, 4, 4), torch.float32, "cpu")

    def f(a, b, c):
        y, ld = affine_coupling(a, b, c, activation)
        x2, ld2 = affine_coupling_inverse(y, b, c, activation)
        return x2, ld + ld2

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    x2, zero = compiled(x, h, t)
    torch.testing.assert_close(x2, x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(zero, torch.zeros(8), rtol=0, atol=1e-4)


# --------------------------------------------------------------------------------------------
# round trip, NaN, bad input, backend selection


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_round_trip(backend, activation):
    if backend == "native" and not NATIVE:
        pytest.skip("fastflow._C is not built")
    x, h, t = _inputs((5, 11), torch.float64, "cpu")
    with fastflow.backend(backend):
        y, ld = affine_coupling(x, h, t, activation)
        x2, ld_inv = affine_coupling_inverse(y, h, t, activation)
    torch.testing.assert_close(x2, x)
    torch.testing.assert_close(ld_inv, -ld)


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_nan_stays_in_its_sample(backend, activation):
    if backend == "native" and not NATIVE:
        pytest.skip("fastflow._C is not built")
    x, h, t = _inputs((4, 19), torch.float32, "cpu")
    x[1, 3] = float("nan")
    h[2, 5] = float("nan")
    with fastflow.backend(backend):
        y, ld = affine_coupling(x, h, t, activation)
    assert torch.isnan(y[1, 3])
    assert torch.isfinite(y[0]).all() and torch.isfinite(y[3]).all()
    assert torch.isfinite(ld[[0, 3]]).all()
    if activation != "additive":
        assert torch.isnan(y[2, 5]) and torch.isnan(ld[2])


def _bad_calls():
    x = torch.randn(3, 4)
    return [
        ((torch.randn(4), torch.randn(4), torch.randn(4)), "x"),  # rank 1
        ((torch.randn(0, 4), torch.randn(0, 4), torch.randn(0, 4)), "empty batch"),
        ((x, torch.randn(3, 5), x), "log_scale"),  # width
        ((x, x, torch.randn(3, 4, dtype=torch.float64)), "shift"),  # dtype
        ((x, x.double(), x), "log_scale"),
        ((x, torch.randn(2, 4), x), "log_scale"),  # batch
        ((x, None, x), "log_scale"),  # missing for exp
        ((x.int(), x.int(), x.int()), "floating"),
    ]


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_input_names_the_argument(backend, case):
    if backend == "native" and not NATIVE:
        pytest.skip("fastflow._C is not built")
    args, word = _bad_calls()[case]
    with fastflow.backend(backend), pytest.raises((ValueError, RuntimeError), match=word):
        affine_coupling(*args, activation="exp")


def test_bad_options():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="activation"):
        affine_coupling(x, x, x, activation="softplus")
    with pytest.raises(ValueError, match="clamp"):
        affine_coupling(x, x, x, clamp=0.0)
    with pytest.raises(ValueError, match="backend"):
        with fastflow.backend("fast"):
            pass


@requires_native
def test_native_op_checks_arguments_itself():
    """The C++ kernel refuses bad input too (torch.ops.fastflow called directly)."""
    x = torch.randn(3, 4)
    op, backward = torch.ops.fastflow.affine_coupling, torch.ops.fastflow.affine_coupling_backward
    with pytest.raises(RuntimeError, match="shift"):
        op(x, x, torch.randn(3, 5), 1, 2.0, False, False)
    with pytest.raises(RuntimeError, match="activation"):
        op(x, x, x, 7, 2.0, False, False)
    with pytest.raises(RuntimeError, match="log_scale"):
        op(x, None, x, 1, 2.0, False, False)
    with pytest.raises(RuntimeError, match="clamp"):
        op(x, x, x, 1, -1.0, False, False)
    with pytest.raises(RuntimeError, match="empty batch"):
        e = torch.randn(0, 4)
        op(e, e, e, 1, 2.0, False, False)
    with pytest.raises(RuntimeError, match="grad_logdet"):
        backward(x, torch.randn(2), x, x, x, 1, 2.0, False)
    with pytest.raises(RuntimeError, match="scale"):
        backward(x, torch.randn(3), x, torch.randn(0), x, 1, 2.0, False)
    with pytest.raises(RuntimeError, match="float32 and float64"):
        h = x.half()
        op(h, h, h, 1, 2.0, False, False)


def test_backend_selection(monkeypatch):
    monkeypatch.setattr(fastflow._native, "_warned", set())  # warnings are once per process
    assert fastflow.get_backend() == "auto"
    with fastflow.backend("reference"):
        assert fastflow.get_backend() == "reference"
    assert fastflow.get_backend() == "auto"
    if NATIVE:
        assert "cpu" in NATIVE
        # bf16 has no CPU kernel: "native" refuses, "auto" falls back to the reference
        x = torch.randn(2, 3, dtype=torch.bfloat16)
        with fastflow.backend("native"), pytest.raises(RuntimeError, match="bfloat16"):
            affine_coupling(x, x, x)
        with pytest.warns(RuntimeWarning, match="reference"):
            y, ld = affine_coupling(x, x, x)
        assert y.dtype == torch.bfloat16 and ld.dtype == torch.float32
    else:
        with pytest.raises(RuntimeError):
            with fastflow.backend("native"):
                pass


def test_reference_half_precision_logdet_is_float32():
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    y, ld = affine_coupling_reference(x, x, x, "sigmoid")
    assert y.dtype == torch.bfloat16 and ld.dtype == torch.float32
