"""Tests of the spectral-norm operators: power iteration and the normalised weight (native ==
reference, hand-derived backward, gradcheck, opcheck, convergence, bad input) and the
convolutional power iteration of the reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastflow
from fastflow.ops import (
    spectral_norm_apply,
    spectral_norm_apply_backward_reference,
    spectral_norm_apply_reference,
    spectral_norm_conv_apply,
    spectral_norm_conv_power,
    spectral_norm_power,
    spectral_norm_power_reference,
)

from _devices import DEVICES, NATIVE, dtypes, native_on, requires_native

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPES = [(1, 1), (3, 5), (64, 2), (2, 64), (33, 17), (128, 128)]
LAYOUTS = ["contiguous", "transposed", "strided"]


def _tol(dtype: torch.dtype) -> dict:
    return {
        torch.float64: dict(rtol=1e-9, atol=1e-10),
        torch.float32: dict(rtol=1e-4, atol=1e-5),
        torch.float16: dict(rtol=2e-2, atol=2e-3),
        torch.bfloat16: dict(rtol=5e-2, atol=2e-2),
    }[dtype]


def _weight(shape, dtype=torch.float64, device="cpu", layout="contiguous", seed=0):
    gen = torch.Generator().manual_seed(seed)
    if layout == "transposed":  # a column-major [out, in]: the transpose of a dense [in, out]
        w = torch.randn(shape[::-1], generator=gen, dtype=torch.float64).t()
    elif layout == "strided":  # every other column of a wider matrix
        w = torch.randn(shape[0], 2 * shape[1], generator=gen, dtype=torch.float64)[:, ::2]
    else:
        w = torch.randn(shape, generator=gen, dtype=torch.float64)
    return w.to(device=device, dtype=dtype)


def _vectors(shape, dtype=torch.float64, device="cpu", seed=1):
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(shape[0], generator=gen, dtype=torch.float64)
    v = torch.randn(shape[1], generator=gen, dtype=torch.float64)
    return u.to(device=device, dtype=dtype), v.to(device=device, dtype=dtype)


def _converged(w, n_iter=300):
    u, v = _vectors(w.shape, w.dtype, w.device)
    return spectral_norm_power_reference(w, u, v, n_iter)


def _with_spectrum(shape, sigmas, dtype=torch.float64, seed=0):
    """A [m, n] matrix with the given leading singular values (the rest 0.1), and its top pair."""
    gen = torch.Generator().manual_seed(seed)
    m, n = shape
    k = min(m, n)
    q1, _ = torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))
    s = torch.full((k,), 0.1, dtype=torch.float64)
    s[: len(sigmas)] = torch.tensor(sigmas[:k], dtype=torch.float64)
    return (q1 * s) @ q2.t(), q1[:, 0], q2[:, 0]


def _run(fn, backend, *args):
    with fastflow.backend(backend):
        return fn(*args)


# --------------------------------------------------------------------------------------------
# native == reference


@requires_native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_native_matches_reference(device, layout, shape):
    if not native_on(device):
        pytest.skip(f"no native kernel for {device}")
    for dtype in dtypes(device):
        tol = _tol(dtype)
        w = _weight(shape, dtype, device, layout)
        u0, v0 = _vectors(shape, dtype, device)
        for n_iter in (0, 1, 7):
            un, vn = _run(spectral_norm_power, "native", w, u0, v0, n_iter)
            ur, vr = _run(spectral_norm_power, "reference", w, u0, v0, n_iter)
            assert un.dtype == dtype and un.shape == u0.shape and vn.shape == v0.shape
            torch.testing.assert_close(un, ur, **tol, msg=lambda m: f"u, n_iter={n_iter}: {m}")
            torch.testing.assert_close(vn, vr, **tol, msg=lambda m: f"v, n_iter={n_iter}: {m}")
        sigma = torch.dot(ur.double(), w.double() @ vr.double()).item()
        # both branches: sigma > coeff (the weight is scaled) and sigma < coeff (unchanged)
        for coeff in (0.5 * sigma, 2.0 * sigma):
            wn = w.detach().requires_grad_(True)  # keeps the layout
            w_hat_n, sig_n = _run(spectral_norm_apply, "native", wn, ur, vr, coeff)
            w_hat_r, sig_r = _run(spectral_norm_apply, "reference", wn, ur, vr, coeff)
            assert w_hat_n.shape == shape and w_hat_n.dtype == dtype
            assert sig_n.shape == () and sig_n.dtype == sig_r.dtype
            torch.testing.assert_close(w_hat_n, w_hat_r, **tol)
            torch.testing.assert_close(sig_n, sig_r, **tol)
            g = torch.randn(shape, dtype=torch.float64).to(device=device, dtype=dtype)
            gs = torch.randn((), dtype=torch.float64).to(device=device, dtype=sig_r.dtype)
            (gn,) = torch.autograd.grad((w_hat_n, sig_n), wn, (g, gs))
            (gr,) = torch.autograd.grad((w_hat_r, sig_r), wn, (g, gs))
            torch.testing.assert_close(gn, gr, **tol, msg=lambda m: f"grad, coeff={coeff}: {m}")


@requires_native
def test_power_large_weight_uses_threads():
    """A weight large enough to be split across threads gives the reference's result."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for dtype in (torch.float32, torch.float64):
            w = _weight((700, 300), dtype)
            u0, v0 = _vectors(w.shape, dtype)
            un, vn = _run(spectral_norm_power, "native", w, u0, v0, 5)
            ur, vr = spectral_norm_power_reference(w, u0, v0, 5)
            torch.testing.assert_close(un, ur, **_tol(dtype))
            torch.testing.assert_close(vn, vr, **_tol(dtype))
            g, gs = torch.randn_like(w), torch.tensor(0.3, dtype=dtype)
            for coeff in (1.0, 1e3):
                got = torch.ops.fastflow.spectral_norm_apply_backward(g, gs, w, un, vn, coeff)
                exp = spectral_norm_apply_backward_reference(g, gs, w, ur, vr, coeff)
                torch.testing.assert_close(got, exp, **_tol(dtype))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("shape", [(4, 3), (1, 6), (7, 7)])
@pytest.mark.parametrize("branch", ["scaled", "unscaled"])
def test_backward_formula_matches_autograd(shape, branch):
    """The hand-derived backward (reference formula and native op) == autograd through the
    reference, with gradients flowing into both w_hat and sigma."""
    w = _weight(shape)
    u, v = _converged(w, 20)
    sigma = torch.dot(u, w @ v).item()
    coeff = 0.5 * sigma if branch == "scaled" else 2.0 * sigma
    g, gs = torch.randn(shape, dtype=torch.float64), torch.randn((), dtype=torch.float64)
    leaf = w.clone().requires_grad_(True)
    w_hat, sig = spectral_norm_apply_reference(leaf, u, v, coeff)
    (expected,) = torch.autograd.grad((w_hat, sig), leaf, (g, gs))
    got = [spectral_norm_apply_backward_reference(g, gs, w, u, v, coeff)]
    if NATIVE:
        got.append(torch.ops.fastflow.spectral_norm_apply_backward(g, gs, w, u, v, coeff))
        # through the operator's autograd, plain and with create_graph (the differentiable path)
        for create_graph in (False, True):
            w_hat, sig = torch.ops.fastflow.spectral_norm_apply(leaf, u, v, coeff)
            got.append(torch.autograd.grad((w_hat, sig), leaf, (g, gs), create_graph=create_graph)[0])
    for grad in got:
        torch.testing.assert_close(grad, expected)
    if branch == "unscaled":  # sigma <= c: dW = G + g_sigma u v^T
        torch.testing.assert_close(got[-1], g + gs * torch.outer(u, v))


# --------------------------------------------------------------------------------------------
# gradcheck / gradgradcheck in float64


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("branch", ["scaled", "unscaled"])
@pytest.mark.parametrize("shape", [(3, 4), (5, 2)])
def test_gradcheck(backend, branch, shape):
    if backend == "native" and not NATIVE:
        pytest.skip("fastflow._C is not built")
    w = _weight(shape, seed=3)
    u, v = _converged(w, 30)
    sigma = torch.dot(u, w @ v).item()
    coeff = 0.7 * sigma if branch == "scaled" else 1.5 * sigma

    def f(weight):
        with fastflow.backend(backend):
            return spectral_norm_apply(weight, u, v, coeff)

    leaf = w.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(f, (leaf,))
    assert torch.autograd.gradgradcheck(f, (leaf,))


# --------------------------------------------------------------------------------------------
# opcheck: schema, fake (torch.compile) and autograd registration


@requires_native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_opcheck(device, layout):
    if not native_on(device):
        pytest.skip(f"no native kernel for {device}")
    for dtype in (torch.float32, torch.float64):
        w = _weight((5, 3), dtype, device, layout)
        u, v = _vectors((5, 3), dtype, device)
        for requires_grad in (False, True):
            wg = w.detach().requires_grad_(requires_grad)
            torch.library.opcheck(torch.ops.fastflow.spectral_norm_power.default, (wg, u, v, 3, 1e-12))
            torch.library.opcheck(torch.ops.fastflow.spectral_norm_power.default, (wg, u, v, 0, 1e-12))
            for coeff in (0.1, 100.0):
                torch.library.opcheck(torch.ops.fastflow.spectral_norm_apply.default, (wg, u, v, coeff))
        g = _weight((5, 3), dtype, device, seed=7)
        gs = torch.tensor(0.5, dtype=dtype, device=device)
        for coeff in (0.1, 100.0):
            torch.library.opcheck(
                torch.ops.fastflow.spectral_norm_apply_backward.default, (g, gs, w, u, v, coeff)
            )


@requires_native
def test_power_outputs_carry_no_gradient():
    w = _weight((4, 3)).requires_grad_(True)
    u, v = _vectors((4, 3))
    for backend in ("native", "reference"):
        un, vn = _run(spectral_norm_power, backend, w, u, v, 2)
        assert not un.requires_grad and not vn.requires_grad


@requires_native
def test_compile_fullgraph():
    w = _weight((6, 4), torch.float32)
    u, v = _vectors((6, 4), torch.float32)

    def f(weight, u, v):
        un, vn = spectral_norm_power(weight, u, v, 5)
        w_hat, sigma = spectral_norm_apply(weight, un, vn, 0.5)
        return w_hat, sigma, un, vn

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    leaf = w.clone().requires_grad_(True)
    got = compiled(leaf, u, v)
    expected = f(leaf, u, v)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)
    (g1,) = torch.autograd.grad(got[0].square().sum() + got[1], leaf)
    (g2,) = torch.autograd.grad(expected[0].square().sum() + expected[1], leaf)
    torch.testing.assert_close(g1, g2)


# --------------------------------------------------------------------------------------------
# what the power iteration computes


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (64, 2), (40, 40)])
def test_power_iteration_converges_to_the_spectral_norm(backend, shape):
    if backend == "native" and not NATIVE:
        pytest.skip("fastflow._C is not built")
    w, u1, v1 = _with_spectrum(shape, [3.0, 2.0, 1.5])
    u0, v0 = _vectors(shape)
    with fastflow.backend(backend):
        u, v = spectral_norm_power(w, u0, v0, 60)
        _, sigma = spectral_norm_apply(w, u, v, 1.0)
    torch.testing.assert_close(sigma, torch.linalg.matrix_norm(w, ord=2), rtol=1e-12, atol=0)
    assert abs(torch.dot(u, u1).item()) == pytest.approx(1.0, abs=1e-10)
    assert abs(torch.dot(v, v1).item()) == pytest.approx(1.0, abs=1e-10)
    # random Gaussian matrices (smaller spectral gap), float32
    wr = _weight(shape, torch.float32, seed=11)
    ur, vr = _vectors(shape, torch.float32)
    with fastflow.backend(backend):
        ur, vr = spectral_norm_power(wr, ur, vr, 500)
        w_hat, sigma = spectral_norm_apply(wr, ur, vr, 0.9)
    torch.testing.assert_close(sigma, torch.linalg.matrix_norm(wr, ord=2), rtol=1e-4, atol=0)
    assert torch.linalg.matrix_norm(w_hat.double(), ord=2).item() <= 0.9 * (1 + 1e-4)


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_power_sigma_is_a_lower_bound_and_increases(backend):
    if backend == "native" and not NATIVE:
        pytest.skip("fastflow._C is not built")
    w = _weight((30, 20), seed=5)
    exact = torch.linalg.matrix_norm(w, ord=2).item()
    u, v = _vectors(w.shape)
    previous = 0.0
    with fastflow.backend(backend):
        for _ in range(10):
            u, v = spectral_norm_power(w, u, v, 1)
            sigma = spectral_norm_apply(w, u, v, 1.0)[1].item()
            assert previous - 1e-12 <= sigma <= exact + 1e-12
            previous = sigma


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_power_returns_new_tensors(backend):
    if backend == "native" and not NATIVE:
        pytest.skip("fastflow._C is not built")
    w = _weight((4, 3))
    u, v = _vectors((4, 3))
    u_keep, v_keep = u.clone(), v.clone()
    with fastflow.backend(backend):
        u0, v0 = spectral_norm_power(w, u, v, 0)
        u2, v2 = spectral_norm_power(w, u, v, 2)
    assert torch.equal(u0, u) and torch.equal(v0, v)
    assert u0.data_ptr() != u.data_ptr() and v0.data_ptr() != v.data_ptr()
    assert torch.equal(u, u_keep) and torch.equal(v, v_keep)
    assert not torch.equal(u2, u)


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_zero_weight_and_nan(backend):
    if backend == "native" and not NATIVE:
        pytest.skip("fastflow._C is not built")
    u, v = _vectors((3, 4))
    with fastflow.backend(backend):
        # W = 0: the eps floor keeps the vectors finite (zero), sigma = 0, w_hat = 0
        uz, vz = spectral_norm_power(torch.zeros(3, 4, dtype=torch.float64), u, v, 3)
        assert not uz.any() and not vz.any()
        w_hat, sigma = spectral_norm_apply(torch.zeros(3, 4, dtype=torch.float64), uz, vz, 0.9)
        assert sigma.item() == 0.0 and torch.equal(w_hat, torch.zeros(3, 4, dtype=torch.float64))
        # a NaN in W is not hidden
        w = _weight((3, 4))
        w[1, 2] = float("nan")
        un, vn = spectral_norm_power(w, u, v, 2)
        assert torch.isnan(un).all() and torch.isnan(vn).all()
        assert torch.isnan(spectral_norm_apply(w, u, v, 0.9)[1])


# --------------------------------------------------------------------------------------------
# bad input, backend selection


def _bad_calls():
    w = torch.randn(4, 3)
    u, v = torch.randn(4), torch.randn(3)
    power = [
        ((torch.randn(4), u, v, 1, 1e-12), "weight"),  # rank 1
        ((torch.randn(0, 3), torch.randn(0), v, 1, 1e-12), "weight must not be empty"),
        ((w.int(), u.int(), v.int(), 1, 1e-12), "floating"),
        ((w, torch.randn(3), v, 1, 1e-12), "u must have shape"),
        ((w, u, torch.randn(4), 1, 1e-12), "v must have shape"),
        ((w, torch.randn(4, 1), v, 1, 1e-12), "u must have shape"),
        ((w, u.double(), v, 1, 1e-12), "u must have the dtype"),
        ((w, u, v.double(), 1, 1e-12), "v must have the dtype"),
        ((w, u, v, -1, 1e-12), "n_iter"),
        ((w, u, v, 1, -1.0), "eps"),
    ]
    apply = [
        ((w, torch.randn(3), v, 0.9), "u must have shape"),
        ((w, u, torch.randn(5), 0.9), "v must have shape"),
        ((w, u, v.double(), 0.9), "v must have the dtype"),
        ((w, u, v, 0.0), "coeff"),
        ((w, u, v, -0.5), "coeff"),
        ((w, u, v, float("inf")), "coeff"),
    ]
    return power, apply


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_bad_input_names_the_argument(backend):
    if backend == "native" and not NATIVE:
        pytest.skip("fastflow._C is not built")
    power, apply = _bad_calls()
    with fastflow.backend(backend):
        for args, word in power:
            with pytest.raises(ValueError, match=word):
                spectral_norm_power(*args)
        for args, word in apply:
            with pytest.raises(ValueError, match=word):
                spectral_norm_apply(*args)
        w = torch.randn(4, 3)
        with pytest.raises(ValueError, match="u must be on the device of weight"):
            spectral_norm_apply(w, torch.randn(4, device="meta"), torch.randn(3), 0.9)
        with pytest.raises(ValueError, match="n_iter"):
            spectral_norm_power(w, torch.randn(4), torch.randn(3), 1.5)


@requires_native
def test_native_op_checks_arguments_itself():
    """The C++ kernels refuse bad input too (torch.ops.fastflow called directly)."""
    power, apply = _bad_calls()
    ops = torch.ops.fastflow
    for args, word in power:
        with pytest.raises(RuntimeError, match=word):
            ops.spectral_norm_power(*args)
    for args, word in apply:
        with pytest.raises(RuntimeError, match=word):
            ops.spectral_norm_apply(*args)
    w, u, v = torch.randn(4, 3), torch.randn(4), torch.randn(3)
    gs = torch.tensor(1.0)
    with pytest.raises(RuntimeError, match="grad_w_hat"):
        ops.spectral_norm_apply_backward(torch.randn(3, 4), gs, w, u, v, 0.9)
    with pytest.raises(RuntimeError, match="grad_sigma"):
        ops.spectral_norm_apply_backward(w, torch.ones(1), w, u, v, 0.9)
    with pytest.raises(RuntimeError, match="grad_sigma"):
        ops.spectral_norm_apply_backward(w, gs.double(), w, u, v, 0.9)
    with pytest.raises(RuntimeError, match="coeff"):
        ops.spectral_norm_apply_backward(w, gs, w, u, v, 0.0)
    with pytest.raises(RuntimeError, match="float32 and float64"):
        ops.spectral_norm_power(w.half(), u.half(), v.half(), 1, 1e-12)


@requires_native
def test_backend_fallback_bf16_cpu(monkeypatch):
    # "auto" warns once per operator and dtype per process: start from a process that has not
    # warned yet (another test may have fallen back on bf16 first)
    monkeypatch.setattr(fastflow._native, "_warned", set())
    w = _weight((4, 3), torch.bfloat16)
    u, v = _vectors((4, 3), torch.bfloat16)
    with fastflow.backend("native"), pytest.raises(RuntimeError, match="bfloat16"):
        spectral_norm_power(w, u, v, 3)
    with pytest.warns(RuntimeWarning, match="reference"):
        un, vn = spectral_norm_power(w, u, v, 3)
    assert un.dtype == torch.bfloat16
    with pytest.warns(RuntimeWarning, match="reference"):
        w_hat, sigma = spectral_norm_apply(w, un, vn, 0.5)
    assert w_hat.dtype == torch.bfloat16 and sigma.dtype == torch.float32


# --------------------------------------------------------------------------------------------
# the convolutional power iteration (reference only)


def _conv_operator_norm(w: torch.Tensor, hw: tuple[int, int], padding: int) -> float:
    """The largest singular value of x -> conv2d(x, w) on [in, H, W], from its dense matrix."""
    n_in = w.shape[1] * hw[0] * hw[1]
    basis = torch.eye(n_in, dtype=w.dtype).reshape(n_in, w.shape[1], *hw)
    cols = F.conv2d(basis, w, padding=padding).reshape(n_in, -1)  # row i: image of e_i
    return torch.linalg.matrix_norm(cols.t(), ord=2).item()


@pytest.mark.parametrize("k, hw", [(3, (5, 5)), (3, (4, 6)), (5, (6, 6)), (1, (3, 3))])
def test_conv_power_converges_to_the_operator_norm(k, hw):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(3, 2, k, k, generator=gen, dtype=torch.float64)
    u0 = torch.randn(3, *hw, generator=gen, dtype=torch.float64)
    v0 = torch.randn(2, *hw, generator=gen, dtype=torch.float64)
    u, v = spectral_norm_conv_power(w, u0, v0, n_iter=500)
    exact = _conv_operator_norm(w, hw, k // 2)
    _, sigma = spectral_norm_conv_apply(w, u, v, coeff=1.0)
    assert sigma.item() == pytest.approx(exact, rel=1e-6)
    if k == 1:  # a 1x1 convolution's norm is that of its matrix, at any size
        assert exact == pytest.approx(torch.linalg.matrix_norm(w[:, :, 0, 0], ord=2).item(), rel=1e-9)
    w_hat, _ = spectral_norm_conv_apply(w, u, v, coeff=0.5 * exact)
    assert _conv_operator_norm(w_hat, hw, k // 2) == pytest.approx(0.5 * exact, rel=1e-6)


def test_conv_transpose_is_the_adjoint():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(4, 3, 3, 3, generator=gen, dtype=torch.float64)
    x = torch.randn(1, 3, 5, 6, generator=gen, dtype=torch.float64)
    y = torch.randn(1, 4, 5, 6, generator=gen, dtype=torch.float64)
    lhs = (F.conv2d(x, w, padding=1) * y).sum()
    rhs = (x * F.conv_transpose2d(y, w, padding=1)).sum()
    torch.testing.assert_close(lhs, rhs)


@pytest.mark.parametrize("branch", ["scaled", "unscaled"])
def test_conv_apply_gradcheck(branch):
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(2, 2, 3, 3, generator=gen, dtype=torch.float64)
    u0, v0 = torch.randn(2, 2, 4, 4, generator=gen, dtype=torch.float64)
    u, v = spectral_norm_conv_power(w, u0, v0, 50)
    sigma = spectral_norm_conv_apply(w, u, v, 1.0)[1].item()
    coeff = 0.5 * sigma if branch == "scaled" else 2 * sigma
    leaf = w.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: spectral_norm_conv_apply(t, u, v, coeff), (leaf,))


def test_conv_bad_input():
    w = torch.randn(4, 3, 3, 3)
    u, v = torch.randn(4, 5, 5), torch.randn(3, 5, 5)
    with pytest.raises(ValueError, match="weight"):
        spectral_norm_conv_power(torch.randn(4, 3), u, v, 1)
    with pytest.raises(ValueError, match="v must have shape"):
        spectral_norm_conv_power(w, u, torch.randn(2, 5, 5), 1)
    with pytest.raises(ValueError, match="u must have shape"):
        spectral_norm_conv_power(w, torch.randn(4, 4, 5), v, 1)
    with pytest.raises(ValueError, match="u must have the dtype"):
        spectral_norm_conv_power(w, u.double(), v, 1)
    with pytest.raises(ValueError, match="n_iter"):
        spectral_norm_conv_power(w, u, v, -2)
    with pytest.raises(ValueError, match="coeff"):
        spectral_norm_conv_apply(w, u, v, 0.0)
    with pytest.raises(ValueError, match="padding"):
        spectral_norm_conv_power(torch.randn(4, 3, 2, 2), u, v, 1)
    # explicit padding 0: u is [out, H - k + 1, W - k + 1]
    un, vn = spectral_norm_conv_power(w, torch.randn(4, 3, 3), v, 2, padding=0)
    assert un.shape == (4, 3, 3) and vn.shape == (3, 5, 5)
