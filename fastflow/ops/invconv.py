"""Invertible 1x1 convolution over a PLU decomposition (Glow), with its per-sample log-det.

The weight is never a parameter itself; it is formed from its factors:

``W = P A B``, ``A = strict_lower(lower) + I``, ``B = strict_upper(upper) + diag(sign * exp(log_s))``

where ``P`` is the fixed permutation with ``P[i, perm[i]] = 1`` (``(P v)_i = v_{perm[i]}``),
``sign`` is fixed and ``lower``, ``upper``, ``log_s`` are trained (entries of ``lower`` and
``upper`` outside their strict triangles are ignored and get zero gradient). Per pixel,
``y = W x`` over the channels (dimension 1) of ``x`` (``[B, C]`` or ``[B, C, H, W]``), and
``log|det dy/dx| = H * W * sum(log_s)`` per sample: no determinant is ever computed. The inverse
``x = W^{-1} y`` forms ``W^{-1} = B^{-1} A^{-1} P^T`` by two triangular solves in float64 (never
an explicit inverse) and returns the negated log-det. Formulas, forward and backward:
REFERENCE.md section 4.2.

With half/bf16 activations (CUDA), ``lower``, ``upper``, ``sign``, ``log_s`` and the log-det are
float32; otherwise they have the activations' dtype.

References:
    Kingma, Dhariwal. "Glow: Generative Flow with Invertible 1x1 Convolutions" (2018),
    https://arxiv.org/abs/1807.03039.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fastflow import _native
from fastflow.ops._common import opmath_dtype as _param_dtype
from fastflow.ops._common import per_sample_format as _per_sample_format
from fastflow.ops._common import pixels as _pixels

__all__ = [
    "invconv_plu",
    "invconv_plu_inverse",
    "invconv_plu_reference",
    "invconv_plu_backward_reference",
    "plu_weight",
    "plu_inverse_weight",
]

_native.register_native_dtypes("invconv_plu", "cpu", (torch.float32, torch.float64))
_native.register_native_dtypes(
    "invconv_plu", "cuda", (torch.float32, torch.float64, torch.float16, torch.bfloat16)
)


def _check_args(
    x: Tensor, perm: Tensor, lower: Tensor, upper: Tensor, sign: Tensor, log_s: Tensor, name: str
) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(
            f"{name} must have a batch dimension and a channel dimension, got shape {tuple(x.shape)}"
        )
    if x.shape[0] == 0:
        raise ValueError(f"{name} has an empty batch (shape {tuple(x.shape)})")
    if x.shape[1] == 0:
        raise ValueError(f"{name} must have at least one channel (dim 1), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    C = x.shape[1]
    pd = _param_dtype(x.dtype)
    if not isinstance(perm, Tensor):
        raise TypeError(f"perm must be a Tensor, got {type(perm).__name__}")
    if perm.shape != (C,):
        raise ValueError(f"perm must have shape [{C}] (the channels of {name}), got {tuple(perm.shape)}")
    if perm.dtype != torch.int64:
        raise ValueError(f"perm must be int64, got {perm.dtype}")
    if perm.device != x.device:
        raise ValueError(f"perm must be on the device of {name} ({x.device}), got {perm.device}")
    for arg_name, t, shape in (
        ("lower", lower, (C, C)),
        ("upper", upper, (C, C)),
        ("sign", sign, (C,)),
        ("log_s", log_s, (C,)),
    ):
        if not isinstance(t, Tensor):
            raise TypeError(f"{arg_name} must be a Tensor, got {type(t).__name__}")
        if tuple(t.shape) != shape:
            raise ValueError(f"{arg_name} must have shape {list(shape)}, got {tuple(t.shape)}")
        if t.dtype != pd:
            raise ValueError(f"{arg_name} must be {pd} ({name} is {x.dtype}), got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{arg_name} must be on the device of {name} ({x.device}), got {t.device}")


def invconv_plu(
    x: Tensor, perm: Tensor, lower: Tensor, upper: Tensor, sign: Tensor, log_s: Tensor
) -> tuple[Tensor, Tensor]:
    """Forward map ``y = W x`` per pixel, ``W = P A B`` (see the module docstring).

    Args:
        x: ``[B, C]`` or ``[B, C, *spatial]`` (contiguous or channels-last), float32/float64
            (half/bf16 too on CUDA).
        perm: int64 ``[C]``, the permutation: ``P[i, perm[i]] = 1``.
        lower: ``[C, C]``; its strictly lower triangle is that of ``A`` (unit diagonal).
        upper: ``[C, C]``; its strictly upper triangle is that of ``B``.
        sign: ``[C]``, the fixed signs of ``B``'s diagonal.
        log_s: ``[C]``, the log-magnitudes of ``B``'s diagonal.

    Returns:
        ``(y, logdet)``: ``y`` of ``x``'s shape, dtype and layout, ``logdet = N * sum(log_s)``
        of shape ``[B]``, ``N`` the pixels per sample (1 for vectors).

    Example:
        >>> C = 3
        >>> perm, sign = torch.tensor([2, 0, 1]), torch.ones(C)
        >>> lower, upper, log_s = torch.randn(C, C), torch.randn(C, C), torch.zeros(C)
        >>> y, logdet = invconv_plu(torch.randn(2, C, 4, 4), perm, lower, upper, sign, log_s)
        >>> y.shape, logdet
        (torch.Size([2, 3, 4, 4]), tensor([0., 0.]))
    """
    _check_args(x, perm, lower, upper, sign, log_s, "x")
    return _dispatch(x, perm, lower, upper, sign, log_s, False)


def invconv_plu_inverse(
    y: Tensor, perm: Tensor, lower: Tensor, upper: Tensor, sign: Tensor, log_s: Tensor
) -> tuple[Tensor, Tensor]:
    """Inverse map of :func:`invconv_plu`: returns ``(x, log|det dx/dy|)``.

    Arguments as in :func:`invconv_plu`, with ``y`` in place of ``x``.

    Example:
        >>> C = 3
        >>> perm, sign = torch.tensor([2, 0, 1]), torch.tensor([1.0, -1.0, 1.0])
        >>> lower, upper, log_s = torch.randn(C, C), torch.randn(C, C), torch.randn(C)
        >>> x = torch.randn(5, C)
        >>> y, ld = invconv_plu(x, perm, lower, upper, sign, log_s)
        >>> x2, ld_inv = invconv_plu_inverse(y, perm, lower, upper, sign, log_s)
        >>> torch.allclose(x, x2, atol=1e-4), torch.allclose(ld, -ld_inv)
        (True, True)
    """
    _check_args(y, perm, lower, upper, sign, log_s, "y")
    return _dispatch(y, perm, lower, upper, sign, log_s, True)


def _dispatch(x, perm, lower, upper, sign, log_s, inverse: bool) -> tuple[Tensor, Tensor]:
    if _native.use_native("invconv_plu", x):
        if torch.is_autocast_enabled(x.device.type):
            # The kernel's GEMM would otherwise be recast by autocast, returning half/bf16 from a
            # float32 input (and a backward that rejects the half/bf16 gradient): the operator
            # keeps its input's dtype, as the reference does.
            with torch.autocast(x.device.type, enabled=False):
                return torch.ops.fastflow.invconv_plu.default(x, perm, lower, upper, sign, log_s, inverse)
        return torch.ops.fastflow.invconv_plu.default(x, perm, lower, upper, sign, log_s, inverse)
    return invconv_plu_reference(x, perm, lower, upper, sign, log_s, inverse=inverse)


# --------------------------------------------------------------------------------------------
# Pure-PyTorch reference: the oracle of the tests and the fallback where no kernel is built.


def _factors(lower: Tensor, upper: Tensor, sign: Tensor, log_s: Tensor) -> tuple[Tensor, Tensor]:
    eye = torch.eye(lower.shape[0], dtype=lower.dtype, device=lower.device)
    return lower.tril(-1) + eye, upper.triu(1) + torch.diag(sign * log_s.exp())


def plu_weight(perm: Tensor, lower: Tensor, upper: Tensor, sign: Tensor, log_s: Tensor) -> Tensor:
    """The dense ``W = P A B`` (``[C, C]``) of the factors, differentiable by autograd."""
    a, b = _factors(lower, upper, sign, log_s)
    return (a @ b)[perm]


def plu_inverse_weight(
    perm: Tensor, lower: Tensor, upper: Tensor, sign: Tensor, log_s: Tensor
) -> Tensor:
    """``W^{-1} = B^{-1} A^{-1} P^T`` by two triangular solves in float64, cast back.

    Differentiable by autograd (through the solves), never an explicit inverse.
    """
    a, b = _factors(lower, upper, sign, log_s)
    C = a.shape[0]
    pt = torch.eye(C, dtype=torch.float64, device=a.device)[:, perm]
    a_inv_pt = torch.linalg.solve_triangular(a.double(), pt, upper=False, unitriangular=True)
    return torch.linalg.solve_triangular(b.double(), a_inv_pt, upper=True).to(a.dtype)


def _apply_1x1(m: Tensor, x: Tensor) -> Tensor:
    # out[b, :, pixel] = m x[b, :, pixel]; computed in m's dtype.
    xf = x.to(m.dtype)
    if x.dim() == 2:
        return xf @ m.t()
    # explicit pixel count: a -1 is ambiguous for an empty batch
    return (m @ xf.reshape(x.shape[0], x.shape[1], math.prod(x.shape[2:]))).reshape(x.shape)


def invconv_plu_reference(
    x: Tensor,
    perm: Tensor,
    lower: Tensor,
    upper: Tensor,
    sign: Tensor,
    log_s: Tensor,
    *,
    inverse: bool = False,
) -> tuple[Tensor, Tensor]:
    """Pure-PyTorch :func:`invconv_plu` (``inverse=False``) or :func:`invconv_plu_inverse`.

    Differentiable by autograd. Half/bf16 inputs are computed in float32 and cast back; the
    log-det has the factors' dtype.
    """
    if inverse:
        m = plu_inverse_weight(perm, lower, upper, sign, log_s)
    else:
        m = plu_weight(perm, lower, upper, sign, log_s)
    out = _apply_1x1(m, x).to(x.dtype)
    ld = log_s.sum() * _pixels(x)
    if inverse:
        ld = -ld
    return out, ld.expand(x.shape[0]).clone()


def _gram(g: Tensor, x: Tensor, dtype: torch.dtype) -> Tensor:
    # sum over samples and pixels of g x^T.
    B, C = x.shape[:2]
    g2 = g.to(dtype).reshape(B, C, -1)
    x2 = x.to(dtype).reshape(B, C, -1)
    return torch.einsum("bin,bjn->ij", g2, x2)


def invconv_plu_backward_reference(
    grad_out: Tensor,
    grad_logdet: Tensor,
    input: Tensor,
    perm: Tensor,
    lower: Tensor,
    upper: Tensor,
    sign: Tensor,
    log_s: Tensor,
    inverse: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The hand-derived backward of :func:`invconv_plu` / its inverse, in PyTorch operations.

    Returns the gradients w.r.t. ``(input, lower, upper, log_s)``. Being made of differentiable
    operations, it is also what double backward differentiates. Formulas: REFERENCE.md 4.2.
    """
    dtype = lower.dtype
    a, b = _factors(lower, upper, sign, log_s)
    if inverse:
        m = plu_inverse_weight(perm, lower, upper, sign, log_s)
    else:
        m = (a @ b)[perm]
    grad_in = _apply_1x1(m.t(), grad_out).to(input.dtype)
    gw = _gram(grad_out, input, dtype)
    if inverse:
        # x = W^{-1} y: dLoss/dW = -W^{-T} (sum g y^T) W^{-T}
        gw = -(m.t() @ gw @ m.t())
    q = gw[torch.argsort(perm)]  # P^T Gw
    grad_lower = (q @ b.t()).tril(-1)
    z = a.t() @ q
    n = _pixels(input)
    gl = grad_logdet.to(dtype).sum() * (-n if inverse else n)
    grad_log_s = z.diagonal() * sign * log_s.exp() + gl
    return grad_in, grad_lower, z.triu(1), grad_log_s


# --------------------------------------------------------------------------------------------
# Registration of the native operator with torch.compile (fake) and autograd.

if _native.native_load_error() is None:

    @torch.library.register_fake("fastflow::invconv_plu")
    def _invconv_plu_fake(x, perm, lower, upper, sign, log_s, inverse):
        out = torch.empty_like(x, memory_format=_per_sample_format(x))
        return out, log_s.new_empty(x.shape[0])

    @torch.library.register_fake("fastflow::invconv_plu_backward")
    def _invconv_plu_backward_fake(
        grad_out, grad_logdet, input, perm, lower, upper, sign, log_s, inverse
    ):
        grad_in = torch.empty_like(input, memory_format=_per_sample_format(input))
        return grad_in, torch.empty_like(lower), torch.empty_like(upper), torch.empty_like(log_s)

    def _setup_context(ctx, inputs, output):
        x, perm, lower, upper, sign, log_s, inverse = inputs
        ctx.save_for_backward(x, perm, lower, upper, sign, log_s)
        ctx.inverse = inverse

    def _backward(ctx, grad_out, grad_logdet):
        x, perm, lower, upper, sign, log_s = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(x)
        if grad_logdet is None:
            grad_logdet = log_s.new_zeros(x.shape[0])
        if grad_out.dtype != x.dtype:
            grad_out = grad_out.to(x.dtype)
        if torch.is_grad_enabled():
            # create_graph=True: the same hand-derived formulas, in differentiable operations.
            gx, gl, gu, gs = invconv_plu_backward_reference(
                grad_out, grad_logdet, x, perm, lower, upper, sign, log_s, ctx.inverse
            )
        else:
            gx, gl, gu, gs = torch.ops.fastflow.invconv_plu_backward.default(
                grad_out, grad_logdet, x, perm, lower, upper, sign, log_s, ctx.inverse
            )
        return gx, None, gl, gu, None, gs, None

    torch.library.register_autograd(
        "fastflow::invconv_plu", _backward, setup_context=_setup_context
    )
