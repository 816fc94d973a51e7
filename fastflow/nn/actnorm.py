"""Activation normalisation (Glow): :class:`ActNorm` and :func:`initialize_actnorm`.

ActNorm is a per-channel affine map ``y = (x + b) * exp(L)`` whose parameters are set from the
data: on the first batch it sees, ``b = -mean`` and ``L = log(1 / (std + eps))`` per channel, so
that its output has zero mean and unit variance per channel on that batch; afterwards both are
ordinary trainable parameters.

How fastflow makes that data-dependent initialisation safe (DESIGN.md, "Data-dependent
initialisation"):

* explicit: it happens on the first forward in training mode of a layer that is not initialised,
  or when asked (:meth:`ActNorm.initialize`, :func:`initialize_actnorm`); a forward in eval mode
  or an inverse of a layer that is not initialised raises ``RuntimeError`` instead of silently
  using the identity parameters;
* distributed-correct: under an initialised ``torch.distributed`` the per-channel sums (and the
  count) are all-reduced, so every rank gets the statistics of the union of the ranks' batches and
  identical parameters (every rank must initialise together: it is a collective call);
* saved: the flag is the buffer ``initialized``, so a layer loaded from a state dict is not
  re-initialised on its next forward (rosinality/glow-pytorch#6, jhjacobsen/invertible-resnet#3);
* traceable: after initialisation the forward has no data-dependent Python branch (the flag is
  mirrored in a Python bool, updated by :meth:`ActNorm.initialize` and by ``load_state_dict``), so
  ``torch.compile(layer, fullgraph=True)`` captures it in one graph. (A layer compiled before
  its initialisation, without ``fullgraph``, runs :meth:`ActNorm.initialize` eagerly and is
  recompiled once when the flag changes.)

References:
    Kingma, Dhariwal. "Glow: Generative Flow with Invertible 1x1 Convolutions" (2018),
    https://arxiv.org/abs/1807.03039 (section 3.1; code: openai/glow, ``actnorm``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fastflow.distributions import _wide
from fastflow.flow import Transform
from fastflow._checks import positive_float as _positive_float
from fastflow._checks import positive_int as _positive_int

__all__ = ["ActNorm", "initialize_actnorm"]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class ActNorm(Transform):
    r"""Activation normalisation (Glow): ``y = (x + bias) * exp(L)`` per channel.

    For inputs ``[B, C]`` or ``[B, C, *spatial]`` (typically ``[B, C, H, W]``, contiguous or
    channels-last) the map acts on dimension 1; the log-det per sample is
    ``prod(spatial) * sum(L)`` (``H * W * sum(L)`` for images), in float32 or wider even for
    half/bf16 inputs. The inverse is ``x = z * exp(-L) - bias``.

    Parametrisation: the parameters are ``bias`` (``b``) and ``log_scale``, both of shape ``[C]``,
    with ``L = logscale_factor * log_scale``. The default ``logscale_factor=1`` stores ``L`` itself
    (as rosinality/glow-pytorch); ``logscale_factor=3`` reproduces openai/glow, which stores
    ``L / 3`` so that a gradient step moves ``L`` three times as far (Adam) as it moves ``b``.
    :attr:`effective_log_scale` is ``L`` in either case.

    Data-dependent initialisation (module docstring): on the first forward in training mode of a
    layer whose ``initialized`` buffer is False, or on :meth:`initialize`, the layer sets
    ``b = -mean(x)`` and ``L = log(1 / (std(x) + eps))``, the mean and the (biased) standard
    deviation taken per channel over the batch and spatial dimensions, in float64, all-reduced
    when ``torch.distributed`` is initialised (over the default process group, or the
    ``process_group`` given to :meth:`initialize` or :func:`initialize_actnorm`). ``data_init=False`` skips
    it: the layer starts initialised as the identity.

    Kingma, Dhariwal. "Glow: Generative Flow with Invertible 1x1 Convolutions" (2018),
    https://arxiv.org/abs/1807.03039.

    Arguments:
        num_features: the number of channels ``C`` (features for ``[B, C]`` inputs).
        logscale_factor: ``L = logscale_factor * log_scale`` (above).
        eps: added to the standard deviation at initialisation (Glow: 1e-6).
        data_init: initialise from the first training batch (True) or start as the identity.

    Example:
        >>> layer = ActNorm(3)
        >>> x = 5 + 2 * torch.randn(64, 3, 8, 8)
        >>> y, logdet = layer(x)      # training mode: initialises on this batch
        >>> bool(layer.initialized), y.mean().abs().item() < 1e-5, logdet.shape
        (True, True, torch.Size([64]))
        >>> x2, logdet_inv = layer.inverse(y)
        >>> torch.allclose(x, x2, atol=1e-5), torch.allclose(logdet, -logdet_inv)
        (True, True)
    """

    def __init__(
        self,
        num_features: int,
        logscale_factor: float = 1.0,
        eps: float = 1e-6,
        data_init: bool = True,
    ):
        super().__init__()
        self.num_features = _positive_int(num_features, "num_features")
        self.logscale_factor = _positive_float(logscale_factor, "logscale_factor")
        self.eps = _positive_float(eps, "eps")
        self.bias = nn.Parameter(torch.zeros(self.num_features))
        self.log_scale = nn.Parameter(torch.zeros(self.num_features))
        # The flag is a (persistent) buffer so that it travels with the state dict; forward reads
        # the Python mirror ``_initialized`` instead, so that it never syncs with the device and
        # torch.compile sees a constant (guarded) rather than a data-dependent branch.
        self.register_buffer("initialized", torch.tensor(not data_init))
        self._initialized = not data_init
        # Set by initialize_actnorm: initialise on the next forward whatever the mode.
        self._init_on_next_forward = False
        self._init_process_group: Any = None

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, logscale_factor={self.logscale_factor}, eps={self.eps}, "
            f"initialized={self._initialized}"
        )

    @property
    def effective_log_scale(self) -> Tensor:
        """``L = logscale_factor * log_scale``, the per-channel log-scale actually applied."""
        if self.logscale_factor == 1.0:
            return self.log_scale
        return self.log_scale * self.logscale_factor

    # -- the flag ---------------------------------------------------------------------------

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        flag = state_dict.get(prefix + "initialized")
        if isinstance(flag, Tensor):
            self._initialized = bool(flag)

    def _set_initialized(self, value: bool) -> None:
        with torch.no_grad():
            self.initialized.fill_(value)
        self._initialized = value

    # -- initialisation ---------------------------------------------------------------------

    @torch.compiler.disable
    @torch.no_grad()
    def initialize(self, x: Tensor, process_group: Any = None) -> None:
        """Sets ``bias`` and ``log_scale`` from the batch ``x`` and marks the layer initialised.

        ``bias = -mean``, ``effective_log_scale = log(1 / (std + eps))`` per channel, over all
        dimensions but 1. When ``torch.distributed`` is initialised the statistics are those of
        the union of every rank's ``x`` (all-reduced over ``process_group``, default the world):
        every rank of the group must call this together, with batches of any sizes.

        Raises:
            ValueError: ``x`` has the wrong shape, fewer than 2 values per channel in all, or
                non-finite values.
        """
        self._check(x, "x")
        c = self.num_features
        # float64 and two passes (mean, then centred squares): one-off work, and exact enough
        # that every rank (and every batch split) gives the same parameters.
        xf = x.detach().transpose(0, 1).reshape(c, -1).to(torch.float64)
        stats = torch.cat([xf.sum(1), xf.new_tensor([xf.shape[1]])])
        if _distributed():
            dist.all_reduce(stats, group=process_group)
        count = stats[c]
        if count.item() < 2:
            raise ValueError(
                f"x must hold at least 2 values per channel to initialise ActNorm (over all "
                f"ranks), got {int(count.item())}"
            )
        mean = stats[:c] / count
        sq = (xf - mean[:, None]).square().sum(1)
        if _distributed():
            dist.all_reduce(sq, group=process_group)
        std = (sq / count).sqrt()
        if not (torch.isfinite(mean).all() and torch.isfinite(std).all()):
            raise ValueError("x has non-finite values: ActNorm cannot be initialised from it")
        self.bias.copy_(-mean)
        self.log_scale.copy_(-torch.log(std + self.eps) / self.logscale_factor)
        self._set_initialized(True)
        self._init_on_next_forward = False

    # -- the transform ----------------------------------------------------------------------

    def _check(self, x: Tensor, name: str) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(x).__name__}")
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(
                f"{name} must have shape [batch, {self.num_features}] or "
                f"[batch, {self.num_features}, H, W] (num_features={self.num_features} "
                f"channels), got {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")

    def _require_initialized(self, what: str) -> None:
        raise RuntimeError(
            f"ActNorm is not initialised ({what}): run a forward in training mode, call "
            "layer.initialize(x), or fastflow.nn.initialize_actnorm(model, batch) first (or "
            "load a state dict of an initialised layer; data_init=False starts as the identity)"
        )

    def _params(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``bias`` and ``exp(L)`` shaped to broadcast over ``x`` in ``x``'s dtype, and ``L`` wide."""
        shape = (1, self.num_features) + (1,) * (x.dim() - 2)
        log_scale = self.effective_log_scale
        bias = self.bias.to(x.dtype).view(shape)
        wide = log_scale.to(_wide(log_scale.dtype))
        scale = torch.exp(wide).to(x.dtype).view(shape)
        return bias, scale, wide

    def _logdet(self, x: Tensor, log_scale: Tensor) -> Tensor:
        spatial = math.prod(x.shape[2:])
        return (log_scale.sum() * spatial).expand(x.shape[0]).contiguous()

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(y, log|det dy/dx|)``, initialising first if needed (class docstring)."""
        self._check(x, "x")
        if self._init_on_next_forward or not self._initialized:
            if self.training or self._init_on_next_forward:
                self.initialize(x, self._init_process_group)
            else:
                self._require_initialized("forward in eval mode")
        bias, scale, log_scale = self._params(x)
        return (x + bias) * scale, self._logdet(x, log_scale)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(x, log|det dx/dz|)``: ``x = z * exp(-L) - bias``; the layer must be initialised."""
        self._check(z, "z")
        if not self._initialized:
            self._require_initialized("inverse")
        shape = (1, self.num_features) + (1,) * (z.dim() - 2)
        log_scale = self.effective_log_scale
        wide = log_scale.to(_wide(log_scale.dtype))
        inv_scale = torch.exp(-wide).to(z.dtype).view(shape)
        x = z * inv_scale - self.bias.to(z.dtype).view(shape)
        return x, -self._logdet(z, wide)


@contextlib.contextmanager
def _init_pending(layers: list[ActNorm], process_group: Any) -> Iterator[None]:
    for layer in layers:
        layer._init_on_next_forward = True
        layer._init_process_group = process_group
    try:
        yield
    finally:
        for layer in layers:
            layer._init_on_next_forward = False
            layer._init_process_group = None


@torch.no_grad()
def initialize_actnorm(
    module: nn.Module,
    batch: Tensor,
    context: Tensor | None = None,
    force: bool = False,
    process_group: Any = None,
) -> int:
    """Initialises every :class:`ActNorm` in ``module`` with one forward of ``batch``.

    The forward runs in the module's current mode (eval mode is fine: dropout and batch-norm
    statistics are left alone) and without gradients; each ActNorm that is not initialised (all
    of them with ``force=True``) initialises itself from the input it receives, so layers deeper
    in the model see the output of the already-initialised layers before them, as in Glow. Under
    ``torch.distributed`` every rank must call this together (the statistics are all-reduced), each
    with its own batch.

    Arguments:
        module: a model or layer (a :class:`~fastflow.Flow`, a
            :class:`~fastflow.Compose`, ...), called as ``module(batch)``, or
            ``module(batch, context=context)`` when ``context`` is given.
        batch: the initialisation batch (Glow uses 256 samples).
        context: the conditioning input of a conditional model.
        force: re-initialise layers that are already initialised (e.g. from a larger batch).
        process_group: the ``torch.distributed`` group to all-reduce over (default: the world).

    Returns:
        the number of ActNorm layers initialised.

    Raises:
        RuntimeError: the forward did not reach every ActNorm layer that was to be initialised.

    Example:
        >>> from fastflow import Compose
        >>> from fastflow.nn import AffineCoupling
        >>> model = Compose(ActNorm(4), AffineCoupling(4, hidden=16), ActNorm(4)).eval()
        >>> initialize_actnorm(model, torch.randn(256, 4))
        2
    """
    layers = [m for m in module.modules() if isinstance(m, ActNorm) and (force or not m._initialized)]
    if not layers:
        return 0
    with _init_pending(layers, process_group):
        if context is None:
            module(batch)
        else:
            module(batch, context=context)
        # initialize() clears the pending mark; a layer still marked was not reached
        missed = [layer for layer in layers if layer._init_on_next_forward]
    if missed:
        names = {m: n for n, m in module.named_modules()}
        raise RuntimeError(
            f"the forward of module did not reach {len(missed)} ActNorm layer(s) "
            f"({', '.join(repr(names[m] or 'module') for m in missed)}); they are not initialised"
        )
    return len(layers)
