"""The CNF solve as traceable PyTorch operations: what :class:`~fastflow.nn.CNF` runs under
``torch.compile`` when the native :func:`~fastflow.ops.cnf_dopri5.cnf_dopri5` operator does not
take the solve.

torchdiffeq's adaptive loop is data-dependent Python control flow, and its dynamics take the
divergence with ``torch.autograd.grad``; Dynamo traces neither. Here

* the solver is a ``torch._higher_order_ops.while_loop`` (one node of the graph): the adaptive
  Runge-Kutta pairs (dopri5, bosh3, adaptive_heun, dopri8, each by its tableau) with
  torchdiffeq's step control replayed operation for operation (first step from the derivatives,
  ``Perturb.PREV`` on the stages at the step's end, the solution from its own weights where the
  last stage is not it, the mixed RMS error norm over the state's parts, the accepted/rejected
  step as ``torch.where``, the fourth-order dense output at the end time), so that a compiled
  solve takes the steps of the eager one; and the fixed-step
  solvers (euler, midpoint, rk4 = torchdiffeq's 3/8-rule ``rk4_alt_step_func``) on torchdiffeq's
  grid (``ceil(1 / h + 1)`` points, the last one moved onto the end time), whose number of steps
  depends on the learned ``T``;
* the divergence is a hand-written vector-Jacobian product through the known dynamics
  (:class:`~fastflow.nn.ODEnet` and :class:`~fastflow.nn.ODEConvNet`, concat and concat-squash
  layers, tanh and softplus): ``eps^T df/dz`` by the transposed layer maps (``W^T`` for a linear
  layer, ``conv_transpose2d`` for a convolution; the time parts drop out, the gate multiplies,
  an activation multiplies by its derivative at the pre-activation), so Hutchinson's estimate
  ``(eps^T J) eps``, the exact trace from the ``D`` basis cotangents and the Jacobian-Frobenius
  regulariser ``|eps^T J|^2`` are the quantities the eager dynamics compute, in plain operations.

Other nets (a user's own, whose call can be repeated: :mod:`fastflow.nn._repeat`) get the
same products from :func:`func_dynamics` (``torch.func.vjp`` under ``vmap``), for solves
without autograd through the loop (no gradient, or the adjoint's two solves). The solve is
differentiable in two ways, as torchdiffeq's: :func:`odeint_graph` by backpropagation through
its steps (``adjoint=False``: the gradient of the same discrete solve, the first step size's
dependence on the input and the parameters included; the step-size update outside autograd,
as in torchdiffeq), and :func:`odeint_adjoint_graph` by the adjoint method (``adjoint=True``:
the augmented system solved back in time, with the dynamics' vector-Jacobian products by
``torch.func.vjp``). The CNF takes gradients through either only where
:func:`fastflow.nn._loops.loop_gradients_in_graph` says Inductor gets a ``while_loop``'s
backward right.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.nn import functional as F

from fastflow.ops.mlp_trace import MLP_ACTIVATIONS, _act_deriv

__all__ = ["ADAPTIVE_GRAPH_SOLVERS", "GRAPH_SOLVERS", "MAX_STEPS", "func_dynamics", "graph_dynamics",
           "has_tableau", "load_tableau", "odeint_adjoint_graph", "odeint_graph"]

#: The adaptive solvers the in-graph solve replays (torchdiffeq's Runge-Kutta pairs with step
#: control); dopri5's tableau is written here, the others' are torchdiffeq's own
#: (:func:`load_tableau`).
ADAPTIVE_GRAPH_SOLVERS = ("dopri5", "bosh3", "adaptive_heun", "dopri8")
#: The solvers the in-graph solve replays.
GRAPH_SOLVERS = ADAPTIVE_GRAPH_SOLVERS + ("rk4", "euler", "midpoint")
#: Adaptive steps (accepted and rejected) after which the in-graph adaptive loop stops and the
#: solve's output is NaN (torchdiffeq has no limit; a solve that needs this many has failed).
MAX_STEPS = 100_000


class _Tableau(NamedTuple):
    """An embedded Runge-Kutta pair as torchdiffeq runs it (Python floats)."""

    alpha: list[float]  # the stages' times, as fractions of the step
    beta: list[list[float]]  # the stages' weights of the previous stages
    c_sol: list[float] | None  # the solution's weights; None: the last stage is the solution
    c_error: list[float]  # the error estimate's weights
    mid: list[float]  # the weights of the midpoint value of the dense output
    order: int


# Dormand-Prince (torchdiffeq's _DORMAND_PRINCE_SHAMPINE_TABLEAU and DPS_C_MID)
_DOPRI5 = _Tableau(
    alpha=[1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0],
    beta=[
        [1 / 5],
        [3 / 40, 9 / 40],
        [44 / 45, -56 / 15, 32 / 9],
        [19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729],
        [9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656],
        [35 / 384, 0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84],
    ],
    c_sol=None,
    c_error=[
        35 / 384 - 1951 / 21600,
        0,
        500 / 1113 - 22642 / 50085,
        125 / 192 - 451 / 720,
        -2187 / 6784 - -12231 / 42400,
        11 / 84 - 649 / 6300,
        -1.0 / 60.0,
    ],
    mid=[
        6025192743 / 30085553152 / 2, 0, 51252292925 / 65400821598 / 2,
        -2691868925 / 45128329728 / 2, 187940372067 / 1594534317056 / 2,
        -1776094331 / 19743644256 / 2, 11237099 / 235043384 / 2,
    ],
    order=5,
)
_SAFETY, _IFACTOR, _DFACTOR = 0.9, 10.0, 0.2
_TABLEAUS: dict[str, _Tableau] = {"dopri5": _DOPRI5}


def has_tableau(method: str) -> bool:
    """Whether the in-graph solve has ``method``'s tableau (:func:`load_tableau`)."""
    return method in _TABLEAUS


def load_tableau(method: str) -> bool:
    """Make ``method``'s tableau available to the in-graph solve, from torchdiffeq's solver
    class (the same numbers as the eager solve). Call it outside a compiled region (the CNF does
    in its constructor). ``False`` where torchdiffeq is not installed."""
    if method in _TABLEAUS:
        return True
    if method not in ADAPTIVE_GRAPH_SOLVERS:
        raise ValueError(f"method must be one of {ADAPTIVE_GRAPH_SOLVERS}, got {method!r}")
    try:
        from torchdiffeq._impl.odeint import SOLVERS as solvers
    except ImportError:
        return False
    cls = solvers[method]
    tab = cls.tableau
    c_sol = tab.c_sol.tolist()
    beta = [b.tolist() for b in tab.beta]
    fsal = c_sol[-1] == 0 and c_sol[:-1] == beta[-1]  # (torchdiffeq's own test)
    _TABLEAUS[method] = _Tableau(
        alpha=tab.alpha.tolist(), beta=beta, c_sol=None if fsal else c_sol,
        c_error=tab.c_error.tolist(), mid=cls.mid.tolist(), order=int(cls.order),
    )
    return True


# -- the dynamics -------------------------------------------------------------------------------


def graph_dynamics(net: Any, event_shape: Sequence[int]) -> Callable[..., tuple[Tensor, Tensor | None]]:
    """For an :class:`~fastflow.nn.ODEnet` (``event_shape = (D,)``) or an
    :class:`~fastflow.nn.ODEConvNet` (``event_shape = (C, H, W)``), the function
    ``(t, z, cotangents, params=None) -> (f, vjps)``: ``f = net(t, z)`` on the flat state
    ``z [B, D]`` and ``vjps[p] = cotangents[p]^T df/dz`` (``cotangents`` and ``vjps`` of shape
    ``[P, B, D]``), by hand through the layers (module docstring), in the operations of the
    layers' own forward. ``params`` maps some of ``net``'s parameter names
    (``net.named_parameters()``) to tensors used in their place (a functional call: the
    adjoint differentiates the dynamics w.r.t. them)."""
    shape = tuple(int(d) for d in event_shape)
    if len(shape) not in (1, 3) or not hasattr(net, "layers") or getattr(net, "layer", None) not in (
        "concatsquash", "concat"
    ):
        raise ValueError(
            f"net must be an ODEnet on (D,) or an ODEConvNet on (C, H, W), got {type(net).__name__} "
            f"on {shape}"
        )
    conv = len(shape) == 3
    layers = list(net.layers)
    squash = net.layer == "concatsquash"
    code = MLP_ACTIVATIONS[net.activation]  # the activation's value and derivative at once

    def run(t: Tensor, z: Tensor, cotangents: Tensor | None,
            params: dict[str, Tensor] | None = None) -> tuple[Tensor, Tensor | None]:
        given = params or {}

        def weights(k: int, name: str) -> tuple[Tensor, Tensor | None]:
            module = getattr(layers[k], name)
            prefix = f"layers.{k}.{name}."
            w = given.get(prefix + "weight", module.weight)
            b = None if module.bias is None else given.get(prefix + "bias", module.bias)
            return w, b

        def linear(k: int, name: str, x: Tensor) -> Tensor:
            return F.linear(x, *weights(k, name))

        batch = z.shape[0]
        h = z.reshape(batch, *shape) if conv else z
        tt = t.reshape(1, 1)
        saved = []  # per layer: (the gate or None, the activation's derivative or None, weight)
        last = len(layers) - 1
        for k, layer in enumerate(layers):
            if conv:
                w, b = weights(k, "conv")
                if squash:
                    gate = torch.sigmoid(linear(k, "hyper_gate", tt)).view(1, -1, 1, 1)
                    out = F.conv2d(h, w, b, padding=layer.padding) * gate \
                        + linear(k, "hyper_bias", tt).view(1, -1, 1, 1)
                else:
                    gate = None
                    tc = tt.reshape(1, 1, 1, 1).expand(batch, 1, h.shape[2], h.shape[3])
                    out = F.conv2d(torch.cat([tc, h], dim=1), w, b, padding=layer.padding)
            else:
                w, b = weights(k, "linear")
                if squash:
                    gate = torch.sigmoid(linear(k, "hyper_gate", tt))
                    out = F.linear(h, w, b) * gate + linear(k, "hyper_bias", tt)
                else:
                    gate = None
                    out = F.linear(torch.cat([tt.expand(batch, 1), h], dim=1), w, b)
            if k < last:
                h, d = _act_deriv(code, out, None)
                saved.append((gate, d, w))
            else:
                saved.append((gate, None, w))
                h = out
        f = h.reshape(batch, -1)
        if cotangents is None:
            return f, None
        n_probes = cotangents.shape[0]
        v = cotangents.reshape(n_probes * batch, *shape) if conv else cotangents
        for k in range(last, -1, -1):
            layer = layers[k]
            gate, d, w = saved[k]
            if d is not None:  # through the activation after this layer
                if conv:
                    v = (v.reshape(n_probes, *d.shape) * d).reshape(n_probes * batch, *d.shape[1:])
                else:
                    v = v * d
            if gate is not None:
                v = v * gate
            if conv:
                v = F.conv_transpose2d(v, w if squash else w[:, 1:], padding=layer.padding)
            else:
                v = v @ (w if squash else w[:, 1:])
        return f, v.reshape(n_probes, batch, -1)

    return run


# -- the solvers --------------------------------------------------------------------------------


def func_dynamics(net: Any, event_shape: Sequence[int]) -> Callable[..., tuple[Tensor, Tensor | None]]:
    """:func:`graph_dynamics` for any dynamics net ``net(t, z) -> dz/dt`` on ``z`` of shape
    ``[B, *event_shape]``: the vector-Jacobian products by ``torch.func.vjp`` (traced into the
    graph; ``torch.autograd.grad`` is not), one per cotangent under ``torch.func.vmap``, and
    ``params`` by ``torch.func.functional_call``. For nets whose call can be repeated
    (:func:`~fastflow.nn._repeat.unrepeatable_submodule`: no state may change inside the
    transform); buffers are read as they are."""
    shape = tuple(int(d) for d in event_shape)

    def run(t: Tensor, z: Tensor, cotangents: Tensor | None,
            params: dict[str, Tensor] | None = None) -> tuple[Tensor, Tensor | None]:
        batch = z.shape[0]

        def f_of(flat: Tensor) -> Tensor:
            h = flat.reshape(batch, *shape)
            out = net(t, h) if params is None else torch.func.functional_call(net, params, (t, h))
            return out.reshape(batch, -1)

        if cotangents is None:
            return f_of(z), None
        f, vjp_fn = torch.func.vjp(f_of, z)
        vjps = torch.func.vmap(lambda c: vjp_fn(c)[0])(cotangents)
        return f, vjps

    return run


def _flat_to_shape(y: Tensor, shapes: list[torch.Size]) -> tuple[Tensor, ...]:
    out, total = [], 0
    for shape in shapes:
        n = shape.numel()
        out.append(y[total:total + n].view(shape))
        total += n
    return tuple(out)


def _mixed_rms(y: Tensor, shapes: list[torch.Size]) -> Tensor:
    """torchdiffeq's default norm of a tuple state: the largest RMS over the parts. (A part whose
    RMS is 0, such as the log-det's zero start, must not put sqrt's infinite derivative at 0
    into the gradient: NaN.)"""
    rms = []
    for p in _flat_to_shape(y, shapes):
        ms = p.abs().pow(2).mean()
        positive = ms > 0
        rms.append(torch.where(positive, torch.where(positive, ms, torch.ones_like(ms)).sqrt(),
                               torch.zeros_like(ms)))
    return torch.stack(rms).max()


def odeint_graph(
    func: Callable[[Tensor, tuple[Tensor, ...]], tuple[Tensor, ...]],
    y0: tuple[Tensor, ...],
    reverse: bool,
    method: str,
    rtol: float,
    atol: float,
    step_size: Tensor | None = None,
    params: Sequence[Tensor] = (),
) -> tuple[tuple[Tensor, ...], Tensor]:
    """``torchdiffeq.odeint(func, y0, t, rtol, atol, method)`` at the end time, with ``t = [0, 1]``
    (``reverse``: ``[1, 0]``) in ``y0``'s dtype, as traceable operations (module docstring).

    Arguments:
        func: ``func(s, state) -> derivatives`` (tuples of tensors of ``y0``'s shapes), ``s`` a
            0-d tensor of ``y0``'s dtype.
        y0: the initial state, a tuple of tensors of one floating dtype.
        reverse: integrate from 1 to 0.
        method: one of :data:`GRAPH_SOLVERS`.
        rtol, atol: tolerances of dopri5.
        step_size: of the fixed-step solvers, in ``s`` (a 0-d float64 tensor, or a number).
        params: every tensor ``func`` closes over that may require grad (the parameters, the
            end time; as torchdiffeq's ``adjoint_params``). The loop's carried state is tied to
            them by a zero, so that it requires grad from the first iteration on:
            ``while_loop``'s autograd drops the gradient of a carry that gains (or loses)
            ``requires_grad`` in the body, e.g. a state that starts as data and picks up the
            parameters' gradients in the first step.

    Returns ``(state at the end, nfe)``: ``nfe`` (0-d int64) the evaluations of ``func``.
    """
    if method not in GRAPH_SOLVERS:
        raise ValueError(f"method must be one of {GRAPH_SOLVERS}, got {method!r}")
    if not isinstance(y0, tuple) or not y0 or not all(isinstance(p, Tensor) for p in y0):
        raise ValueError("y0 must be a non-empty tuple of tensors")
    shapes = [p.shape for p in y0]
    y = torch.cat([p.reshape(-1) for p in y0])
    for p in params:  # (a zero: see params)
        if isinstance(p, Tensor) and p.requires_grad and p.numel() > 0:
            y = y + 0 * p.reshape(-1)[0].to(y.dtype)
    dtype = y.dtype
    t = torch.tensor([1.0, 0.0] if reverse else [0.0, 1.0], dtype=dtype, device=y.device)
    if reverse:
        t = -t

    def flat_func(s: Tensor, state: Tensor, prev: bool = False) -> Tensor:
        # torchdiffeq's _PerturbFunc(_ReverseFunc(_TupleFunc(func))): the time in the state's
        # dtype, one float below for the stages at a step's end
        s = s.to(dtype)
        if prev:
            s = s + (torch.nextafter(s, s - 1) - s).detach()
        if reverse:
            f = func(-s, _flat_to_shape(state, shapes))
            return -1.0 * torch.cat([p.reshape(-1) for p in f])
        f = func(s, _flat_to_shape(state, shapes))
        return torch.cat([p.reshape(-1) for p in f])

    if method in ADAPTIVE_GRAPH_SOLVERS:
        if method not in _TABLEAUS:
            raise ValueError(f"the tableau of {method!r} is not loaded: call load_tableau first")
        y_end, nfe = _rk_adaptive(flat_func, y, t, shapes, rtol, atol, _TABLEAUS[method])
    else:
        if step_size is None:
            raise ValueError(f"step_size must be given for the fixed-step solver {method!r}")
        y_end, nfe = _fixed_grid(flat_func, y, t, method, step_size)
    return _flat_to_shape(y_end, shapes), nfe


class _AdjointSolve(torch.autograd.Function):
    """torchdiffeq's ``odeint_adjoint`` at the end time, as traceable operations: the solve
    without autograd in the forward, and in the backward the augmented system
    ``(0, y, -a^T df/dy, -a^T df/dtheta)`` solved back to the start time by the same solver, with
    torchdiffeq's adjoint norm (the largest RMS over the time part, the state's parts, their
    adjoints' parts and each parameter's adjoint). The vector-Jacobian products of the dynamics
    are ``torch.func.vjp`` of ``func`` (plain operations), which a graph traces."""

    @staticmethod
    def forward(func: Callable[..., tuple[Tensor, ...]], options: tuple, n_state: int,
                *tensors: Tensor) -> tuple[Tensor, ...]:
        y0, params = tensors[:n_state], tensors[n_state:]
        reverse, method, rtol, atol, step_size = options
        final, nfe = odeint_graph(lambda s, y: func(s, y, None), y0, reverse, method, rtol, atol,
                                  step_size)
        return (*final, nfe)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        func, options, n_state = inputs[:3]
        ctx.func, ctx.options, ctx.n_state = func, options, n_state
        ctx.save_for_backward(*output[:-1], *inputs[3 + n_state:])
        ctx.mark_non_differentiable(output[-1])

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        func, n = ctx.func, ctx.n_state
        reverse, method, rtol, atol, step_size = ctx.options
        saved = ctx.saved_tensors
        final, params = saved[:n], tuple(saved[n:])
        adj = tuple(torch.zeros_like(y) if g is None else g for y, g in zip(final, grads[:n]))

        def augmented(s: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
            y, a = state[1:1 + n], state[1 + n:1 + 2 * n]
            f, vjp = torch.func.vjp(lambda ys, ps: func(s, ys, ps), y, params)
            vjp_y, vjp_params = vjp(tuple(-ai for ai in a))
            return (torch.zeros_like(state[0]), *f, *vjp_y, *vjp_params)

        start = (final[0].new_zeros(()), *final, *adj, *[torch.zeros_like(p) for p in params])
        out, _ = odeint_graph(augmented, start, not reverse, method, rtol, atol, step_size)
        return (None, None, None, *out[1 + n:1 + 2 * n], *out[1 + 2 * n:])


def odeint_adjoint_graph(
    func: Callable[[Tensor, tuple[Tensor, ...], tuple[Tensor, ...]], tuple[Tensor, ...]],
    y0: tuple[Tensor, ...],
    params: Sequence[Tensor],
    reverse: bool,
    method: str,
    rtol: float,
    atol: float,
    step_size: Tensor | None = None,
) -> tuple[tuple[Tensor, ...], Tensor]:
    """:func:`odeint_graph` with torchdiffeq's adjoint gradient (``odeint_adjoint`` with
    ``adjoint_params = params``; the adjoint solve with the forward's solver and tolerances):
    ``func(s, state, params)`` takes the parameters as arguments, so that the backward
    differentiates the dynamics w.r.t. them, and ``func(s, state, None)`` is the same dynamics
    on the modules' own tensors (the forward solve: a ``torch.func.functional_call`` there,
    inside the autograd function's loop, does not trace). Only ``params`` that require grad
    are given to it (torchdiffeq drops the others from the adjoint). Returns ``(state at the
    end, nfe)``, ``nfe`` the forward solve's."""
    out = _AdjointSolve.apply(func, (reverse, method, rtol, atol, step_size), len(y0), *y0, *params)
    return tuple(out[:-1]), out[-1]


def _fixed_grid(func: Callable[..., Tensor], y: Tensor, t: Tensor, method: str,
                step_size: Tensor | float) -> tuple[Tensor, Tensor]:
    """torchdiffeq's FixedGridODESolver from ``t[0]`` to ``t[1]``."""
    from torch._higher_order_ops import while_loop

    dtype = y.dtype
    start, end = t[0].clone(), t[1].clone()  # (views of one tensor would alias in the loop)
    step = torch.as_tensor(step_size, dtype=torch.float64, device=y.device).to(dtype)
    n_steps = (torch.ceil((end - start) / step + 1) - 1).to(torch.int64)  # grid points - 1
    evals = {"euler": 1, "midpoint": 2, "rk4": 4}[method]

    def cond(i: Tensor, y: Tensor) -> Tensor:
        return i < n_steps

    def body(i: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        t0 = i.to(dtype) * step + start
        t1 = torch.where(i + 1 == n_steps, end, (i + 1).to(dtype) * step + start)
        dt = t1 - t0
        f0 = func(t0, y)
        if method == "euler":
            dy = dt * f0
        elif method == "midpoint":
            half_dt = 0.5 * dt
            y_mid = y + f0 * half_dt
            dy = dt * func(t0 + half_dt, y_mid)
        else:  # torchdiffeq's rk4_alt_step_func (the 3/8 rule)
            k1 = f0
            k2 = func(t0 + dt * (1 / 3), y + dt * k1 * (1 / 3))
            k3 = func(t0 + dt * (2 / 3), y + dt * (k2 - k1 * (1 / 3)))
            k4 = func(t1, y + dt * (k1 - k2 + k3))
            dy = (k1 + 3 * (k2 + k3) + k4) * dt * 0.125
        return i + 1, y + dy

    i0 = torch.zeros((), dtype=torch.int64, device=y.device)
    _, y_end = while_loop(cond, body, (i0, y.clone()))
    return y_end, n_steps * evals


def _rk_adaptive(func: Callable[..., Tensor], y0: Tensor, t: Tensor, shapes: list[torch.Size],
                 rtol: float, atol: float, tableau: _Tableau) -> tuple[Tensor, Tensor]:
    """torchdiffeq's RKAdaptiveStepsizeODESolver (dopri5, bosh3, adaptive_heun, dopri8: their
    ``tableau``) from ``t[0]`` to ``t[1]``."""
    from torch._higher_order_ops import while_loop

    dtype, device = y0.dtype, y0.device
    t_dtype = torch.promote_types(torch.float64, dtype)
    rtol_t = torch.tensor(rtol, dtype=t_dtype, device=device)
    atol_t = torch.tensor(atol, dtype=t_dtype, device=device)
    t = t.to(t_dtype)
    t0, t_end = t[0].clone(), t[1].clone()
    order = tableau.order
    n_stages = len(tableau.alpha)
    alpha = torch.tensor(tableau.alpha, dtype=dtype, device=device)
    beta = [torch.tensor(b, dtype=dtype, device=device) for b in tableau.beta]
    c_error = torch.tensor(tableau.c_error, dtype=dtype, device=device)
    c_mid = torch.tensor(tableau.mid, dtype=dtype, device=device)
    c_sol = None if tableau.c_sol is None else torch.tensor(tableau.c_sol, dtype=dtype, device=device)

    def norm(v: Tensor) -> Tensor:
        return _mixed_rms(v, shapes)

    # _select_initial_step (with the solver's order - 1), differentiable as in torchdiffeq
    f0 = func(t0, y0)
    scale = atol_t + torch.abs(y0) * rtol_t
    d0 = norm(y0 / scale).abs()
    d1 = norm(f0 / scale).abs()
    small = (d0 < 1e-5) | (d1 < 1e-5)
    h0 = torch.where(small, torch.tensor(1e-6, dtype=dtype, device=device),
                     0.01 * d0 / torch.where(small, torch.ones_like(d1), d1))
    h0 = h0.abs()
    y1 = y0 + h0 * f0
    f1 = func(t0 + h0, y1)
    d2 = torch.abs(norm((f1 - f0) / scale) / h0)
    tiny = (d1 <= 1e-15) & (d2 <= 1e-15)
    dmax = torch.maximum(d1, d2)
    h1 = torch.where(
        tiny,
        torch.maximum(torch.tensor(1e-6, dtype=dtype, device=device), h0 * 1e-3),
        (0.01 / torch.where(tiny, torch.ones_like(dmax), dmax)) ** (1.0 / float(order - 1 + 1)),
    )
    h1 = h1.abs()
    dt0 = torch.min(100 * h0, h1).to(t_dtype)

    zero_t = torch.zeros((), dtype=t_dtype, device=device)
    inf_t = torch.tensor(float("inf"), dtype=t_dtype, device=device)

    def cond(t_prev, t_cur, dt, y, f, c0, c1, c2, c3, c4, steps):
        return (t_end > t_cur) & (steps < MAX_STEPS) & (t_cur + torch.where(torch.isfinite(dt), dt, zero_t) > t_cur) \
            & torch.isfinite(y).all()

    def body(t_prev, t_cur, dt, y, f, c0, c1, c2, c3, c4, steps):
        # _adaptive_step
        dt = torch.where(torch.isfinite(dt), dt, zero_t).clamp(zero_t, inf_t)
        t_next = t_cur + dt
        # _runge_kutta_step: the stage times in the state's dtype
        s0, sdt, s1 = t_cur.to(dtype), dt.to(dtype), t_next.to(dtype)
        ks = [f]
        yi = y
        for i in range(n_stages):
            if tableau.alpha[i] == 1.0:
                ti, prev = s1, True
            else:
                ti, prev = s0 + alpha[i] * sdt, False
            k = torch.stack(ks, dim=-1)
            yi = y + torch.sum(k * (beta[i] * sdt), dim=-1).view_as(f)
            ks.append(func(ti, yi, prev))
        k = torch.stack(ks, dim=-1)
        if c_sol is not None:  # not first-same-as-last: the solution from its own weights
            yi = y + torch.sum(k * (sdt * c_sol), dim=-1).view_as(f)
        y_new = yi
        f_new = ks[-1]
        y_err = torch.sum(k * (sdt * c_error), dim=-1)
        error_tol = atol_t + rtol_t * torch.max(y.abs(), y_new.abs())
        ratio = norm(y_err / error_tol).abs()
        accept = (ratio <= 1) | (dt <= 0)
        # _interp_fit
        dty = dt.type_as(y)
        y_mid = y + torch.sum(k * (dty * c_mid), dim=-1).view_as(y)
        k0, k6 = k[..., 0], k[..., -1]
        new_c = [
            y,
            dty * k0,
            dty * (k6 - 4 * k0) - 11 * y - 5 * y_new + 16 * y_mid,
            dty * (5 * k0 - 3 * k6) + 18 * y + 14 * y_new - 32 * y_mid,
            2 * dty * (k6 - k0) - 8 * (y_new + y) + 16 * y_mid,
        ]
        old_c = [c0, c1, c2, c3, c4]
        coeffs = [torch.where(accept, n, o) for n, o in zip(new_c, old_c)]
        # _optimal_step_size, outside autograd
        last = dt.detach()
        r = ratio.detach()
        r64 = r.type_as(last)
        dfactor = torch.where(r < 1, torch.ones((), dtype=t_dtype, device=device),
                              torch.tensor(_DFACTOR, dtype=t_dtype, device=device))
        exponent = torch.tensor(order, dtype=t_dtype, device=device).reciprocal()
        factor = torch.min(torch.tensor(_IFACTOR, dtype=t_dtype, device=device),
                           torch.max(_SAFETY / r64 ** exponent, dfactor))
        dt_next = torch.where(r == 0, last * _IFACTOR, last * factor).clamp(zero_t, inf_t)
        return (
            t_cur.clone(),
            torch.where(accept, t_next, t_cur),
            dt_next + 0 * dt,
            torch.where(accept, y_new, y),
            torch.where(accept, f_new, f),
            *coeffs,
            steps + 1,
        )

    steps0 = torch.zeros((), dtype=torch.int64, device=device)
    # (the loop's inputs must not alias one another)
    # Every carry keeps its requires_grad across iterations: while_loop's autograd loses the
    # gradient of a carry that gains it in the body (the time, through the first step) or drops
    # it (the step size, updated outside autograd); `0 * dt` links them (its gradient is zero).
    t_start = t0 + 0 * dt0
    carry = (t_start.clone(), t_start.clone(), dt0, y0.clone(), f0, *[y0.clone() for _ in range(5)], steps0)
    t_prev, t_cur, _, y, _, c0, c1, c2, c3, c4, steps = while_loop(cond, body, carry)
    # _interp_evaluate at the end time; NaN where the loop stopped short of it
    x = ((t_end - t_prev) / (t_cur - t_prev)).to(dtype)
    total = c0 + x * c1
    x_power = x
    for c in (c2, c3, c4):
        x_power = x_power * x
        total = total + x_power * c
    done = t_cur >= t_end
    # (where torchdiffeq asserts: the step size underflowed or the state is not finite)
    torch._assert_async(
        done, "CNF solve (adaptive, in the compiled graph) failed: the state is not finite, the step "
        "size underflowed, or it took more than MAX_STEPS steps"
    )
    total = torch.where(done, total, torch.full_like(total, float("nan")))
    return total, 2 + n_stages * steps
