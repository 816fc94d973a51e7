"""Glow's invertible 1x1 convolution: :class:`InvertibleConv1x1`.

A learned linear map of the channels applied at every pixel, ``y[:, :, h, w] = W x[:, :, h, w]``
(or ``y = W x`` for vectors ``[B, C]``), with ``log|det dy/dx| = H * W * log|det W|``.

``lu=True`` (default, as in rosinality/glow-pytorch) keeps ``W = P L (U + diag(sign * exp(log_s)))``
in factors, so the log-det is ``H * W * sum(log_s)`` and the inverse is two triangular solves;
it runs in the fused operator :func:`fastflow.ops.invconv_plu` (native where built).
``lu=False`` keeps a dense ``W`` (the active branch of openai/glow): its log-det comes from
``torch.linalg.slogdet`` in float64 and its inverse from a float64 inverse, kept for comparison.

Both start from a random rotation (Q of the QR decomposition of a Gaussian matrix), so the
layer starts volume-preserving, or from a given ``weight``. In eval mode the inverse weight is
cached and recomputed only when a parameter changes (an optimiser step, ``load_state_dict``,
``.to()``), which makes repeated sampling cost one GEMM per call.

A weight that is numerically singular in its dtype is reported, not inverted into ``inf``: a
``weight`` given to the constructor with a zero or underflowing pivot, and, when the inverse is
asked for, an ``|s| = exp(log_s)`` that underflows (or overflows) the parameters' dtype or an
inverse weight with non-finite entries, raise ``ValueError`` naming the channels
(:meth:`InvertibleConv1x1.check_invertible`). The forward pass does not check, so that a
training step stays free of host synchronisation.

References:
    Kingma, Dhariwal. "Glow: Generative Flow with Invertible 1x1 Convolutions" (2018),
    https://arxiv.org/abs/1807.03039.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from fastflow.flow import Transform
from fastflow.ops._common import pixels as _pixels
from fastflow.ops.invconv import invconv_plu, invconv_plu_inverse, plu_inverse_weight, plu_weight

__all__ = ["InvertibleConv1x1"]


def _apply_1x1(w: Tensor, x: Tensor) -> Tensor:
    # y[b, :, pixel] = w x[b, :, pixel], in x's dtype.
    w = w.to(x.dtype)
    if x.dim() == 2:
        return x @ w.t()
    return (w @ x.reshape(x.shape[0], x.shape[1], -1)).reshape(x.shape)


class InvertibleConv1x1(Transform):
    """Invertible 1x1 convolution of Glow, over a PLU decomposition or a dense weight.

    Arguments:
        num_channels: ``C``, the size of dimension 1 of the inputs (``[B, C]`` or
            ``[B, C, H, W]``).
        lu: keep ``W`` as ``P L U`` factors (fused native operator, log-det without a
            determinant); ``False`` keeps a dense ``W`` with a float64 ``slogdet``.
        weight: an invertible ``[C, C]`` matrix to start from; default a random rotation.

    Attributes (``lu=True``): ``lower`` and ``upper`` (``[C, C]`` parameters of which only the
    strict lower / upper triangle is used), ``log_s`` (``[C]`` parameter), and the buffers
    ``perm`` (int64 ``[C]``, ``P[i, perm[i]] = 1``) and ``sign`` (``[C]``). ``lu=False``:
    ``weight`` (``[C, C]`` parameter).

    Example:
        >>> layer = InvertibleConv1x1(4)
        >>> x = torch.randn(8, 4, 5, 5)
        >>> y, logdet = layer(x)
        >>> x2, logdet_inv = layer.inverse(y)
        >>> torch.allclose(x, x2, atol=1e-5), torch.allclose(logdet, -logdet_inv)
        (True, True)
    """

    def __init__(self, num_channels: int, lu: bool = True, weight: Tensor | None = None):
        super().__init__()
        if int(num_channels) != num_channels or num_channels < 1:
            raise ValueError(f"num_channels must be a positive integer, got {num_channels!r}")
        C = int(num_channels)
        self.num_channels = C
        self.lu = bool(lu)
        dtype = torch.get_default_dtype()
        if weight is None:
            w = torch.linalg.qr(torch.randn(C, C, dtype=torch.float64))[0]
        else:
            if not isinstance(weight, Tensor) or tuple(weight.shape) != (C, C):
                shape = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
                raise ValueError(f"weight must be a [{C}, {C}] tensor, got {shape}")
            w = weight.detach().to("cpu", torch.float64)
            dtype = weight.dtype if weight.is_floating_point() else dtype
        if self.lu:
            p, lower, upper = torch.linalg.lu(w)  # w = p lower upper
            s = upper.diagonal()
            if (s == 0).any():
                raise ValueError("weight is singular (a zero pivot in its LU decomposition)")
            _check_log_s(s.abs().log(), dtype, "weight")
            self.register_buffer("perm", p.argmax(dim=1))  # p[i, perm[i]] = 1
            self.register_buffer("sign", s.sign().to(dtype))
            self.lower = nn.Parameter(lower.tril(-1).to(dtype))
            self.upper = nn.Parameter(upper.triu(1).to(dtype))
            self.log_s = nn.Parameter(s.abs().log().to(dtype))
        else:
            if not torch.isfinite(torch.linalg.slogdet(w)[1]):
                raise ValueError("weight is singular (its determinant is zero)")
            self.weight = nn.Parameter(w.to(dtype))
        self._inverse_cache: tuple[tuple, Tensor] | None = None

    def extra_repr(self) -> str:
        return f"{self.num_channels}, lu={self.lu}"

    def _check(self, x: Tensor, name: str) -> None:
        if not isinstance(x, Tensor) or x.dim() < 2 or x.shape[1] != self.num_channels:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"{name} must have shape [B, {self.num_channels}] or [B, {self.num_channels}, H, W], "
                f"got {shape}"
            )
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
        if x.shape[0] == 0:
            raise ValueError(f"{name} has an empty batch (shape {tuple(x.shape)})")

    def _factors(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        return self.perm, self.lower, self.upper, self.sign, self.log_s

    def weight_matrix(self) -> Tensor:
        """The dense ``W`` (``[C, C]``), differentiable w.r.t. the parameters."""
        return plu_weight(*self._factors()) if self.lu else self.weight

    def check_invertible(self) -> None:
        """Raise ``ValueError`` if ``W`` is numerically singular in the parameters' dtype.

        PLU: some ``|s| = exp(log_s)`` underflows (below the dtype's smallest normal number, so
        ``1/|s|`` overflows) or overflows. Dense: ``det W`` is zero. Both: ``W``'s inverse has
        entries the dtype cannot hold. :meth:`inverse` runs these checks (outside
        ``torch.compile``) each time it forms the inverse; they cost one host synchronisation.
        """
        with torch.no_grad():
            self._checked_inverse_weight()

    def _checked_inverse_weight(self) -> Tensor:
        if self.lu:
            _check_log_s(self.log_s.detach(), self.log_s.dtype, "InvertibleConv1x1 weight")
        elif not torch.isfinite(torch.linalg.slogdet(self.weight.detach().double())[1]):
            raise ValueError("InvertibleConv1x1 weight is singular (its determinant is zero)")
        w_inv = self._inverse_weight()
        bad = ~torch.isfinite(w_inv.detach()).all(dim=1)
        if bad.any():
            raise ValueError(
                f"InvertibleConv1x1 weight is numerically singular in {w_inv.dtype}: rows "
                f"{bad.nonzero().flatten().tolist()} of its inverse are not finite"
            )
        return w_inv

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check(x, "x")
        if self.lu:
            return invconv_plu(x, *self._factors())
        w = self.weight
        logdet = torch.linalg.slogdet(w.double())[1].to(w.dtype) * _pixels(x)
        return _apply_1x1(w, x), logdet.expand(x.shape[0]).clone()

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check(z, "z")
        checked = not torch.compiler.is_compiling()
        params = list(self.parameters())
        # The cached weight carries no graph: use it only where no gradient to the parameters
        # can be asked for.
        # (not under torch.compile: the cache's key reads data pointers, a graph break; the
        # compiled graph forms the inverse weight itself)
        cacheable = checked and not self.training and not (
            torch.is_grad_enabled() and any(p.requires_grad for p in params)
        )
        if self.lu and not cacheable:
            if checked:  # the operator forms the inverse weight internally
                _check_log_s(self.log_s.detach(), self.log_s.dtype, "InvertibleConv1x1 weight")
            return invconv_plu_inverse(z, *self._factors())
        if self.lu:
            logdet = -self.log_s.sum() * _pixels(z)
        else:
            logdet = -torch.linalg.slogdet(self.weight.double())[1].to(self.weight.dtype) * _pixels(z)
        if cacheable:
            w_inv = self._cached_inverse()
        else:
            w_inv = self._checked_inverse_weight() if checked else self._inverse_weight()
        return _apply_1x1(w_inv, z), logdet.expand(z.shape[0]).clone()

    def _inverse_weight(self) -> Tensor:
        if self.lu:
            return plu_inverse_weight(*self._factors())
        # float64 inverse, as openai/glow (REFERENCE.md 4.2)
        return torch.linalg.inv(self.weight.double()).to(self.weight.dtype)

    def _cached_inverse(self) -> Tensor:
        # Keyed on every parameter's and buffer's version counter (bumped by in-place updates:
        # optimiser steps, load_state_dict) and storage (replaced by .to() / .cuda()).
        key = tuple(
            (t._version, t.data_ptr(), t.device, t.dtype)
            for t in list(self.parameters()) + list(self.buffers())
        )
        if self._inverse_cache is None or self._inverse_cache[0] != key:
            with torch.no_grad():
                if torch.compiler.is_compiling():
                    w_inv = self._inverse_weight()
                else:
                    w_inv = self._checked_inverse_weight()
                self._inverse_cache = (key, w_inv)
        return self._inverse_cache[1]


def _check_log_s(log_s: Tensor, dtype: torch.dtype, what: str) -> None:
    # |s| = exp(log_s) must be a normal number of the parameters' dtype: below the smallest one,
    # 1/|s| (a diagonal entry of W's inverse) overflows; above the largest, W itself does.
    info = torch.finfo(dtype)
    bad = (log_s < math.log(info.tiny)) | (log_s > math.log(info.max)) | log_s.isnan()
    if bad.any():
        channels = bad.nonzero().flatten().tolist()
        raise ValueError(
            f"{what} is numerically singular in {dtype}: |s| = exp(log_s) is out of range at "
            f"channels {channels} (log_s = {[round(float(v), 2) for v in log_s[bad][:8]]}); "
            "the inverse would not be finite"
        )
