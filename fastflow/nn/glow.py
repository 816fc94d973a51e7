"""Glow: one flow step (:class:`GlowStep`) and the multi-scale architecture (:class:`MultiScale`).

A Glow step is ``ActNorm -> invertible 1x1 convolution (PLU) -> affine coupling`` (channel mask,
``activation="sigmoid"``, a :class:`~fastflow.nn.ConvNet` conditioner whose last convolution
starts at zero). :class:`MultiScale` stacks them in levels: each level squeezes
(``[C, H, W] -> [4C, H/2, W/2]``), runs ``depth`` steps, and (all levels but the last) factors out
the second half of the channels, ``h = [z1, z2]``; ``z2`` leaves the flow and is scored by a
learned :class:`~fastflow.nn.SplitPrior` ``p(z2 | z1)``, ``z1`` goes on to the next level. What
the last level leaves is the top latent, scored by the model's top prior
(:class:`fastflow.models.Glow`).

The latent layout (DESIGN.md, "Points the contract settles"): ``forward`` returns ONE latent of
the input's shape, the factored-out parts put back where their channels were. Writing
``S`` for the squeeze and ``S^-1`` for its inverse (``pixel_unshuffle`` / ``pixel_shuffle``)::

    z = S^-1(cat[ S^-1(cat[ ... S^-1(z_top) ..., z2_{L-2} ]), z2_0 ])      (levels 0 .. L-1)

i.e. ``z`` is what the squeeze/split bookkeeping alone would give if every level's steps were the
identity. :meth:`MultiScale.split_latent` undoes it (``z -> (z_top, [z2_0, ..., z2_{L-2}])``) and
:meth:`MultiScale.merge_latent` builds it. The log-det of ``forward`` is that of the steps only:
the split priors are densities, not part of the map; they enter the model's ``log_prob``.

Multi-scale Real NVP: ``invconv=False, activation="exp"`` drops the 1x1 convolution and
alternates the transformed half of the channels from one step to the next (``flip`` on odd steps).

References:
    Kingma, Dhariwal. "Glow: Generative Flow with Invertible 1x1 Convolutions" (2018),
    https://arxiv.org/abs/1807.03039 (code: openai/glow).
    Dinh, Sohl-Dickstein, Bengio. "Density estimation using Real NVP" (2016),
    https://arxiv.org/abs/1605.08803 (multi-scale architecture, section 3.6).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastflow.distributions import _check_temperature, _event_shape, _wide
from fastflow.flow import Compose, Transform
from fastflow.nn.actnorm import ActNorm
from fastflow.nn.coupling import AdditiveCoupling, AffineCoupling
from fastflow.nn.invconv import InvertibleConv1x1
from fastflow.nn.multiscale import SplitPrior
from fastflow._checks import positive_int as _positive_int

__all__ = ["GlowStep", "MultiScale"]

_COUPLINGS = ("affine", "additive")


def _image_shape(shape, name: str = "shape") -> torch.Size:
    shape = _event_shape(shape, name)
    if len(shape) != 3:
        raise ValueError(f"{name} must be an image shape (C, H, W), got {tuple(shape)}")
    return shape


class GlowStep(Compose):
    """One step of Glow: ``ActNorm -> InvertibleConv1x1 -> AffineCoupling`` on ``[B, C, H, W]``.

    The coupling uses the channel mask (the second half of the channels is transformed from the
    first), ``activation="sigmoid"`` (``y_b = (x_b + t) * sigmoid(h + 2)``) and a
    :class:`~fastflow.nn.ConvNet` conditioner (conv3x3 -> ReLU -> conv1x1 -> ReLU ->
    zero-initialised conv3x3). ``forward``/``inverse`` follow the Transform contract; the log-det
    is the sum of the three layers'. ActNorm initialises itself from its first training batch
    (or :func:`fastflow.nn.initialize_actnorm`).

    Kingma, Dhariwal. "Glow: Generative Flow with Invertible 1x1 Convolutions" (2018),
    https://arxiv.org/abs/1807.03039.

    Arguments:
        shape: the image shape ``(C, H, W)`` of the step's input (``C >= 2``; the coupling
            needs ``H, W``).
        hidden: channels of the conditioner's hidden layers (Glow: 512).
        n_hidden_layers: hidden layers of the conditioner.
        coupling: ``"affine"`` or ``"additive"`` (Glow's additive variant, log-det 0).
        activation: the affine coupling's scale, ``"sigmoid"`` (Glow) or ``"exp"`` (Real NVP,
            soft-clamped by ``clamp``).
        invconv: include the 1x1 convolution (False: a Real NVP step, see ``flip``).
        lu: keep the 1x1 convolution in PLU factors (False: dense weight).
        actnorm: include the ActNorm.
        flip: the coupling transforms the first half of the channels instead of the second.
        clamp: soft clamp of the ``"exp"`` activation.

    Attributes: ``actnorm``, ``invconv`` (None when left out) and ``coupling``, the layers.

    Example:
        >>> step = GlowStep((4, 8, 8), hidden=16)
        >>> x = torch.randn(2, 4, 8, 8)
        >>> z, logdet = step(x)            # training mode: ActNorm initialises on x
        >>> x2, logdet_inv = step.inverse(z)
        >>> torch.allclose(x, x2, atol=1e-5), torch.allclose(logdet, -logdet_inv, atol=1e-4)
        (True, True)
    """

    def __init__(
        self,
        shape: Sequence[int],
        hidden: int = 512,
        n_hidden_layers: int = 2,
        coupling: str = "affine",
        activation: str = "sigmoid",
        invconv: bool = True,
        lu: bool = True,
        actnorm: bool = True,
        flip: bool = False,
        clamp: float = 2.0,
    ):
        shape = _image_shape(shape)
        c = shape[0]
        if c < 2:
            raise ValueError(f"shape must have at least 2 channels (a coupling needs two parts), got {tuple(shape)}")
        if coupling not in _COUPLINGS:
            raise ValueError(f"coupling must be one of {_COUPLINGS}, got {coupling!r}")
        layers: list[nn.Module] = []
        if actnorm:
            layers.append(ActNorm(c))
        if invconv:
            layers.append(InvertibleConv1x1(c, lu=lu))
        if coupling == "affine":
            layers.append(
                AffineCoupling(
                    shape, mask="channel", flip=flip, hidden=hidden,
                    n_hidden_layers=n_hidden_layers, activation=activation, clamp=clamp,
                )
            )
        else:
            layers.append(
                AdditiveCoupling(shape, mask="channel", flip=flip, hidden=hidden, n_hidden_layers=n_hidden_layers)
            )
        super().__init__(layers)
        self.event_shape = shape

    @property
    def actnorm(self) -> ActNorm | None:
        return next((t for t in self.transforms if isinstance(t, ActNorm)), None)

    @property
    def invconv(self) -> InvertibleConv1x1 | None:
        return next((t for t in self.transforms if isinstance(t, InvertibleConv1x1)), None)

    @property
    def coupling(self) -> nn.Module:
        return self.transforms[-1]


class MultiScale(Transform):
    """Glow's multi-scale stack of :class:`GlowStep`\\ s with squeezes and factored-out halves.

    Level ``i`` (``0 <= i < levels``): squeeze (2x2 space-to-channel), ``depth`` steps, then, for
    every level but the last, split ``h = [z1, z2]`` along the channels (``z1`` the first half);
    ``z2`` is factored out, with the learned prior ``priors[i]`` (:class:`SplitPrior`, conditioned
    on ``z1``). ``forward`` returns one latent of the input's shape in the layout of the module
    docstring and the log-det of the steps (the priors are not part of the map). The model
    (:class:`fastflow.models.Glow`) adds the priors' log-densities.

    Arguments:
        shape: the input shape ``(C, H, W)``; ``H`` and ``W`` divisible by ``2**levels``.
        levels: number of levels ``L``.
        depth: steps per level ``K``.
        hidden, n_hidden_layers, coupling, activation, invconv, lu, actnorm, clamp: of each
            :class:`GlowStep`. With ``invconv=False`` step ``k`` of a level flips (the
            transformed half alternates), as in Real NVP.
        split_kernel: kernel size of the split priors' zero-initialised convolution (Glow: 3).

    Attributes: ``steps`` (a ModuleList of one :class:`~fastflow.Compose` of steps per level),
    ``priors`` (a ModuleList of ``L - 1`` :class:`SplitPrior`\\ s), ``top_shape`` (the shape of
    the top latent, ``(C * 2**(L+1), H / 2**L, W / 2**L)``).

    Example:
        >>> ms = MultiScale((3, 8, 8), levels=2, depth=1, hidden=8)
        >>> x = torch.randn(2, 3, 8, 8)
        >>> z, logdet = ms(x)
        >>> z.shape, ms.top_shape
        (torch.Size([2, 3, 8, 8]), torch.Size([24, 2, 2]))
        >>> torch.allclose(ms.inverse(z)[0], x, atol=1e-5)
        True
    """

    def __init__(
        self,
        shape: Sequence[int],
        levels: int = 3,
        depth: int = 32,
        hidden: int = 512,
        n_hidden_layers: int = 2,
        coupling: str = "affine",
        activation: str = "sigmoid",
        invconv: bool = True,
        lu: bool = True,
        actnorm: bool = True,
        clamp: float = 2.0,
        split_kernel: int = 3,
    ):
        super().__init__()
        shape = _image_shape(shape)
        self.levels = _positive_int(levels, "levels")
        self.depth = _positive_int(depth, "depth")
        c, h, w = shape
        f = 2**self.levels
        if h % f or w % f:
            raise ValueError(
                f"shape's H and W must be divisible by 2**levels = {f}, got H, W = {h}, {w}"
            )
        self.event_shape = shape
        steps, priors, split_channels = [], [], []
        for i in range(self.levels):
            c, h, w = c * 4, h // 2, w // 2
            level = [
                GlowStep(
                    (c, h, w), hidden=hidden, n_hidden_layers=n_hidden_layers, coupling=coupling,
                    activation=activation, invconv=invconv, lu=lu, actnorm=actnorm,
                    flip=(not invconv) and k % 2 == 1, clamp=clamp,
                )
                for k in range(self.depth)
            ]
            steps.append(Compose(level))
            if i < self.levels - 1:
                kept = c // 2
                priors.append(SplitPrior(kept, c - kept, kernel_size=split_kernel))
                split_channels.append(kept)
                c = kept
        self.steps = nn.ModuleList(steps)
        self.priors = nn.ModuleList(priors)
        self._kept = split_channels
        self.top_shape = torch.Size((c, h, w))

    def extra_repr(self) -> str:
        return f"event_shape={tuple(self.event_shape)}, levels={self.levels}, depth={self.depth}"

    def _check(self, x: Tensor, name: str) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1:] != self.event_shape:
            raise ValueError(
                f"{name} must have shape [batch, {', '.join(map(str, self.event_shape))}], "
                f"got {tuple(x.shape)}"
            )

    @staticmethod
    def _no_context(context: Tensor | None) -> None:
        if context is not None:
            raise ValueError("context was given but MultiScale (Glow) is unconditional")

    # -- the latent layout ------------------------------------------------------------------

    def split_latent(self, z: Tensor) -> tuple[Tensor, list[Tensor]]:
        """``z`` (the input's shape) -> ``(z_top, [z2_0, ..., z2_{L-2}])`` (module docstring)."""
        self._check(z, "z")
        h, z2s = z, []
        for i in range(self.levels):
            h = F.pixel_unshuffle(h, 2)
            if i < self.levels - 1:
                k = self._kept[i]
                z2s.append(h[:, k:])
                h = h[:, :k]
        return h, z2s

    def merge_latent(self, z_top: Tensor, z2s: Sequence[Tensor]) -> Tensor:
        """``(z_top, [z2_0, ..., z2_{L-2}])`` -> one latent of the input's shape."""
        if len(z2s) != self.levels - 1:
            raise ValueError(f"z2s must hold levels - 1 = {self.levels - 1} tensors, got {len(z2s)}")
        h = z_top
        for i in reversed(range(self.levels)):
            if i < self.levels - 1:
                h = torch.cat([h, z2s[i]], dim=1)
            h = F.pixel_shuffle(h, 2)
        return h

    # -- data -> latent ---------------------------------------------------------------------

    def encode(self, x: Tensor) -> tuple[Tensor, list[Tensor], list[Tensor], Tensor]:
        """``(z_top, z2s, z1s, logdet)``: the pieces of the latent, the halves ``z1`` each split
        prior is conditioned on, and the steps' log-det ``[B]``."""
        self._check(x, "x")
        h, total = x, None
        z1s, z2s = [], []
        for i in range(self.levels):
            h = F.pixel_unshuffle(h, 2)
            h, logdet = self.steps[i](h)
            logdet = logdet.to(_wide(logdet.dtype))
            total = logdet if total is None else total + logdet
            if i < self.levels - 1:
                k = self._kept[i]
                z1s.append(h[:, :k])
                z2s.append(h[:, k:])
                h = h[:, :k]
        return h, z2s, z1s, total

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(z, log|det dz/dx|)`` with ``z`` of ``x``'s shape (layout: module docstring)."""
        self._no_context(context)
        z_top, z2s, _, logdet = self.encode(x)
        return self.merge_latent(z_top, z2s), logdet

    # -- latent -> data ---------------------------------------------------------------------

    def decode(
        self,
        z_top: Tensor,
        z2s: Sequence[Tensor] | None = None,
        temperature: float = 1.0,
    ) -> tuple[Tensor, Tensor, list[Tensor], Tensor | None]:
        """Runs the levels backwards from ``z_top``.

        With ``z2s`` given, they are the factored-out parts; with ``z2s=None`` each is drawn from
        its split prior given the ``z1`` at hand, standard deviation scaled by ``temperature``,
        and its log-density (temperature 1) is accumulated.

        Returns:
            ``(x, log|det dx/dz|, z2s, log_prob_splits)``; ``log_prob_splits`` (``[B]``) is the
            sum of the split priors' log-densities of the drawn parts, None when ``z2s`` was given.
        """
        draw = z2s is None
        if draw:
            temperature = _check_temperature(temperature)
        elif len(z2s) != self.levels - 1:
            raise ValueError(f"z2s must hold levels - 1 = {self.levels - 1} tensors, got {len(z2s)}")
        out_z2s = [None] * (self.levels - 1) if draw else list(z2s)
        h, total, log_prob = z_top, None, None
        for i in reversed(range(self.levels)):
            if i < self.levels - 1:
                if draw:
                    z2 = self.priors[i].sample(h, temperature=temperature)
                    lp = self.priors[i].log_prob(z2, h)
                    log_prob = lp if log_prob is None else log_prob + lp
                    out_z2s[i] = z2
                h = torch.cat([h, out_z2s[i]], dim=1)
            h, logdet = self.steps[i].inverse(h)
            logdet = logdet.to(_wide(logdet.dtype))
            total = logdet if total is None else total + logdet
            h = F.pixel_shuffle(h, 2)
        return h, total, out_z2s, log_prob

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(x, log|det dx/dz|)`` for a latent ``z`` of the input's shape."""
        self._no_context(context)
        z_top, z2s = self.split_latent(z)
        x, logdet, _, _ = self.decode(z_top, z2s)
        return x, logdet
