"""Ready-made flows: Real NVP for vectors and single-scale Real NVP for images.

Each builder is a :class:`~fastflow.flow.Flow` subclass, so a model is used like any flow
(``log_prob``, ``sample``, ``sample_and_log_prob``, ``forward``/``inverse``).

How :class:`RealNVP` splits a vector: coupling ``k`` uses the ``"half"`` mask, transforming the
second half ``x[:, D//2:]`` from the first when ``k`` is even and the first half ``x[:, :D//2]``
from the second when ``k`` is odd (``flip``), so every feature is transformed by every other
layer. The halves are taken as views (``narrow``) and joined with one ``cat``; no permutation
layer sits between the couplings.

Multi-scale models (Glow, multi-scale Real NVP) will reuse :func:`_image_couplings` for the
couplings of each scale, between squeeze and split layers.

References:
    Dinh, Sohl-Dickstein, Bengio. "Density estimation using Real NVP" (2016),
    https://arxiv.org/abs/1605.08803.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fastflow.distributions import _event_shape
from fastflow.flow import Flow
from fastflow.nn.coupling import AdditiveCoupling, AffineCoupling

__all__ = ["RealNVP", "RealNVPImage"]

_ACTIVATIONS = ("exp", "sigmoid", "additive")


def _check_count(n: int, name: str) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{name} must be a positive int, got {n!r}")
    return n


def _coupling(
    features: int | Sequence[int],
    mask: str,
    flip: bool,
    hidden: int,
    n_hidden_layers: int,
    context_features: int | None,
    activation: str,
    clamp: float,
) -> nn.Module:
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
    if activation == "additive":
        return AdditiveCoupling(
            features, mask=mask, flip=flip, hidden=hidden, n_hidden_layers=n_hidden_layers,
            context_features=context_features,
        )
    return AffineCoupling(
        features, mask=mask, flip=flip, hidden=hidden, n_hidden_layers=n_hidden_layers,
        context_features=context_features, activation=activation, clamp=clamp,
    )


def _image_couplings(
    shape: torch.Size,
    n_couplings: int,
    hidden: int,
    n_hidden_layers: int,
    context_features: int | None,
    activation: str,
    clamp: float,
) -> list[nn.Module]:
    """Couplings for images of one scale: pairs of checkerboard and channel masks, alternating.

    Coupling ``k`` flips when ``k`` is odd; pairs ``0, 1`` use the checkerboard, ``2, 3`` the
    channel mask, and so on (Real NVP's per-scale pattern, interleaved). With one channel only
    the checkerboard is used.
    """
    layers = []
    for k in range(n_couplings):
        mask = "checkerboard" if (k // 2) % 2 == 0 or shape[0] < 2 else "channel"
        layers.append(
            _coupling(shape, mask, k % 2 == 1, hidden, n_hidden_layers, context_features, activation, clamp)
        )
    return layers


class RealNVP(Flow):
    """Real NVP for vectors ``[B, D]``: affine couplings with alternating halves.

    Dinh, Sohl-Dickstein, Bengio. "Density estimation using Real NVP" (2016),
    https://arxiv.org/abs/1605.08803.

    Arguments:
        features: the number of features ``D`` (>= 2).
        n_couplings: coupling layers (the transformed half alternates; see the module docstring).
        hidden: width of each conditioner MLP.
        n_hidden_layers: hidden layers per conditioner (``D_a -> hidden x n -> 2 D_b``).
        activation: ``"exp"`` (Real NVP, soft-clamped), ``"sigmoid"`` (Glow) or ``"additive"``
            (NICE, volume preserving).
        clamp: soft clamp of the ``"exp"`` activation (``math.inf`` for none).
        context_features: size of a context ``[B, K]`` for a conditional flow (None: none).
        base: base distribution (None: standard normal over ``D``).

    Example:
        >>> flow = RealNVP(2, n_couplings=4, hidden=32)
        >>> x = torch.randn(10, 2)
        >>> flow.log_prob(x).shape, flow.sample(3).shape
        (torch.Size([10]), torch.Size([3, 2]))
    """

    def __init__(
        self,
        features: int,
        n_couplings: int = 8,
        hidden: int = 256,
        n_hidden_layers: int = 2,
        activation: str = "exp",
        clamp: float = 2.0,
        context_features: int | None = None,
        base: nn.Module | None = None,
    ):
        if isinstance(features, bool) or not isinstance(features, int) or features < 2:
            raise ValueError(f"features must be an int >= 2 (a coupling needs two parts), got {features!r}")
        _check_count(n_couplings, "n_couplings")
        layers = [
            _coupling(features, "half", k % 2 == 1, hidden, n_hidden_layers, context_features, activation, clamp)
            for k in range(n_couplings)
        ]
        # Flow raises ValueError when a base's own event shape differs from (features,).
        super().__init__(layers, base=base, event_shape=features)


class RealNVPImage(Flow):
    """Single-scale Real NVP for images ``[B, C, H, W]``: checkerboard and channel couplings.

    Couplings come in pairs (the second of a pair flipped), the pairs alternating between the
    checkerboard and the channel mask (checkerboard only when ``C == 1``). Conditioners are
    :class:`~fastflow.nn.ConvNet`\\ s with a zero-initialised last layer. Multi-scale
    architectures (squeeze, factor-out) come with Glow.

    Dinh, Sohl-Dickstein, Bengio. "Density estimation using Real NVP" (2016),
    https://arxiv.org/abs/1605.08803.

    Arguments:
        shape: the image shape ``(C, H, W)``.
        n_couplings: coupling layers.
        hidden: channels of each conditioner's hidden layers.
        n_hidden_layers: hidden layers per conditioner (3x3 then 1x1 convolutions).
        activation: ``"exp"``, ``"sigmoid"`` or ``"additive"``.
        clamp: soft clamp of the ``"exp"`` activation.
        context_features: size of a context ``[B, K]``, broadcast as extra channels.
        base: base distribution (None: standard normal over ``shape``).

    Example:
        >>> flow = RealNVPImage((3, 8, 8), n_couplings=4, hidden=16)
        >>> x = torch.randn(2, 3, 8, 8)
        >>> flow.log_prob(x).shape, flow.sample(2, temperature=0.7).shape
        (torch.Size([2]), torch.Size([2, 3, 8, 8]))
    """

    def __init__(
        self,
        shape: Sequence[int] = (3, 32, 32),
        n_couplings: int = 8,
        hidden: int = 64,
        n_hidden_layers: int = 2,
        activation: str = "exp",
        clamp: float = 2.0,
        context_features: int | None = None,
        base: nn.Module | None = None,
    ):
        shape = _event_shape(shape, "shape")
        if len(shape) != 3:
            raise ValueError(f"shape must be an image shape (C, H, W), got {tuple(shape)}")
        _check_count(n_couplings, "n_couplings")
        layers = _image_couplings(
            shape, n_couplings, hidden, n_hidden_layers, context_features, activation, clamp
        )
        super().__init__(layers, base=base, event_shape=shape)
