"""Base distributions of a flow: a standard normal and a diagonal Gaussian over an event shape.

A base distribution is an ``nn.Module`` with

* ``log_prob(z, context=None) -> [B]``: the log-density of each sample of ``z`` (shape
  ``[B, *event_shape]``), computed in float32 or wider even when ``z`` is half/bf16;
* ``sample(n, temperature=1.0, context=None) -> [n, *event_shape]``: samples whose standard
  deviation is scaled by ``temperature`` ("std x T", Glow's reduced-temperature sampling; for a
  Gaussian this is the density ``p^(1/T^2)``, renormalised).

Their tensors are parameters or buffers, so ``.to(device)`` and ``.to(dtype)`` move them, and
samples come out on the module's device in the module's dtype. ``context`` is accepted for a
uniform interface with conditional bases and ignored by these unconditional ones.

References:
    Kingma, Dhariwal. "Glow: Generative Flow with Invertible 1x1 Convolutions" (2018),
    https://arxiv.org/abs/1807.03039 (temperature, section 3 and appendix).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["StandardNormal", "DiagonalGaussian"]

_LOG_2PI = math.log(2.0 * math.pi)


def _event_shape(event_shape: int | Sequence[int], name: str = "event_shape") -> torch.Size:
    """Normalises an int or a sequence of positive ints into a ``torch.Size``."""
    if isinstance(event_shape, bool):
        raise ValueError(f"{name} must be an int or a sequence of ints, got {event_shape!r}")
    if isinstance(event_shape, numbers.Integral):
        event_shape = (int(event_shape),)
    try:
        dims = tuple(event_shape)
    except TypeError:
        raise ValueError(f"{name} must be an int or a sequence of ints, got {event_shape!r}") from None
    if not dims or not all(
        isinstance(d, numbers.Integral) and not isinstance(d, bool) and d >= 1 for d in dims
    ):
        raise ValueError(f"{name} must be a non-empty sequence of positive ints, got {event_shape!r}")
    return torch.Size(int(d) for d in dims)


def _check_n(n: int) -> int:
    """Validates a number of samples."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        if isinstance(n, Tensor) and n.dim() == 0 and not n.is_floating_point():
            n = int(n)
        else:
            raise ValueError(f"n (number of samples) must be a positive int, got {n!r}")
    if n < 1:
        raise ValueError(f"n (number of samples) must be a positive int, got {n}")
    return int(n)


def _check_temperature(temperature: float) -> float:
    """Validates a sampling temperature (a finite multiplier >= 0 of the base std).

    0 is allowed: every latent is then its prior's mean, the mode Glow shows at T = 0.
    """
    if isinstance(temperature, Tensor):
        if temperature.numel() != 1:
            raise ValueError(
                f"temperature must be a number >= 0, got a tensor of shape "
                f"{tuple(temperature.shape)}"
            )
        temperature = temperature.item()
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
    temperature = float(temperature)
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be finite and >= 0, got {temperature}")
    return temperature


def _wide(dtype: torch.dtype) -> torch.dtype:
    """float32 for half/bf16 (and float32), else the dtype itself: where log-densities live."""
    return torch.promote_types(dtype, torch.float32)


class _Base(nn.Module):
    """Shared checks of the base distributions."""

    event_shape: torch.Size

    def _check_z(self, z: Tensor, name: str = "z") -> None:
        if not isinstance(z, Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(z).__name__}")
        if z.dim() != len(self.event_shape) + 1 or z.shape[1:] != self.event_shape:
            raise ValueError(
                f"{name} must have shape [batch, {', '.join(map(str, self.event_shape))}] "
                f"(event shape {tuple(self.event_shape)}), got {tuple(z.shape)}"
            )
        if not z.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {z.dtype}")

    def extra_repr(self) -> str:
        return f"event_shape={tuple(self.event_shape)}"


class StandardNormal(_Base):
    r"""Standard normal distribution :math:`\mathcal{N}(0, I)` over ``event_shape``.

    Has no parameters and no state in its ``state_dict``; a non-persistent zero-size buffer
    records the device and dtype that samples are drawn in (``.to()`` moves it).

    Arguments:
        event_shape: the shape of one sample, e.g. ``2`` or ``(3, 32, 32)``.

    Example:
        >>> base = StandardNormal(2)
        >>> z = base.sample(5, temperature=0.7)
        >>> z.shape, base.log_prob(z).shape
        (torch.Size([5, 2]), torch.Size([5]))
    """

    def __init__(self, event_shape: int | Sequence[int]):
        super().__init__()
        self.event_shape = _event_shape(event_shape)
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)

    def log_prob(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        """Log-density of each sample of ``z`` (shape ``[B, *event_shape]``), shape ``[B]``."""
        self._check_z(z)
        zf = z.to(_wide(z.dtype))
        d = self.event_shape.numel()
        return -0.5 * zf.reshape(zf.shape[0], -1).square().sum(1) - 0.5 * d * _LOG_2PI

    def sample(self, n: int, temperature: float = 1.0, context: Tensor | None = None) -> Tensor:
        """``n`` samples of shape ``[n, *event_shape]`` with standard deviation ``temperature``."""
        n = _check_n(n)
        temperature = _check_temperature(temperature)
        a = self._anchor
        eps = torch.randn((n, *self.event_shape), device=a.device, dtype=a.dtype)
        return eps if temperature == 1.0 else eps * temperature


class DiagonalGaussian(_Base):
    r"""Gaussian :math:`\mathcal{N}(\mu, \mathrm{diag}(\sigma^2))` over ``event_shape``.

    ``loc`` (:math:`\mu`) and ``log_scale`` (:math:`\log\sigma`) have the event shape and start
    at zero (a standard normal).

    Arguments:
        event_shape: the shape of one sample.
        learnable: if True, ``loc`` and ``log_scale`` are ``nn.Parameter``\ s, else buffers.

    Example:
        >>> base = DiagonalGaussian((2, 4, 4))
        >>> z = base.sample(3)
        >>> z.shape, base.log_prob(z).shape
        (torch.Size([3, 2, 4, 4]), torch.Size([3]))
    """

    def __init__(self, event_shape: int | Sequence[int], learnable: bool = True):
        super().__init__()
        self.event_shape = _event_shape(event_shape)
        loc = torch.zeros(self.event_shape)
        log_scale = torch.zeros(self.event_shape)
        if learnable:
            self.loc = nn.Parameter(loc)
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("loc", loc)
            self.register_buffer("log_scale", log_scale)

    def log_prob(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        """Log-density of each sample of ``z`` (shape ``[B, *event_shape]``), shape ``[B]``."""
        self._check_z(z)
        dtype = _wide(torch.promote_types(z.dtype, self.loc.dtype))
        loc, log_scale = self.loc.to(dtype), self.log_scale.to(dtype)
        u = (z.to(dtype) - loc) * torch.exp(-log_scale)
        per_elem = -0.5 * u.square() - log_scale
        d = self.event_shape.numel()
        return per_elem.reshape(z.shape[0], -1).sum(1) - 0.5 * d * _LOG_2PI

    def sample(self, n: int, temperature: float = 1.0, context: Tensor | None = None) -> Tensor:
        """``n`` samples ``loc + temperature * exp(log_scale) * eps``, shape ``[n, *event_shape]``."""
        n = _check_n(n)
        temperature = _check_temperature(temperature)
        eps = torch.randn((n, *self.event_shape), device=self.loc.device, dtype=self.loc.dtype)
        return self.loc + (temperature * torch.exp(self.log_scale)) * eps
