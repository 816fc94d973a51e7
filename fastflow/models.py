"""Ready-made flows: Real NVP for vectors and single-scale Real NVP for images.

Each builder is a :class:`~fastflow.flow.Flow` subclass, so a model is used like any flow
(``log_prob``, ``sample``, ``sample_and_log_prob``, ``forward``/``inverse``).

How :class:`RealNVP` splits a vector: coupling ``k`` uses the ``"half"`` mask, transforming the
second half ``x[:, D//2:]`` from the first when ``k`` is even and the first half ``x[:, :D//2]``
from the second when ``k`` is odd (``flip``), so every feature is transformed by every other
layer. The halves are taken as views (``narrow``) and joined with one ``cat``; no permutation
layer sits between the couplings.

:class:`Glow` is the multi-scale model (squeeze, steps, split per level); with
``activation="exp", invconv=False`` it is a multi-scale Real NVP with channel-wise couplings.

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
from fastflow.nn.continuous import FFJORD
from fastflow.nn.residual import ResidualFlow, ResidualFlowImage

__all__ = ["RealNVP", "RealNVPImage", "Glow", "MAF", "IAF", "PlanarFlow", "SylvesterFlow", "ResidualFlow", "ResidualFlowImage", "FFJORD"]

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


# --------------------------------------------------------------------------------------------
# Glow (multi-scale), also multi-scale Real NVP



class Glow(Flow):
    """Multi-scale Glow for images ``[B, C, H, W]`` (also multi-scale Real NVP).

    ``levels`` levels of: squeeze, ``depth`` :class:`~fastflow.nn.GlowStep`\\ s (ActNorm -> 1x1
    convolution over PLU -> affine coupling with the sigmoid scale), and, for all levels but the
    last, a split: half the channels are factored out with a learned prior
    ``p(z2 | z1) = N(mu(z1), exp(log_std(z1))^2)`` (:class:`~fastflow.nn.SplitPrior`). The top
    latent has the prior ``base``, a :class:`~fastflow.DiagonalGaussian` over ``top_shape``
    (per-position mean and log-std, learned with ``learn_top=True``, zero at the start).

    Contract (DESIGN.md, "Points the contract settles"):

    * ``forward(x) -> (z, logdet)``: ``z`` has ``x``'s shape, the factored-out parts put back
      where their channels were (layout: :mod:`fastflow.nn.glow`; ``model.multiscale.split_latent``
      takes it apart); ``logdet`` is the sum of the steps' log-dets (the priors are not in it).
    * ``inverse(z)`` maps such a latent back to data.
    * ``log_prob(x) = log p_top(z_top) + sum_i log p(z2_i | z1_i) + logdet``.
    * ``sample(n, temperature=T)`` scales the standard deviation of every prior by ``T``, the
      top prior and the split priors alike (``z2 = mu + T * sigma * eps``);
      ``sample_and_log_prob`` returns the model's (temperature-1) log-density of its samples in
      the same pass.

    ActNorm is initialised from data: by the first forward in training mode, or explicitly with
    :func:`fastflow.nn.initialize_actnorm` ``(model, batch)``; before that, sampling raises
    ``RuntimeError``. Dequantisation and the bits/dim bookkeeping are left to the caller.

    Multi-scale Real NVP: ``activation="exp", invconv=False`` (no 1x1 convolution; the coupling's
    transformed half alternates from step to step; ActNorm stays unless ``actnorm=False``).

    Kingma, Dhariwal. "Glow: Generative Flow with Invertible 1x1 Convolutions" (2018),
    https://arxiv.org/abs/1807.03039; Dinh, Sohl-Dickstein, Bengio. "Density estimation using
    Real NVP" (2016), https://arxiv.org/abs/1605.08803.

    Arguments:
        shape: the image shape ``(C, H, W)``, ``H`` and ``W`` divisible by ``2**levels``.
        levels: number of levels ``L`` (Glow: 3 at 32x32).
        depth: steps per level ``K`` (Glow: 32).
        hidden: channels of each coupling conditioner's hidden layers (Glow: 512).
        n_hidden_layers: hidden layers per conditioner.
        learn_top: learn the top prior's mean and log-std (False: standard normal).
        coupling: ``"affine"`` or ``"additive"``.
        activation: ``"sigmoid"`` (Glow) or ``"exp"`` (Real NVP, soft-clamped by ``clamp``).
        invconv: include the invertible 1x1 convolutions.
        lu: PLU parametrisation of the 1x1 convolutions.
        actnorm: include the ActNorms.
        clamp: soft clamp of the ``"exp"`` activation.
        split_kernel: kernel size of the split priors' convolution.

    Example:
        >>> model = Glow((3, 8, 8), levels=2, depth=2, hidden=16)
        >>> x = torch.randn(4, 3, 8, 8)
        >>> z, logdet = model(x)             # training mode: the ActNorms initialise on x
        >>> z.shape, model.log_prob(x).shape
        (torch.Size([4, 3, 8, 8]), torch.Size([4]))
        >>> model.sample(2, temperature=0.7).shape
        torch.Size([2, 3, 8, 8])
    """

    def __init__(
        self,
        shape: Sequence[int] = (3, 32, 32),
        levels: int = 3,
        depth: int = 32,
        hidden: int = 512,
        n_hidden_layers: int = 2,
        learn_top: bool = True,
        coupling: str = "affine",
        activation: str = "sigmoid",
        invconv: bool = True,
        lu: bool = True,
        actnorm: bool = True,
        clamp: float = 2.0,
        split_kernel: int = 3,
    ):
        from fastflow.distributions import DiagonalGaussian
        from fastflow.nn.glow import MultiScale

        shape = _event_shape(shape, "shape")
        if len(shape) != 3:
            raise ValueError(f"shape must be an image shape (C, H, W), got {tuple(shape)}")
        multiscale = MultiScale(
            shape, levels=levels, depth=depth, hidden=hidden, n_hidden_layers=n_hidden_layers,
            coupling=coupling, activation=activation, invconv=invconv, lu=lu, actnorm=actnorm,
            clamp=clamp, split_kernel=split_kernel,
        )
        super().__init__(multiscale, event_shape=shape)
        # the top prior, over the top latent's shape (the flow's event shape stays the input's)
        self.base = DiagonalGaussian(multiscale.top_shape, learnable=bool(learn_top))
        self.learn_top = bool(learn_top)

    @property
    def multiscale(self):
        """The :class:`~fastflow.nn.MultiScale` transform (steps, split priors, latent layout)."""
        return self.transform.transforms[0]

    @property
    def top_shape(self) -> torch.Size:
        return self.multiscale.top_shape

    @staticmethod
    def _unconditional(context) -> None:
        if context is not None:
            raise ValueError("context was given but Glow is unconditional")

    def log_prob(self, x, context=None):
        """``log p(x)``, shape ``[B]``: top prior + split priors + log-det (float32 or wider)."""
        self._unconditional(context)
        self._check_input(x, "x")
        z_top, z2s, z1s, logdet = self.multiscale.encode(x)
        total = self.base.log_prob(z_top)
        for prior, z2, z1 in zip(self.multiscale.priors, z2s, z1s):
            total = total + prior.log_prob(z2, z1)
        dtype = torch.promote_types(total.dtype, logdet.dtype)
        return total.to(dtype) + logdet.to(dtype)

    def _draw(self, n, temperature):
        from fastflow.distributions import _check_n, _check_temperature

        n = _check_n(n)
        temperature = _check_temperature(temperature)
        z_top = self.base.sample(n, temperature=temperature)
        x, logdet_inv, _, log_prob_splits = self.multiscale.decode(z_top, None, temperature)
        return z_top, x, logdet_inv, log_prob_splits

    def sample(self, n, temperature=1.0, context=None):
        """``n`` samples ``[n, C, H, W]``; every prior's std is scaled by ``temperature``."""
        self._unconditional(context)
        return self._draw(n, temperature)[1]

    def sample_and_log_prob(self, n, temperature=1.0, context=None):
        """``n`` samples and the model's log-density of them (temperature 1), in one pass."""
        self._unconditional(context)
        z_top, x, logdet_inv, log_prob_splits = self._draw(n, temperature)
        total = self.base.log_prob(z_top)
        if log_prob_splits is not None:
            total = total + log_prob_splits
        dtype = torch.promote_types(total.dtype, logdet_inv.dtype)
        return x, total.to(dtype) - logdet_inv.to(dtype)


class MAF(Flow):
    """Masked autoregressive flow for vectors ``[B, D]``: ``n_transforms``
    :class:`~fastflow.nn.MaskedAutoregressive` layers with a feature permutation between
    consecutive layers (and optionally a :class:`~fastflow.nn.BatchNormFlow` after each).

    Density in one pass per layer; sampling in ``D`` passes per layer.

    Papamakarios, Pavlakou, Murray. "Masked Autoregressive Flow for Density Estimation" (2017),
    https://arxiv.org/abs/1705.07057.

    Arguments:
        features: ``D``.
        n_transforms: autoregressive layers (MAF paper: 5).
        hidden: hidden widths of each MADE (an int: two layers of that width).
        activation: ``"exp"`` (soft-clamped by ``clamp``), ``"sigmoid"`` or ``"additive"``.
        clamp: soft clamp of ``"exp"``.
        permutation: between layers, ``"reverse"`` (default) or ``"random"``.
        batch_norm: a batch-norm flow layer after each autoregressive layer.
        context_features: width of a context ``[B, K]`` (None: unconditional).
        base: base distribution (None: standard normal over ``D``).

    Example:
        >>> flow = MAF(3, n_transforms=2, hidden=16)
        >>> flow.log_prob(torch.randn(4, 3)).shape, flow.sample(2).shape
        (torch.Size([4]), torch.Size([2, 3]))
    """

    _layer = "MaskedAutoregressive"

    def __init__(
        self,
        features: int,
        n_transforms: int = 5,
        hidden: int | Sequence[int] = 128,
        activation: str = "exp",
        clamp: float = 2.0,
        permutation: str = "reverse",
        batch_norm: bool = False,
        context_features: int | None = None,
        base: nn.Module | None = None,
    ):
        from fastflow.nn import autoregressive as ar

        _check_count(features, "features")
        _check_count(n_transforms, "n_transforms")
        if permutation not in ("reverse", "random"):
            raise ValueError(f"permutation must be 'reverse' or 'random', got {permutation!r}")
        layer_cls = getattr(ar, self._layer)
        layers: list[nn.Module] = []
        for k in range(n_transforms):
            if k > 0:
                layers.append(ar.Permutation(features, permutation))
            layers.append(layer_cls(features, hidden, context_features, activation, clamp))
            if batch_norm:
                layers.append(ar.BatchNormFlow(features))
        super().__init__(layers, base=base, event_shape=features)


class IAF(MAF):
    """Inverse autoregressive flow for vectors: :class:`MAF` built from
    :class:`~fastflow.nn.InverseAutoregressive` layers, so sampling (and
    ``sample_and_log_prob``) takes one pass per layer and ``log_prob`` of given data ``D``.

    Kingma et al. "Improving Variational Inference with Inverse Autoregressive Flow" (2016),
    https://arxiv.org/abs/1606.04934. Same arguments as :class:`MAF`.
    """

    _layer = "InverseAutoregressive"


class PlanarFlow(Flow):
    """``n_transforms`` :class:`~fastflow.nn.Planar` layers for vectors ``[B, D]``.

    Density (``log_prob``) in one cheap pass; sampling inverts every layer numerically (a
    scalar root find per sample and layer, to ``tol``; see :mod:`fastflow.nn.det_identity`).

    Rezende, Mohamed. "Variational Inference with Normalizing Flows" (2015),
    https://arxiv.org/abs/1505.05770.

    Arguments:
        features: ``D``.
        n_transforms: planar layers.
        tol, max_iter: of each layer's numerical inverse (None: the dtype's default tol).
        base: base distribution (None: standard normal over ``D``).

    Example:
        >>> flow = PlanarFlow(2, n_transforms=4)
        >>> flow.log_prob(torch.randn(5, 2)).shape, flow.sample(3).shape
        (torch.Size([5]), torch.Size([3, 2]))
    """

    def __init__(
        self,
        features: int,
        n_transforms: int = 8,
        tol: float | None = None,
        max_iter: int = 100,
        base: nn.Module | None = None,
    ):
        from fastflow.nn.det_identity import Planar

        _check_count(features, "features")
        _check_count(n_transforms, "n_transforms")
        layers = [Planar(features, tol=tol, max_iter=max_iter) for _ in range(n_transforms)]
        super().__init__(layers, base=base, event_shape=features)


class SylvesterFlow(Flow):
    """``n_transforms`` :class:`~fastflow.nn.Sylvester` layers for vectors ``[B, D]``.

    ``variant="triangular"`` alternates ``Q`` between the identity and the reversal
    permutation from layer to layer (van den Berg et al.); the other variants learn ``Q``.

    van den Berg, Hasenclever, Tomczak, Welling. "Sylvester Normalizing Flows for Variational
    Inference" (2018), https://arxiv.org/abs/1803.05649.

    Arguments:
        features: ``D``.
        n_transforms: Sylvester layers.
        variant: ``"orthogonal"``, ``"householder"`` or ``"triangular"``.
        m: ``"orthogonal"`` only, the columns of ``Q`` (default ``D``).
        n_reflections: ``"householder"`` only (default ``D``).
        tol, max_iter: of each layer's numerical inverse.
        base: base distribution (None: standard normal over ``D``).

    Example:
        >>> flow = SylvesterFlow(3, n_transforms=2, variant="triangular")
        >>> flow.log_prob(torch.randn(5, 3)).shape, flow.sample(2).shape
        (torch.Size([5]), torch.Size([2, 3]))
    """

    def __init__(
        self,
        features: int,
        n_transforms: int = 4,
        variant: str = "orthogonal",
        m: int | None = None,
        n_reflections: int | None = None,
        tol: float | None = None,
        max_iter: int = 100,
        base: nn.Module | None = None,
    ):
        from fastflow.nn.det_identity import Sylvester

        _check_count(features, "features")
        _check_count(n_transforms, "n_transforms")
        layers = [
            Sylvester(
                features, m=m, variant=variant, n_reflections=n_reflections,
                flip=variant == "triangular" and k % 2 == 1, tol=tol, max_iter=max_iter,
            )
            for k in range(n_transforms)
        ]
        super().__init__(layers, base=base, event_shape=features)
