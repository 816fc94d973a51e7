"""Image utilities for density models: bit reduction, dequantisation, logit pre-processing and
bits per dimension.

A flow models a continuous density; images are integers. The usual pipeline (Real NVP, Glow):
reduce the bit depth (:func:`reduce_bits`), add uniform noise inside each bin and scale to
``[0, 1)`` (:func:`dequantize`), optionally map to the real line (:class:`Logit`, a Transform
with its log-det), fit, and report :func:`bits_per_dim`, which accounts for the bin width.

The number of levels is ``2**n_bits`` by default; ``n_bins`` (keyword-only, in
:func:`dequantize` and :func:`bits_per_dim`) gives any other count, e.g. the 17 levels (0..16)
of scikit-learn's 8x8 digits (:func:`fastflow.data.load_digits`).

References:
    Dinh, Sohl-Dickstein, Bengio. "Density estimation using Real NVP" (2016),
    https://arxiv.org/abs/1605.08803 (logit pre-processing).
    Kingma, Dhariwal. "Glow: Generative Flow with Invertible 1x1 Convolutions" (2018),
    https://arxiv.org/abs/1807.03039 (n-bit images, dequantisation).
    Theis, van den Oord, Bethge. "A note on the evaluation of generative models" (2015),
    https://arxiv.org/abs/1511.01844 (uniform dequantisation bounds the discrete likelihood).
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from fastflow.flow import Transform

__all__ = ["reduce_bits", "dequantize", "bits_per_dim", "Logit"]


def _check_bits(n_bits: int) -> int:
    if isinstance(n_bits, bool) or not isinstance(n_bits, int) or not 1 <= n_bits <= 8:
        raise ValueError(f"n_bits must be an int from 1 to 8, got {n_bits!r}")
    return n_bits


def _levels(n_bits: int, n_bins: int | None) -> int:
    """The number of levels: ``n_bins`` when given (then ``n_bits`` must be left at 8), else
    ``2**n_bits``."""
    _check_bits(n_bits)
    if n_bins is None:
        return 2**n_bits
    if isinstance(n_bins, bool) or not isinstance(n_bins, numbers.Integral) or n_bins < 2:
        raise ValueError(f"n_bins must be an int >= 2, got {n_bins!r}")
    if n_bits != 8:
        raise ValueError(
            f"give either n_bits or n_bins, not both (got n_bits={n_bits!r}, n_bins={n_bins!r}): "
            "n_bins sets the number of levels itself"
        )
    return int(n_bins)


def reduce_bits(x: Tensor, n_bits: int) -> Tensor:
    """8-bit integer pixels (0..255) to ``n_bits`` integer levels (0..2**n_bits - 1).

    Example:
        >>> reduce_bits(torch.tensor([0, 31, 32, 255]), 3).tolist()
        [0, 0, 1, 7]
    """
    _check_bits(n_bits)
    if x.is_floating_point() or x.dtype == torch.bool:
        raise ValueError(f"x must hold integer pixel values 0..255, got dtype {x.dtype}")
    if x.numel() and (x.min() < 0 or x.max() > 255):
        raise ValueError("x must hold integer pixel values 0..255")
    return torch.div(x, 2 ** (8 - n_bits), rounding_mode="floor")


def dequantize(
    x: Tensor,
    n_bits: int = 8,
    generator: torch.Generator | None = None,
    dtype=torch.float32,
    *,
    n_bins: int | None = None,
) -> Tensor:
    """Integer levels ``0..K - 1`` to ``[0, 1)``: ``(x + u) / K``, ``u ~ U(0, 1)``.

    ``K = 2**n_bits`` levels, or ``K = n_bins`` when ``n_bins`` is given (any int >= 2, e.g. 17
    for the digits of :func:`fastflow.data.load_digits`; ``n_bits`` must then be left at its
    default). The density of the result, times the bin volume ``K**(-D)``, lower-bounds the
    probability of the integer image (Theis et al.); :func:`bits_per_dim` applies that factor
    (give it the same ``n_bits`` or ``n_bins``).

    Example:
        >>> x = dequantize(torch.tensor([0, 8, 16]), n_bins=17)
        >>> torch.equal(torch.floor(x * 17).long(), torch.tensor([0, 8, 16]))
        True
    """
    levels = _levels(n_bits, n_bins)
    if x.is_floating_point() or x.dtype == torch.bool:
        raise ValueError(f"x must hold integer levels, got dtype {x.dtype}")
    if x.numel() and (x.min() < 0 or x.max() >= levels):
        which = f"n_bins={n_bins}" if n_bins is not None else f"n_bits={n_bits}"
        raise ValueError(f"x must hold integer levels 0..{levels - 1} for {which}")
    u = torch.rand(x.shape, generator=generator, dtype=dtype, device=x.device)
    return (x.to(dtype) + u) / levels


def bits_per_dim(
    log_prob: Tensor, num_dims: int, n_bits: int = 8, *, n_bins: int | None = None
) -> Tensor:
    """Bits per dimension of integer images from the log-density of their dequantised ``[0, 1)``
    versions: ``-(log_prob - D * log K) / (D * log 2)``, per sample.

    ``K`` is the number of levels: ``2**n_bits``, or ``n_bins`` when it is given (any int >= 2;
    ``n_bits`` must then be left at its default), as in :func:`dequantize`. ``log_prob`` must be
    the density of data in ``[0, 1)^D`` (compose :class:`Logit` or any other pre-processing into
    the flow so its log-det is included).
    """
    if isinstance(num_dims, bool) or not isinstance(num_dims, int) or num_dims < 1:
        raise ValueError(f"num_dims must be a positive int, got {num_dims!r}")
    levels = _levels(n_bits, n_bins)
    return -(log_prob - num_dims * math.log(levels)) / (num_dims * math.log(2.0))


class Logit(Transform):
    """Logit pre-processing ``y = logit(alpha + (1 - 2 alpha) x)`` for data in ``[0, 1]``.

    The squeeze into ``[alpha, 1 - alpha]`` keeps the logit finite at 0 and 1. Real NVP writes
    ``alpha + (1 - alpha) x``; the symmetric form (as in Residual Flows' code) keeps the map
    centred, so ``x = 0.5`` goes to 0. Log-det per sample:
    ``sum log(1 - 2 alpha) - log p - log(1 - p)`` with ``p = alpha + (1 - 2 alpha) x``.

    Arguments:
        alpha: the margin, ``0 <= alpha < 0.5`` (Real NVP CIFAR: 0.05; FFJORD: 1e-6).

    Example:
        >>> layer = Logit(alpha=0.05)
        >>> y, logdet = layer(torch.rand(4, 3, 8, 8))
        >>> x, logdet_inv = layer.inverse(y)
    """

    def __init__(self, alpha: float = 0.05):
        super().__init__()
        if not 0 <= float(alpha) < 0.5:
            raise ValueError(f"alpha must be in [0, 0.5), got {alpha!r}")
        self.alpha = float(alpha)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"

    def _logdet(self, p: Tensor) -> Tensor:
        wide = torch.promote_types(p.dtype, torch.float32)
        pw = p.to(wide)
        per = math.log1p(-2 * self.alpha) - torch.log(pw) - torch.log1p(-pw)
        return per.reshape(p.shape[0], -1).sum(1)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if x.dim() < 2:
            raise ValueError(f"x must have a batch dimension, got shape {tuple(x.shape)}")
        p = self.alpha + (1 - 2 * self.alpha) * x
        return torch.log(p) - torch.log1p(-p), self._logdet(p)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if z.dim() < 2:
            raise ValueError(f"z must have a batch dimension, got shape {tuple(z.shape)}")
        p = torch.sigmoid(z)
        return (p - self.alpha) / (1 - 2 * self.alpha), -self._logdet(p)
