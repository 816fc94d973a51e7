"""Coupling layers (NICE, Real NVP, Glow): :class:`AffineCoupling` and :class:`AdditiveCoupling`.

A coupling layer splits its input ``x`` into a conditioning part ``x_a`` (passed through
unchanged) and a transformed part ``x_b``; a conditioner network reads ``x_a`` (and the context,
if any) and returns the raw log-scale ``h`` and the shift ``t`` of ``x_b``, and
``y_b = g(x_b; h, t)`` is an elementwise invertible map. Everything after the conditioner runs in
the fused operator :func:`fastflow.ops.affine_coupling` (its inverse in
:func:`fastflow.ops.affine_coupling_inverse`), native where built.

Masks (which elements form ``x_a`` and ``x_b``); ``flip=True`` swaps the two parts:

=================  ======================================  ==================================
``mask``           vectors ``[B, D]``                      images ``[B, C, H, W]``
=================  ======================================  ==================================
``"half"``         ``x_a = x[:, :D//2]``, ``x_b`` the rest  the same split of the channels
``"alternate"``    ``x_a`` even features, ``x_b`` odd ones  even / odd channels
``"channel"``      (images only)                           ``x_a`` first ``C//2`` channels
``"checkerboard"`` (images only)                           ``x_a`` pixels with ``(h+w)`` even,
                                                           ``x_b`` those with ``(h+w)`` odd
=================  ======================================  ==================================

The conditioner is called with one tensor and returns one tensor:

* vectors: ``x_a`` of shape ``[B, D_a]``, with the context ``[B, K]`` concatenated as extra
  features, to ``[B, 2 * D_b]``;
* images, channel-wise masks: ``x_a`` ``[B, C_a, H, W]``, with the context broadcast over
  ``H, W`` as ``K`` extra channels, to ``[B, 2 * C_b, H, W]``;
* images, checkerboard: ``x`` with the transformed pixels zeroed, ``[B, C, H, W]`` (+ ``K``
  context channels), to ``[B, 2 * C, H, W]``, of which the transformed pixels are read (the
  masked convolution of Real NVP); they are gathered with a fixed index buffer.

The output holds the raw log-scale in its first half and the shift in its second half (along
dimension 1). :class:`AdditiveCoupling` has no scale: its conditioner returns the shift alone
(``[B, D_b]``, ``[B, C_b, H, W]`` or ``[B, C, H, W]``).

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
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fastflow.distributions import _event_shape
from fastflow.flow import Transform
from fastflow.ops.affine_coupling import affine_coupling, affine_coupling_inverse

__all__ = ["MASKS", "AffineCoupling", "AdditiveCoupling", "MLP", "ConvNet"]

#: The mask names understood by the coupling layers.
MASKS = ("half", "alternate", "channel", "checkerboard")


# --------------------------------------------------------------------------------------------
# Default conditioners


class MLP(nn.Sequential):
    """Fully connected conditioner: ``in -> hidden (-> hidden)* -> out`` with ReLUs.

    The last layer starts at zero (weights and bias), so a coupling layer built on it starts as
    the identity (for the ``"exp"`` and ``"additive"`` activations; ``"sigmoid"`` starts at the
    constant scale ``sigmoid(2)``).

    Arguments:
        in_features: input width.
        out_features: output width.
        hidden: width of the hidden layers.
        n_hidden_layers: number of hidden layers (0: a single linear layer).
        zero_init: zero the last layer.

    Example:
        >>> net = MLP(3, 8, hidden=32)
        >>> net(torch.randn(5, 3)).shape
        torch.Size([5, 8])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        hidden: int = 256,
        n_hidden_layers: int = 2,
        zero_init: bool = True,
    ):
        _check_width(hidden, n_hidden_layers)
        layers: list[nn.Module] = []
        width = in_features
        for _ in range(n_hidden_layers):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        last = nn.Linear(width, out_features)
        if zero_init:
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        layers.append(last)
        super().__init__(*layers)


class ConvNet(nn.Sequential):
    """Convolutional conditioner: ``conv3x3 -> ReLU (-> conv1x1 -> ReLU)* -> conv3x3``.

    With ``n_hidden_layers=2`` (default) this is Glow's network without its ActNorms:
    conv3x3 -> ReLU -> conv1x1 -> ReLU -> zero-initialised conv3x3. Padding keeps ``H, W``.

    Arguments:
        in_channels: input channels.
        out_channels: output channels.
        hidden: channels of the hidden layers.
        n_hidden_layers: number of hidden layers (the first a 3x3 convolution, the others 1x1;
            0: a single 3x3 convolution).
        zero_init: zero the last convolution.
        channels_last: run the convolutions on a channels-last copy of the input and return the
            output in the input's layout. ``None`` (default): on CPU only, where oneDNN's
            channels-last convolutions measured up to 1.5x faster forward+backward for Glow's
            conditioner (``python -m bench``, bench/RESULTS.md); other devices keep the
            input's layout.

    Example:
        >>> net = ConvNet(3, 6, hidden=16)
        >>> net(torch.randn(2, 3, 8, 8)).shape
        torch.Size([2, 6, 8, 8])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        hidden: int = 256,
        n_hidden_layers: int = 2,
        zero_init: bool = True,
        channels_last: bool | None = None,
    ):
        _check_width(hidden, n_hidden_layers)
        if channels_last is not None and not isinstance(channels_last, bool):
            raise ValueError(f"channels_last must be True, False or None, got {channels_last!r}")
        layers: list[nn.Module] = []
        width = in_channels
        for i in range(n_hidden_layers):
            k = 3 if i == 0 else 1
            layers += [nn.Conv2d(width, hidden, k, padding=k // 2), nn.ReLU()]
            width = hidden
        last = nn.Conv2d(width, out_channels, 3, padding=1)
        if zero_init:
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        layers.append(last)
        super().__init__(*layers)
        self.channels_last = channels_last

    def extra_repr(self) -> str:
        return "" if self.channels_last is None else f"channels_last={self.channels_last}"

    def forward(self, x: Tensor) -> Tensor:
        use = x.device.type == "cpu" if self.channels_last is None else self.channels_last
        if not use or x.dim() != 4:
            return super().forward(x)
        fmt = torch.channels_last if _is_channels_last(x) else torch.contiguous_format
        h = super().forward(x.contiguous(memory_format=torch.channels_last))
        return h.contiguous(memory_format=fmt)


def check_layer_input(module: nn.Module, x: Tensor, name: str) -> None:
    """Raises ``ValueError`` naming ``name`` when ``x`` cannot enter ``module``: not floating
    point, an empty batch, or (autocast off) a dtype other than the module's parameters' (the
    layer would otherwise fail deep inside with a message about its weights)."""
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} has an empty batch (shape {tuple(x.shape)})")
    param = next(module.parameters(), None)
    if (
        param is not None
        and x.dtype != param.dtype
        and not torch.is_autocast_enabled(x.device.type)
    ):
        raise ValueError(
            f"{name} must have the layer's dtype ({param.dtype}; convert the layer with "
            f".to(dtype) or use torch.autocast), got {x.dtype}"
        )


def _check_width(hidden: int, n_hidden_layers: int) -> None:
    if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
        raise ValueError(f"hidden must be a positive int, got {hidden!r}")
    if isinstance(n_hidden_layers, bool) or not isinstance(n_hidden_layers, int) or n_hidden_layers < 0:
        raise ValueError(f"n_hidden_layers must be a non-negative int, got {n_hidden_layers!r}")


# --------------------------------------------------------------------------------------------
# Partitions: which elements are conditioning and which are transformed


def _is_channels_last(x: Tensor) -> bool:
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


class _DimPartition(nn.Module):
    """Splits dimension 1 (features or channels) into two parts: "half" or "alternate".

    Part 0 is the first ``n // 2`` entries ("half") or the even ones ("alternate"), part 1 the
    rest; ``flip=False`` transforms part 1.
    """

    def __init__(self, n: int, mask: str, flip: bool):
        super().__init__()
        idx = torch.arange(n)
        if mask == "half":
            part0, part1 = idx[: n // 2], idx[n // 2 :]
        else:
            part0, part1 = idx[0::2], idx[1::2]
        cond, trans = (part1, part0) if flip else (part0, part1)
        self.n_cond, self.n_trans = len(cond), len(trans)
        # "half" takes views (narrow) and one cat; "alternate" gathers with fixed indices.
        self.contiguous_parts = mask == "half"
        self.cond_first = not flip
        self.register_buffer("cond_idx", cond, persistent=False)
        self.register_buffer("trans_idx", trans, persistent=False)
        self.register_buffer("unperm", torch.argsort(torch.cat([cond, trans])), persistent=False)

    def conditioning(self, x: Tensor) -> Tensor:
        if self.contiguous_parts:
            start = 0 if self.cond_first else self.n_trans
            return x.narrow(1, start, self.n_cond)
        return x.index_select(1, self.cond_idx)

    def transformed(self, x: Tensor) -> Tensor:
        if self.contiguous_parts:
            start = self.n_cond if self.cond_first else 0
            return x.narrow(1, start, self.n_trans)
        return x.index_select(1, self.trans_idx)

    def params(self, out: Tensor, k: int) -> list[Tensor]:
        """Cuts the conditioner output (``k`` blocks of ``n_trans`` along dim 1) into ``k`` parts."""
        return list(out.split(self.n_trans, dim=1))[:k]

    def merge(self, x: Tensor, y_b: Tensor) -> Tensor:
        x_a = self.conditioning(x)
        if self.contiguous_parts:
            return torch.cat([x_a, y_b] if self.cond_first else [y_b, x_a], dim=1)
        return torch.cat([x_a, y_b], dim=1).index_select(1, self.unperm)


class _CheckerboardPartition(nn.Module):
    """Splits the pixels of ``[B, C, H, W]`` by the parity of ``h + w``.

    Part 0 is the even-parity pixels, part 1 the odd ones; ``flip=False`` transforms part 1.
    The conditioner sees the whole image with the transformed pixels zeroed; the transformed
    pixels and their parameters are gathered into ``[B, C, N_b]`` with a fixed index.
    """

    def __init__(self, channels: int, height: int, width: int, flip: bool):
        super().__init__()
        parity = (torch.arange(height)[:, None] + torch.arange(width)[None, :]) % 2
        trans = parity == (0 if flip else 1)
        self.n_cond, self.n_trans = channels, channels  # channels seen / parametrised
        self.register_buffer(
            "cond_mask", (~trans).to(torch.get_default_dtype())[None, None], persistent=False
        )
        self.register_buffer("trans_idx", trans.flatten().nonzero().flatten(), persistent=False)

    def conditioning(self, x: Tensor) -> Tensor:
        return x * self.cond_mask.to(x.dtype)

    def transformed(self, x: Tensor) -> Tensor:
        return x.flatten(2).index_select(2, self.trans_idx)

    def params(self, out: Tensor, k: int) -> list[Tensor]:
        gathered = out.flatten(2).index_select(2, self.trans_idx)
        return list(gathered.split(self.n_trans, dim=1))[:k]

    def merge(self, x: Tensor, y_b: Tensor) -> Tensor:
        return x.flatten(2).index_copy(2, self.trans_idx, y_b).view(x.shape)


# --------------------------------------------------------------------------------------------
# The coupling layers


class _Coupling(Transform):
    """Shared machinery of the coupling layers: the partition, the conditioner, the context."""

    # number of tensors the conditioner returns per transformed element (log-scale, shift)
    _n_params = 2

    def __init__(
        self,
        features: int | Sequence[int],
        mask: str,
        flip: bool,
        conditioner: nn.Module | None,
        hidden: int,
        n_hidden_layers: int,
        context_features: int | None,
        activation: str,
        clamp: float,
    ):
        super().__init__()
        shape = _event_shape(features, "features")
        if len(shape) not in (1, 3):
            raise ValueError(
                f"features must be a number of features D or an image shape (C, H, W), got "
                f"{tuple(shape)}"
            )
        if mask not in MASKS:
            raise ValueError(f"mask must be one of {MASKS}, got {mask!r}")
        image = len(shape) == 3
        if context_features is not None and (
            isinstance(context_features, bool)
            or not isinstance(context_features, int)
            or context_features < 1
        ):
            raise ValueError(f"context_features must be a positive int or None, got {context_features!r}")
        clamp = float(clamp)
        if not clamp > 0:
            raise ValueError(f"clamp must be positive (math.inf for no clamp), got {clamp}")

        if mask == "checkerboard":
            if not image:
                raise ValueError(
                    "mask 'checkerboard' needs an image shape (C, H, W) for features, got "
                    f"{tuple(shape)}"
                )
            c, h, w = shape
            if h * w < 2:
                raise ValueError(f"mask 'checkerboard' needs at least 2 pixels, got H, W = {h}, {w}")
            self.partition: nn.Module = _CheckerboardPartition(c, h, w, bool(flip))
        else:
            if mask == "channel" and not image:
                raise ValueError(
                    "mask 'channel' needs an image shape (C, H, W) for features; use mask 'half' "
                    f"for vectors (got features {tuple(shape)})"
                )
            n = shape[0]
            if n < 2:
                what = "channels" if image else "features"
                raise ValueError(f"mask {mask!r} needs at least 2 {what}, got {n}")
            self.partition = _DimPartition(n, "alternate" if mask == "alternate" else "half", bool(flip))

        self.event_shape = shape
        self.mask = mask
        self.flip = bool(flip)
        self.context_features = context_features
        self.activation = activation
        self.clamp = clamp

        if conditioner is None:
            n_in = self.partition.n_cond + (context_features or 0)
            n_out = self._n_params * self.partition.n_trans
            if image:
                conditioner = ConvNet(n_in, n_out, hidden, n_hidden_layers)
            else:
                conditioner = MLP(n_in, n_out, hidden, n_hidden_layers)
        elif not isinstance(conditioner, nn.Module):
            raise TypeError(f"conditioner must be an nn.Module, got {type(conditioner).__name__}")
        self.conditioner = conditioner

    def extra_repr(self) -> str:
        parts = [
            f"event_shape={tuple(self.event_shape)}",
            f"mask={self.mask!r}",
            f"flip={self.flip}",
            f"activation={self.activation!r}",
        ]
        if self.activation == "exp":
            parts.append(f"clamp={self.clamp}")
        if self.context_features is not None:
            parts.append(f"context_features={self.context_features}")
        return ", ".join(parts)

    def _check(self, x: Tensor, name: str) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(x).__name__}")
        if x.dim() != len(self.event_shape) + 1 or x.shape[1:] != self.event_shape:
            raise ValueError(
                f"{name} must have shape [batch, {', '.join(map(str, self.event_shape))}], "
                f"got {tuple(x.shape)}"
            )
        check_layer_input(self, x, name)

    def _conditioner_input(self, x: Tensor, context: Tensor | None) -> Tensor:
        x_a = self.partition.conditioning(x)
        if self.context_features is None:
            if context is not None:
                raise ValueError(
                    "context was given but this coupling was built with context_features=None"
                )
            return x_a
        if context is None:
            raise ValueError(
                f"context is required: this coupling was built with "
                f"context_features={self.context_features}"
            )
        if not isinstance(context, Tensor) or context.shape != (x.shape[0], self.context_features):
            got = tuple(context.shape) if isinstance(context, Tensor) else type(context).__name__
            raise ValueError(
                f"context must have shape [batch, context_features] = "
                f"[{x.shape[0]}, {self.context_features}], got {got}"
            )
        context = context.to(x_a.dtype)
        if x.dim() == 4:
            context = context[:, :, None, None].expand(-1, -1, x.shape[2], x.shape[3])
        return torch.cat([x_a, context], dim=1)

    def _params(self, x: Tensor, context: Tensor | None) -> list[Tensor]:
        out = self.conditioner(self._conditioner_input(x, context))
        expected = self._n_params * self.partition.n_trans
        if not isinstance(out, Tensor) or out.dim() != x.dim() or out.shape[0] != x.shape[0] or out.shape[1] != expected or out.shape[2:] != x.shape[2:]:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(
                f"the conditioner's output must have shape "
                f"{(x.shape[0], expected, *x.shape[2:])} ({self._n_params} x the transformed "
                f"part's size along dimension 1), got {got}"
            )
        return self.partition.params(out, self._n_params)

    def _scale_and_shift(self, params: list[Tensor]) -> tuple[Tensor | None, Tensor]:
        log_scale, shift = params
        return log_scale, shift

    def _couple(self, x: Tensor, context: Tensor | None, inverse: bool) -> tuple[Tensor, Tensor]:
        log_scale, shift = self._scale_and_shift(self._params(x, context))
        x_b = self.partition.transformed(x)
        # Under autocast the conditioner runs in half/bf16 while x stays in its own dtype: the
        # coupling itself (and its log-det) is computed in x's dtype.
        if shift.dtype != x_b.dtype:
            shift = shift.to(x_b.dtype)
        if log_scale is not None and log_scale.dtype != x_b.dtype:
            log_scale = log_scale.to(x_b.dtype)
        op = affine_coupling_inverse if inverse else affine_coupling
        y_b, logdet = op(x_b, log_scale, shift, activation=self.activation, clamp=self.clamp)
        y = self.partition.merge(x, y_b)
        if _is_channels_last(x):
            y = y.contiguous(memory_format=torch.channels_last)
        return y, logdet

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(y, log|det dy/dx|)``; ``y`` has ``x``'s shape and memory format."""
        self._check(x, "x")
        return self._couple(x, context, inverse=False)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(x, log|det dx/dz|)``, the exact inverse of :meth:`forward`."""
        self._check(z, "z")
        return self._couple(z, context, inverse=True)


class AffineCoupling(_Coupling):
    r"""Affine coupling layer (Real NVP; Glow with ``activation="sigmoid"``).

    ``y_a = x_a`` and, with ``(h, t) = NN(x_a [, context])``:

    * ``activation="exp"`` (Real NVP): ``y_b = x_b * exp(s) + t`` with the soft clamp
      ``s = clamp * tanh(h / clamp)`` (``clamp=math.inf``: ``s = h``); log-det ``sum s``;
    * ``activation="sigmoid"`` (Glow): ``y_b = (x_b + t) * sigmoid(h + 2)``; log-det
      ``sum log sigmoid(h + 2)``.

    Dinh, Sohl-Dickstein, Bengio. "Density estimation using Real NVP" (2016),
    https://arxiv.org/abs/1605.08803; Kingma, Dhariwal. "Glow: Generative Flow with Invertible
    1x1 Convolutions" (2018), https://arxiv.org/abs/1807.03039.

    Arguments:
        features: the number of features ``D`` for inputs ``[B, D]``, or the image shape
            ``(C, H, W)`` for inputs ``[B, C, H, W]`` (contiguous or channels-last).
        mask: ``"half"``, ``"alternate"``, ``"channel"`` or ``"checkerboard"`` (module
            docstring).
        flip: transform the other part (part 0 instead of part 1).
        conditioner: any ``nn.Module`` from the conditioning input to ``2x`` the transformed
            part's size along dimension 1 (raw log-scale first, then shift; module docstring).
            None: an :class:`MLP` (vectors) or :class:`ConvNet` (images) with a zero last layer.
        hidden: width (units or channels) of the default conditioner.
        n_hidden_layers: hidden layers of the default conditioner.
        context_features: size ``K`` of a context ``[B, K]`` fed to the conditioner (None: no
            context).
        activation: ``"exp"`` or ``"sigmoid"``.
        clamp: soft clamp of the ``"exp"`` activation (``math.inf`` for none).

    Example:
        >>> layer = AffineCoupling(4, mask="alternate", hidden=32)
        >>> x = torch.randn(8, 4)
        >>> y, logdet = layer(x)
        >>> x2, logdet_inv = layer.inverse(y)
        >>> y.shape, logdet.shape, torch.allclose(x, x2)
        (torch.Size([8, 4]), torch.Size([8]), True)
        >>> image_layer = AffineCoupling((3, 8, 8), mask="checkerboard", hidden=16)
        >>> image_layer(torch.randn(2, 3, 8, 8))[0].shape
        torch.Size([2, 3, 8, 8])
    """

    def __init__(
        self,
        features: int | Sequence[int],
        mask: str = "half",
        flip: bool = False,
        conditioner: nn.Module | None = None,
        hidden: int = 256,
        n_hidden_layers: int = 2,
        context_features: int | None = None,
        activation: str = "exp",
        clamp: float = 2.0,
    ):
        if activation not in ("exp", "sigmoid"):
            raise ValueError(
                f"activation must be 'exp' or 'sigmoid' for AffineCoupling (AdditiveCoupling "
                f"for 'additive'), got {activation!r}"
            )
        super().__init__(
            features, mask, flip, conditioner, hidden, n_hidden_layers, context_features,
            activation, clamp,
        )


class AdditiveCoupling(_Coupling):
    r"""Additive coupling layer (NICE): ``y_a = x_a``, ``y_b = x_b + t(x_a)``; log-det 0.

    Dinh, Krueger, Bengio. "NICE: Non-linear Independent Components Estimation" (2014),
    https://arxiv.org/abs/1410.8516.

    Arguments:
        features, mask, flip, hidden, n_hidden_layers, context_features: as in
            :class:`AffineCoupling`.
        conditioner: any ``nn.Module`` from the conditioning input to the shift, of the
            transformed part's size along dimension 1 (there is no scale).

    Example:
        >>> layer = AdditiveCoupling(6, hidden=32)
        >>> y, logdet = layer(torch.randn(5, 6))
        >>> logdet.tolist()
        [0.0, 0.0, 0.0, 0.0, 0.0]
    """

    _n_params = 1

    def __init__(
        self,
        features: int | Sequence[int],
        mask: str = "half",
        flip: bool = False,
        conditioner: nn.Module | None = None,
        hidden: int = 256,
        n_hidden_layers: int = 2,
        context_features: int | None = None,
    ):
        super().__init__(
            features, mask, flip, conditioner, hidden, n_hidden_layers, context_features,
            "additive", math.inf,
        )

    def _scale_and_shift(self, params: list[Tensor]) -> tuple[Tensor | None, Tensor]:
        (shift,) = params
        return None, shift
