"""Spectral normalisation by power iteration (i-ResNet, Residual Flows): the operators.

A weight ``W`` is made contractive by the soft normalisation

``W_hat = W / max(1, sigma / c)``,  ``sigma = u^T W v``

where ``u``, ``v`` are persistent unit vectors that estimate ``W``'s top singular vectors and are
refined by power iteration, ``v <- W^T u / |W^T u|``, ``u <- W v / |W v|``. After a round
``sigma = |W v|``, a lower bound of the spectral norm that converges to it from below (at a rate
``(sigma_2 / sigma_1)^2`` per round). Gradients treat ``u`` and ``v`` as constants, as spectral
normalisation always does (REFERENCE.md 4.3; a gradient through the power iteration makes
layers stall, jhjacobsen/invertible-resnet#4).

Operators (native kernels where built, pure-PyTorch references beside them):

:func:`spectral_norm_power`
    ``n_iter`` rounds of the power iteration on a matrix ``[out, in]``; returns new ``(u, v)``
    and has no gradient. The layer writes them back into its buffers in training mode.
:func:`spectral_norm_apply`
    ``(W_hat, sigma)`` with a hand-written backward (``dW = s G + (g_sigma - [sigma > c]
    c <G, W> / sigma^2) u v^T``, ``s = 1 / max(1, sigma / c)``); double backward through the
    same formula written in differentiable operations.
:func:`spectral_norm_conv_power`, :func:`spectral_norm_conv_apply`
    the same for a convolution's kernel, with the power iteration run on the convolution
    operator itself (``conv2d`` / ``conv_transpose2d`` at a fixed spatial size), so that
    ``sigma`` estimates the operator norm of the convolution, not of the kernel's matrix view.
    Pure PyTorch only: each round is two convolutions, which oneDNN / cuDNN already run at full
    speed, and the Python overhead per round is small beside them.

With half/bf16 weights (CUDA) the math runs in float32: ``u``, ``v`` and ``W_hat`` come back in
the weight's dtype and ``sigma`` is float32.

References:
    Behrmann, Grathwohl, Chen, Duvenaud, Jacobsen. "Invertible Residual Networks" (2019),
    https://arxiv.org/abs/1811.00995.
    Chen, Behrmann, Duvenaud, Jacobsen. "Residual Flows for Invertible Generative Modeling"
    (2019), https://arxiv.org/abs/1906.02735.
    Miyato, Kataoka, Koyama, Yoshida. "Spectral Normalization for Generative Adversarial
    Networks" (2018), https://arxiv.org/abs/1802.05957.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fastflow import _native
from fastflow.ops._common import opmath_dtype

__all__ = [
    "spectral_norm_power",
    "spectral_norm_apply",
    "spectral_norm_power_reference",
    "spectral_norm_apply_reference",
    "spectral_norm_apply_backward_reference",
    "spectral_norm_conv_power",
    "spectral_norm_conv_apply",
]

for _op in ("spectral_norm_power", "spectral_norm_apply"):
    _native.register_native_dtypes(_op, "cpu", (torch.float32, torch.float64))
    _native.register_native_dtypes(
        _op, "cuda", (torch.float32, torch.float64, torch.float16, torch.bfloat16)
    )


# --------------------------------------------------------------------------------------------
# Argument checks (shared by both backends, so the reference refuses what the kernel refuses)


def _check_tensor(t: Any, name: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")


def _check_vector(weight: Tensor, t: Any, name: str, shape: tuple[int, ...], what: str) -> None:
    _check_tensor(t, name)
    if tuple(t.shape) != shape:
        raise ValueError(
            f"{name} must have shape {list(shape)} ({what} of weight {tuple(weight.shape)}), "
            f"got {tuple(t.shape)}"
        )
    if t.dtype != weight.dtype:
        raise ValueError(f"{name} must have the dtype of weight ({weight.dtype}), got {t.dtype}")
    if t.device != weight.device:
        raise ValueError(f"{name} must be on the device of weight ({weight.device}), got {t.device}")


def _check_weight(weight: Any, dims: int) -> None:
    _check_tensor(weight, "weight")
    if weight.dim() != dims:
        what = "a matrix [out, in]" if dims == 2 else "a conv2d kernel [out, in, kh, kw]"
        raise ValueError(f"weight must be {what}, got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise ValueError(f"weight must be a floating-point tensor, got {weight.dtype}")
    if weight.numel() == 0:
        raise ValueError(f"weight must not be empty, got shape {tuple(weight.shape)}")


def _check_matrix_args(weight: Any, u: Any, v: Any) -> None:
    _check_weight(weight, 2)
    _check_vector(weight, u, "u", (weight.shape[0],), "the first (out) dimension")
    _check_vector(weight, v, "v", (weight.shape[1],), "the second (in) dimension")


def _check_n_iter(n_iter: Any) -> int:
    if isinstance(n_iter, bool) or not isinstance(n_iter, numbers.Integral) or n_iter < 0:
        raise ValueError(f"n_iter must be an int >= 0, got {n_iter!r}")
    return int(n_iter)


def _check_eps(eps: Any) -> float:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not (
        eps >= 0 and math.isfinite(eps)
    ):
        raise ValueError(f"eps must be a number >= 0, got {eps!r}")
    return float(eps)


def _check_coeff(coeff: Any) -> float:
    if isinstance(coeff, bool) or not isinstance(coeff, numbers.Real) or not (
        coeff > 0 and math.isfinite(coeff)
    ):
        raise ValueError(f"coeff must be a number > 0, got {coeff!r}")
    return float(coeff)


# --------------------------------------------------------------------------------------------
# Entry points


def spectral_norm_power(
    weight: Tensor, u: Tensor, v: Tensor, n_iter: int = 1, eps: float = 1e-12
) -> tuple[Tensor, Tensor]:
    """``n_iter`` rounds of the power iteration of ``weight``; returns the new ``(u, v)``.

    One round is ``v <- W^T u / max(|W^T u|, eps)``, then ``u <- W v / max(|W v|, eps)``. The
    outputs are new tensors (``u`` and ``v`` are not modified) and carry no gradient.

    Args:
        weight: ``[out, in]``, float32/float64 (half/bf16 too on CUDA); any strides.
        u: ``[out]``, the current left singular vector estimate; weight's dtype and device.
        v: ``[in]``, the current right singular vector estimate.
        n_iter: rounds, ``>= 0`` (0 returns copies).
        eps: floor of the norms divided by (as :func:`torch.nn.functional.normalize`).

    Example:
        >>> w = torch.diag(torch.tensor([3.0, 1.0]))
        >>> u, v = spectral_norm_power(w, torch.ones(2), torch.ones(2), n_iter=30)
        >>> torch.allclose(u, torch.tensor([1.0, 0.0]), atol=1e-6)
        True
    """
    _check_matrix_args(weight, u, v)
    n_iter, eps = _check_n_iter(n_iter), _check_eps(eps)
    if _native.use_native("spectral_norm_power", weight):
        return torch.ops.fastflow.spectral_norm_power.default(weight, u, v, n_iter, eps)
    return spectral_norm_power_reference(weight, u, v, n_iter, eps)


def spectral_norm_apply(
    weight: Tensor, u: Tensor, v: Tensor, coeff: float
) -> tuple[Tensor, Tensor]:
    """The normalised weight ``W / max(1, sigma / coeff)`` and ``sigma = u^T W v``.

    Differentiable w.r.t. ``weight`` (through both outputs; ``u`` and ``v`` are constants and
    get no gradient), twice.

    Args:
        weight: ``[out, in]``, float32/float64 (half/bf16 too on CUDA); any strides.
        u, v: ``[out]``, ``[in]`` unit vectors from :func:`spectral_norm_power`.
        coeff: the target ``c > 0``: the result's spectral norm estimate is ``min(sigma, c)``.

    Returns:
        ``(w_hat, sigma)``: ``w_hat`` of weight's shape and dtype (contiguous), ``sigma`` a
        0-dim tensor of weight's dtype (float32 for half/bf16).

    Example:
        >>> w = torch.diag(torch.tensor([3.0, 1.0]))
        >>> u, v = spectral_norm_power(w, torch.ones(2), torch.ones(2), n_iter=30)
        >>> w_hat, sigma = spectral_norm_apply(w, u, v, coeff=0.9)
        >>> round(sigma.item(), 4), torch.linalg.matrix_norm(w_hat, ord=2).item() <= 0.9 + 1e-6
        (3.0, True)
    """
    _check_matrix_args(weight, u, v)
    coeff = _check_coeff(coeff)
    if _native.use_native("spectral_norm_apply", weight):
        return torch.ops.fastflow.spectral_norm_apply.default(weight, u, v, coeff)
    return spectral_norm_apply_reference(weight, u, v, coeff)


# --------------------------------------------------------------------------------------------
# Pure-PyTorch references: the oracle of the tests and the fallback where no kernel is built.


def spectral_norm_power_reference(
    weight: Tensor, u: Tensor, v: Tensor, n_iter: int, eps: float = 1e-12
) -> tuple[Tensor, Tensor]:
    """Pure-PyTorch :func:`spectral_norm_power` (two GEMVs and two normalisations per round)."""
    od = opmath_dtype(weight.dtype)
    with torch.no_grad():
        w = weight.detach().to(od)
        un, vn = u.detach().to(od), v.detach().to(od)
        for _ in range(n_iter):
            vn = F.normalize(torch.mv(w.t(), un), dim=0, eps=eps)
            un = F.normalize(torch.mv(w, vn), dim=0, eps=eps)
        return un.to(u.dtype).clone(), vn.to(v.dtype).clone()


def spectral_norm_apply_reference(
    weight: Tensor, u: Tensor, v: Tensor, coeff: float
) -> tuple[Tensor, Tensor]:
    """Pure-PyTorch :func:`spectral_norm_apply`, differentiable by autograd w.r.t. ``weight``."""
    od = opmath_dtype(weight.dtype)
    w = weight.to(od)
    sigma = torch.dot(u.detach().to(od), torch.mv(w, v.detach().to(od)))
    w_hat = w / torch.clamp(sigma / coeff, min=1.0)
    return w_hat.to(weight.dtype), sigma


def spectral_norm_apply_backward_reference(
    grad_w_hat: Tensor, grad_sigma: Tensor, weight: Tensor, u: Tensor, v: Tensor, coeff: float
) -> Tensor:
    """The hand-derived gradient of :func:`spectral_norm_apply` w.r.t. ``weight``.

    ``s G + (g_sigma - [sigma > c] c <G, W> / sigma^2) u v^T`` with ``s = 1 / max(1, sigma/c)``
    (REFERENCE.md 4.3, plus the term of a gradient flowing into ``sigma``). Written in
    differentiable operations: it is what double backward differentiates.
    """
    od = opmath_dtype(weight.dtype)
    w, g = weight.to(od), grad_w_hat.to(od)
    u, v = u.detach().to(od), v.detach().to(od)
    sigma = torch.dot(u, torch.mv(w, v))
    s = 1.0 / torch.clamp(sigma / coeff, min=1.0)
    inner = (g * w).sum()
    k = grad_sigma.to(od) - torch.where(sigma > coeff, inner * s * s / coeff, 0.0)
    return (s * g + k * torch.outer(u, v)).to(weight.dtype)


# --------------------------------------------------------------------------------------------
# Convolutions: power iteration on the convolution operator (pure PyTorch)


def _conv_padding(weight: Tensor, padding: Any) -> tuple[int, int]:
    if padding is None:
        kh, kw = weight.shape[2:]
        if kh % 2 == 0 or kw % 2 == 0:
            raise ValueError(
                f"padding must be given for an even kernel size, weight has shape {tuple(weight.shape)}"
            )
        return (kh // 2, kw // 2)
    if isinstance(padding, numbers.Integral) and not isinstance(padding, bool):
        padding = (int(padding), int(padding))
    if (
        not isinstance(padding, (tuple, list))
        or len(padding) != 2
        or not all(isinstance(p, numbers.Integral) and not isinstance(p, bool) and p >= 0 for p in padding)
    ):
        raise ValueError(f"padding must be an int >= 0 or a pair of them, got {padding!r}")
    return (int(padding[0]), int(padding[1]))


def _check_conv_args(weight: Any, u: Any, v: Any, padding: Any) -> tuple[int, int]:
    _check_weight(weight, 4)
    pad = _conv_padding(weight, padding)
    _check_tensor(v, "v")
    if v.dim() != 3 or v.shape[0] != weight.shape[1]:
        raise ValueError(
            f"v must have shape [in={weight.shape[1]}, H, W] (an input feature map of weight "
            f"{tuple(weight.shape)}), got {tuple(v.shape)}"
        )
    out_h = v.shape[1] + 2 * pad[0] - weight.shape[2] + 1
    out_w = v.shape[2] + 2 * pad[1] - weight.shape[3] + 1
    if out_h < 1 or out_w < 1:
        raise ValueError(
            f"v's spatial size {tuple(v.shape[1:])} is too small for kernel {tuple(weight.shape[2:])} "
            f"with padding {pad}"
        )
    _check_vector(weight, v, "v", tuple(v.shape), "an input feature map")
    _check_vector(weight, u, "u", (weight.shape[0], out_h, out_w), "an output feature map")
    return pad


def _unit(x: Tensor, eps: float) -> Tensor:
    return x / torch.linalg.vector_norm(x).clamp_min(eps)


def spectral_norm_conv_power(
    weight: Tensor,
    u: Tensor,
    v: Tensor,
    n_iter: int = 1,
    eps: float = 1e-12,
    padding: int | tuple[int, int] | None = None,
) -> tuple[Tensor, Tensor]:
    """Power iteration on the operator ``x -> conv2d(x, weight, padding=padding)`` (stride 1).

    One round is ``v <- conv_transpose2d(u) / |.|`` (the adjoint), ``u <- conv2d(v) / |.|``, on
    single feature maps: ``v`` is ``[in, H, W]``, ``u`` is ``[out, H', W']`` with
    ``H' = H + 2 padding - kh + 1`` (``H`` for the default "same" padding ``k // 2``). The norm
    estimated is that of the convolution at this spatial size (with zero padding it grows
    slightly with the size, towards the maximum over frequencies of the kernel's symbol).
    Pure PyTorch; returns new tensors, no gradient.

    Example:
        >>> w = torch.randn(4, 3, 3, 3)
        >>> u, v = spectral_norm_conv_power(w, torch.randn(4, 5, 5), torch.randn(3, 5, 5), 50)
        >>> u.shape, v.shape
        (torch.Size([4, 5, 5]), torch.Size([3, 5, 5]))
    """
    pad = _check_conv_args(weight, u, v, padding)
    n_iter, eps = _check_n_iter(n_iter), _check_eps(eps)
    od = opmath_dtype(weight.dtype)
    with torch.no_grad():
        w = weight.detach().to(od)
        un, vn = u.detach().to(od)[None], v.detach().to(od)[None]
        for _ in range(n_iter):
            vn = _unit(F.conv_transpose2d(un, w, padding=pad), eps)
            un = _unit(F.conv2d(vn, w, padding=pad), eps)
        return un[0].to(u.dtype).clone(), vn[0].to(v.dtype).clone()


def spectral_norm_conv_apply(
    weight: Tensor,
    u: Tensor,
    v: Tensor,
    coeff: float,
    padding: int | tuple[int, int] | None = None,
) -> tuple[Tensor, Tensor]:
    """``(W / max(1, sigma / coeff), sigma)`` with ``sigma = <u, conv2d(v, W)>`` (u, v constants).

    The convolutional counterpart of :func:`spectral_norm_apply`; pure PyTorch, differentiable
    w.r.t. ``weight`` by autograd (the rank-one ``u v^T`` of the matrix case becomes the
    weight gradient of the convolution, ``d sigma / d W``).
    """
    pad = _check_conv_args(weight, u, v, padding)
    coeff = _check_coeff(coeff)
    od = opmath_dtype(weight.dtype)
    w = weight.to(od)
    sigma = (u.detach().to(od) * F.conv2d(v.detach().to(od)[None], w, padding=pad)[0]).sum()
    w_hat = w / torch.clamp(sigma / coeff, min=1.0)
    return w_hat.to(weight.dtype), sigma


# --------------------------------------------------------------------------------------------
# Registration of the native operators with torch.compile (fake) and autograd.

if _native.native_load_error() is None:

    @torch.library.register_fake("fastflow::spectral_norm_power")
    def _spectral_norm_power_fake(weight, u, v, n_iter, eps):
        return u.new_empty(u.shape), v.new_empty(v.shape)

    @torch.library.register_fake("fastflow::spectral_norm_apply")
    def _spectral_norm_apply_fake(weight, u, v, coeff):
        return weight.new_empty(weight.shape), weight.new_empty((), dtype=opmath_dtype(weight.dtype))

    @torch.library.register_fake("fastflow::spectral_norm_apply_backward")
    def _spectral_norm_apply_backward_fake(grad_w_hat, grad_sigma, weight, u, v, coeff):
        return weight.new_empty(weight.shape)

    # The Autograd kernels of spectral_norm_power (no gradient) and spectral_norm_apply (the
    # spectral_norm_apply_backward operator; under create_graph the same formula in
    # differentiable ATen operations) are registered in C++, csrc/cpu/spectral_norm.cpp: a
    # Python autograd kernel costs more per call than the operator on a 128 x 128 weight.
