"""The native CNF solve (fastflow.ops.cnf_dopri5) against torchdiffeq's.

The reference is :class:`fastflow.nn.CNF` under ``fastflow.backend("reference")``: torchdiffeq's
dopri5 (``odeint_adjoint``) over the autograd dynamics. The native operator replays the same
step control, so in float64 the two take the same steps: values, NFE and adjoint gradients agree
to rounding. Beyond agreement with torchdiffeq: the solve converges to a tight solution, the
adjoint gradient equals backpropagation through a tight direct solve, and the operator passes
opcheck and gradcheck.
"""

from __future__ import annotations

import pytest
import torch

import fastflow
from fastflow.nn import CNF, ODEnet
from fastflow.ops.cnf_dopri5 import cnf_dopri5, concatsquash_tensors

from _devices import DEVICES, native_on, requires_native

pytestmark = [requires_native, pytest.mark.usefixtures("one_thread")]


def _cnf(activation="tanh", train_T=True, tol=1e-6, hidden=(8, 8), device="cpu", dtype=torch.float64, **kw):
    torch.manual_seed(0)
    cnf = CNF(2, hidden=hidden, activation=activation, train_T=train_T, atol=tol, rtol=tol, **kw)
    with torch.no_grad():  # away from the initialisation's near-zero gates and shifts
        for p in cnf.net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return cnf.to(device=device, dtype=dtype)


def _run(cnf, x, backend, reverse=False, seed=3):
    """(out, logdet, nfe, nfe_backward, grad_x, grads) of one solve and a backward pass."""
    cnf.zero_grad()
    xg = x.clone().requires_grad_()
    torch.manual_seed(seed)  # the same probe
    with fastflow.backend(backend):
        out, logdet = cnf.inverse(xg) if reverse else cnf(xg)
        (out.square().sum() + (logdet * torch.linspace(0.5, 1.5, len(x), dtype=x.dtype, device=x.device)).sum()).backward()
    return (out.detach(), logdet.detach(), cnf.last_nfe, cnf.last_nfe_backward, xg.grad,
            [p.grad.clone() for p in cnf.parameters()])


@pytest.mark.parametrize("activation", ["tanh", "softplus"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("train_T", [True, False])
@pytest.mark.parametrize("estimator", ["hutchinson", "exact"])
def test_float64_native_solve_is_torchdiffeqs_step_for_step(activation, reverse, train_T, estimator):
    cnf = _cnf(activation, train_T, estimator=estimator)
    x = torch.randn(32, 2, dtype=torch.float64)
    native = _run(cnf, x, "native", reverse)
    ref = _run(cnf, x, "reference", reverse)
    assert native[2] == ref[2] and native[2] > 12  # forward NFE (first step: 2, then 6 per step)
    assert native[3] == ref[3] and native[3] > 12  # adjoint NFE
    for a, b in zip(native[:2] + native[4:5] + tuple(native[5]), ref[:2] + ref[4:5] + tuple(ref[5])):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_float32_agrees_with_the_reference(device):
    if not native_on(device):
        pytest.skip(f"no native kernel on {device}")
    cnf = _cnf(device=device, dtype=torch.float32, tol=1e-5)
    x = torch.randn(64, 2, device=device)
    native = _run(cnf, x, "native")
    ref = _run(cnf, x, "reference")
    assert abs(native[2] - ref[2]) <= 6 and abs(native[3] - ref[3]) <= 12
    torch.testing.assert_close(native[0], ref[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(native[1], ref[1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(native[4], ref[4], rtol=1e-3, atol=1e-4)
    for a, b in zip(native[5], ref[5]):
        assert (a - b).norm() <= 1e-3 * b.norm() + 1e-5


def test_solution_converges_to_a_tight_solve():
    """The error against a 1e-11 solve shrinks with the tolerance (not just agreement with
    torchdiffeq). Not monotonically tolerance by tolerance: the value at the end time comes from
    the dense output of the step that passes it, as in torchdiffeq, whose error the step control
    does not bound (here 1e-4 gives 2e-6 and 1e-5 gives 2e-4, both solves 3 steps)."""
    cnf = _cnf(tol=1e-11)
    x = torch.randn(32, 2, dtype=torch.float64)
    eps = torch.randn_like(x)
    args = (*concatsquash_tensors(cnf.net), cnf.end_time.detach(), "tanh", eps)
    with torch.no_grad():
        z_star, l_star, _ = cnf_dopri5(x, *args, rtol=1e-11, atol=1e-11)
        errors = []
        for tol in (1e-2, 1e-6, 1e-9):
            z, logdet, nfe = cnf_dopri5(x, *args, rtol=tol, atol=tol)
            errors.append(max((z - z_star).abs().max().item(), (logdet - l_star).abs().max().item()))
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-7


def test_adjoint_gradient_equals_backprop_through_a_tight_direct_solve():
    cnf = _cnf(tol=1e-10)
    x = torch.randn(16, 2, dtype=torch.float64)
    native = _run(cnf, x, "native")
    cnf.adjoint = False
    direct = _run(cnf, x, "reference")
    assert direct[3] == 0  # backpropagated through the solver's operations, no adjoint solve
    torch.testing.assert_close(native[4], direct[4], rtol=1e-6, atol=1e-8)
    for a, b in zip(native[5], direct[5]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


def test_gradcheck():
    torch.manual_seed(1)
    net = ODEnet(2, hidden=(4,)).double()
    x = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    eps = torch.randn(3, 2, dtype=torch.float64)
    T = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    w, b, gw, gb, sw = concatsquash_tensors(net)

    def f(x, T, w0, gw1):
        z, logdet, _ = cnf_dopri5(x, [w0, w[1]], b, [gw[0], gw1], gb, sw, T, "tanh", eps,
                                  rtol=1e-12, atol=1e-12, end_time_norm=1)
        return z, logdet

    assert torch.autograd.gradcheck(f, (x, T, w[0], gw[1]), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_opcheck():
    torch.manual_seed(1)
    net = ODEnet(2, hidden=(4,)).double()
    for p in net.parameters():
        p.requires_grad_(True)
    x = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    eps = torch.randn(3, 2, dtype=torch.float64)
    T = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    args = (x, *[[t.detach().requires_grad_() for t in ts] for ts in concatsquash_tensors(net)],
            T, 3, eps, False, 1e-6, 1e-6, 2, 1000)
    torch.library.opcheck(torch.ops.fastflow.cnf_dopri5.default, args)


def test_no_grad_inference_mode_and_empty_batch():
    cnf = _cnf()
    x = torch.randn(8, 2, dtype=torch.float64)
    torch.manual_seed(1)
    with torch.no_grad():
        z1, l1 = cnf(x)
    torch.manual_seed(1)
    with torch.inference_mode():
        z2, l2 = cnf(x)
    torch.manual_seed(1)
    with fastflow.backend("reference"), torch.no_grad():
        z3, l3 = cnf(x)
    torch.testing.assert_close(z1, z3, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(l2, l3, rtol=1e-10, atol=1e-12)
    assert not z1.requires_grad and z2.is_inference()
    with fastflow.backend("native"):
        z, logdet = cnf(x[:0])
    assert z.shape == (0, 2) and logdet.shape == (0,) and cnf.last_nfe == 0


def test_round_trip_and_chain():
    """inverse(forward(x)) = x within the solver's tolerance, log-dets opposite (one probe:
    both solves use the same Hutchinson estimate)."""
    cnf = _cnf(tol=1e-9)
    x = torch.randn(16, 2, dtype=torch.float64)
    with torch.no_grad():
        torch.manual_seed(4)
        z, logdet = cnf(x)
        torch.manual_seed(4)
        x2, logdet_inv = cnf.inverse(z)
    torch.testing.assert_close(x2, x, rtol=0, atol=1e-6)
    torch.testing.assert_close(logdet_inv, -logdet, rtol=0, atol=1e-6)


def test_errors_name_the_argument():
    cnf = _cnf()
    w, b, gw, gb, sw = concatsquash_tensors(cnf.net)
    x = torch.randn(4, 2, dtype=torch.float64)
    eps = torch.randn_like(x)
    T = torch.tensor(0.5, dtype=torch.float64)
    with pytest.raises(ValueError, match="probe"):
        cnf_dopri5(x, w, b, gw, gb, sw, T, "tanh", eps[:2])
    with pytest.raises(ValueError, match="activation"):
        cnf_dopri5(x, w, b, gw, gb, sw, T, "relu", eps)
    with pytest.raises(ValueError, match="gate_biases"):
        cnf_dopri5(x, w, b, gw, gb[:1], sw, T, "tanh", eps)
    with pytest.raises(ValueError, match="rtol"):
        cnf_dopri5(x, w, b, gw, gb, sw, T, "tanh", eps, rtol=0.0)
    with pytest.raises(ValueError, match="max_steps"):
        cnf_dopri5(x, w, b, gw, gb, sw, T, "tanh", eps, max_steps=0)
    with pytest.raises(TypeError, match="weights"):
        cnf_dopri5(x, w[0], b, gw, gb, sw, T, "tanh", eps)
    op = torch.ops.fastflow.cnf_dopri5
    with pytest.raises(RuntimeError, match="gate_weights"):
        op(x, w, b, [g.t() for g in gw], gb, sw, T, 3, eps, False, 1e-5, 1e-5, 0, 100)
    with pytest.raises(RuntimeError, match="z has non-finite"):
        op(x.clone().fill_(float("nan")), w, b, gw, gb, sw, T, 3, eps, False, 1e-5, 1e-5, 0, 100)
    with pytest.raises(RuntimeError, match="max_steps"):
        op(x * 100, w, b, gw, gb, sw, T, 3, eps, False, 1e-12, 1e-12, 0, 2)
    with pytest.raises(RuntimeError, match="weights\\[1\\]"):
        op(x, [w[0], w[1].float(), w[2]], b, gw, gb, sw, T, 3, eps, False, 1e-5, 1e-5, 0, 100)
    with pytest.raises(ValueError, match="non-finite"):  # the layer says it first, naming x
        cnf(torch.tensor([[float("inf"), 0.0]], dtype=torch.float64))


def test_non_finite_dynamics_raise_instead_of_looping():
    cnf = _cnf()
    with torch.no_grad():
        cnf.net.layers[0].linear.weight.fill_(float("nan"))
    with fastflow.backend("native"), pytest.raises(RuntimeError, match="non-finite"):
        cnf(torch.randn(4, 2, dtype=torch.float64))


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("features, training", [(2, True), (2, False), (3, False)])
def test_compiles_in_one_graph(features, training):
    """With the native solve, a CNF model's log_prob is one graph (no break) and matches eager,
    values and gradients (training mode: Hutchinson; eval mode: the exact trace for D = 2,
    Hutchinson for D = 3)."""
    from fastflow.models import FFJORD

    torch._dynamo.reset()
    torch.manual_seed(0)
    flow = FFJORD(features, hidden=(8,), n_blocks=2).double()
    flow.train(training)
    x = torch.randn(6, features, dtype=torch.float64)
    explain = torch._dynamo.explain(flow.log_prob)(x)
    assert explain.graph_count == 1 and explain.graph_break_count == 0, explain.break_reasons
    _compiled_matches_eager(flow, x, torch.compile(flow.log_prob, fullgraph=True, backend="aot_eager"),
                            rtol=1e-10, atol=1e-12)


def _compiled_matches_eager(flow, x, compiled, rtol, atol):
    """The compiled log_prob and its parameter gradients equal eager's (the same seed)."""
    torch.manual_seed(7)
    got = compiled(x)
    got.sum().backward()
    grads = [p.grad.clone() for p in flow.parameters()]
    flow.zero_grad()
    torch.manual_seed(7)
    want = flow.log_prob(x)
    want.sum().backward()
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    for p, g in zip(flow.parameters(), grads):
        torch.testing.assert_close(g, p.grad, rtol=10 * rtol, atol=atol)
    torch._dynamo.reset()


def test_exact_trace_probes_give_the_brute_force_divergence():
    """With the basis probes the solve's log-det is the exact one: equal to the reference's
    exact trace (D autograd vector-Jacobian products per evaluation) and, on one Euler-sized
    check, to the brute-force Jacobian's trace of the dynamics."""
    from fastflow.ops.cnf_dopri5 import basis_probes

    cnf = _cnf(tol=1e-9, hidden=(8,))
    x = torch.randn(8, 2, dtype=torch.float64)
    probes = basis_probes(x)
    assert probes.shape == (2, 8, 2)
    T = cnf.end_time.detach()
    tensors = concatsquash_tensors(cnf.net)
    with torch.no_grad():
        z, logdet, _ = cnf_dopri5(x, *tensors, T, "tanh", probes, rtol=1e-9, atol=1e-9)
        cnf.eval()
        cnf.eval_estimator = "exact"
        with fastflow.backend("reference"):
            z_ref, logdet_ref = cnf(x)
    torch.testing.assert_close(logdet, logdet_ref, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(z, z_ref, rtol=1e-8, atol=1e-10)
    # the divergence itself: a tiny end time makes logdet ~ T * tr(df/dz)(0, x)
    tiny = torch.tensor(1e-7, dtype=torch.float64)
    with torch.no_grad():
        _, ld_tiny, _ = cnf_dopri5(x, *tensors, tiny, "tanh", probes, rtol=1e-12, atol=1e-12)
    jac = torch.autograd.functional.jacobian(lambda v: cnf.net(torch.zeros((), dtype=torch.float64), v).sum(0), x)
    trace = torch.diagonal(jac, dim1=0, dim2=2).sum(-1)  # [B]: sum_i df_i/dx_i per sample
    torch.testing.assert_close(ld_tiny / tiny, trace, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_inductor_with_eager_random_numbers_matches_eager():
    """Under the default (Inductor) backend the probes come from Inductor's generator; with
    ``fallback_random`` they are eager's, and values and gradients equal eager's."""
    import torch._inductor.config as inductor_config

    from fastflow.models import FFJORD

    torch._dynamo.reset()
    torch.manual_seed(0)
    flow = FFJORD(2, hidden=(8,), n_blocks=2).train()
    x = torch.randn(16, 2)
    with inductor_config.patch(fallback_random=True):  # (the config's own patch: restored after)
        _compiled_matches_eager(flow, x, torch.compile(flow.log_prob, fullgraph=True), rtol=1e-6, atol=1e-6)
