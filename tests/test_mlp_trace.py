"""Tests of the MLP trace operators (fastflow.ops.mlp_trace): native == reference (values and
the surrogate gradient), gradcheck where the gradient is exact, opcheck, the trace against
brute-force Jacobian powers, the coefficients as tensors (trailing zeros ignored) equal to the
lists, the forward-mode Jacobian and power traces in PyTorch operations against autograd, the
fixed-point solve, NaN isolation and bad input."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import fastflow
from fastflow.ops.mlp_trace import (
    MLP_ACTIVATIONS,
    mlp_apply_reference,
    mlp_fixed_point,
    mlp_fixed_point_reference,
    mlp_jacobian,
    mlp_power_traces,
    mlp_trace,
    mlp_trace_reference,
)

from _devices import DEVICES, native_on, requires_native

pytestmark = pytest.mark.usefixtures("one_thread")

ACTS = ["elu", "lipswish", "tanh", "softplus", "identity"]


def _net(widths, act, preact=False, bias=True, gated=False, batch=5, dtype=torch.float64,
         device="cpu", scale=0.6, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)

    weights, biases, gates, shifts = [], [], [], []
    for i in range(len(widths) - 1):
        w = rnd(widths[i + 1], widths[i])
        weights.append(w * scale / torch.linalg.matrix_norm(w, ord=2))
        if bias:
            biases.append(rnd(widths[i + 1]) * 0.3)
        if gated:
            gates.append(torch.sigmoid(rnd(widths[i + 1])))
            shifts.append(rnd(batch, widths[i + 1]) * 0.2 if i == 0 else rnd(widths[i + 1]) * 0.2)
    n_act = 0 if act == "identity" else len(weights) - (0 if preact else 1)
    betas = (torch.rand(n_act, generator=gen, dtype=torch.float64) + 0.5).to(device=device, dtype=dtype) \
        if act == "lipswish" else None
    return dict(weights=weights, biases=biases, gates=gates, shifts=shifts, betas=betas,
                activation=act, preact=preact)


def _series(k):
    return [(-1) ** (j + 1) / j for j in range(1, k + 1)], [(-1) ** j for j in range(k)]


def _both(x, net, probes, vc, pc):
    """(native, reference) results with gradients w.r.t. x and every layer tensor."""
    results = []
    for backend in ("native", "reference"):
        xs = x.detach().clone().requires_grad_()
        leaves = {k: [t.detach().clone().requires_grad_() for t in net[k]]
                  for k in ("weights", "biases", "gates", "shifts")}
        betas = None if net["betas"] is None else net["betas"].detach().clone().requires_grad_()
        with fastflow.backend(backend):
            out, tr = mlp_trace(xs, leaves["weights"], leaves["biases"], leaves["gates"],
                                leaves["shifts"], betas, net["activation"], net["preact"],
                                probes=probes, value_coeffs=vc, psi_coeffs=pc)
        gen = torch.Generator().manual_seed(7)
        go = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out)
        gt = torch.randn(tr.shape, generator=gen, dtype=torch.float64).to(tr)
        flat = [xs] + sum(leaves.values(), []) + ([betas] if betas is not None else [])
        grads = torch.autograd.grad((out * go).sum() + (tr * gt).sum(), flat, allow_unused=True)
        results.append((out.detach(), tr.detach(), grads))
    return results


@requires_native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("act,preact,bias,gated", [
    ("elu", False, True, False), ("elu", True, True, False), ("lipswish", True, True, False),
    ("lipswish", False, False, False), ("tanh", False, True, True), ("softplus", False, True, True),
    ("identity", False, True, True), ("lipswish", True, True, True),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_native_matches_reference(device, act, preact, bias, gated, dtype):
    if not native_on(device):
        pytest.skip(f"no native kernels on {device}")
    widths = [3, 16, 7, 3]
    net = _net(widths, act, preact, bias, gated, batch=5, dtype=dtype, device=device)
    x = torch.randn(5, 3, dtype=dtype, device=device)
    for n_probes, k in [(1, 1), (2, 4), (3, 6)]:
        probes = torch.randn(n_probes, 5, 3, dtype=dtype, device=device)
        vc, pc = _series(k)
        (o1, t1, g1), (o2, t2, g2) = _both(x, net, probes, vc, pc)
        tol = dict(rtol=1e-9, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-5)
        torch.testing.assert_close(o1, o2, **tol)
        torch.testing.assert_close(t1, t2, **tol)
        for a, b in zip(g1, g2):
            if a is None or b is None:
                assert a is None or not a.any()
                assert b is None or not b.any()
                continue
            torch.testing.assert_close(a, b, **tol)


def test_trace_equals_brute_force_jacobian_powers():
    """<v, J^k v> summed with the coefficients, against J from torch.autograd.functional."""
    net = _net([4, 9, 4], "lipswish", preact=True, batch=3)
    x = torch.randn(3, 4, dtype=torch.float64)
    probes = torch.randn(2, 3, 4, dtype=torch.float64)
    vc = [0.7, -0.2, 0.05]
    for backend in ("native", "reference") if fastflow.native_available() else ("reference",):
        with fastflow.backend(backend):
            _, tr = mlp_trace(x, net["weights"], net["biases"], betas=net["betas"],
                              activation="lipswish", preact=True, probes=probes, value_coeffs=vc)
        want = []
        for b in range(3):
            J = torch.autograd.functional.jacobian(
                lambda z: mlp_apply_reference(z[None], net["weights"], net["biases"], net["betas"],
                                              "lipswish", True)[0], x[b])
            total = 0.0
            for v in probes[:, b]:
                Jk = torch.eye(4, dtype=torch.float64)
                for c in vc:
                    Jk = J @ Jk
                    total = total + c * (v @ Jk @ v)
            want.append(total / 2)
        torch.testing.assert_close(tr, torch.stack(want), rtol=1e-10, atol=1e-12)


@requires_native
@pytest.mark.parametrize("act,gated", [("lipswish", False), ("elu", False), ("tanh", True),
                                       ("softplus", True)])
def test_gradcheck_exact_trace(act, gated):
    """With K = 1 and psi = v the hand-written backward is the exact gradient of v^T J v."""
    net = _net([2, 5, 2], act, preact=act == "lipswish", gated=gated, batch=3)
    x = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    probes = torch.randn(2, 3, 2, dtype=torch.float64)
    ws = [w.requires_grad_() for w in net["weights"]]
    bs = [b.requires_grad_() for b in net["biases"]]
    gs = [g.requires_grad_() for g in net["gates"]]
    ss = [s.requires_grad_() for s in net["shifts"]]
    betas = net["betas"].requires_grad_() if net["betas"] is not None else None

    def f(x, *flat):
        n = len(ws)
        w, rest = list(flat[:n]), list(flat[n:])
        b = rest[:len(bs)]; rest = rest[len(bs):]
        g = rest[:len(gs)]; rest = rest[len(gs):]
        s = rest[:len(ss)]; rest = rest[len(ss):]
        be = rest[0] if rest else None
        with fastflow.backend("native"):
            return mlp_trace(x, w, b, g, s, be, act, act == "lipswish", probes=probes,
                             value_coeffs=[1.0])
    inputs = (x, *ws, *bs, *gs, *ss) + ((betas,) if betas is not None else ())
    assert torch.autograd.gradcheck(f, inputs)


@requires_native
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    if not native_on(device):
        pytest.skip(f"no native kernels on {device}")
    for act, gated in [("lipswish", False), ("tanh", True)]:
        net = _net([3, 6, 3], act, preact=True, gated=gated, batch=4, device=device)
        x = torch.randn(4, 3, dtype=torch.float64, device=device, requires_grad=True)
        ws = [w.requires_grad_() for w in net["weights"]]
        betas = net["betas"] if net["betas"] is not None else x.new_zeros(0)
        probes = torch.randn(2, 4, 3, dtype=torch.float64, device=device)
        code = MLP_ACTIVATIONS[act]
        args = (x, ws, net["biases"], net["gates"], net["shifts"], betas, code, True, probes,
                [1.0, -0.5], [1.0, -1.0])
        torch.library.opcheck(torch.ops.fastflow.mlp_trace.default, args)
        y = torch.randn(4, 3, dtype=torch.float64, device=device)
        if not gated:
            torch.library.opcheck(
                torch.ops.fastflow.mlp_fixed_point.default,
                (y, [w.detach() for w in ws], net["biases"], betas, code, True, 1e-8, 100),
            )


# --------------------------------------------------------------------------------------------
# coefficients as tensors (mlp_trace.tensor_coeffs)


def _padded(values, length):
    return torch.tensor(list(values) + [0.0] * (length - len(values)), dtype=torch.float64)


@requires_native
@pytest.mark.parametrize("device", DEVICES)
def test_tensor_coefficients_equal_the_lists(device):
    """Fixed-length tensors, zero past the terms that count: the values and gradients of the
    float[] operator with those terms, natively and in the reference; the fake kernel and the
    registered autograd pass opcheck."""
    if not native_on(device):
        pytest.skip(f"no native kernels on {device}")
    net = _net([3, 7, 3], "lipswish", preact=True, batch=4, device=device)
    x = torch.randn(4, 3, dtype=torch.float64, device=device)
    probes = torch.randn(2, 4, 3, dtype=torch.float64, device=device)
    for k, n_psi in [(1, 1), (3, 3), (4, 2)]:
        vc, pc = _series(k)
        pc = pc[:n_psi]
        want = _both(x, net, probes, vc, pc)
        got = _both(x, net, probes, _padded(vc, 9), _padded(pc, 9))
        for (o1, t1, g1), (o2, t2, g2) in zip(got, want):
            torch.testing.assert_close(o1, o2, rtol=0, atol=0)
            torch.testing.assert_close(t1, t2, rtol=1e-13, atol=1e-14)
            for a, b in zip(g1, g2):
                if a is None or b is None:
                    assert (a is None or not a.any()) and (b is None or not b.any())
                    continue
                torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-14)
    ws = [w.clone().requires_grad_() for w in net["weights"]]
    args = (x.clone().requires_grad_(), ws, net["biases"], [], [], net["betas"],
            MLP_ACTIVATIONS["lipswish"], True, probes, _padded([1.0, -0.5], 6),
            _padded([1.0], 6))
    torch.library.opcheck(torch.ops.fastflow.mlp_trace.tensor_coeffs, args)


@requires_native
def test_tensor_coefficients_bad_input_names_the_argument():
    net = _net([3, 5, 3], "elu")
    x = torch.randn(5, 3, dtype=torch.float64)
    probes = torch.randn(1, 5, 3, dtype=torch.float64)
    base = (net["weights"], net["biases"], (), (), None, "elu", False)
    vc = torch.tensor([1.0, -0.5, 0.0])
    with pytest.raises(ValueError, match="value_coeffs must be a 1-D floating-point tensor"):
        mlp_trace(x, *base, probes=probes, value_coeffs=vc[None], psi_coeffs=vc)
    with pytest.raises(ValueError, match="psi_coeffs must be a 1-D floating-point tensor"):
        mlp_trace(x, *base, probes=probes, value_coeffs=vc, psi_coeffs=torch.ones(2, dtype=torch.long))
    with pytest.raises(TypeError, match="both be tensors"):
        mlp_trace(x, *base, probes=probes, value_coeffs=vc, psi_coeffs=[1.0])
    with pytest.raises(RuntimeError, match="psi_coeffs may not have a non-zero entry at or past K = 2"):
        mlp_trace(x, *base, probes=probes, value_coeffs=vc, psi_coeffs=torch.tensor([1.0, 0, 1.0]))
    with pytest.raises(RuntimeError, match=r"value_coeffs\[1\] must be finite"):
        mlp_trace(x, *base, probes=probes, value_coeffs=torch.tensor([1.0, math.nan]),
                  psi_coeffs=torch.tensor([1.0]))
    with fastflow.backend("reference"):
        with pytest.raises(ValueError, match="psi_coeffs may not have more entries"):
            mlp_trace(x, *base, probes=probes, value_coeffs=vc,
                      psi_coeffs=torch.tensor([1.0, 0, 1.0]))


# --------------------------------------------------------------------------------------------
# forward mode in PyTorch operations (mlp_jacobian, mlp_power_traces)


@pytest.mark.parametrize("act,preact,gated", [
    ("elu", False, False), ("lipswish", True, False), ("tanh", True, True),
    ("softplus", False, True), ("identity", False, False),
])
def test_forward_mode_jacobian_and_power_traces(act, preact, gated):
    """mlp_jacobian is torch.autograd.functional.jacobian of the network per sample;
    mlp_power_traces are <v, J^k v> of that Jacobian; both gradcheck (ordinary autograd)."""
    net = _net([3, 6, 5, 3], act, preact, gated=gated, batch=4)
    x = torch.randn(4, 3, dtype=torch.float64) * 2
    kw = dict(biases=net["biases"], betas=net["betas"], activation=act, preact=preact,
              gates=net["gates"], shifts=net["shifts"])
    out, J = mlp_jacobian(x, net["weights"], **kw)
    torch.testing.assert_close(out, mlp_apply_reference(x, net["weights"], **kw))
    for b in range(4):
        def row(z, b=b):
            xb = x.clone()
            xb[b] = z
            return mlp_apply_reference(xb, net["weights"], **kw)[b]
        want = torch.autograd.functional.jacobian(row, x[b])
        torch.testing.assert_close(J[b], want, rtol=1e-10, atol=1e-12)
    probes = torch.randn(2, 4, 3, dtype=torch.float64)
    _, traces = mlp_power_traces(x, net["weights"], probes=probes, n_terms=3, **kw)
    Jk = torch.eye(3, dtype=torch.float64).expand(4, 3, 3)
    for k in range(3):
        Jk = J @ Jk
        want = torch.einsum("pbi,bij,pbj->b", probes, Jk, probes) / 2
        torch.testing.assert_close(traces[k], want, rtol=1e-10, atol=1e-12)

    ws = [w.clone().requires_grad_() for w in net["weights"]]

    def f(xx, *w):
        return mlp_jacobian(xx, list(w), **kw)[1], mlp_power_traces(
            xx, list(w), probes=probes, n_terms=2, **kw)[1]

    assert torch.autograd.gradcheck(f, (x.clone().requires_grad_(), *ws))


def test_forward_mode_bad_input_names_the_argument():
    net = _net([3, 5, 3], "elu")
    x = torch.randn(5, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="x must be a matrix"):
        mlp_jacobian(x[None], net["weights"], activation="elu")
    with pytest.raises(ValueError, match="n_terms"):
        mlp_power_traces(x, net["weights"], activation="elu", probes=x[None], n_terms=0)
    with pytest.raises(ValueError, match="probes"):
        mlp_power_traces(x, net["weights"], activation="elu", probes=x[None, :2], n_terms=2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("act,preact", [("lipswish", True), ("elu", False), ("lipswish", False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fixed_point_inverts(device, act, preact, dtype):
    net = _net([4, 32, 32, 4], act, preact, batch=64, dtype=dtype, device=device, scale=0.9)
    x = torch.randn(64, 4, dtype=dtype, device=device) * 2
    y = x + mlp_apply_reference(x, net["weights"], net["biases"], net["betas"], act, preact)
    tol = 1e-10 if dtype == torch.float64 else 1e-6
    got = {}
    for backend in ("native", "reference") if native_on(device) else ("reference",):
        with fastflow.backend(backend):
            got[backend] = mlp_fixed_point(y, net["weights"], net["biases"], net["betas"], act,
                                           preact, tol=tol, max_iter=500)
        x2, iters, res = got[backend]
        assert bool((res <= tol).all()), res.max()
        err = 1e-8 if dtype == torch.float64 else 1e-4
        assert float((x2 - x).abs().max()) < err
        assert iters.dtype == torch.long and int(iters.min()) >= 1
    if "native" in got:
        (xn, itn, rn), (xr, itr, rr) = got["native"], got["reference"]
        torch.testing.assert_close(xn, xr)
        # the same iteration, in the same order of operations: the counts agree to within one
        assert int((itn - itr).abs().max()) <= 1


@pytest.mark.parametrize("device", DEVICES)
def test_fixed_point_nan_stays_in_its_sample_and_budget(device):
    net = _net([3, 16, 3], "elu", batch=6, device=device, scale=0.8)
    x = torch.randn(6, 3, dtype=torch.float64, device=device)
    y = x + mlp_apply_reference(x, net["weights"], net["biases"], None, "elu")
    y[2, 1] = float("nan")
    x2, iters, res = mlp_fixed_point(y, net["weights"], net["biases"], None, "elu",
                                     tol=1e-12, max_iter=300)
    assert torch.isnan(res[2]) and torch.isnan(x2[2]).all()
    keep = torch.tensor([0, 1, 3, 4, 5], device=device)
    assert float((x2[keep] - x[keep]).abs().max()) < 1e-10
    assert int(iters[2]) == 1
    # a budget too small: the residuals say so (the caller reports it)
    _, iters, res = mlp_fixed_point(y[keep], net["weights"], net["biases"], None, "elu",
                                    tol=1e-12, max_iter=2)
    assert bool((iters == 2).all()) and bool((res > 1e-12).all())


def test_bad_input_names_the_argument():
    net = _net([3, 5, 3], "lipswish", preact=True)
    x = torch.randn(5, 3, dtype=torch.float64)
    probes = torch.randn(1, 5, 3, dtype=torch.float64)
    kw = dict(probes=probes, value_coeffs=[1.0])
    base = (net["weights"], net["biases"], (), (), net["betas"], "lipswish", True)
    for backend in ("native", "reference") if fastflow.native_available() else ("reference",):
        with fastflow.backend(backend):
            with pytest.raises(ValueError, match="x must be a matrix"):
                mlp_trace(x[None], *base, **kw)
            with pytest.raises(ValueError, match=r"weights\[1\]"):
                mlp_trace(x, [net["weights"][0], net["weights"][1][:, :2]], *base[1:], **kw)
            with pytest.raises(ValueError, match="betas"):
                mlp_trace(x, net["weights"], net["biases"], (), (), None, "lipswish", True, **kw)
            with pytest.raises(ValueError, match="activation"):
                mlp_trace(x, net["weights"], net["biases"], (), (), None, "relu", True, **kw)
            with pytest.raises(ValueError, match="probes"):
                mlp_trace(x, *base, probes=probes[:, :4], value_coeffs=[1.0])
            with pytest.raises(ValueError, match="dtype"):
                mlp_trace(x.float(), *base, probes=probes.float(), value_coeffs=[1.0])
            with pytest.raises(ValueError, match=r"biases\[0\]"):
                mlp_trace(x, net["weights"], [net["biases"][0][:2], net["biases"][1]],
                          *base[2:], **kw)
            with pytest.raises(ValueError, match="psi_coeffs"):
                mlp_trace(x, *base, probes=probes, value_coeffs=[1.0], psi_coeffs=[1.0, 2.0])
            with pytest.raises(ValueError, match="tol"):
                mlp_fixed_point(x, net["weights"], net["biases"], net["betas"], "lipswish", True,
                                tol=0.0)
            with pytest.raises(ValueError, match="max_iter"):
                mlp_fixed_point(x, net["weights"], net["biases"], net["betas"], "lipswish", True,
                                max_iter=0)


@requires_native
def test_raw_operator_errors_name_the_argument():
    net = _net([3, 5, 3], "elu")
    x = torch.randn(5, 3, dtype=torch.float64)
    probes = torch.randn(1, 5, 3, dtype=torch.float64)
    op = torch.ops.fastflow.mlp_trace
    e = x.new_zeros(0)
    with pytest.raises(RuntimeError, match="probes"):
        op(x, net["weights"], net["biases"], [], [], e, 1, False, probes[:, :2], [1.0], [1.0])
    with pytest.raises(RuntimeError, match="act must be"):
        op(x, net["weights"], net["biases"], [], [], e, 9, False, probes, [1.0], [1.0])
    with pytest.raises(RuntimeError, match="gates"):
        op(x, net["weights"], net["biases"], [x[:1, :1]], [], e, 1, False, probes, [1.0], [1.0])
    with pytest.raises(RuntimeError, match="tol"):
        torch.ops.fastflow.mlp_fixed_point(x, net["weights"], net["biases"], e, 1, False, -1.0, 5)


def test_nan_in_one_sample_stays_there():
    net = _net([3, 8, 3], "lipswish", preact=True, batch=4)
    x = torch.randn(4, 3, dtype=torch.float64)
    x[1, 0] = float("nan")
    probes = torch.randn(1, 4, 3, dtype=torch.float64)
    for backend in ("native", "reference") if fastflow.native_available() else ("reference",):
        with fastflow.backend(backend):
            out, tr = mlp_trace(x, net["weights"], net["biases"], (), (), net["betas"],
                                "lipswish", True, probes=probes, value_coeffs=[1.0, -0.5])
        assert torch.isnan(tr[1]) and torch.isnan(out[1]).all()
        assert torch.isfinite(tr[[0, 2, 3]]).all() and torch.isfinite(out[[0, 2, 3]]).all()


# --------------------------------------------------------------------------------------------
# FFJORD: the CNF's native dynamics (one mlp_trace call per evaluation)


@requires_native
@pytest.mark.parametrize("adjoint", [True, False])
@pytest.mark.parametrize("activation", ["tanh", "softplus"])
def test_cnf_native_dynamics_match_the_reference(adjoint, activation):
    from fastflow.nn.continuous import CNF

    torch.manual_seed(0)
    cnf = CNF(2, hidden=(8, 8), activation=activation, adjoint=adjoint, atol=1e-8, rtol=1e-8).double()
    x = torch.randn(16, 2, dtype=torch.float64)
    got = {}
    for backend in ("native", "reference"):
        cnf.zero_grad()
        xg = x.clone().requires_grad_()
        torch.manual_seed(3)  # the same probes
        with fastflow.backend(backend):
            z, logdet = cnf(xg)
            (z.square().sum() + logdet.sum()).backward()
        got[backend] = (z.detach(), logdet.detach(), cnf.last_nfe, xg.grad,
                        [p.grad.clone() for p in cnf.parameters()])
    (zn, ln, nn_, gxn, gpn), (zr, lr, nr, gxr, gpr) = got["native"], got["reference"]
    torch.testing.assert_close(zn, zr, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(ln, lr, rtol=1e-9, atol=1e-10)
    assert nn_ == nr
    torch.testing.assert_close(gxn, gxr, rtol=1e-6, atol=1e-8)
    for a, b in zip(gpn, gpr):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


@requires_native
def test_cnf_native_dynamics_only_where_they_apply(monkeypatch):
    """The whole solve is one native call (fastflow.ops.cnf_dopri5) for dopri5 with adjoint
    gradients; fixed-step solvers and backpropagation through the solver call the native
    dynamics per evaluation (Hutchinson); the exact trace outside the native solve, the
    regularisers and concat layers keep the autograd dynamics."""
    from fastflow.nn import continuous

    calls = []
    real_trace, real_solve = continuous.mlp_trace, continuous.cnf_dopri5
    monkeypatch.setattr(continuous, "mlp_trace", lambda *a, **k: calls.append("dynamics") or real_trace(*a, **k))
    monkeypatch.setattr(continuous, "cnf_dopri5", lambda *a, **k: calls.append("solve") or real_solve(*a, **k))
    x = torch.randn(8, 2, dtype=torch.float64)
    for kwargs, path in [
        (dict(), "solve"), (dict(adjoint=False), "dynamics"), (dict(solver="rk4", step_size=0.1), "dynamics"),
        (dict(estimator="exact"), "solve"), (dict(estimator="exact", adjoint=False), None),
        (dict(kinetic=True), None), (dict(layer="concat"), None),
    ]:
        calls.clear()
        torch.manual_seed(0)
        cnf = continuous.CNF(2, hidden=(4,), **kwargs).double()
        cnf(x.clone().requires_grad_())
        assert set(calls) == ({path} if path else set()), kwargs
