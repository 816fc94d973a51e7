"""Invertible backpropagation: train deep flows with activation memory independent of depth.

Standard backpropagation keeps every layer's activations (the inputs autograd saves, the
conditioner networks' hidden layers) from the forward pass until the backward pass reaches that
layer, so the memory of a training step grows linearly with the depth of the flow. A flow made
of exactly invertible layers does not need them: the input of each layer can be computed again
from its output by running the layer's inverse. :class:`InvertibleBackprop` wraps a model and
does that, as one custom autograd function over the whole chain of layers:

* forward: every layer runs without a graph; only the chain's final output is kept (it is an
  output anyway, of the input's size);
* backward, from the last layer to the first: the layer's input is reconstructed by its inverse,
  the layer is run again locally with a graph, and that small graph is differentiated to give
  the gradients of the layer's parameters and of its input; the graph is freed before the
  next layer.

The gradients (of the parameters, of the input and of a context) are those of standard
backpropagation up to the reconstruction error. The peak memory is that of one layer's graph
plus a few input-sized tensors, whatever the depth (bench/RESULTS.md has the measured figures).

Which layers take part (checked when the wrapper is built; the error names the layer):

* exactly invertible, reconstructed by their inverse: :class:`~fastflow.nn.AffineCoupling`,
  :class:`~fastflow.nn.AdditiveCoupling`, :class:`~fastflow.nn.ActNorm`,
  :class:`~fastflow.nn.InvertibleConv1x1` (and :class:`~fastflow.nn.LULinear`),
  :class:`~fastflow.nn.OrthogonalLinear`, :class:`~fastflow.nn.QRLinear`,
  :class:`~fastflow.nn.Permutation`, :class:`~fastflow.nn.Squeeze`; the containers
  :class:`~fastflow.Compose` (so :class:`~fastflow.nn.GlowStep`) and :class:`~fastflow.Flow` are
  flattened, and :class:`~fastflow.nn.MultiScale` (Glow, multi-scale Real NVP) becomes its
  squeezes, steps and splits (below). A layer of another class takes part when it declares
  ``exactly_invertible = True`` (class or instance attribute).
* not exactly invertible (the inverse is a numerical solve to a tolerance, an ODE solve, a
  sequential pass per feature, or uses batch statistics): :class:`~fastflow.nn.iResBlock`,
  :class:`~fastflow.nn.CNF`, :class:`~fastflow.nn.Planar`, :class:`~fastflow.nn.Radial`,
  :class:`~fastflow.nn.Sylvester`, :class:`~fastflow.nn.MaskedAutoregressive`,
  :class:`~fastflow.nn.InverseAutoregressive`, :class:`~fastflow.nn.BatchNormFlow`, and any layer
  declaring ``exactly_invertible = False``. With ``fallback="checkpoint"`` (default) they fall
  back to ordinary checkpointing: their input is stored in the forward pass (one activation per
  such layer) and they are recomputed from it in backward, like ``torch.utils.checkpoint``.
  With ``fallback="error"`` they are refused (``ValueError``).
* refused: an ``nn.Module`` that is not a :class:`~fastflow.Transform` (``TypeError``) and a
  Transform of a class not listed that declares nothing (``ValueError``: declare
  ``exactly_invertible``).

Split priors (Glow): at each split the factored-out half ``z2`` leaves the chain and the learned
prior ``log p(z2 | z1)`` enters the log-density. The chain computes those prior terms itself: in
the forward pass without a graph; in backward, when the chain has reconstructed ``z1`` (the input
of the next level) and holds ``z2`` (a part of the saved output), it runs the prior again with a
graph and adds its gradients to those of ``z1``, ``z2`` and the prior's parameters.

Numerical care. A reconstruction is exact in exact arithmetic only: every inverse adds rounding
error, and the error of one layer is carried (and amplified) by the inverses of the layers
before it, so it grows with depth. ``check=True`` also keeps the true input of every layer
(standard memory: a diagnostic) and records, after each backward, the largest absolute
difference between the reconstructed and the true input of each layer
(:attr:`InvertibleBackprop.reconstruction_errors`), or raises when it exceeds ``check_tol``.
``checkpoint_every=k`` stores the true input of every ``k``-th layer and reconstructs from there
(the error then accumulates over at most ``k`` layers), ``checkpoint_every="level"`` stores the
input of each level of a multi-scale model (memory: less than twice the input, whatever the
depth). In float64 the gradients match standard backpropagation's to about 1e-13. In float32
(bench/RESULTS.md, a 3-level Glow of hidden width 128) the largest reconstruction error grows
from 2.5e-6 over 36 layers to 8.9e-6 over 288 at initialisation, and faster once the couplings
are far from the identity (up to 2e-3 over 288 layers); the gradients are more sensitive still,
because a ReLU conditioner's gradient jumps where a unit's pre-activation crosses zero, which a
reconstructed input can do where the true one did not. A reconstruction that is not finite
(a coupling scale that underflows the dtype) raises ``RuntimeError`` rather than giving NaN
gradients.

State. ActNorm's data-dependent initialisation must have happened before (a forward of the
model itself in training mode, :func:`fastflow.nn.initialize_actnorm`, or
:meth:`InvertibleBackprop.initialize`): the wrapper raises ``RuntimeError`` naming the layer
otherwise. Buffers that a layer changes in its forward pass (running statistics, power-iteration
vectors) are set back to their values of the forward pass around the reconstruction and the
recomputation, so they are updated once per step, as in standard training; the random-number
state of a layer that draws random numbers in forward (dropout, stochastic estimators) is
replayed, so the recomputation draws the same numbers (``preserve_rng_state``, as in
``torch.utils.checkpoint``). Double backward (``create_graph=True``) is not supported.

``torch.compile``. Inside a compiled graph, ``forward`` and ``log_prob`` run the chain as a
second autograd function that Dynamo traces into one graph (``fullgraph=True`` works), forward
and backward. Its backward reconstructs each layer's input with the inverse, as above. It then
takes the layer's gradients by :func:`torch.func.vjp` of its recomputation, on fastflow's
reference operators. The compiled forward keeps batch-sized tensors for the backward whatever
the depth: the memory saving holds in the graph (tests/test_compile_export.py counts them).
That path saves no random-number state and reads nothing on the host, so it applies when:

* every checkpointed layer is one of: planar, radial, Sylvester, MADE, IAF, batch norm
  (training mode too: the recomputation updates copies of its running averages), and
  residual blocks on MLP or convolutional branches (``residual_mlp``, ``residual_cnn``) with
  any estimator. The recomputation uses the spectral norms' ``u``, ``v`` as the forward left
  them. The random numbers of the roulette and the series (the geometric ``N``, the probes)
  are drawn before the block's forward and kept for its recomputation, so both calls use the
  same numbers. The recomputation runs on the reference operators, so the Neumann gradient
  per draw is the reference's form of the estimator; the native operator's per-draw form
  differs and has the same expectation (:mod:`fastflow.ops.mlp_trace`). For the Neumann
  gradients the forward also keeps the surrogate's left vectors (``[n_probes, *x.shape]``
  per block, computed beside the value), so the recomputation takes one product instead of
  the series; the backpropagated roulette's recomputation runs every capped product
  (``torch.func`` does not run a ``while_loop`` here). Not CNFs, whose solvers draw random
  numbers inside; not residual blocks on a branch of another kind, nor convolutional ones
  under autocast (their products are ``torch.func`` calls, which Dynamo fails to trace inside
  this function: a torch bug, :func:`_graph_chain_blocker`);
* no layer holds a submodule whose call cannot be repeated
  (:func:`~fastflow.nn._repeat.unrepeatable_submodule`);
* ``check`` is not set (it reads the errors on the host). ``checkpoint_every`` applies, except
  that the last layer's input is reconstructed rather than kept.

Otherwise the eager function runs inside the compiled model (excluded from compilation, a
graph break whose message names the reason). A plain ``torch.compile`` matches eager;
``fullgraph=True`` raises an error that names the reason.
Inside the graph the parameters' gradients are returned to autograd, not added to ``.grad``
one layer at a time.

References:
    Gomez, Ren, Urtasun, Grosse. "The Reversible Residual Network: Backpropagation Without
    Storing Activations" (2017), https://arxiv.org/abs/1707.04585.
    Jacobsen, Smeulders, Oyallon. "i-RevNet: Deep Invertible Networks" (2018),
    https://arxiv.org/abs/1802.07088.
    Kingma, Dhariwal. "Glow: Generative Flow with Invertible 1x1 Convolutions" (2018),
    https://arxiv.org/abs/1807.03039 (openai/glow trains with this "memory-efficient gradients").
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn.utils.stateless import _reparametrize_module

from fastflow.distributions import _wide
from fastflow.flow import Compose, Flow, Transform

__all__ = ["InvertibleBackprop"]

_FALLBACKS = ("checkpoint", "error")


def _exact_types() -> tuple[type, ...]:
    from fastflow.nn.actnorm import ActNorm
    from fastflow.nn.autoregressive import Permutation
    from fastflow.nn.coupling import _Coupling
    from fastflow.nn.invconv import InvertibleConv1x1
    from fastflow.nn.linear import OrthogonalLinear, QRLinear
    from fastflow.nn.multiscale import Squeeze
    from fastflow.nn.residual import _Unsqueeze

    return (_Coupling, ActNorm, InvertibleConv1x1, OrthogonalLinear, QRLinear, Permutation,
            Squeeze, _Unsqueeze)


def _inexact_types() -> tuple[type, ...]:
    from fastflow.nn.autoregressive import BatchNormFlow, MaskedAutoregressive
    from fastflow.nn.continuous import CNF
    from fastflow.nn.det_identity import Planar, Radial, Sylvester
    from fastflow.nn.residual import iResBlock

    return (iResBlock, CNF, Planar, Radial, Sylvester, MaskedAutoregressive, BatchNormFlow)


# --------------------------------------------------------------------------------------------
# The chain: a flat list of operations


@dataclasses.dataclass
class _Op:
    kind: str  # "inverse" (reconstructed), "checkpoint" (input stored), "unshuffle", "split", "merge"
    name: str
    module: nn.Module | None = None
    keep: int = 0  # split: channels kept (z1)
    prior: nn.Module | None = None  # split: the SplitPrior
    multiscale: nn.Module | None = None  # merge: the MultiScale whose latent layout is built
    level_start: bool = False  # the first layer of a level (checkpoint_every="level")


def _flatten(module: Any, name: str, ops: list[_Op], fallback: str) -> None:
    from fastflow.nn.glow import MultiScale

    label = name or "model"
    if isinstance(module, Flow):
        _flatten(module.transform, f"{name}.transform" if name else "transform", ops, fallback)
    elif isinstance(module, Compose):
        for i, t in enumerate(module.transforms):
            _flatten(t, f"{name}.transforms.{i}" if name else f"transforms.{i}", ops, fallback)
    elif isinstance(module, MultiScale):
        prefix = f"{name}." if name else ""
        for i in range(module.levels):
            ops.append(_Op("unshuffle", f"{prefix}levels[{i}].squeeze"))
            start = len(ops)
            _flatten(module.steps[i], f"{prefix}steps.{i}", ops, fallback)
            if len(ops) > start:
                ops[start].level_start = True
            if i < module.levels - 1:
                ops.append(
                    _Op("split", f"{prefix}priors.{i}", keep=module._kept[i], prior=module.priors[i])
                )
        ops.append(_Op("merge", f"{prefix}merge_latent", multiscale=module))
    else:
        ops.append(_Op(_classify(module, label, fallback), label, module))


def _classify(module: Any, name: str, fallback: str) -> str:
    declared = getattr(module, "exactly_invertible", None)
    if declared is not None and not isinstance(declared, bool):
        raise ValueError(
            f"layer {name!r} ({type(module).__name__}) declares exactly_invertible = "
            f"{declared!r}; it must be True or False"
        )
    if declared is True:
        if not callable(getattr(module, "inverse", None)):
            raise TypeError(
                f"layer {name!r} ({type(module).__name__}) declares exactly_invertible = True "
                "but has no inverse method"
            )
        return "inverse"
    exact = declared is None and isinstance(module, _exact_types())
    if exact:
        return "inverse"
    if declared is False or isinstance(module, _inexact_types()):
        if fallback == "checkpoint":
            return "checkpoint"
        raise ValueError(
            f"layer {name!r} ({type(module).__name__}) is not exactly invertible and "
            "fallback='error' refuses it (fallback='checkpoint' stores its input instead)"
        )
    if not isinstance(module, nn.Module):
        raise TypeError(f"layer {name!r} must be an nn.Module (a Transform), got {type(module).__name__}")
    if not isinstance(module, Transform):
        raise TypeError(
            f"layer {name!r} ({type(module).__name__}) is an nn.Module but not a fastflow "
            "Transform: invertible backpropagation needs layers with forward(x) -> (y, logdet) "
            "and an exact inverse"
        )
    raise ValueError(
        f"layer {name!r} ({type(module).__name__}) is not known to be exactly invertible: set "
        "exactly_invertible = True on its class if inverse(forward(x)) == x up to rounding "
        "(it is then reconstructed by its inverse), or exactly_invertible = False (it is then "
        "checkpointed)"
    )


# --------------------------------------------------------------------------------------------
# State that a layer changes in forward: buffers and the random-number generators


def _rng_devices(x: Tensor) -> list[torch.device]:
    return [x.device] if x.device.type == "cuda" else []


def _rng_get(devices: list[torch.device]) -> tuple[Tensor, list[Tensor]]:
    return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]


def _rng_set(state: tuple[Tensor, list[Tensor]], devices: list[torch.device]) -> None:
    torch.set_rng_state(state[0])
    for d, s in zip(devices, state[1]):
        torch.cuda.set_rng_state(s, d)


def _rng_equal(a: tuple[Tensor, list[Tensor]], b: tuple[Tensor, list[Tensor]]) -> bool:
    return torch.equal(a[0], b[0]) and all(torch.equal(u, v) for u, v in zip(a[1], b[1]))


def _buffer_refs(module: nn.Module) -> list[tuple[nn.Module, str, Tensor]]:
    return [
        (owner, key, buf)
        for owner in module.modules()
        for key, buf in owner._buffers.items()
        if buf is not None
    ]


def _same(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b) or (
        a.is_floating_point() and torch.equal(a.isnan(), b.isnan())
        and torch.equal(a.nan_to_num(), b.nan_to_num())
    ))


@dataclasses.dataclass
class _Record:
    """What the forward pass leaves for one layer's backward."""

    input: Tensor | None = None  # the true input (checkpointed layer, anchor, check mode)
    rng: tuple[Tensor, list[Tensor]] | None = None  # RNG state before the layer, if it drew
    buffers: list[tuple[nn.Module, str, Tensor]] | None = None  # pre-forward values it changed


def _run_layer_recording(module: nn.Module, h: Tensor, context: Tensor | None, rec: _Record,
                         preserve_rng: bool) -> tuple[Tensor, Tensor]:
    devices = _rng_devices(h)
    rng = _rng_get(devices) if preserve_rng else None
    refs = _buffer_refs(module)
    before = [(owner, key, buf, buf._version, buf.clone()) for owner, key, buf in refs]
    y, logdet = module(h, context=context)
    changed = [
        (owner, key, old)
        for owner, key, buf, version, old in before
        # in-place updates inside an operator (batch norm's running statistics) may leave the
        # version counter as it was: compare the values too
        if owner._buffers.get(key) is not buf or buf._version != version or not _same(buf, old)
    ]
    if changed:
        rec.buffers = changed
    if rng is not None and not _rng_equal(rng, _rng_get(devices)):
        rec.rng = rng
    return y, logdet


@contextlib.contextmanager
def _forward_state(rec: _Record, devices: list[torch.device]) -> Iterator[Any]:
    """Within: the changed buffers hold their values from before the layer's forward pass; on
    exit they get back their current values. Yields a function that replays the RNG state."""
    saved = None
    if rec.buffers:
        saved = [(owner, key, owner._buffers[key]) for owner, key, _ in rec.buffers]
        saved = [(owner, key, cur, cur.clone() if cur is not None else None) for owner, key, cur in saved]
        with torch.no_grad():
            for owner, key, old in rec.buffers:
                cur = owner._buffers.get(key)
                if cur is not None and cur.shape == old.shape and cur.dtype == old.dtype:
                    cur.copy_(old)
                else:
                    owner._buffers[key] = old.clone()
    with contextlib.ExitStack() as stack:
        if rec.rng is not None:
            stack.enter_context(torch.random.fork_rng(devices=devices))

            def replay() -> None:
                _rng_set(rec.rng, devices)
        else:

            def replay() -> None:
                pass

        try:
            yield replay
        finally:
            if saved is not None:
                with torch.no_grad():
                    for owner, key, cur, value in saved:
                        if cur is not None:
                            cur.copy_(value)
                        owner._buffers[key] = cur  # also where the recomputation replaced it


# --------------------------------------------------------------------------------------------
# The autograd function


class _Run:
    """One call's settings, shared by the forward and the backward of the function."""

    def __init__(self, owner: "InvertibleBackprop", with_priors: bool):
        self.owner = owner
        self.ops = owner._ops
        self.with_priors = with_priors
        self.anchors = owner._anchors
        self.graph_anchors = owner._graph_anchors
        self.check = owner.check
        self.check_tol = owner.check_tol
        self.preserve_rng = owner.preserve_rng_state
        self.first_layer = owner._first_layer
        # a compiled graph's chain: id(layer or prior) -> [(parameter name, position)]
        self.param_positions: dict[int, list[tuple[str, int]]] = {}
        # and [(op index of a checkpointed layer, the names of its floating-point buffers)]
        self.state_at: list[tuple[int, list[str]]] = []


def _layer_params(module: nn.Module) -> list[Tensor]:
    return [p for p in module.parameters() if p.requires_grad]


def _chain_forward(run: _Run, x: Tensor, context: Tensor | None, records: list[_Record] | None,
                   keep: Any = None, draw: Any = None) -> tuple[Tensor, Tensor, Tensor]:
    """The chain without a graph; fills ``records`` (one per op) when given; ``keep(i, h)`` is
    called with each layer's input when given; ``draw(i, h)``, when given, returns the random
    numbers the layer is to use (:func:`_call_drawn`) or None."""
    h, logdet, log_prob = x, None, None
    stack: list[Tensor] = []
    for i, op in enumerate(run.ops):
        rec = _Record()
        if op.kind in ("inverse", "checkpoint"):
            if keep is not None:
                keep(i, h)
            if records is not None and (op.kind == "checkpoint" or i in run.anchors or run.check):
                rec.input = h
            drawn = draw(i, h) if draw is not None else None
            if drawn is not None:
                y, ld = _call_drawn(op.module, h, drawn)
            elif records is None:
                y, ld = op.module(h, context=context)
            else:
                y, ld = _run_layer_recording(op.module, h, context, rec, run.preserve_rng)
            ld = ld.to(_wide(ld.dtype))
            logdet = ld if logdet is None else logdet + ld
            h = y
        elif op.kind == "unshuffle":
            h = F.pixel_unshuffle(h, 2)
        elif op.kind == "split":
            z1, z2 = h[:, : op.keep], h[:, op.keep :]
            if run.with_priors:
                lp = op.prior.log_prob(z2, z1)
                log_prob = lp if log_prob is None else log_prob + lp
            stack.append(z2)
            h = z1
        elif op.kind == "merge":
            n = op.multiscale.levels - 1
            z2s = stack[len(stack) - n :]
            del stack[len(stack) - n :]
            h = op.multiscale.merge_latent(h, z2s)
        if records is not None:
            records.append(rec)
    wide = _wide(x.dtype)
    if logdet is None:
        logdet = x.new_zeros(x.shape[0], dtype=wide)
    if log_prob is None:
        log_prob = x.new_zeros(x.shape[0], dtype=wide)
    return h, logdet, log_prob


def _call_drawn(module: nn.Module, x: Tensor, draws: Any) -> tuple[Tensor, Tensor]:
    """A residual block's forward on the random numbers ``draws``
    (:meth:`~fastflow.nn.iResBlock._draw`)."""
    module._check(x, "x")
    return module._transform(x, draws)


class _Local:
    """Differentiates one layer's recomputed graph.

    The gradients of the leaves standing for the layer's input (and the context) are returned.
    A parameter's gradient goes where standard backpropagation would put it:

    * in a ``.backward()`` that will accumulate into the parameter, and when the parameter has
      no gradient hooks, it is added to ``.grad`` at once (``direct``), so that no more than one
      layer's parameter gradients exist beyond ``.grad`` (the chain's function then returns
      None for it, which autograd's accumulation ignores);
    * otherwise (``torch.autograd.grad``, a parameter with hooks, a parameter that is not a
      leaf) the gradients are summed over the layers and returned by the chain's function, so
      that autograd delivers them, hooks included (memory: one copy of those gradients);
    * a parameter left out of ``.backward(inputs=...)`` gets nothing.
    """

    def __init__(self, direct: set[int], collect: set[int] | None):
        self.direct = direct
        self.collect = collect  # None: every parameter
        self.collected: dict[int, Tensor] = {}

    @contextlib.contextmanager
    def params(self, module: nn.Module) -> Iterator[list[tuple[Tensor, Tensor]]]:
        """Within: the module's parameters that take gradients are replaced by detached aliases
        (so that the local graph does not run the parameters' hooks); yields
        ``[(parameter, alias), ...]``."""
        names, pairs = [], []
        for name, p in module.named_parameters():
            if p.requires_grad and (self.collect is None or id(p) in self.direct or id(p) in self.collect):
                names.append(name)
                pairs.append((p, p.detach().requires_grad_(True)))
        if not names:
            yield pairs
            return
        with _reparametrize_module(module, {n: a for n, (_, a) in zip(names, pairs)}, tie_weights=True):
            yield pairs

    def __call__(self, outs: list[Tensor], gouts: list[Tensor], leaves: list[Tensor | None],
                 pairs: list[tuple[Tensor, Tensor]]) -> list[Tensor | None]:
        outs_gouts = [(o, g) for o, g in zip(outs, gouts) if o.requires_grad]
        used = [t for t in leaves if t is not None]
        if not outs_gouts or not (used or pairs):
            return [None] * len(leaves)
        params = [p for p, _ in pairs]
        g = torch.autograd.grad(
            [o for o, _ in outs_gouts], used + [a for _, a in pairs], [g for _, g in outs_gouts],
            allow_unused=True,
        )
        for p, gp in zip(params, g[len(used):]):
            if gp is None:
                continue
            key = id(p)
            if key in self.direct:
                if p.grad is None:
                    p.grad = gp
                else:
                    p.grad.add_(gp)
            else:
                self.collected[key] = gp if key not in self.collected else self.collected[key] + gp
        it = iter(g[: len(used)])
        return [None if t is None else next(it) for t in leaves]


def _coupling_backward(layer: nn.Module, y: Tensor, gy: Tensor, gld: Tensor,
                       context: Tensor | None, ctx_leaf: Tensor | None,
                       local: _Local) -> tuple[Tensor, Tensor, Tensor | None]:
    """Reconstruction and local gradients of a coupling layer with one conditioner pass.

    The conditioner reads the untouched part, the same in the input and the output, so the pass
    that gives the inverse its scale and shift also serves the recomputation (the generic path
    runs it twice). Returns ``(x, grad_x, grad_context)``.
    """
    from fastflow.nn.coupling import _is_channels_last
    from fastflow.ops.affine_coupling import affine_coupling, affine_coupling_inverse

    part = layer.partition
    with local.params(layer) as pairs:
        with torch.enable_grad():
            a_leaf = y.detach().requires_grad_(True)  # stands for x: x_a == y_a
            log_scale, shift = layer._scale_and_shift(
                layer._params(a_leaf, ctx_leaf if ctx_leaf is not None else context)
            )
    with torch.no_grad():
        x_b, _ = affine_coupling_inverse(
            part.transformed(y), None if log_scale is None else log_scale.detach(), shift.detach(),
            activation=layer.activation, clamp=layer.clamp,
        )
        x = part.merge(y, x_b)
        if _is_channels_last(y):
            x = x.contiguous(memory_format=torch.channels_last)
    with torch.enable_grad():
        b_leaf = x_b.detach().requires_grad_(True)
        y_b, ld = affine_coupling(b_leaf, log_scale, shift, activation=layer.activation, clamp=layer.clamp)
        g_b, g_a, g_c = local(
            [y_b, ld], [part.transformed(gy), gld.to(ld.dtype)], [b_leaf, a_leaf, ctx_leaf], pairs
        )
    ga = gy if g_a is None else gy + g_a  # y_a = x_a passes gy through, plus the conditioner
    gx = part.merge(ga, g_b if g_b is not None else torch.zeros_like(x_b))
    if _is_channels_last(gy):
        gx = gx.contiguous(memory_format=torch.channels_last)
    return x, gx, g_c


def _fast_coupling(module: nn.Module) -> bool:
    from fastflow.nn.coupling import _Coupling

    return (
        isinstance(module, _Coupling)
        and getattr(module, "exactly_invertible", None) is None
        and type(module).forward is _Coupling.forward
        and type(module).inverse is _Coupling.inverse
        and _FUSE_COUPLINGS
    )


# The one-conditioner-pass backward of couplings (tests switch it off to compare with the
# generic path).
_FUSE_COUPLINGS = True


def _undo_reshape(op: _Op, h: Tensor, gh: Tensor, stack: list[tuple[Tensor, Tensor]]
                  ) -> tuple[Tensor, Tensor]:
    """The backward of an unshuffle or a merge: the value and its gradient before the op (a
    merge pushes its ``z2`` pieces and their gradients on ``stack``, for the splits)."""
    if op.kind == "unshuffle":
        return F.pixel_shuffle(h, 2), F.pixel_shuffle(gh, 2)
    ms = op.multiscale
    z_top, z2s = ms.split_latent(h)
    g_top, g2s = ms.split_latent(gh)
    stack.extend(zip(z2s, g2s))
    return z_top, g_top


class _ChainFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run: _Run, x: Tensor, context: Tensor | None, *params: Tensor):
        records: list[_Record] = []
        h, logdet, log_prob = _chain_forward(run, x, context, records)
        if h is x:
            h = h.clone()
        ctx.run = run
        ctx.records = records
        ctx.context = context
        ctx.params = params
        ctx.save_for_backward(h)
        return h, logdet, log_prob

    @staticmethod
    @once_differentiable
    def backward(ctx, g_out: Tensor, g_logdet: Tensor, g_logprob: Tensor):
        run: _Run = ctx.run
        records: list[_Record] = ctx.records
        (h,) = ctx.saved_tensors
        context = ctx.context
        need_ctx = context is not None and ctx.needs_input_grad[2]
        local = _local_backward(ctx)
        g_context = None
        gh = g_out
        stack: list[tuple[Tensor, Tensor]] = []  # (z2, grad of z2) for the splits, last on top
        errors: list[tuple[str, float]] = []
        devices = _rng_devices(h)
        # a reconstruction that overflows (a layer numerically not invertible, e.g. a sigmoid
        # scale near 0) must not turn into silent NaN gradients: checked once per level
        finite_out = bool(torch.isfinite(h).all())
        for i in reversed(range(len(run.ops))):
            op, rec = run.ops[i], records[i]
            if op.kind in ("inverse", "checkpoint"):
                module = op.module
                ctx_leaf = context.detach().requires_grad_(True) if need_ctx else None
                with _forward_state(rec, devices) as replay:
                    if op.kind == "inverse" and _fast_coupling(module) and (
                        rec.input is None or run.check
                    ):
                        replay()
                        x_in, gx, gc = _coupling_backward(module, h, gh, g_logdet, context, ctx_leaf, local)
                    else:
                        if op.kind == "checkpoint" or (rec.input is not None and not run.check):
                            x_in = rec.input
                        else:
                            replay()
                            with torch.no_grad():
                                x_in, _ = module.inverse(h, context=context)
                        replay()
                        with torch.enable_grad(), local.params(module) as pairs:
                            x_leaf = x_in.detach().requires_grad_(True)
                            y, ld = module(x_leaf, context=ctx_leaf if ctx_leaf is not None else context)
                            gx, gc = local(
                                [y, ld], [gh, g_logdet.to(ld.dtype)], [x_leaf, ctx_leaf], pairs
                            )
                        if gx is None:
                            gx = torch.zeros_like(x_in)
                if run.check and op.kind == "inverse" and rec.input is not None:
                    err = (x_in.detach() - rec.input).abs().max().item() if x_in.numel() else 0.0
                    errors.append((op.name, err))
                    if run.check_tol is not None and not err <= run.check_tol:
                        raise RuntimeError(
                            f"layer {op.name!r} ({type(module).__name__}) reconstructed its input "
                            f"with a max abs error {err:.3g} > check_tol={run.check_tol:g}: it is "
                            "not exactly invertible at this precision (checkpoint_every= bounds "
                            "the error's growth; a layer that is not invertible must declare "
                            "exactly_invertible = False)"
                        )
                if (op.level_start or i == run.first_layer) and op.kind == "inverse" and finite_out \
                        and not bool(torch.isfinite(x_in).all()):
                    if run.check:
                        run.owner.reconstruction_errors = list(reversed(errors))
                    raise RuntimeError(
                        f"the reconstruction of the input of layer {op.name!r} "
                        f"({type(module).__name__}) is not finite although the chain's output is: "
                        "a layer between it and the output is numerically not invertible in "
                        f"{x_in.dtype} (e.g. a coupling scale near 0); check=True names it, "
                        "checkpoint_every= or float64 avoid it"
                    )
                if gc is not None:
                    g_context = gc if g_context is None else g_context + gc
                h, gh = x_in.detach(), gx
            elif op.kind in ("unshuffle", "merge"):
                h, gh = _undo_reshape(op, h, gh, stack)
            elif op.kind == "split":
                z2, g2 = stack.pop()
                if run.with_priors:
                    with torch.enable_grad(), local.params(op.prior) as pairs:
                        z1_leaf = h.detach().requires_grad_(True)
                        z2_leaf = z2.detach().requires_grad_(True)
                        lp = op.prior.log_prob(z2_leaf, z1_leaf)
                        g1p, g2p = local([lp], [g_logprob.to(lp.dtype)], [z1_leaf, z2_leaf], pairs)
                    if g1p is not None:
                        gh = gh + g1p
                    if g2p is not None:
                        g2 = g2 + g2p
                h = torch.cat([h, z2], dim=1)
                gh = torch.cat([gh, g2], dim=1)
        if run.check:
            run.owner.reconstruction_errors = list(reversed(errors))
        g_params = tuple(local.collected.get(id(p)) for p in ctx.params)
        g_x = gh if ctx.needs_input_grad[1] else None
        return (None, g_x, g_context if need_ctx else None, *g_params)


# --------------------------------------------------------------------------------------------
# Inside a compiled graph


#: Why a compiled model runs the chain eagerly (:func:`_graph_chain_blocker`), in the
#: message of the graph break (and of ``fullgraph=True``'s error).
_EAGER_REASONS = {
    "check": "check=True reads each layer's reconstruction error on the host",
    "unrepeatable": "a layer holds a submodule whose call cannot be repeated (dropout or batch "
                    "norm in training mode, torch's hook-based spectral norm: "
                    "fastflow.nn._repeat.unrepeatable_submodule)",
    "layer": "a checkpointed layer draws random numbers inside its solver (a CNF) or is of a "
             "kind the graph's recomputation does not take",
    "products": "a residual block's products would be torch.func calls (a branch of the "
                "user's own, a convolutional branch under autocast, or branch parameters in "
                "another dtype than the input), which Dynamo (torch 2.13) fails to trace "
                "inside the chain's autograd function",
}


def _graph_chain_blocker(run: _Run, x: Tensor) -> str | None:
    """None where a compiled graph may run the chain on ``x`` as :class:`_GraphChainFunction`,
    else why not (a key of :data:`_EAGER_REASONS`). It needs no check mode (which reads the
    errors on the host) and every layer repeatable there. The recomputation cannot replay a
    random-number state, so a checkpointed layer must draw no random numbers or draw them where
    they can be passed in: planar, radial, Sylvester, MADE, IAF, batch norm (its running
    averages are passed in as copies, :func:`_func_vjp`), and residual blocks (their spectral
    norms' ``u``, ``v`` as the forward left them; the random numbers of their estimators drawn
    before the forward and passed to both calls, :func:`_call_drawn`); not CNFs, whose solvers
    draw random numbers inside. A residual block's call must run on its branch's own products:
    an MLP- or convolution-structured branch (:func:`~fastflow.nn.residual.mlp_structure`,
    :func:`~fastflow.nn._branch_products.conv_structure`) in ``x``'s dtype, a convolutional one
    not under autocast. Otherwise its products are ``torch.func`` calls between stores of
    module globals, which Dynamo (torch 2.13) fails to trace inside the chain's autograd
    function (a strict record in tests/test_compile_export.py). No layer may hold a submodule
    whose call cannot be repeated (:func:`~fastflow.nn._repeat.unrepeatable_submodule`)."""
    from fastflow.nn._repeat import unrepeatable_submodule
    from fastflow.nn.autoregressive import BatchNormFlow, InverseAutoregressive, MaskedAutoregressive
    from fastflow.nn.det_identity import Planar, Radial, Sylvester
    from fastflow.nn._branch_products import conv_structure
    from fastflow.nn.residual import iResBlock, mlp_structure

    if run.check:
        return "check"
    for op in run.ops:
        for m in (op.module, op.prior):
            if m is not None and unrepeatable_submodule(m) is not None:
                return "unrepeatable"
        if op.kind == "checkpoint" and not isinstance(
                op.module, (Planar, Radial, Sylvester, MaskedAutoregressive, InverseAutoregressive,
                            BatchNormFlow, iResBlock)):
            return "layer"
        if isinstance(op.module, iResBlock):
            g = op.module.g
            if any(p.dtype != x.dtype for p in g.parameters()):
                return "products"
            if mlp_structure(g) is None and (
                    conv_structure(g) is None or torch.is_autocast_enabled(x.device.type)):
                return "products"
    return None


def _eager_chain(run: _Run, x: Tensor, context: Tensor | None, *params: Tensor):
    return _ChainFunction.apply(run, x, context, *params)


#: The eager chain, one function per reason, each excluded from compilation with its reason.
_EAGER_CHAINS = {
    key: torch.compiler.disable(
        _eager_chain,
        reason=f"fastflow InvertibleBackprop runs its chain eagerly here: {text} "
               "(fastflow.nn.invertible docstring, torch.compile)",
    )
    for key, text in _EAGER_REASONS.items()
}


def _func_vjp(call: Any, primals: tuple[Tensor | None, ...], params: list[tuple[str, int]],
              all_params: tuple[Tensor, ...], cotangents: Any,
              state: dict[str, Tensor] | None = None
              ) -> tuple[list[Tensor | None], list[Tensor]]:
    """``call(named tensors, *primals)`` recomputed under :func:`torch.func.vjp`, the
    parameters ``params`` (names and positions in ``all_params``) as inputs: the gradients of
    the primals (None for a None primal) and of those parameters.

    ``state``: the layer's buffers by name as its forward left them, passed in as copies
    (inputs of the transformed function: torch.func refuses in-place updates of captured
    tensors, and a batch norm in training mode updates its running averages). The call runs
    with the spectral norms' power-iteration updates off, so it uses the forward's ``u``,
    ``v``. (A copy of the buffers made before the forward does not do: Inductor's partitioner
    recomputes such a copy in the backward, from the buffer the forward has updated since.)"""
    from fastflow import _native
    from fastflow.nn import lipschitz

    given = [i for i, t in enumerate(primals) if t is not None]
    names = [n for n, _ in params]
    state_names = list(state or {})

    def f(ins: tuple[Tensor, ...], ps: tuple[Tensor, ...], bs: tuple[Tensor, ...]) -> Any:
        args = list(primals)
        for i, t in zip(given, ins):
            args[i] = t
        return call({**dict(zip(names, ps)), **dict(zip(state_names, bs))}, *args)

    # torch.func does not run the native operators' C++ or old-style autograd kernels: the
    # references (a module global, set and restored by hand, as in a compiled graph)
    backend, updates = _native._backend, lipschitz._power_updates
    _native._backend, lipschitz._power_updates = "reference", False
    try:
        _, pull = torch.func.vjp(f, tuple(primals[i] for i in given),
                                 tuple(all_params[j] for _, j in params),
                                 tuple(state[n].clone() for n in state_names))
        g_in, g_ps, _ = pull(cotangents)
    finally:
        _native._backend, lipschitz._power_updates = backend, updates
    out: list[Tensor | None] = [None] * len(primals)
    for i, g in zip(given, g_in):
        out[i] = g
    return out, list(g_ps)


class _GraphChainFunction(torch.autograd.Function):
    """The chain with invertible backpropagation in operations ``torch.compile`` traces into
    one graph (forward and backward): the forward keeps the chain's output (and the inputs of
    checkpointed layers); the backward reconstructs each layer's input with its
    inverse and takes the layer's gradients by :func:`torch.func.vjp` of its recomputation on
    fastflow's reference operators (the checkpointed layers' buffers as the forward left
    them). No check mode, no random-number replay (:func:`_graph_chain_blocker`); the parameters'
    gradients are returned (autograd accumulates them)."""

    @staticmethod
    def forward(ctx, run: _Run, x: Tensor, context: Tensor | None, *params: Tensor):
        h, logdet, log_prob, stored, drawn = _chain_forward_graph(run, x, context)
        # The checkpointed layers' buffers as this call left them (after their updates), for
        # a recomputation without updates (:func:`_func_vjp`).
        states = []
        for i, names in run.state_at:
            buffers = dict(run.ops[i].module.named_buffers())
            states.extend(buffers[n].clone() for n in names)
        ctx.run = run
        ctx.has_context = context is not None
        ctx.stored_at = [i for i, _ in stored]
        # the residual blocks' draws and Neumann left vectors: (op index, kind, has N, has
        # probes, has left vectors); their tensors saved
        lefts = {i: d.sink[0] if d.sink else None for i, d in drawn.items()}
        ctx.drawn_at = [(i, d.kind, d.n_random is not None, d.probes is not None,
                         lefts[i] is not None) for i, d in drawn.items()]
        draw_tensors = [t for i, d in drawn.items() for t in (d.n_random, d.probes, lefts[i])
                        if t is not None]
        ctx.save_for_backward(h, *([context] if context is not None else []),
                              *[t for _, t in stored], *states, *draw_tensors, *params)
        return h, logdet, log_prob

    @staticmethod
    @once_differentiable
    def backward(ctx, g_out: Tensor, g_logdet: Tensor, g_logprob: Tensor):
        run: _Run = ctx.run
        saved = ctx.saved_tensors
        h = saved[0]
        k = 1
        context = None
        if ctx.has_context:
            context, k = saved[1], 2
        stored = dict(zip(ctx.stored_at, saved[k:k + len(ctx.stored_at)]))
        k += len(ctx.stored_at)
        states: dict[int, dict[str, Tensor]] = {}
        for i, names in run.state_at:
            states[i] = dict(zip(names, saved[k:k + len(names)]))
            k += len(names)
        from fastflow.nn.residual import _Draws

        drawn: dict[int, Any] = {}
        for i, kind, *has in ctx.drawn_at:
            tensors = []
            for flag in has:  # N, probes, left vectors
                tensors.append(saved[k] if flag else None)
                k += flag
            n_random, probes, left = tensors
            drawn[i] = _Draws(kind, n_random, probes, repeat=True, left=left)
        params = saved[k:]
        positions = run.param_positions
        g_params: list[Tensor | None] = [None] * len(params)
        g_context = None
        gh = g_out
        stack: list[tuple[Tensor, Tensor]] = []

        def add(named: list[tuple[str, int]], grads: list[Tensor]) -> None:
            for (_, j), g in zip(named, grads):
                g_params[j] = g if g_params[j] is None else g_params[j] + g

        for i in reversed(range(len(run.ops))):
            op = run.ops[i]
            if op.kind in ("inverse", "checkpoint"):
                module = op.module
                x_in = stored.get(i)
                if x_in is None:
                    with torch.no_grad():
                        x_in, _ = module.inverse(h, context=context)
                named = positions[id(module)]

                def call(ps: dict[str, Tensor], xi: Tensor, c: Tensor | None,
                         module: nn.Module = module, draws: Any = drawn.get(i)) -> Any:
                    with _reparametrize_module(module, ps):
                        if draws is not None:
                            return _call_drawn(module, xi, draws)
                        return module(xi, context=c)

                (gx, gc), gps = _func_vjp(call, (x_in, context), named, params, (gh, g_logdet),
                                          states.get(i))
                add(named, gps)
                if gc is not None:
                    g_context = gc if g_context is None else g_context + gc
                h, gh = x_in, gx
            elif op.kind in ("unshuffle", "merge"):
                h, gh = _undo_reshape(op, h, gh, stack)
            elif op.kind == "split":
                z2, g2 = stack.pop()
                if run.with_priors:
                    prior = op.prior
                    named = positions[id(prior)]

                    def call(ps: dict[str, Tensor], a: Tensor, b: Tensor,
                             prior: nn.Module = prior) -> Tensor:
                        with _reparametrize_module(prior, ps):
                            return prior.log_prob(b, a)

                    (g1p, g2p), gps = _func_vjp(call, (h, z2), named, params, g_logprob)
                    add(named, gps)
                    gh = gh + g1p
                    g2 = g2 + g2p
                h = torch.cat([h, z2], dim=1)
                gh = torch.cat([gh, g2], dim=1)
        need_ctx = ctx.has_context and ctx.needs_input_grad[2]
        return (None, gh if ctx.needs_input_grad[1] else None,
                g_context if need_ctx else None, *g_params)


def _chain_forward_graph(run: _Run, x: Tensor, context: Tensor | None
                         ) -> tuple[Tensor, Tensor, Tensor, list[tuple[int, Tensor]], dict[int, Any]]:
    """:func:`_chain_forward` without a graph, keeping the inputs of the checkpointed layers
    and of the anchors (but the last layer's, ``InvertibleBackprop._graph_anchors``), and
    drawing the residual blocks' random numbers before their calls:
    ``(h, logdet, log_prob, [(op index, input), ...], {op index: draws})``."""
    from fastflow.nn.residual import iResBlock

    stored: list[tuple[int, Tensor]] = []
    drawn: dict[int, Any] = {}

    def keep(i: int, h: Tensor) -> None:
        if run.ops[i].kind == "checkpoint" or i in run.graph_anchors:
            stored.append((i, h))

    def draw(i: int, h: Tensor) -> Any:
        module = run.ops[i].module
        if run.ops[i].kind != "checkpoint" or not isinstance(module, iResBlock):
            return None
        drawn[i] = module._draw(h)
        return drawn[i]

    h, logdet, log_prob = _chain_forward(run, x, context, None, keep, draw)
    return h, logdet, log_prob, stored, drawn


def _local_backward(ctx) -> _Local:
    """Where the parameters' gradients go (:class:`_Local`)."""
    # one entry of next_functions per tensor input: x, the context when given, the parameters
    offset = 1 + (ctx.context is not None)
    nodes = [n for n, _ in ctx.next_functions[offset:]]
    if len(nodes) != len(ctx.params):
        return _Local(set(), None)
    direct: set[int] = set()
    collect: set[int] = set()
    try:
        for p, node in zip(ctx.params, nodes):
            if node is None:
                continue
            if type(node).__name__ != "AccumulateGrad":  # not a leaf: autograd routes it
                collect.add(id(p))
            elif torch._C._will_engine_execute_node(node):
                hooked = bool(p._backward_hooks) or bool(getattr(p, "_post_accumulate_grad_hooks", None))
                (collect if hooked else direct).add(id(p))
    except RuntimeError:  # torch.autograd.grad() is running: return every gradient
        return _Local(set(), None)
    return _Local(direct, collect)


# --------------------------------------------------------------------------------------------
# The wrapper


class InvertibleBackprop(nn.Module):
    """Trains a flow with invertible backpropagation: activation memory independent of depth.

    Wraps ``model`` (its parameters are shared, not copied) and computes ``forward`` and
    ``log_prob`` through one autograd function that keeps only the chain's output and, in
    backward, reconstructs each layer's input with the layer's inverse and recomputes the layer
    locally (module docstring). The values and the gradients are those of the model itself,
    up to rounding; ``inverse``, ``sample`` and ``sample_and_log_prob`` are the model's.

    Gomez, Ren, Urtasun, Grosse. "The Reversible Residual Network: Backpropagation Without
    Storing Activations" (2017), https://arxiv.org/abs/1707.04585.

    Arguments:
        model: a :class:`~fastflow.Flow` (``RealNVP``, ``RealNVPImage``, ``Glow`` with its split
            priors, any flow of the layers listed in the module docstring), a
            :class:`~fastflow.Compose` or a single Transform. Which layers are reconstructed,
            checkpointed or refused: module docstring.
        checkpoint_every: None (default): every exactly invertible layer is reconstructed from
            the chain's output; an int ``k >= 1``: the true input of every ``k``-th layer is
            stored and the reconstruction restarts from it; ``"level"``: the input of each level
            of a multi-scale model is stored (the first layer's for a single-scale chain).
        check: keep every layer's true input too and record, in each backward, the largest
            absolute reconstruction error of each layer in :attr:`reconstruction_errors`
            (a list of ``(layer name, error)`` in forward order). A diagnostic: memory as
            standard backpropagation. The gradients are still those of the reconstruction.
        check_tol: with ``check``, raise ``RuntimeError`` naming the layer when a layer's error
            exceeds this.
        fallback: ``"checkpoint"`` (default): layers that are not exactly invertible are
            checkpointed; ``"error"``: they are refused with ``ValueError``.
        preserve_rng_state: replay the random-number state of layers that draw random numbers
            in forward (dropout, stochastic estimators) for their reconstruction and
            recomputation, as ``torch.utils.checkpoint`` does.

    Raises:
        TypeError: a layer is not a Transform, or ``model`` is not an ``nn.Module``.
        ValueError: a layer is not known to be exactly invertible (or, with
            ``fallback="error"``, known not to be); a bad argument.
        RuntimeError (at a call): an ActNorm of the model is not initialised.

    Example:
        >>> from fastflow.models import Glow
        >>> model = Glow((3, 16, 16), levels=2, depth=4, hidden=32)
        >>> x = torch.randn(8, 3, 16, 16)
        >>> _ = model(x)                               # ActNorm's data-dependent initialisation
        >>> trainer = InvertibleBackprop(model)
        >>> loss = -trainer.log_prob(x).mean()         # == -model.log_prob(x).mean()
        >>> loss.backward()                            # memory of one layer, not of 8 steps
        >>> torch.allclose(trainer.log_prob(x), model.log_prob(x), atol=1e-4)
        True
    """

    def __init__(
        self,
        model: nn.Module,
        checkpoint_every: int | str | None = None,
        check: bool = False,
        check_tol: float | None = None,
        fallback: str = "checkpoint",
        preserve_rng_state: bool = True,
    ):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module (a Flow or a Transform), got {type(model).__name__}")
        if fallback not in _FALLBACKS:
            raise ValueError(f"fallback must be one of {_FALLBACKS}, got {fallback!r}")
        if checkpoint_every is not None and checkpoint_every != "level" and (
            isinstance(checkpoint_every, bool)
            or not isinstance(checkpoint_every, int)
            or checkpoint_every < 1
        ):
            raise ValueError(
                f"checkpoint_every must be None, a positive int or 'level', got {checkpoint_every!r}"
            )
        if not isinstance(check, bool):
            raise ValueError(f"check must be True or False, got {check!r}")
        if check_tol is not None:
            if isinstance(check_tol, bool) or not isinstance(check_tol, (int, float)) or not check_tol >= 0:
                raise ValueError(f"check_tol must be a non-negative number or None, got {check_tol!r}")
            check_tol = float(check_tol)
        self.model = model
        self.checkpoint_every = checkpoint_every
        self.check = check
        self.check_tol = check_tol
        self.fallback = fallback
        self.preserve_rng_state = bool(preserve_rng_state)
        #: after a backward in check mode: ``[(layer name, max abs reconstruction error), ...]``
        self.reconstruction_errors: list[tuple[str, float]] = []
        ops: list[_Op] = []
        _flatten(model, "", ops, fallback)
        self._ops = ops
        layer_idx = [i for i, op in enumerate(ops) if op.kind in ("inverse", "checkpoint")]
        if checkpoint_every is None:
            anchors: set[int] = set()
        elif checkpoint_every == "level":
            anchors = {i for i in layer_idx if ops[i].level_start}
            if not anchors and layer_idx:
                anchors = {layer_idx[0]}
        else:
            anchors = set(layer_idx[::checkpoint_every])
        self._anchors = anchors
        # In a compiled graph the last layer is reconstructed even when it is an anchor (one
        # inverse of rounding error): keeping its input made Dynamo (torch 2.13) fail on a Glow
        # ("Argument 'value' of Node 'output' does not belong to this Graph").
        self._graph_anchors = anchors - set(layer_idx[-1:])
        self._first_layer = layer_idx[0] if layer_idx else -1
        from fastflow.nn.actnorm import ActNorm

        self._actnorms = [
            (op.name + (f".{sub}" if sub else ""), m)
            for op in ops if op.module is not None
            for sub, m in op.module.named_modules() if isinstance(m, ActNorm)
        ]
        from fastflow.models import Glow

        self._glow = isinstance(model, Glow)

    def extra_repr(self) -> str:
        n = {k: sum(op.kind == k for op in self._ops) for k in ("inverse", "checkpoint")}
        return (
            f"reconstructed={n['inverse']}, checkpointed={n['checkpoint']}, "
            f"checkpoint_every={self.checkpoint_every!r}, check={self.check}, fallback={self.fallback!r}"
        )

    @property
    def layers(self) -> list[tuple[str, str]]:
        """``[(layer name, "reconstructed" | "checkpointed"), ...]`` in forward order."""
        what = {"inverse": "reconstructed", "checkpoint": "checkpointed"}
        return [(op.name, what[op.kind]) for op in self._ops if op.kind in what]

    def initialize(self, batch: Tensor, context: Tensor | None = None) -> int:
        """Initialises the model's ActNorms from ``batch`` (:func:`fastflow.nn.initialize_actnorm`)."""
        from fastflow.nn.actnorm import initialize_actnorm

        return initialize_actnorm(self.model, batch, context=context)

    def _require_initialized(self) -> None:
        for name, layer in self._actnorms:
            if not layer._initialized or layer._init_on_next_forward:
                raise RuntimeError(
                    f"ActNorm {name!r} is not initialised: invertible backpropagation needs "
                    "ActNorm's data-dependent initialisation done first (it reconstructs inputs "
                    "with the inverse, which must use the same parameters as the forward pass): "
                    "run one forward of the model itself, call "
                    "fastflow.nn.initialize_actnorm(model, batch), or this wrapper's "
                    ".initialize(batch)"
                )

    def _chain(self, x: Tensor, context: Tensor | None, with_priors: bool) -> tuple[Tensor, Tensor, Tensor]:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(f"x must be a floating-point tensor, got {x.dtype}")
        if isinstance(self.model, Flow):
            self.model._check_input(x, "x")
        if self._glow and context is not None:
            raise ValueError("context was given but Glow is unconditional")
        self._require_initialized()
        run = _Run(self, with_priors)
        params = [p for op in self._ops for m in (op.module, op.prior) if m is not None
                  for p in _layer_params(m)]
        params = list({id(p): p for p in params}.values())  # shared parameters once
        grad_needed = torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in params)
            or (context is not None and context.requires_grad)
        )
        if not grad_needed:
            with torch.no_grad():
                return _chain_forward(run, x, context, None)
        if torch.compiler.is_compiling():
            blocker = _graph_chain_blocker(run, x)
            if blocker is not None:  # a graph break that names the reason
                return _EAGER_CHAINS[blocker](run, x, context, *params)
            index = {id(p): j for j, p in enumerate(params)}
            run.param_positions = {
                id(m): [(n, index[id(p)]) for n, p in m.named_parameters() if id(p) in index]
                for op in self._ops for m in (op.module, op.prior) if m is not None
            }
            for i, op in enumerate(self._ops):
                if op.kind == "checkpoint":
                    names = [n for n, b in op.module.named_buffers() if b.is_floating_point()]
                    if names:
                        run.state_at.append((i, names))
            return _GraphChainFunction.apply(run, x, context, *params)
        return _ChainFunction.apply(run, x, context, *params)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(z, log|det dz/dx|)``, the model's own forward (its Transform contract)."""
        z, logdet, _ = self._chain(x, context, with_priors=False)
        return z, logdet

    def log_prob(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """The model's ``log_prob(x)`` (``[B]``), with invertible backpropagation.

        For :class:`~fastflow.models.Glow`: top prior + split priors + log-det; for any other
        :class:`~fastflow.Flow`: ``base.log_prob(z) + logdet``.
        """
        if not isinstance(self.model, Flow):
            raise TypeError(
                f"log_prob needs a Flow (a base distribution); the wrapped model is a "
                f"{type(self.model).__name__}: use forward"
            )
        z, logdet, log_prob_splits = self._chain(x, context, with_priors=self._glow)
        if self._glow:
            z_top, _ = self.model.multiscale.split_latent(z)
            total = self.model.base.log_prob(z_top) + log_prob_splits.to(_wide(z.dtype))
        else:
            total = self.model._base_log_prob(z, context)
        dtype = torch.promote_types(_wide(total.dtype), _wide(logdet.dtype))
        return total.to(dtype) + logdet.to(dtype)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The model's inverse (standard autograd)."""
        return self.model.inverse(z, context=context)

    def sample(self, n: int, temperature: float = 1.0, context: Tensor | None = None) -> Tensor:
        """The model's ``sample``."""
        return self.model.sample(n, temperature=temperature, context=context)

    def sample_and_log_prob(self, n: int, temperature: float = 1.0, context: Tensor | None = None):
        """The model's ``sample_and_log_prob``."""
        return self.model.sample_and_log_prob(n, temperature=temperature, context=context)
