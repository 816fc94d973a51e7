"""CNF / FFJORD under ``torch.compile(fullgraph=True)`` where the native ``cnf_dopri5`` operator
does not take the solve: the in-graph solver (:mod:`fastflow.nn._ode_graph`).

For each configuration of a solve without gradients (vector and image dynamics, concat and
concat-squash layers, tanh and softplus, Hutchinson and exact divergence, the adaptive and the
fixed-step solvers, the RNODE regularisers in training mode, forward and inverse) the compiled
call (``backend="aot_eager"``; one case on Inductor with ``fallback_random``) equals the eager
torchdiffeq solve with the same seed: values, the number of evaluations and the regularisers.
``torch._dynamo.explain`` counts one graph and no break for one case of each kind. Solves with
gradients outside the native solve (``adjoint=True`` or ``adjoint=False``) stay on torchdiffeq
with the default settings: they match eager under a plain ``torch.compile``, gradients
included, and ``fullgraph=True`` raises an error that names the reason. With donated buffers
off (:mod:`fastflow.nn._loops`), training runs the in-graph solve, ``adjoint=False`` with
gradients through its steps and ``adjoint=True`` by the adjoint solve: one graph, eager's
values and gradients (``aot_eager``; on Inductor a fixed-step case, and FFJORD on images
with the adjoint through :func:`fastflow.compile`); so does ``adjoint=True`` training with a
dynamics net of the user's own (``adjoint=False`` stays eager with it).

Tiny nets and loose tolerances keep every solve short.
"""

from __future__ import annotations

import pytest
import torch

from fastflow.models import FFJORD
from fastflow.nn import CNF
from fastflow.nn._loops import loop_gradient_settings

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

F64 = dict(rtol=1e-9, atol=1e-11)


def _flow(features, dtype=torch.float64, training=True, **kwargs):
    torch.manual_seed(0)
    kwargs.setdefault("hidden", (8,))
    kwargs.setdefault("atol", 1e-5)
    kwargs.setdefault("rtol", 1e-5)
    flow = FFJORD(features, **kwargs).to(dtype)
    flow.train(training)
    return flow


def _run(flow, x, fn, grad, input_grad=True):
    """``fn(x)`` with the seed reset (the same probes), and the gradients of its sum w.r.t. ``x``
    (``input_grad``) and every parameter (None without ``grad``)."""
    flow.zero_grad()
    x = x.detach().clone().requires_grad_(grad and input_grad)
    torch.manual_seed(7)
    if grad:
        out = fn(x)
        total = sum(o.sum() for o in out) if isinstance(out, tuple) else out.sum()
        total.backward()
        grads = ([x.grad] if input_grad else []) + [p.grad for p in flow.parameters()]
        assert all(g is not None for g in grads)
        grads = [g.clone() for g in grads]
    else:
        with torch.no_grad():
            out = fn(x)
        grads = None
    blocks = flow.blocks if hasattr(flow, "blocks") else [flow]
    diag = [(b.last_nfe, b.last_kinetic, b.last_jacobian_frobenius) for b in blocks]
    return out, grads, diag


def _compiled_matches_eager(flow, x, method="log_prob", grad=True, tol=F64, backend="aot_eager",
                            input_grad=True):
    torch._dynamo.reset()
    fn = getattr(flow, method)
    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    got, got_grads, got_diag = _run(flow, x, compiled, grad, input_grad)
    want, want_grads, want_diag = _run(flow, x, fn, grad, input_grad)
    torch.testing.assert_close(got, want, **tol)
    if grad:
        for g, w in zip(got_grads, want_grads):
            torch.testing.assert_close(g, w, rtol=10 * tol["rtol"], atol=10 * tol["atol"])
    for (nfe, kin, jac), (nfe_w, kin_w, jac_w) in zip(got_diag, want_diag):
        assert nfe == nfe_w  # the same steps
        assert isinstance(nfe, int)
        for a, b in ((kin, kin_w), (jac, jac_w)):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, **tol)
    torch._dynamo.reset()


def _one_graph(fn, x, grad=True):
    torch._dynamo.reset()
    ctx = torch.enable_grad() if grad else torch.no_grad()
    with ctx:
        explain = torch._dynamo.explain(fn)(x)
    assert explain.graph_count == 1 and explain.graph_break_count == 0, explain.break_reasons
    torch._dynamo.reset()


# -- adaptive dopri5 --------------------------------------------------------------------------
# (a training solve's compilation is the slow part, about 15 s each here: two such cases; the
# image dynamics are trained in the fixed-step cases, where it costs a few seconds)

DOPRI5_TRAIN = [
    # (features, layer, activation, estimator, regularised)
    (2, "concatsquash", "tanh", "hutchinson", False),
    (3, "concat", "softplus", "exact", True),
]


@pytest.mark.parametrize("features, layer, activation, estimator, regularised", DOPRI5_TRAIN)
def test_dopri5_training_mode_without_gradients(features, layer, activation, estimator, regularised):
    """A training-mode solve under no_grad: values, NFE and the regularisers (Jacobian-Frobenius:
    eager's |eps^T J|^2, by the transposed layer maps)."""
    flow = _flow(features, layer=layer, activation=activation, estimator=estimator, adjoint=False,
                 kinetic=regularised, jacobian_frobenius=regularised)
    x = torch.randn(5, *flow.event_shape, dtype=torch.float64)
    _compiled_matches_eager(flow, x, grad=False)
    if regularised:
        assert flow.blocks[0].last_kinetic.shape == flow.blocks[0].last_jacobian_frobenius.shape == (5,)


DOPRI5_EVAL = [
    (2, "concat", "tanh", "exact", torch.float64),
    ((1, 4, 4), "concat", "softplus", "exact", torch.float64),
    ((1, 4, 4), "concatsquash", "tanh", "hutchinson", torch.float64),
]


@pytest.mark.parametrize("features, layer, activation, estimator, dtype", DOPRI5_EVAL)
def test_dopri5_no_grad_eval(features, layer, activation, estimator, dtype):
    """Eval-mode log_prob under no_grad (the default adjoint=True: no gradients, so no adjoint).
    (A 2-D concat-squash ODEnet would take the native solve here: tests/test_cnf_dopri5.py.)"""
    flow = _flow(features, dtype=dtype, training=False, layer=layer, activation=activation,
                 eval_estimator=estimator)
    x = torch.randn(6, *flow.event_shape, dtype=dtype)
    tol = F64 if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    _compiled_matches_eager(flow, x, grad=False, tol=tol)


OTHER_ADAPTIVE = [
    # (solver, features, dtype)
    ("bosh3", 2, torch.float64),
    ("bosh3", 2, torch.float32),
    ("adaptive_heun", (1, 4, 4), torch.float64),
    ("dopri8", 2, torch.float64),
]


@pytest.mark.parametrize("solver, features, dtype", OTHER_ADAPTIVE)
def test_other_adaptive_solvers_no_grad(solver, features, dtype):
    """bosh3 (first same as last), adaptive_heun (not: its solution from its own weights, and
    torchdiffeq's next derivative the last stage's) and dopri8 on their torchdiffeq tableaus:
    eager's values and number of evaluations."""
    flow = _flow(features, dtype=dtype, training=False, layer="concat", solver=solver)
    x = torch.randn(5, *flow.event_shape, dtype=dtype)
    tol = F64 if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    _compiled_matches_eager(flow, x, grad=False, tol=tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_dopri5_inverse(dtype):
    """The inverse solve (T -> 0: torchdiffeq negates the time); float32: the time in float64,
    the stages in float32, as in torchdiffeq."""
    torch.manual_seed(0)
    cnf = CNF(2, hidden=(8,), layer="concat", atol=1e-5, rtol=1e-5).to(dtype).eval()
    z = torch.randn(5, 2, dtype=dtype)
    tol = F64 if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    _compiled_matches_eager(cnf, z, method="inverse", grad=False, tol=tol)


# -- fixed-step solvers ------------------------------------------------------------------------

FIXED = [
    # (features, solver, layer, estimator, training, regularised)
    (2, "rk4", "concatsquash", "hutchinson", True, True),
    (3, "euler", "concat", "exact", True, False),
    ((1, 4, 4), "midpoint", "concatsquash", "hutchinson", True, False),
    ((1, 4, 4), "euler", "concat", "hutchinson", True, True),
    (2, "rk4", "concat", "exact", False, False),
]


@pytest.mark.parametrize("features, solver, layer, estimator, training, regularised", FIXED)
def test_fixed_step_solvers(features, solver, layer, estimator, training, regularised):
    """torchdiffeq's grid (the last step shortened to the end time: step 0.15 on T = 0.5 gives
    four steps, the last 0.05), its rk4 (3/8 rule), euler and midpoint; training mode (with
    the regularisers) and eval mode, without gradients."""
    flow = _flow(features, training=bool(training), solver=solver, step_size=0.15, layer=layer,
                 estimator=estimator, eval_estimator=estimator, adjoint=False,
                 kinetic=regularised, jacobian_frobenius=regularised)
    x = torch.randn(5, *flow.event_shape, dtype=torch.float64)
    _compiled_matches_eager(flow, x, grad=False)
    assert flow.blocks[0].last_nfe == 4 * {"rk4": 4, "euler": 1, "midpoint": 2}[solver]


def test_fixed_step_float32_grid_and_learned_end_time():
    """One compiled graph serves every T (the number of grid steps is a tensor in it), and the
    float32 grid is torchdiffeq's (float32 arithmetic on the step in s)."""
    flow = _flow(2, dtype=torch.float32, solver="rk4", step_size=0.15, adjoint=False)
    x = torch.randn(4, 2)
    torch._dynamo.reset()
    compiled = torch.compile(flow.log_prob, fullgraph=True, backend="aot_eager")
    for T, steps in ((0.5, 4), (0.8, 6)):
        with torch.no_grad():
            flow.blocks[0].sqrt_T.fill_(T ** 0.5)
        got, _, _ = _run(flow, x, compiled, False)
        assert flow.blocks[0].last_nfe == 4 * steps
        want, _, _ = _run(flow, x, flow.log_prob, False)
        assert flow.blocks[0].last_nfe == 4 * steps
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


# -- one graph, Inductor, and what stays eager -------------------------------------------------

ONE_GRAPH = [
    # (kind, flow kwargs, grad)
    ("dopri5 training regularised", dict(features=2, adjoint=False, kinetic=True, jacobian_frobenius=True), False),
    ("fixed step image", dict(features=(1, 4, 4), solver="rk4", step_size=0.2, adjoint=False), False),
    ("eval no-grad", dict(features=2, layer="concat", training=False), False),
]


@pytest.mark.parametrize("kind, kwargs, grad", ONE_GRAPH, ids=[c[0] for c in ONE_GRAPH])
def test_one_graph_no_break(kind, kwargs, grad):
    kwargs = dict(kwargs)
    flow = _flow(kwargs.pop("features"), **kwargs)
    _one_graph(flow.log_prob, torch.randn(4, *flow.event_shape, dtype=torch.float64), grad)


def test_inductor_with_eager_random_numbers_matches_eager():
    """The default backend (Inductor) with eager's random numbers (``fallback_random``): a
    training-mode dopri5 solve with both regularisers, without gradients."""
    import torch._inductor.config as inductor_config

    flow = _flow(2, dtype=torch.float32, layer="concat", kinetic=True, jacobian_frobenius=True)
    x = torch.randn(6, 2)
    with inductor_config.patch(fallback_random=True):  # (the config's own patch: restored after)
        _compiled_matches_eager(flow, x, backend="inductor", grad=False,
                                tol=dict(rtol=1e-4, atol=1e-5))


@pytest.mark.parametrize("adjoint", [True, False])
def test_training_outside_the_native_solve_stays_eager(adjoint):
    """Gradients through a solve the native operator does not take: torchdiffeq (odeint_adjoint
    or odeint), eager inside a plain torch.compile (which matches eager, gradients included);
    fullgraph names the reason."""
    flow = _flow(2, layer="concat", adjoint=adjoint)  # training mode
    x = torch.randn(4, 2, dtype=torch.float64)
    torch._dynamo.reset()
    got, got_grads, _ = _run(flow, x, torch.compile(flow.log_prob, backend="aot_eager"), True)
    want, want_grads, _ = _run(flow, x, flow.log_prob, True)
    torch.testing.assert_close(got, want, **F64)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, **F64)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="(?s)disable.*runs on torchdiffeq"):
        torch.compile(flow.log_prob, fullgraph=True, backend="aot_eager")(x)
    torch._dynamo.reset()


# -- training in the graph, where a while_loop's backward is right (fastflow.nn._loops) ---------


IN_GRAPH_TRAINING = [
    # (features, flow kwargs, gradient w.r.t. the input too)
    (2, dict(layer="concatsquash", activation="tanh"), True),
    ((1, 4, 4), dict(layer="concat", activation="softplus", estimator="exact", kinetic=True,
                     jacobian_frobenius=True), False),
    ((1, 4, 4), dict(solver="midpoint", step_size=0.15, layer="concatsquash"), True),
    (2, dict(solver="rk4", step_size=0.15, kinetic=True, jacobian_frobenius=True), False),
    (2, dict(solver="bosh3", layer="concat", kinetic=True, jacobian_frobenius=True), False),
    ((1, 4, 4), dict(solver="adaptive_heun", layer="concat"), False),
]


@pytest.mark.parametrize("features, kwargs, input_grad", IN_GRAPH_TRAINING)
def test_training_in_graph_with_loop_gradients(features, kwargs, input_grad):
    """adjoint=False training compiles into one graph and gives eager's log-density, gradients
    (w.r.t. every parameter, the learned end time included, and the input where it requires
    grad; where it does not, as data in training, the solve's state picks up the parameters'
    gradient only inside the loop), NFE and regularisers: the gradient of the same discrete
    solve (dopri5's first step size and step control included)."""
    flow = _flow(features, adjoint=False, **kwargs)
    x = torch.randn(4, *flow.event_shape, dtype=torch.float64)
    with loop_gradient_settings():
        _one_graph(flow.log_prob, x, grad=True)
        _compiled_matches_eager(flow, x, grad=True, input_grad=input_grad)
    assert flow.blocks[0].sqrt_T.requires_grad


def test_training_in_graph_on_inductor_matches_eager():
    """The same on the default backend (Inductor, eager's random numbers): a fixed-step solve
    whose number of steps follows the learned end time (about 30 s to compile here)."""
    import torch._inductor.config as inductor_config

    flow = _flow(2, solver="rk4", step_size=0.15, adjoint=False)
    x = torch.randn(5, 2, dtype=torch.float64)
    with loop_gradient_settings(), inductor_config.patch(fallback_random=True):
        _compiled_matches_eager(flow, x, grad=True, backend="inductor")


def test_fastflow_compile_trains_image_ffjord_with_the_adjoint_on_inductor():
    """fastflow.compile (the settings for this model's graphs only): FFJORD on images, trained
    with the adjoint, in one Inductor graph; eager's log-density and gradients, the program's
    settings unchanged (about 40 s to compile here)."""
    import fastflow
    import torch._inductor.config as inductor_config

    flow = _flow((1, 4, 4), layer="concat", adjoint=True)
    x = torch.randn(4, 1, 4, 4, dtype=torch.float64)
    torch._dynamo.reset()
    with inductor_config.patch(fallback_random=True):
        got, got_grads, _ = _run(flow, x, fastflow.compile(flow.log_prob, fullgraph=True), True, False)
        assert flow.blocks[0].last_nfe_backward is None  # the graph's adjoint solve: not counted
        want, want_grads, _ = _run(flow, x, flow.log_prob, True, False)
        assert flow.blocks[0].last_nfe_backward > 0
    torch._dynamo.reset()
    torch.testing.assert_close(got, want, **F64)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-10)
    assert torch._functorch.config.donated_buffer


ADJOINT_TRAINING = [
    # (features, flow kwargs, gradient w.r.t. the input too)
    (2, dict(layer="concat"), True),
    (3, dict(layer="concatsquash", estimator="exact", kinetic=True, jacobian_frobenius=True), False),
    ((1, 4, 4), dict(layer="concatsquash"), False),
    (2, dict(solver="rk4", step_size=0.15, layer="concat"), True),
]


@pytest.mark.parametrize("features, kwargs, input_grad", ADJOINT_TRAINING)
def test_adjoint_training_in_graph(features, kwargs, input_grad):
    """adjoint=True training outside the native solve: one graph, and torchdiffeq's adjoint
    gradients (the augmented system solved back in time with its adjoint norm; the dynamics'
    vector-Jacobian products by torch.func in the graph), the learned end time's included."""
    flow = _flow(features, adjoint=True, **kwargs)
    x = torch.randn(4, *flow.event_shape, dtype=torch.float64)
    with loop_gradient_settings():
        _one_graph(flow.log_prob, x, grad=True)
        _compiled_matches_eager(flow, x, grad=True, input_grad=input_grad)


class _UserMLP(torch.nn.Module):
    """A dynamics net of the user's own: not an ODEnet."""

    def __init__(self, d):
        super().__init__()
        self.first = torch.nn.Linear(d + 1, 8)
        self.second = torch.nn.Linear(8, d)

    def forward(self, t, z):
        h = torch.cat([t.expand(z.shape[0], 1), z], 1)
        return self.second(torch.nn.functional.softplus(self.first(h)))


class _UserConv(torch.nn.Module):
    """A user's convolutional dynamics net; ``buffer``: it reads a buffer (a fixed scale);
    ``dropout``: with a dropout layer."""

    def __init__(self, c, buffer=False, dropout=False):
        super().__init__()
        self.first = torch.nn.Conv2d(c, 4, 3, padding=1)
        self.second = torch.nn.Conv2d(4, c, 3, padding=1)
        self.drop = torch.nn.Dropout(0.1) if dropout else torch.nn.Identity()
        self.register_buffer("scale", torch.full((), 0.8 if buffer else 1.0))

    def forward(self, t, z):
        return self.scale * self.second(self.drop(torch.tanh(self.first(z) * (1 + t))))


def _user_cnf(net, features, **kwargs):
    torch.manual_seed(0)
    return CNF(features, net=net, atol=1e-5, rtol=1e-5, **kwargs).double()


@pytest.mark.parametrize("kind", ["mlp exact", "conv hutchinson"])
@pytest.mark.parametrize("method", ["forward", "inverse"])
def test_user_defined_dynamics_without_gradients(kind, method):
    """A net of the user's own (the convolutional one reads a buffer; one with dropout in eval
    mode): solves without gradients run in the graph, the divergence by torch.func (vjp under
    vmap), and equal eager's values and NFE."""
    if kind == "mlp exact":
        cnf = _user_cnf(_UserMLP(2), 2, eval_estimator="exact")
    else:
        cnf = _user_cnf(_UserConv(1, buffer=True, dropout=True), (1, 4, 4), eval_estimator="hutchinson")
    cnf.eval()
    x = torch.randn(4, *cnf.event_shape, dtype=torch.float64)
    _compiled_matches_eager(cnf, x, method=method, grad=False)


@pytest.mark.parametrize("kind", ["mlp exact regularised", "conv hutchinson"])
def test_user_defined_dynamics_adjoint_training(kind):
    """adjoint=True training with a net of the user's own (one reads a buffer), where loops
    may take gradients: one graph (both solves loops without autograd, the products by
    torch.func), and eager's values, gradients (the input's and every parameter's) and number
    of evaluations."""
    if kind == "mlp exact regularised":
        cnf = _user_cnf(_UserMLP(2), 2, adjoint=True, estimator="exact", kinetic=True,
                        jacobian_frobenius=True)
    else:  # (a net with a buffer that its call reads)
        cnf = _user_cnf(_UserConv(1, buffer=True), (1, 4, 4), adjoint=True)
    cnf.train()
    x = torch.randn(3, *cnf.event_shape, dtype=torch.float64)
    with loop_gradient_settings():
        _one_graph(cnf, x, grad=True)
        _compiled_matches_eager(cnf, x, method="forward", grad=True)


@pytest.mark.parametrize("net", ["training", "dropout"])
def test_user_defined_dynamics_that_stay_eager(net):
    """Training with a user's net and adjoint=False (with gradients through loops allowed),
    and a user's net whose call cannot be repeated (dropout in training mode), stay on
    torchdiffeq: fullgraph names the reason."""
    if net == "training":
        cnf = _user_cnf(_UserConv(1), (1, 4, 4), adjoint=False).train()
        ctx = loop_gradient_settings()
    else:
        cnf = _user_cnf(_UserConv(1, dropout=True), (1, 4, 4)).train()
        ctx = torch.no_grad()
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    torch._dynamo.reset()
    with ctx, pytest.raises(Exception, match="(?s)disable.*runs on torchdiffeq"):
        torch.compile(cnf, fullgraph=True, backend="aot_eager")(x)
    torch._dynamo.reset()


def test_bad_input_still_names_the_argument():
    """Compiled, a wrong shape raises while tracing and a non-finite input when the graph runs,
    naming the argument; a solve that fails (non-finite dynamics) raises instead of looping."""
    flow = _flow(2, layer="concat", adjoint=False)
    cnf = flow.blocks[0]
    torch._dynamo.reset()
    with pytest.raises(Exception, match="x must have shape"):
        torch.compile(cnf, fullgraph=True, backend="aot_eager")(torch.randn(4, 3, dtype=torch.float64))
    torch._dynamo.reset()
    compiled = torch.compile(cnf.inverse, fullgraph=True, backend="aot_eager")
    bad = torch.randn(4, 2, dtype=torch.float64)
    bad[1, 0] = float("nan")
    with torch.no_grad():  # (a no-grad solve: quick to compile)
        with pytest.raises(RuntimeError, match="z has non-finite values"):
            compiled(bad)
        cnf.net.layers[0].linear.weight.fill_(float("inf"))
        with pytest.raises(RuntimeError, match="CNF solve .* failed"):
            compiled(torch.randn(4, 2, dtype=torch.float64))
    torch._dynamo.reset()
