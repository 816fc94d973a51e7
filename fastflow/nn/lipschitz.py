"""Lipschitz-constrained layers for residual flows: spectrally normalised linear and conv layers,
and the LipSwish activation.

:class:`SpectralNormLinear` and :class:`SpectralNormConv2d` use ``W_hat = W / max(1, sigma / c)``
in place of their weight, ``sigma`` the power-iteration estimate of the spectral norm (of the
matrix, or of the convolution operator at the input's spatial size), so that the layer is
``c``-Lipschitz once the estimate has converged. Composed with 1-Lipschitz activations (ELU,
:class:`LipSwish`) they make the residual branch ``g`` of an invertible residual block
contractive (``Lip(g) <= c^k`` for ``k`` layers).

Power iteration (REFERENCE.md 1.4, 1.5, 4.3):

* at construction, ``init_power_iter`` rounds (200, as Residual Flows) from random unit vectors,
  so that the estimate is already converged before the first step;
* in training mode, every forward runs ``n_power_iter`` rounds first (5, as i-ResNet) and keeps
  the refined ``u``, ``v`` (buffers: saved in the state dict, broadcast by DDP);
* in eval mode, none: the forward uses the stored ``u``, ``v`` and changes nothing;
* :meth:`~SpectralNormLinear.power_iteration` runs rounds on demand, up to a tolerance if asked,
  in any mode; with ``n_power_iter=0`` that is Residual Flows' scheme (the forward never
  updates; call :func:`update_spectral_norms` after each optimiser step and before evaluation).

Gradients treat ``u`` and ``v`` as constants (REFERENCE.md 4.3). A layer whose forward is called
many times per step in training mode (a fixed-point inverse) refines ``u``, ``v`` on every call;
set ``n_power_iter = 0`` or use eval mode around such calls if that is not wanted.

The power iteration converges from below: ``sigma`` is a lower bound of the true norm, so a
weight that changes faster than the iteration follows can exceed ``c`` slightly
(jhjacobsen/invertible-resnet#14: raise the iterations).

References:
    Behrmann, Grathwohl, Chen, Duvenaud, Jacobsen. "Invertible Residual Networks" (2019),
    https://arxiv.org/abs/1811.00995.
    Chen, Behrmann, Duvenaud, Jacobsen. "Residual Flows for Invertible Generative Modeling"
    (2019), https://arxiv.org/abs/1906.02735.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastflow.ops.spectral_norm import (
    spectral_norm_apply,
    spectral_norm_conv_apply,
    spectral_norm_conv_power,
    spectral_norm_power,
)
from fastflow._checks import int_at_least
from fastflow._checks import non_negative_float as _non_negative_float
from fastflow._checks import positive_float as _positive_float
from fastflow._checks import positive_int as _positive_int

__all__ = ["SpectralNormLinear", "SpectralNormConv2d", "LipSwish", "update_spectral_norms"]


def _random_unit(shape: tuple[int, ...], like: Tensor) -> Tensor:
    x = torch.randn(shape, device=like.device, dtype=like.dtype)
    return x / torch.linalg.vector_norm(x).clamp_min(1e-12)


# Whether a training-mode forward runs its power-iteration update. Off only while a residual
# block's compiled graph takes its branch's products by torch.func
# (fastflow.nn._branch_products.func_products): a second call of the branch at the same point
# must use the weights of the first and change no state. A module global, not a flag on each
# layer: torch.compile (2.13) loses a module attribute's restore made after a while_loop.
_power_updates = True


class _SpectralNormBase(nn.Module):
    """The power-iteration state (buffers ``u``, ``v``) and its update rules."""

    weight: Tensor
    u: Tensor
    v: Tensor

    def _init_spectral_norm(self, coeff: float, n_power_iter: int, init_power_iter: int, eps: float) -> None:
        self.coeff = _positive_float(coeff, "coeff")
        self.n_power_iter = int_at_least(n_power_iter, "n_power_iter", 0)
        self.init_power_iter = int_at_least(init_power_iter, "init_power_iter", 0)
        self.eps = _non_negative_float(eps, "eps")

    # Subclasses: one call of the operator pair on the current weight.
    def _power(self, u: Tensor, v: Tensor, n_iter: int) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _apply_norm(self, u: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _check_ready(self) -> None:
        pass

    @torch.no_grad()
    def power_iteration(self, n_iter: int, tol: float | None = None) -> int:
        """Runs up to ``n_iter`` rounds of the power iteration and stores the new ``u``, ``v``.

        Works in any mode (this is how eval-mode estimates are refreshed). With ``tol``, stops
        after the first round in which both vectors moved by at most ``tol`` (RMS of the change
        per entry, as Residual Flows' adaptive iteration; one host read per round).

        Returns:
            the rounds run.
        """
        n_iter = int_at_least(n_iter, "n_iter", 0)
        self._check_ready()
        if tol is None:
            if n_iter > 0:
                u, v = self._power(self.u, self.v, n_iter)
                self.u.copy_(u)
                self.v.copy_(v)
            return n_iter
        tol = _non_negative_float(tol, "tol")
        for done in range(1, n_iter + 1):
            u, v = self._power(self.u, self.v, 1)
            du = torch.linalg.vector_norm(u - self.u) / math.sqrt(u.numel())
            dv = torch.linalg.vector_norm(v - self.v) / math.sqrt(v.numel())
            self.u.copy_(u)
            self.v.copy_(v)
            if max(du.item(), dv.item()) <= tol:
                return done
        return n_iter

    def normalized_weight(self, update: bool | None = None) -> Tensor:
        """``W / max(1, sigma / coeff)``, differentiable w.r.t. the weight.

        Args:
            update: run ``n_power_iter`` rounds first and store ``u``, ``v``; default: in
                training mode.
        """
        return self._normalized(self.training if update is None else update)[0]

    @torch.no_grad()
    def spectral_norm(self) -> Tensor:
        """The current estimate ``sigma = u^T W v`` of the weight's norm (no update, no grad)."""
        self._check_ready()
        return self._apply_norm(self.u, self.v)[1]

    def _normalized(self, update: bool) -> tuple[Tensor, Tensor]:
        self._check_ready()
        if update and self.n_power_iter > 0 and _power_updates:
            u, v = self._power(self.u, self.v, self.n_power_iter)
            with torch.no_grad():
                self.u.copy_(u)
                self.v.copy_(v)
        else:
            # Copies: the backward keeps u, v, and a later power_iteration() updates the buffers
            # in place.
            u, v = self.u.clone(), self.v.clone()
        return self._apply_norm(u, v)


class SpectralNormLinear(_SpectralNormBase):
    r"""``y = x W_hat^T + b`` with ``W_hat = W / max(1, sigma / coeff)`` (spectral normalisation).

    ``sigma`` is the power-iteration estimate of ``W``'s largest singular value, kept in the
    buffers ``u`` (``[out_features]``) and ``v`` (``[in_features]``); see the module docstring
    for when they are updated. Runs on :func:`fastflow.ops.spectral_norm_power` and
    :func:`fastflow.ops.spectral_norm_apply` (native where built).

    Arguments:
        in_features, out_features: sizes of the map, as :class:`torch.nn.Linear`.
        bias: learn an additive bias.
        coeff: the bound ``c > 0`` on the layer's Lipschitz constant (a residual branch needs
            ``c < 1``; i-ResNet 0.9, Residual Flows 0.98).
        n_power_iter: rounds per training forward (0: the forward never updates ``u``, ``v``).
        init_power_iter: rounds at construction.
        eps: floor of the norms in the power iteration.

    Example:
        >>> layer = SpectralNormLinear(8, 16, coeff=0.9)
        >>> y = layer(torch.randn(4, 8))
        >>> y.shape, torch.linalg.matrix_norm(layer.normalized_weight(), ord=2).item() <= 0.9 + 1e-3
        (torch.Size([4, 16]), True)
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        coeff: float = 0.9,
        n_power_iter: int = 5,
        init_power_iter: int = 200,
        eps: float = 1e-12,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features = _positive_int(in_features, "in_features")
        self.out_features = _positive_int(out_features, "out_features")
        self._init_spectral_norm(coeff, n_power_iter, init_power_iter, eps)
        # The initialisation of torch.nn.Linear.
        ref = nn.Linear(self.in_features, self.out_features, bias=bias, device=device, dtype=dtype)
        self.weight = nn.Parameter(ref.weight.detach())
        self.bias = None if ref.bias is None else nn.Parameter(ref.bias.detach())
        self.register_buffer("u", _random_unit((self.out_features,), self.weight.detach()))
        self.register_buffer("v", _random_unit((self.in_features,), self.weight.detach()))
        self.power_iteration(self.init_power_iter)

    def _power(self, u: Tensor, v: Tensor, n_iter: int) -> tuple[Tensor, Tensor]:
        return spectral_norm_power(self.weight, u, v, n_iter, self.eps)

    def _apply_norm(self, u: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return spectral_norm_apply(self.weight, u, v, self.coeff)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1:] != (self.in_features,):
            raise ValueError(
                f"x must have {self.in_features} features in its last dimension, got shape {tuple(x.shape)}"
            )
        return F.linear(x, self.normalized_weight(), self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, coeff={self.coeff}, n_power_iter={self.n_power_iter}"
        )


class SpectralNormConv2d(_SpectralNormBase):
    r"""A stride-1 "same" convolution with a spectrally normalised kernel.

    ``kernel_size=1``: the kernel is a matrix ``[out, in]`` and is normalised as one (the
    operator norm of a 1x1 convolution is that of its matrix at any spatial size), on the native
    operators; ``u`` is ``[out_channels]``, ``v`` is ``[in_channels]``.

    Odd ``kernel_size > 1`` (3 in i-ResNet and Residual Flows): the power iteration runs on the
    convolution operator itself at the input's spatial size ``(H, W)``, ``conv2d`` and its
    adjoint ``conv_transpose2d`` (:func:`fastflow.ops.spectral_norm_conv_power`, pure PyTorch);
    ``u`` is ``[out_channels, H, W]``, ``v`` is ``[in_channels, H, W]``. They are sized by
    ``input_shape=(H, W)`` at construction, or else at the first forward (which then also runs
    the ``init_power_iter`` rounds; pass ``input_shape`` to keep that out of a compiled
    forward). The layer then accepts only that spatial size (the norm depends on it);
    :meth:`set_input_shape` re-sizes. A state dict restores the size it was saved with. Each
    round costs two convolutions of one feature map: for wide layers at large sizes, lower
    ``init_power_iter`` (or pass a tolerance to :meth:`power_iteration`).

    Arguments:
        in_channels, out_channels: as :class:`torch.nn.Conv2d`.
        kernel_size: odd int (square kernel, padding ``kernel_size // 2``, stride 1).
        bias, coeff, n_power_iter, init_power_iter, eps: as :class:`SpectralNormLinear`.
        input_shape: ``(H, W)`` of the inputs, for ``kernel_size > 1`` (checked and ignored for
            ``kernel_size=1``).

    Example:
        >>> conv = SpectralNormConv2d(3, 8, kernel_size=3, coeff=0.9, input_shape=(6, 6))
        >>> conv(torch.randn(2, 3, 6, 6)).shape
        torch.Size([2, 8, 6, 6])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        bias: bool = True,
        coeff: float = 0.9,
        n_power_iter: int = 5,
        init_power_iter: int = 200,
        input_shape: tuple[int, int] | None = None,
        eps: float = 1e-12,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_channels = _positive_int(in_channels, "in_channels")
        self.out_channels = _positive_int(out_channels, "out_channels")
        k = _positive_int(kernel_size, "kernel_size")
        if k % 2 == 0:
            raise ValueError(f"kernel_size must be odd (a 'same' convolution), got {k}")
        self.kernel_size = k
        self.padding = k // 2
        self._init_spectral_norm(coeff, n_power_iter, init_power_iter, eps)
        ref = nn.Conv2d(
            self.in_channels, self.out_channels, k, padding=self.padding, bias=bias,
            device=device, dtype=dtype,
        )
        self.weight = nn.Parameter(ref.weight.detach())
        self.bias = None if ref.bias is None else nn.Parameter(ref.bias.detach())
        w = self.weight.detach()
        if k == 1:
            self.register_buffer("u", _random_unit((self.out_channels,), w))
            self.register_buffer("v", _random_unit((self.in_channels,), w))
            self.power_iteration(self.init_power_iter)
        else:
            # Sized later (set_input_shape, the first forward or load_state_dict).
            self.register_buffer("u", w.new_empty(0))
            self.register_buffer("v", w.new_empty(0))
        if input_shape is not None:
            self.set_input_shape(input_shape)

    @property
    def input_shape(self) -> tuple[int, int] | None:
        """``(H, W)`` the power iteration is sized for (``kernel_size > 1``), or None."""
        if self.kernel_size == 1 or self.v.dim() != 3:
            return None
        return (int(self.v.shape[1]), int(self.v.shape[2]))

    @torch.no_grad()
    def set_input_shape(self, input_shape: tuple[int, int]) -> None:
        """Sizes ``u``, ``v`` for inputs of spatial size ``(H, W)``: new random unit vectors
        refined by ``init_power_iter`` rounds. Checks the size and does nothing else for
        ``kernel_size=1``."""
        if (
            not isinstance(input_shape, (tuple, list, torch.Size))
            or len(input_shape) != 2
        ):
            raise ValueError(f"input_shape must be a pair (H, W), got {input_shape!r}")
        h = _positive_int(input_shape[0], "input_shape[0]")
        w = _positive_int(input_shape[1], "input_shape[1]")
        if self.kernel_size == 1:
            return  # the norm of a 1x1 convolution does not depend on the size
        like = self.weight.detach()
        self.u = _random_unit((self.out_channels, h, w), like)
        self.v = _random_unit((self.in_channels, h, w), like)
        self.power_iteration(self.init_power_iter)

    def _check_ready(self) -> None:
        if self.kernel_size > 1 and self.v.dim() != 3:
            raise RuntimeError(
                "SpectralNormConv2d: u, v are not sized yet; pass input_shape=(H, W), call "
                "set_input_shape or run a forward first"
            )

    def _matrix(self) -> Tensor:
        return self.weight.reshape(self.out_channels, self.in_channels)

    def _power(self, u: Tensor, v: Tensor, n_iter: int) -> tuple[Tensor, Tensor]:
        if self.kernel_size == 1:
            return spectral_norm_power(self._matrix(), u, v, n_iter, self.eps)
        return spectral_norm_conv_power(self.weight, u, v, n_iter, self.eps, self.padding)

    def _apply_norm(self, u: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if self.kernel_size == 1:
            w_hat, sigma = spectral_norm_apply(self._matrix(), u, v, self.coeff)
            return w_hat.reshape(self.weight.shape), sigma
        return spectral_norm_conv_apply(self.weight, u, v, self.coeff, self.padding)

    def prepare(self, x: Tensor) -> None:
        """Checks an input ``[B, C, H, W]`` and sizes the power iteration for its ``(H, W)`` on
        the first call (what :meth:`forward` does before convolving)."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"x must have shape [B, {self.in_channels}, H, W], got {tuple(x.shape)}"
            )
        if self.kernel_size > 1:
            size = (int(x.shape[2]), int(x.shape[3]))
            if self.v.dim() != 3:
                self.set_input_shape(size)
            elif size != self.input_shape:
                raise ValueError(
                    f"x has spatial size {size}, but the power iteration of this layer is sized "
                    f"for {self.input_shape} (the norm of a convolution depends on it); call "
                    "set_input_shape to re-size"
                )

    def forward(self, x: Tensor) -> Tensor:
        self.prepare(x)
        return F.conv2d(x, self.normalized_weight(), self.bias, padding=self.padding)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # u, v of a kernel_size > 1 layer take the size they were saved with.
        if self.kernel_size > 1:
            for name in ("u", "v"):
                saved = state_dict.get(prefix + name)
                if isinstance(saved, Tensor) and saved.shape != getattr(self, name).shape:
                    setattr(self, name, getattr(self, name).new_empty(saved.shape))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"bias={self.bias is not None}, coeff={self.coeff}, n_power_iter={self.n_power_iter}, "
            f"input_shape={self.input_shape}"
        )


class LipSwish(nn.Module):
    r"""LipSwish (Residual Flows): ``phi(z) = z sigmoid(beta z) / 1.1``, ``beta = softplus(beta_raw)``.

    A smooth 1-Lipschitz activation (``|phi'| <= 0.99985`` for every ``beta > 0``; REFERENCE.md
    1.5) with non-vanishing second derivative, which the log-det gradient of a residual flow
    needs (ReLU's would be zero). ``beta_raw`` is learned, initialised to ``beta_init_raw``
    (0.5, as Residual Flows).

    Example:
        >>> act = LipSwish()
        >>> act(torch.zeros(3))
        tensor([0., 0., 0.], grad_fn=<DivBackward0>)
    """

    def __init__(self, beta_init_raw: float = 0.5) -> None:
        super().__init__()
        if (
            isinstance(beta_init_raw, bool)
            or not isinstance(beta_init_raw, numbers.Real)
            or not math.isfinite(beta_init_raw)
        ):
            raise ValueError(f"beta_init_raw must be a finite number, got {beta_init_raw!r}")
        self.beta_raw = nn.Parameter(torch.full((1,), float(beta_init_raw)))

    @property
    def beta(self) -> Tensor:
        """``softplus(beta_raw)``."""
        return F.softplus(self.beta_raw)

    def forward(self, x: Tensor) -> Tensor:
        beta = F.softplus(self.beta_raw).to(x.dtype)
        return x * torch.sigmoid(beta * x) / 1.1


def update_spectral_norms(module: nn.Module, n_iter: int = 200, tol: float | None = 1e-3) -> None:
    """Refreshes every spectrally normalised layer inside ``module`` (Residual Flows' scheme).

    Runs :meth:`~SpectralNormLinear.power_iteration` ``(n_iter, tol)`` on each
    :class:`SpectralNormLinear` / :class:`SpectralNormConv2d` (``kernel_size > 1`` layers not
    sized yet are skipped). Call it after each optimiser step and before evaluation when the
    layers are built with ``n_power_iter=0``.
    """
    for m in module.modules():
        if isinstance(m, _SpectralNormBase):
            if isinstance(m, SpectralNormConv2d) and m.kernel_size > 1 and m.input_shape is None:
                continue
            m.power_iteration(n_iter, tol)
