"""Jacobian products of a residual branch in PyTorch operations, for :class:`fastflow.nn.iResBlock`.

A convolutional branch of the kind :func:`fastflow.nn.residual_cnn` builds (an ``nn.Sequential``
of stride-1 "same" convolutions and elementwise activations) is linearised once at ``x``: its
output and each activation's derivative at its input. Its Jacobian then acts on a tangent by
the same convolutions without bias and the derivatives (``J t``), and on a cotangent by the
transposed convolutions in reverse (``J^T u``). Both are ordinary differentiable operations: a
gradient flows through them by autograd (the series' backpropagated gradient, the Neumann
surrogate), and ``torch.compile`` traces them, where the autograd estimators' vector-Jacobian
products (``torch.autograd.grad`` with ``create_graph``) are not traced.

A branch of any other kind gets the same products inside a compiled graph from
:func:`func_products` (``torch.func.vjp`` of a second call of the branch), where the branch
allows it (:func:`fastflow.nn._repeat.unrepeatable_submodule`).

:func:`power_sums` runs the power series of the log-det estimators on any such product, with a
Python number of terms, or, inside a compiled graph, a number of terms that is a tensor (the
roulette's draw): through ``torch._higher_order_ops.while_loop`` without autograd or where the
loop's backward is right (:mod:`fastflow.nn._loops`), and otherwise with autograd as every
capped product with zero weights past the draw (see :func:`power_sums`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastflow.nn._loops import loop_gradients_in_graph
from fastflow.ops.mlp_trace import MLP_ACTIVATIONS, _act_deriv

__all__ = ["conv_structure", "ConvLinearization", "func_products", "jacobian_from_vjp", "power_sums"]


def _conv_ok(m: nn.Module) -> bool:
    """A stride-1 "same" convolution without groups or dilation (its transpose is its adjoint
    on the same spatial size)."""
    from fastflow.nn.lipschitz import SpectralNormConv2d

    if type(m) is SpectralNormConv2d:
        return True
    if type(m) is not nn.Conv2d:
        return False
    k = m.kernel_size
    return (
        m.stride == (1, 1) and m.dilation == (1, 1) and m.groups == 1
        and m.padding_mode == "zeros" and not isinstance(m.padding, str)
        and k[0] % 2 == 1 and k[1] % 2 == 1 and m.padding == (k[0] // 2, k[1] // 2)
    )


def conv_structure(g: nn.Module) -> list[tuple[nn.Module | None, nn.Module]] | None:
    """The steps ``(activation or None, convolution)`` of a convolutional branch whose products
    :class:`ConvLinearization` computes, or None.

    That is an ``nn.Sequential`` ``[act ->] conv -> act -> conv ... -> conv`` of stride-1
    "same" convolutions (``nn.Conv2d`` with odd kernels, padding ``k // 2``, no groups or
    dilation, or :class:`~fastflow.nn.SpectralNormConv2d`) and activations the native operators
    know (LipSwish, ELU with ``alpha = 1``, Tanh, Softplus with ``beta = 1``): what
    :func:`~fastflow.nn.residual_cnn` builds.
    """
    from fastflow.nn.residual import _activation_kind

    if type(g) is not nn.Sequential or len(g) == 0:
        return None
    steps: list[tuple[nn.Module | None, nn.Module]] = []
    act: nn.Module | None = None
    for m in g:
        if _conv_ok(m):
            steps.append((act, m))
            act = None
        elif act is None and _activation_kind(m) is not None:
            act = m
        else:
            return None
    if act is not None:  # a trailing activation
        return None
    return steps


class ConvLinearization:
    """A convolutional branch (:func:`conv_structure`) linearised at ``x`` ``[B, C, H, W]``.

    ``out`` is ``g(x)``; :meth:`jvp` and :meth:`vjp` apply ``J`` and ``J^T`` to tangents of
    shape ``[..., B, C, H, W]`` (any leading dimensions, e.g. probes). The spectral norms'
    normalised kernels are read once (with their power-iteration update in training mode, as
    the branch's own forward does).
    """

    def __init__(self, steps: Sequence[tuple[nn.Module | None, nn.Module]], x: Tensor):
        from fastflow.nn.lipschitz import SpectralNormConv2d

        self.convs: list[tuple[Tensor, tuple[int, int]]] = []
        self.derivs: list[Tensor | None] = []
        h = x
        for act, conv in steps:
            d = None
            if act is not None:
                kind = _activation_kind_code(act)
                beta = F.softplus(act.beta_raw).to(h.dtype) if kind == 2 else None
                h, d = _act_deriv(kind, h, beta)
            if isinstance(conv, SpectralNormConv2d):
                conv.prepare(h)
                w, pad = conv.normalized_weight(), (conv.padding, conv.padding)
            else:
                w, pad = conv.weight, conv.padding
            self.derivs.append(d)
            self.convs.append((w, pad))
            h = F.conv2d(h, w, conv.bias, padding=pad)
        self.out = h

    @staticmethod
    def _batched(op: Callable[[Tensor], Tensor], t: Tensor) -> Tensor:
        lead = t.shape[:-3]
        out = op(t.reshape(-1, *t.shape[-3:]))
        return out.reshape(*lead, *out.shape[-3:])

    def jvp(self, t: Tensor) -> Tensor:
        """``J t`` (forward mode)."""
        for (w, pad), d in zip(self.convs, self.derivs):
            if d is not None:
                t = t * d
            t = self._batched(lambda u: F.conv2d(u, w, padding=pad), t)
        return t

    def vjp(self, u: Tensor) -> Tensor:
        """``J^T u`` (the transposed convolutions in reverse: ``u^T J`` per sample)."""
        for (w, pad), d in zip(reversed(self.convs), reversed(self.derivs)):
            u = self._batched(lambda v: F.conv_transpose2d(v, w, padding=pad), u)
            if d is not None:
                u = u * d
        return u

    def jacobian(self) -> Tensor:
        """The per-sample Jacobian ``[B, D, D]`` (``D = C H W``, flattened), by ``D`` products."""
        return jacobian_from_vjp(self.vjp, self.out)


def jacobian_from_vjp(vjp: Callable[[Tensor], Tensor], out: Tensor) -> Tensor:
    """The per-sample Jacobian ``[B, D, D]`` (``D`` a sample's elements, flattened) of a
    row-wise map with output like ``out`` ``[B, ...]``, from its product ``vjp`` (``u -> J^T u``
    on ``[..., B, ...]``): ``D`` products, one batch of cotangents."""
    b = out.shape[0]
    shape = out.shape[1:]
    d = shape.numel()
    basis = torch.eye(d, dtype=out.dtype, device=out.device)
    rows = vjp(basis.reshape(d, 1, *shape).expand(d, b, *shape))  # rows[i, b] = e_i^T J_b
    return rows.reshape(d, b, d).transpose(0, 1)


@contextlib.contextmanager
def func_products(g: nn.Module, x: Tensor) -> Iterator[tuple[Tensor, Callable[[Tensor], Tensor]]]:
    """A branch of any kind linearised at ``x`` by ``torch.func``, for a compiled graph: yields
    ``(out, vjp)`` with ``out = g(x)`` (the branch's own call, with its training-mode state
    update) and ``vjp`` applying ``J^T`` to cotangents ``[..., *x.shape]``, inside the block.

    Each product is :func:`torch.func.vjp` of a second call of ``g`` at ``x`` (a forward and a
    backward of ``g``: a pullback kept from one call cannot be carried into a ``while_loop``'s
    body), made with fastflow's spectral norms' power-iteration updates off and torch's
    parametrizations taken from the first call (both use the weights of the first call and
    change no state), and fastflow's operators on their references (``torch.func`` does not
    run the native operators' C++ autograd kernels). The branch's call must not depend on its
    mode otherwise (:func:`~fastflow.nn._repeat.unrepeatable_submodule` finds torch's modules
    that do). The products are differentiable by ordinary autograd w.r.t. ``x`` and ``g``'s
    parameters.
    """
    from torch.nn.utils import parametrize

    from fastflow import _native
    from fastflow.nn import lipschitz

    def one(u: Tensor) -> Tensor:
        again, pullback = torch.func.vjp(g, x)
        return pullback(u.to(again.dtype))[0]

    def vjp(u: Tensor) -> Tensor:
        lead = u.shape[: u.dim() - x.dim()]
        if not lead:
            return one(u)
        return torch.func.vmap(one)(u.reshape(-1, *x.shape)).reshape(*lead, *x.shape)

    # Module globals, set and restored by hand (not flags on the modules, not a generator
    # context manager): what torch.compile replays correctly around a while_loop. torch's
    # parametrizations (its spectral norm among them) are computed once, in g's own call, and
    # the products' calls reuse them (torch.nn.utils.parametrize.cached, by hand).
    backend, updates = _native._backend, lipschitz._power_updates
    parametrize._cache_enabled += 1
    try:
        out = g(x)
        if not isinstance(out, Tensor) or out.shape != x.shape:
            raise ValueError(
                f"g must return a tensor of its input's shape {tuple(x.shape)}, got "
                f"{tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__}"
            )
        _native._backend, lipschitz._power_updates = "reference", False
        yield out, vjp
    finally:
        _native._backend, lipschitz._power_updates = backend, updates
        parametrize._cache_enabled -= 1
        if not parametrize._cache_enabled:
            parametrize._cache = {}


def _activation_kind_code(act: nn.Module) -> int:
    from fastflow.nn.residual import _activation_kind

    return MLP_ACTIVATIONS[_activation_kind(act)]


def _wide_dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-probe, per-sample inner product over the trailing event dims, float32 or wider."""
    wide = torch.promote_types(a.dtype, torch.float32)
    return (a * b).flatten(2).sum(2, dtype=wide)


def power_sums(
    apply: Callable[[Tensor], Tensor],
    probes: Tensor,
    value_coeffs: Sequence[float] | Tensor,
    n_total: int | Tensor,
    psi_coeffs: Sequence[float] | Tensor | None = None,
    convolutions: bool = False,
    loop_gradients: bool = True,
    loops: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """``(value, psi)`` of the power series on the product ``apply`` (``J`` or ``J^T``).

    ``value[b] = mean_p sum_{k=1}^{n} c_k <v_p, A^k v_p>`` ``[B]`` (float32 or wider) and, with
    ``psi_coeffs``, ``psi = sum_{j=0}^{n-1} psi_j A^j v`` (the Neumann gradient's left vectors,
    ``[P, B, ...]``), for probes ``v`` ``[P, B, ...]``, ``n = n_total`` terms.

    ``n_total`` is an int (a Python loop), or a 0-d integer tensor with the coefficients as
    fixed-length tensors that are zero past it
    (:func:`~fastflow.ops.logdet_estimators.roulette_coefficients`), for a compiled graph that
    does not read the draw. Then ``torch._higher_order_ops.while_loop`` runs exactly
    ``n_total`` products, with autograd off or where a ``while_loop``'s backward is right
    (:func:`~fastflow.nn._loops.loop_gradients_in_graph`). Otherwise, with autograd on, every
    coefficient's product runs (the cap's, ``len(value_coeffs)``) and the weights past the draw
    are zero. ``psi_coeffs`` only with autograd off. ``n_total >= 1``. ``convolutions``: the
    product runs convolutions (:func:`~fastflow.nn._loops.loop_gradients_in_graph`).
    ``loop_gradients=False``: never a ``while_loop`` with autograd (products by ``torch.func``,
    :func:`func_products`: such a loop's values came out wrong, even under ``aot_eager``).
    ``loops=False``: never a ``while_loop`` (inside a ``torch.func`` transform, under which a
    compiled graph's ``while_loop`` does not trace): every capped product, with or without
    autograd.
    """
    if not isinstance(n_total, Tensor):
        u = probes
        psi = probes * psi_coeffs[0] if psi_coeffs is not None else None
        value = None
        for k in range(1, int(n_total) + 1):
            u = apply(u)
            term = _wide_dot(u, probes) * value_coeffs[k - 1]
            value = term if value is None else value + term
            if psi is not None and k < n_total:
                psi = psi + u * psi_coeffs[k]
        return value.mean(0), psi
    from torch._higher_order_ops import while_loop

    device = probes.device
    wide = torch.promote_types(probes.dtype, torch.float32)
    cv = torch.as_tensor(value_coeffs).to(device=device, dtype=wide)
    if torch.is_grad_enabled() and psi_coeffs is not None:
        raise ValueError("psi_coeffs with a tensor n_total needs autograd off")
    if not loops or (
            torch.is_grad_enabled() and not (loop_gradients and loop_gradients_in_graph(convolutions))):
        cp = None if psi_coeffs is None else torch.as_tensor(psi_coeffs).to(probes)
        u = probes
        value = None
        psi = None if cp is None else probes * cp[0]
        for k in range(cv.shape[0]):
            u = apply(u)
            term = _wide_dot(u, probes) * cv[k]
            value = term if value is None else value + term
            if cp is not None and k + 1 < cp.shape[0]:
                psi = psi + u * cp[k + 1]
        return value.mean(0), psi
    n = n_total.to(device=device, dtype=torch.int64)

    def coeff(c: Tensor, k: Tensor) -> Tensor:
        return torch.gather(c, 0, k.reshape(1))

    # the first product outside the loop (n_total >= 1)
    u = apply(probes)
    value = _wide_dot(u, probes) * coeff(cv, torch.zeros((), dtype=torch.int64, device=device))
    one = torch.ones((), dtype=torch.int64, device=device)
    if psi_coeffs is None:
        def body(k: Tensor, u: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            u = apply(u)
            return k + 1, u, value + _wide_dot(u, probes) * coeff(cv, k)

        _, _, value = while_loop(lambda k, u, value: k < n, body, (one, u, value))
        return value.mean(0), None
    # psi's weights are zero past the draw; one more zero for the index n_total at the cap
    cp = torch.as_tensor(psi_coeffs).to(device=device, dtype=probes.dtype)
    cp = torch.cat([cp, cp.new_zeros(1)])
    psi = probes * coeff(cp, one - 1) + u * coeff(cp, one)

    def body_psi(k: Tensor, u: Tensor, value: Tensor, psi: Tensor) -> tuple[Tensor, ...]:
        u = apply(u)
        value = value + _wide_dot(u, probes) * coeff(cv, k)
        return k + 1, u, value, psi + u * coeff(cp, k + 1)

    _, _, value, psi = while_loop(lambda k, u, value, psi: k < n, body_psi, (one, u, value, psi))
    return value.mean(0), psi
