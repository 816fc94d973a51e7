"""Fused affine coupling: the elementwise part of a coupling layer and its per-sample log-det.

A coupling layer splits its input into a conditioning part and a transformed part ``x``; a
network reads the conditioning part and returns a raw log-scale ``h`` and a shift ``t`` of
``x``'s shape. This operator does everything after the network in one pass:

=============  ==============================================  =====================
activation     forward ``y``                                   log-det per sample
=============  ==============================================  =====================
``"exp"``      ``x * exp(s) + t``, ``s = clamp*tanh(h/clamp)``  ``sum s``
``"sigmoid"``  ``(x + t) * s``, ``s = sigmoid(h + 2)`` (Glow)  ``sum log s``
``"additive"`` ``x + t`` (NICE)                                ``0``
=============  ==============================================  =====================

The sums run over every non-batch dimension. ``"additive"`` has nothing to fuse and runs as one
ATen addition under every backend (the native operator accepts it too). ``clamp=inf`` turns the soft clamp off
(``s = h``), as in the original Real NVP. The inverse maps ``y`` back to ``x`` and returns
``log|det dx/dy|``, the negative of the forward log-det.

References:
    Dinh, Krueger, Bengio. "NICE: Non-linear Independent Components Estimation" (2014),
    https://arxiv.org/abs/1410.8516.
    Dinh, Sohl-Dickstein, Bengio. "Density estimation using Real NVP" (2016),
    https://arxiv.org/abs/1605.08803.
    Kingma, Dhariwal. "Glow: Generative Flow with Invertible 1x1 Convolutions" (2018),
    https://arxiv.org/abs/1807.03039.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from fastflow import _native
from fastflow.ops._common import opmath_dtype as _logdet_dtype
from fastflow.ops._common import per_sample_format as _per_sample_format

__all__ = [
    "ACTIVATIONS",
    "affine_coupling",
    "affine_coupling_inverse",
    "affine_coupling_reference",
    "affine_coupling_backward_reference",
]

#: Names of the scale activations and their codes in the native schema.
ACTIVATIONS = {"additive": 0, "exp": 1, "sigmoid": 2}
_NAMES = {code: name for name, code in ACTIVATIONS.items()}

_native.register_native_dtypes("affine_coupling", "cpu", (torch.float32, torch.float64))
_native.register_native_dtypes(
    "affine_coupling", "cuda", (torch.float32, torch.float64, torch.float16, torch.bfloat16)
)


def _check_args(
    x: Tensor, log_scale: Tensor | None, shift: Tensor, activation: str, clamp: float, name: str
) -> tuple[int, float]:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(
            f"{name} must have a batch dimension and at least one feature dimension, "
            f"got shape {tuple(x.shape)}"
        )
    if x.shape[0] == 0:
        raise ValueError(f"{name} has an empty batch (shape {tuple(x.shape)})")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    others = [("shift", shift)]
    if activation != "additive":
        if log_scale is None:
            raise ValueError(f"log_scale is required for activation {activation!r}")
        others.append(("log_scale", log_scale))
    for other_name, other in others:
        if not isinstance(other, Tensor):
            raise TypeError(f"{other_name} must be a Tensor, got {type(other).__name__}")
        if other.shape != x.shape:
            raise ValueError(
                f"{other_name} must have the shape of {name} {tuple(x.shape)}, "
                f"got {tuple(other.shape)}"
            )
        if other.dtype != x.dtype:
            raise ValueError(f"{other_name} must have the dtype of {name} ({x.dtype}), got {other.dtype}")
        if other.device != x.device:
            raise ValueError(
                f"{other_name} must be on the device of {name} ({x.device}), got {other.device}"
            )
    clamp = float(clamp)
    if not clamp > 0:
        raise ValueError(f"clamp must be positive (math.inf for no clamp), got {clamp}")
    return ACTIVATIONS[activation], clamp


def affine_coupling(
    x: Tensor,
    log_scale: Tensor | None,
    shift: Tensor,
    activation: str = "exp",
    clamp: float = 2.0,
) -> tuple[Tensor, Tensor]:
    """Forward map of an affine coupling on the transformed part ``x``.

    Args:
        x: the transformed part, shape ``[B, ...]`` (``[B, D]`` or ``[B, C, H, W]``, contiguous or
            channels-last), float32/float64 (half/bf16 too on CUDA).
        log_scale: the network's raw log-scale ``h``, shape and dtype of ``x``; ignored (may be
            None) for ``activation="additive"``.
        shift: the shift ``t``, shape and dtype of ``x``.
        activation: ``"exp"``, ``"sigmoid"`` or ``"additive"`` (see the module docstring).
        clamp: soft clamp of the ``"exp"`` activation, ``s = clamp * tanh(h / clamp)``;
            ``math.inf`` for none.

    Returns:
        ``(y, logdet)``: ``y`` of ``x``'s shape and dtype, ``logdet = log|det dy/dx|`` of shape
        ``[B]`` (float32 when ``x`` is half/bf16).

    Example:
        >>> x, h, t = torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4)
        >>> y, logdet = affine_coupling(x, h, t, activation="exp")
        >>> y.shape, logdet.shape
        (torch.Size([3, 4]), torch.Size([3]))
    """
    code, clamp = _check_args(x, log_scale, shift, activation, clamp, "x")
    return _dispatch(x, log_scale, shift, code, clamp, False)


def affine_coupling_inverse(
    y: Tensor,
    log_scale: Tensor | None,
    shift: Tensor,
    activation: str = "exp",
    clamp: float = 2.0,
) -> tuple[Tensor, Tensor]:
    """Inverse map of :func:`affine_coupling`: returns ``(x, log|det dx/dy|)``.

    Arguments as in :func:`affine_coupling`, with ``y`` in place of ``x``.

    Example:
        >>> x, h, t = torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4)
        >>> y, ld = affine_coupling(x, h, t)
        >>> x2, ld_inv = affine_coupling_inverse(y, h, t)
        >>> torch.allclose(x, x2, atol=1e-5), torch.allclose(ld, -ld_inv)
        (True, True)
    """
    code, clamp = _check_args(y, log_scale, shift, activation, clamp, "y")
    return _dispatch(y, log_scale, shift, code, clamp, True)


def _dispatch(
    x: Tensor, log_scale: Tensor | None, shift: Tensor, code: int, clamp: float, inverse: bool
) -> tuple[Tensor, Tensor]:
    if code == ACTIVATIONS["additive"]:
        # Nothing to fuse: one ATen add whose backward passes the gradient through untouched.
        # Measured (bench/RESULTS.md), the operator's fixed per-call cost made it 0.5-0.7x of
        # this; the native kernel still takes "additive" when called as torch.ops.fastflow.*.
        return affine_coupling_reference(x, None, shift, "additive", clamp, inverse=inverse)
    if _native.use_native("affine_coupling", x):
        # Keep the activated scale for the backward only when a backward can follow.
        save = torch.is_grad_enabled() and (
            x.requires_grad or shift.requires_grad or (log_scale is not None and log_scale.requires_grad)
        )
        out, logdet, _ = torch.ops.fastflow.affine_coupling.default(
            x, log_scale, shift, code, clamp, inverse, save
        )
        return out, logdet
    return affine_coupling_reference(x, log_scale, shift, _NAMES[code], clamp, inverse=inverse)


# --------------------------------------------------------------------------------------------
# Pure-PyTorch reference: the oracle of the tests and the fallback where no kernel is built.


def _scale_terms(h: Tensor, activation: str, clamp: float) -> tuple[Tensor, Tensor]:
    """Returns (multiplier m of the affine map, log m) for the scale activations."""
    if activation == "exp":
        s = h if math.isinf(clamp) else clamp * torch.tanh(h / clamp)
        return torch.exp(s), s
    a = h + 2.0
    # log sigmoid(a) = -softplus(-a), stable for large |a|.
    return torch.sigmoid(a), F.logsigmoid(a)


def affine_coupling_reference(
    x: Tensor,
    log_scale: Tensor | None,
    shift: Tensor,
    activation: str = "exp",
    clamp: float = 2.0,
    *,
    inverse: bool = False,
) -> tuple[Tensor, Tensor]:
    """Pure-PyTorch :func:`affine_coupling` (``inverse=False``) or its inverse.

    Differentiable by autograd. Half/bf16 inputs are computed in float32 and the output cast
    back, like the native kernels; the log-det stays float32.
    """
    out_dtype = x.dtype
    ld_dtype = _logdet_dtype(x.dtype)
    xf, tf = x.to(ld_dtype), shift.to(ld_dtype)
    batch = x.shape[0]
    if activation == "additive":
        out = xf - tf if inverse else xf + tf
        logdet = xf.new_zeros(batch)
    else:
        mult, log_mult = _scale_terms(log_scale.to(ld_dtype), activation, clamp)
        if activation == "exp":
            out = (xf - tf) / mult if inverse else xf * mult + tf
        else:
            out = xf / mult - tf if inverse else (xf + tf) * mult
        logdet = log_mult.reshape(batch, -1).sum(1)
        if inverse:
            logdet = -logdet
    return out.to(out_dtype), logdet


def affine_coupling_backward_reference(
    grad_out: Tensor,
    grad_logdet: Tensor,
    input: Tensor,
    log_scale: Tensor | None,
    shift: Tensor,
    activation: str,
    clamp: float,
    inverse: bool,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """The hand-derived backward of :func:`affine_coupling` in PyTorch operations.

    Returns ``(grad_input, grad_log_scale, grad_shift)`` (``grad_log_scale`` None for the
    additive activation). Being made of differentiable operations, it is also what double
    backward differentiates. Formulas: REFERENCE.md section 4.1.
    """
    dtype = _logdet_dtype(input.dtype)
    g = grad_out.to(dtype)
    u = input.to(dtype)
    t = shift.to(dtype)
    gl = grad_logdet.to(dtype).reshape((-1,) + (1,) * (input.dim() - 1))
    if activation == "additive":
        grad_in, grad_h, grad_t = g, None, (-g if inverse else g)
    else:
        h = log_scale.to(dtype)
        if activation == "exp":
            if math.isinf(clamp):
                s, dsdh = h, torch.ones_like(h)
            else:
                th = torch.tanh(h / clamp)
                s, dsdh = clamp * th, 1 - th * th
            if inverse:
                e_inv = torch.exp(-s)
                grad_in = g * e_inv
                x = (u - t) * e_inv
                grad_t, grad_h = -grad_in, -(g * x + gl) * dsdh
            else:
                grad_in = g * torch.exp(s)
                grad_t, grad_h = g, (grad_in * u + gl) * dsdh
        else:
            s = torch.sigmoid(h + 2.0)
            one_minus_s = torch.sigmoid(-(h + 2.0))
            if inverse:
                grad_in = g / s
                grad_t, grad_h = -g, -(grad_in * u + gl) * one_minus_s
            else:
                grad_in = g * s
                grad_t, grad_h = grad_in, (grad_in * (u + t) + gl) * one_minus_s
    cast = input.dtype
    return (
        grad_in.to(cast),
        None if grad_h is None else grad_h.to(cast),
        grad_t.to(cast),
    )


# --------------------------------------------------------------------------------------------
# Registration of the native operator with torch.compile (fake) and autograd.

def _shift_grad(grad_out: Tensor, grad_in: Tensor, activation: int, inverse: bool) -> Tensor:
    # y = x e^s + t and y = x + t pass g to t; y = (x + t) s passes g s, the input's gradient;
    # the inverses negate: x = (y - t) e^{-s} gives -dy, x = y / s - t and y - t give -g.
    if activation == ACTIVATIONS["sigmoid"]:
        return -grad_out if inverse else grad_in
    if activation == ACTIVATIONS["exp"] and inverse:
        return -grad_in
    return -grad_out if inverse else grad_out


if _native.native_load_error() is None:

    @torch.library.register_fake("fastflow::affine_coupling")
    def _affine_coupling_fake(x, log_scale, shift, activation, clamp, inverse, save_scale):
        fmt = _per_sample_format(x)
        out = torch.empty_like(x, memory_format=fmt)
        logdet = x.new_empty(x.shape[0], dtype=_logdet_dtype(x.dtype))
        if save_scale and activation != ACTIVATIONS["additive"]:
            scale = torch.empty_like(x, memory_format=fmt)
        else:
            scale = x.new_empty(0)
        return out, logdet, scale

    @torch.library.register_fake("fastflow::affine_coupling_backward")
    def _affine_coupling_backward_fake(
        grad_out, grad_logdet, input, scale, shift, activation, clamp, inverse
    ):
        fmt = _per_sample_format(input)
        grad_in = torch.empty_like(input, memory_format=fmt)
        if activation == ACTIVATIONS["additive"]:
            grad_h = input.new_empty(0)
        else:
            grad_h = torch.empty_like(input, memory_format=fmt)
        return grad_in, grad_h

    def _setup_context(ctx, inputs, output):
        x, log_scale, shift, activation, clamp, inverse, _ = inputs
        scale = output[2]
        ctx.mark_non_differentiable(scale)
        ctx.save_for_backward(x, log_scale, shift, scale)
        ctx.args = (activation, clamp, inverse)

    def _backward(ctx, grad_out, grad_logdet, _grad_scale):
        x, log_scale, shift, scale = ctx.saved_tensors
        activation, clamp, inverse = ctx.args
        if grad_out is None:
            grad_out = torch.zeros_like(x)
        if grad_logdet is None:
            grad_logdet = x.new_zeros(x.shape[0], dtype=_logdet_dtype(x.dtype))
        if torch.is_grad_enabled():
            # create_graph=True: the same hand-derived formulas, in differentiable operations.
            return affine_coupling_backward_reference(
                grad_out, grad_logdet, x, log_scale, shift, _NAMES[activation], clamp, inverse
            ) + (None, None, None, None)
        if activation == ACTIVATIONS["additive"]:
            grad_x, grad_h = grad_out, None
        else:
            if scale.numel() == 0:
                # called directly with save_scale=False while inputs required grad
                scale = torch.ops.fastflow.affine_coupling.default(
                    x, log_scale, shift, activation, clamp, inverse, True
                )[2]
            grad_x, grad_h = torch.ops.fastflow.affine_coupling_backward.default(
                grad_out, grad_logdet, x, scale, shift, activation, clamp, inverse
            )
        grad_t = _shift_grad(grad_out, grad_x, activation, inverse)
        return grad_x, grad_h, grad_t, None, None, None, None

    torch.library.register_autograd(
        "fastflow::affine_coupling", _backward, setup_context=_setup_context
    )
