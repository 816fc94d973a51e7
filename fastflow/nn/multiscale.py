"""Multi-scale pieces of Glow: :class:`Squeeze`, :class:`ZeroConv2d` and :class:`SplitPrior`.

A multi-scale model (Glow, multi-scale Real NVP) trades space for channels with a squeeze
(``[B, C, H, W] -> [B, 4C, H/2, W/2]``) and, after each level but the last, factors out half of
the channels ``z = [z1, z2]``: ``z2`` leaves the flow and is scored by a learned conditional
Gaussian prior ``p(z2 | z1) = N(mu(z1), exp(log_std(z1))^2)`` (:class:`SplitPrior`), while ``z1``
goes on to the next level. The model puts the factored-out parts back in place, so its forward
returns one latent of the input's shape (DESIGN.md, "Points the contract settles").

References:
    Dinh, Sohl-Dickstein, Bengio. "Density estimation using Real NVP" (2016),
    https://arxiv.org/abs/1605.08803 (squeeze, factoring out; section 3.6).
    Kingma, Dhariwal. "Glow: Generative Flow with Invertible 1x1 Convolutions" (2018),
    https://arxiv.org/abs/1807.03039 (learned split prior, zero-initialised convolution;
    code: openai/glow, ``squeeze2d``, ``split2d``, ``conv2d_zeros``).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastflow.distributions import _check_temperature, _wide
from fastflow.flow import Transform
from fastflow._checks import positive_int as _positive_int

__all__ = ["Squeeze", "ZeroConv2d", "SplitPrior"]

_LOG_2PI = math.log(2.0 * math.pi)


def _check_image(x: Tensor, name: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must have shape [batch, C, H, W], got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")


class Squeeze(Transform):
    r"""Space-to-depth: ``[B, C, H, W] -> [B, C * f^2, H / f, W / f]``; log-det 0.

    Each ``f x f`` block of pixels becomes ``f^2`` channels, in the order of
    :class:`torch.nn.PixelUnshuffle`: output channel ``c * f^2 + i * f + j`` holds
    ``x[:, c, i::f, j::f]`` (the ``f^2`` sub-images of one input channel are adjacent, as in
    rosinality/glow-pytorch; openai/glow puts the input channel last). The inverse is
    depth-to-space (:class:`torch.nn.PixelShuffle`). A permutation of the elements: the log-det
    is zero (float32 or wider).

    Arguments:
        factor: the block size ``f`` (Glow and Real NVP: 2).

    Example:
        >>> squeeze = Squeeze()
        >>> x = torch.randn(2, 3, 8, 8)
        >>> z, logdet = squeeze(x)
        >>> z.shape, logdet.tolist()
        (torch.Size([2, 12, 4, 4]), [0.0, 0.0])
        >>> torch.equal(squeeze.inverse(z)[0], x)
        True
    """

    def __init__(self, factor: int = 2):
        super().__init__()
        self.factor = _positive_int(factor, "factor")

    def extra_repr(self) -> str:
        return f"factor={self.factor}"

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(z, 0)`` with ``z`` of shape ``[B, C * f^2, H / f, W / f]``."""
        _check_image(x, "x")
        f = self.factor
        h, w = x.shape[2], x.shape[3]
        if h % f or w % f:
            raise ValueError(
                f"x's height H and width W must be divisible by factor={f}, got H, W = {h}, {w} "
                f"(x of shape {tuple(x.shape)})"
            )
        z = F.pixel_unshuffle(x, f) if f > 1 else x
        return z, x.new_zeros(x.shape[0], dtype=_wide(x.dtype))

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(x, 0)`` with ``x`` of shape ``[B, C / f^2, H * f, W * f]``."""
        _check_image(z, "z")
        f = self.factor
        if z.shape[1] % (f * f):
            raise ValueError(
                f"z's channels C must be divisible by factor^2 = {f * f}, got C = {z.shape[1]} "
                f"(z of shape {tuple(z.shape)})"
            )
        x = F.pixel_shuffle(z, f) if f > 1 else z
        return x, z.new_zeros(z.shape[0], dtype=_wide(z.dtype))


class ZeroConv2d(nn.Module):
    r"""Glow's zero-initialised convolution: ``conv(x) * exp(logscale_factor * logs)``.

    A ``kernel_size`` convolution (zero padding keeps ``H, W``) whose weight and bias start at
    zero, its output scaled per channel by ``exp(logscale_factor * logs)`` with ``logs`` a
    parameter of shape ``[out_channels]`` that starts at zero. It outputs zeros at
    initialisation, so a coupling's last layer or a split prior built on it starts as the
    identity or the standard normal; the scale lets the output grow fast once training starts.
    (openai/glow ``conv2d_zeros``; rosinality/glow-pytorch pads with ones instead of zeros.)

    Arguments:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: odd kernel size (Glow: 3).
        logscale_factor: the factor of ``logs`` (Glow: 3).

    Example:
        >>> conv = ZeroConv2d(4, 6)
        >>> conv(torch.randn(2, 4, 5, 5)).abs().max().item()
        0.0
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        logscale_factor: float = 3.0,
    ):
        super().__init__()
        in_channels = _positive_int(in_channels, "in_channels")
        out_channels = _positive_int(out_channels, "out_channels")
        kernel_size = _positive_int(kernel_size, "kernel_size")
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (to keep H and W), got {kernel_size}")
        if isinstance(logscale_factor, bool) or not isinstance(logscale_factor, numbers.Real):
            raise ValueError(f"logscale_factor must be a number, got {logscale_factor!r}")
        self.logscale_factor = float(logscale_factor)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        self.logs = nn.Parameter(torch.zeros(out_channels))

    def extra_repr(self) -> str:
        return f"logscale_factor={self.logscale_factor}"

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)
        scale = torch.exp(self.logs * self.logscale_factor).to(out.dtype)
        return out * scale.view(1, -1, 1, 1)


class SplitPrior(nn.Module):
    r"""Glow's learned prior of a factored-out half: ``p(z2 | z1) = N(mu, exp(log_std)^2)``.

    ``(mu, log_std) = ZeroConv2d(z1)`` (the first ``out_channels`` output channels are ``mu``, the
    rest ``log_std``, the split of rosinality/glow-pytorch; openai/glow interleaves them). At
    initialisation the prior is the standard normal. ``temperature`` multiplies the standard
    deviation when sampling (DESIGN.md: it scales every prior, split priors included).

    Kingma, Dhariwal. "Glow: Generative Flow with Invertible 1x1 Convolutions" (2018),
    https://arxiv.org/abs/1807.03039.

    Arguments:
        channels: channels of ``z1``, the part kept (the conditioning input).
        out_channels: channels of ``z2``, the part factored out (default: ``channels``, Glow's
            even split).
        kernel_size, logscale_factor: of the :class:`ZeroConv2d`.

    Example:
        >>> prior = SplitPrior(6)
        >>> z1, z2 = torch.randn(4, 12, 8, 8).chunk(2, dim=1)
        >>> prior.log_prob(z2, z1).shape
        torch.Size([4])
        >>> prior.sample(z1, temperature=0.7).shape
        torch.Size([4, 6, 8, 8])
    """

    def __init__(
        self,
        channels: int,
        out_channels: int | None = None,
        kernel_size: int = 3,
        logscale_factor: float = 3.0,
    ):
        super().__init__()
        self.channels = _positive_int(channels, "channels")
        self.out_channels = (
            self.channels if out_channels is None else _positive_int(out_channels, "out_channels")
        )
        self.conv = ZeroConv2d(self.channels, 2 * self.out_channels, kernel_size, logscale_factor)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, out_channels={self.out_channels}"

    def _check_z1(self, z1: Tensor) -> None:
        _check_image(z1, "z1")
        if z1.shape[1] != self.channels:
            raise ValueError(
                f"z1 must have channels={self.channels} channels ([batch, {self.channels}, H, W]), "
                f"got {tuple(z1.shape)}"
            )

    def params(self, z1: Tensor) -> tuple[Tensor, Tensor]:
        """``(mu, log_std)`` of ``z2`` given ``z1``, each ``[B, out_channels, H, W]``."""
        self._check_z1(z1)
        h = self.conv(z1)
        return h[:, : self.out_channels], h[:, self.out_channels :]

    def log_prob(self, z2: Tensor, z1: Tensor) -> Tensor:
        """``log p(z2 | z1)`` summed over each sample, shape ``[B]``, float32 or wider."""
        mu, log_std = self.params(z1)
        _check_image(z2, "z2")
        expected = (z1.shape[0], self.out_channels, z1.shape[2], z1.shape[3])
        if tuple(z2.shape) != expected:
            raise ValueError(
                f"z2 must have shape [batch, out_channels, H, W] = {expected} (z1's batch and "
                f"size), got {tuple(z2.shape)}"
            )
        dtype = _wide(torch.promote_types(z2.dtype, mu.dtype))
        mu, log_std = mu.to(dtype), log_std.to(dtype)
        u = (z2.to(dtype) - mu) * torch.exp(-log_std)
        per_elem = -0.5 * u.square() - log_std - 0.5 * _LOG_2PI
        return per_elem.flatten(1).sum(1)

    def sample(
        self,
        z1: Tensor,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """``z2 = mu + temperature * exp(log_std) * eps``, ``eps ~ N(0, I)``, given ``z1``."""
        temperature = _check_temperature(temperature)
        mu, log_std = self.params(z1)
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        return mu + (temperature * torch.exp(log_std)) * eps
