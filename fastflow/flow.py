"""The Transform contract, composition of transforms, and Flow (a base distribution + transforms).

Every layer and every model of fastflow follows one contract (DESIGN.md, "The Transform
contract"; sign convention of REFERENCE.md)::

    z, logdet = t(x, context=None)              # data -> latent, logdet = log|det dz/dx|, [B]
    x, logdet_inv = t.inverse(z, context=None)  # latent -> data, logdet_inv = -logdet

and :class:`Flow` turns a stack of transforms into a density,
``log p(x) = log p_base(z) + log|det dz/dx|``, that can be sampled
(``x = f^{-1}(z)``, ``z ~ p_base``). Log-dets and log-densities are float32 or wider even for
half/bf16 activations.

References:
    Papamakarios, Nalisnick, Rezende, Mohamed, Lakshminarayanan. "Normalizing Flows for
    Probabilistic Modeling and Inference" (2019), https://arxiv.org/abs/1912.02762.
    Kingma, Dhariwal. "Glow: Generative Flow with Invertible 1x1 Convolutions" (2018),
    https://arxiv.org/abs/1807.03039 (reduced-temperature sampling).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fastflow.distributions import (
    StandardNormal,
    _check_n,
    _check_temperature,
    _event_shape,
    _wide,
)

__all__ = ["InverseNotAvailable", "ConvergenceError", "ConvergenceWarning", "Transform", "Compose", "Flow"]


class InverseNotAvailable(RuntimeError):
    """Raised by :meth:`Transform.inverse` of a layer that has no exact inverse.

    A layer without a closed-form or iterative inverse raises this rather than returning an
    approximation silently.
    """


class ConvergenceError(RuntimeError):
    """An iterative computation (a numerical inverse, a fixed-point solve, an
    orthogonalisation) did not reach its tolerance within its iteration budget."""


class ConvergenceWarning(RuntimeWarning):
    """The warning form of :class:`ConvergenceError` (``on_fail="warn"``)."""


class Transform(nn.Module):
    """Base class of every invertible layer: ``forward`` and ``inverse`` return ``(out, logdet)``.

    Subclasses implement :meth:`forward` and, where it exists, :meth:`inverse`. Both take the
    conditioning input as the keyword ``context`` (ignored by unconditional layers).

    Example:
        >>> import math
        >>> class Scale2(Transform):
        ...     def forward(self, x, context=None):
        ...         return 2 * x, x.new_full((x.shape[0],), x[0].numel() * math.log(2))
        >>> z, logdet = Scale2()(torch.randn(4, 3))
        >>> Scale2().inverse(z)
        Traceback (most recent call last):
        ...
        fastflow.flow.InverseNotAvailable: Scale2 has no exact inverse
    """

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Maps data ``x`` to ``(z, log|det dz/dx|)`` with a log-det of shape ``[B]``."""
        raise NotImplementedError(f"{type(self).__name__} does not implement forward")

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Maps ``z`` back to ``(x, log|det dx/dz|)``; raises :class:`InverseNotAvailable` here."""
        raise InverseNotAvailable(f"{type(self).__name__} has no exact inverse")


def _accumulate(total: Tensor | None, logdet: Tensor) -> Tensor:
    # Sum in float32 or wider: a bf16 sum of many layers' log-dets loses whole nats.
    logdet = logdet.to(_wide(logdet.dtype))
    return logdet if total is None else total + logdet


class Compose(Transform):
    """Applies transforms in order; the log-det is the sum, the inverse runs them in reverse.

    Arguments:
        *transforms: :class:`Transform`\\ s (or modules with the same contract), given as
            separate arguments or as one list/tuple.

    Example:
        >>> from fastflow.nn import AffineCoupling
        >>> t = Compose(AffineCoupling(4), AffineCoupling(4, flip=True))
        >>> x = torch.randn(8, 4)
        >>> z, logdet = t(x)
        >>> x2, logdet_inv = t.inverse(z)
        >>> torch.allclose(x, x2, atol=1e-5), torch.allclose(logdet, -logdet_inv)
        (True, True)
    """

    def __init__(self, *transforms: nn.Module | Sequence[nn.Module]):
        super().__init__()
        if len(transforms) == 1 and isinstance(transforms[0], (list, tuple, nn.ModuleList)):
            transforms = tuple(transforms[0])
        for i, t in enumerate(transforms):
            if not isinstance(t, nn.Module):
                raise TypeError(
                    f"transforms[{i}] must be an nn.Module (a Transform), got {type(t).__name__}"
                )
        self.transforms = nn.ModuleList(transforms)

    def __len__(self) -> int:
        return len(self.transforms)

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self.transforms)

    def __getitem__(self, index: int) -> nn.Module:
        return self.transforms[index]

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        total = None
        for t in self.transforms:
            x, logdet = t(x, context=context)
            total = _accumulate(total, logdet)
        if total is None:
            total = x.new_zeros(x.shape[0], dtype=_wide(x.dtype))
        return x, total

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        total = None
        for t in reversed(self.transforms):
            z, logdet = t.inverse(z, context=context)
            total = _accumulate(total, logdet)
        if total is None:
            total = z.new_zeros(z.shape[0], dtype=_wide(z.dtype))
        return z, total


class Flow(Transform):
    """A normalizing flow: a base distribution and the transforms from data to its latent.

    ``log_prob(x) = base.log_prob(z) + log|det dz/dx|`` with ``z, _ = transforms(x)``;
    ``sample`` draws ``z`` from the base (standard deviation scaled by ``temperature``) and
    returns ``transforms.inverse(z)``. A Flow is itself a :class:`Transform` (its ``forward`` and
    ``inverse`` are those of the composed transforms), so flows nest.

    Arguments:
        transforms: a :class:`Transform` or a sequence of them (data -> latent order).
        base: the base distribution, an ``nn.Module`` with ``log_prob(z, context=None) -> [B]``
            and ``sample(n, temperature=1.0, context=None)`` (see :mod:`fastflow.distributions`).
            None: a :class:`~fastflow.distributions.StandardNormal` over ``event_shape``.
        event_shape: the shape of one sample. With ``base=None`` and no ``event_shape``, it is
            taken from the first batch given to ``log_prob``/``forward`` (``sample`` raises
            ``ValueError`` until then). It is saved in the state dict, so a loaded flow can
            sample at once.

    Conditional flows: ``context`` (shape ``[B, ...]``) is passed, as a keyword, to every
    transform and to the base. For ``sample(n, context=c)``, ``c`` holds one row per sample
    (``[n, ...]``) or a single row (``[1, ...]``) shared by all ``n`` samples.

    Example:
        >>> from fastflow.nn import AffineCoupling
        >>> flow = Flow([AffineCoupling(2), AffineCoupling(2, flip=True)], event_shape=2)
        >>> x = torch.randn(16, 2)
        >>> flow.log_prob(x).shape
        torch.Size([16])
        >>> samples, log_prob = flow.sample_and_log_prob(5, temperature=0.7)
        >>> samples.shape, log_prob.shape
        (torch.Size([5, 2]), torch.Size([5]))
    """

    def __init__(
        self,
        transforms: nn.Module | Iterable[nn.Module],
        base: nn.Module | None = None,
        event_shape: int | Sequence[int] | None = None,
    ):
        super().__init__()
        if isinstance(transforms, Compose):
            self.transform = transforms
        elif isinstance(transforms, nn.Module) and not isinstance(transforms, nn.ModuleList):
            self.transform = Compose([transforms])
        else:
            self.transform = Compose(list(transforms))
        if event_shape is not None:
            event_shape = _event_shape(event_shape)
        if base is not None:
            if not isinstance(base, nn.Module):
                raise TypeError(
                    f"base must be an nn.Module with log_prob and sample, got {type(base).__name__}"
                )
            base_shape = getattr(base, "event_shape", None)
            if base_shape is not None:
                base_shape = torch.Size(base_shape)
                if event_shape is not None and event_shape != base_shape:
                    raise ValueError(
                        f"event_shape {tuple(event_shape)} differs from the base's event shape "
                        f"{tuple(base_shape)}"
                    )
                event_shape = base_shape
        elif event_shape is not None:
            base = StandardNormal(event_shape)
        self.event_shape: torch.Size | None = event_shape
        self.register_module("base", base)

    def extra_repr(self) -> str:
        shape = None if self.event_shape is None else tuple(self.event_shape)
        return f"event_shape={shape}"

    # The event shape travels with the state dict, so that a flow whose shape was inferred
    # from data can sample right after loading.
    def get_extra_state(self) -> Any:
        return {"event_shape": None if self.event_shape is None else tuple(self.event_shape)}

    def set_extra_state(self, state: Any) -> None:
        shape = state.get("event_shape") if isinstance(state, dict) else None
        if shape is None:
            return
        shape = torch.Size(shape)
        if self.event_shape is None:
            self._set_event_shape(shape, *self._device_dtype())
        elif shape != self.event_shape:
            raise ValueError(
                f"the state dict's event_shape {tuple(shape)} differs from this flow's "
                f"{tuple(self.event_shape)}"
            )

    def _device_dtype(self) -> tuple[torch.device, torch.dtype]:
        for t in self.parameters():
            if t.is_floating_point():
                return t.device, t.dtype
        for t in self.buffers():
            if t.is_floating_point():
                return t.device, t.dtype
        return torch.device("cpu"), torch.get_default_dtype()

    def _set_event_shape(self, shape: torch.Size, device: torch.device, dtype: torch.dtype) -> None:
        self.event_shape = shape
        if self.base is None:
            self.base = StandardNormal(shape).to(device=device, dtype=dtype)

    def _check_input(self, x: Tensor, name: str) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(x).__name__}")
        if self.event_shape is None:
            if x.dim() < 2:
                raise ValueError(
                    f"{name} must have shape [batch, *event_shape] (at least 2 dimensions), "
                    f"got {tuple(x.shape)}"
                )
            if not x.is_floating_point():
                raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
            self._set_event_shape(x.shape[1:], x.device, x.dtype)
        elif x.dim() != len(self.event_shape) + 1 or x.shape[1:] != self.event_shape:
            raise ValueError(
                f"{name} must have shape [batch, {', '.join(map(str, self.event_shape))}] "
                f"(event shape {tuple(self.event_shape)}), got {tuple(x.shape)}"
            )

    def _require_base(self) -> nn.Module:
        if self.base is None:
            raise ValueError(
                "the flow's event shape is unknown, so it cannot sample yet: pass event_shape= "
                "or base= to Flow, or call log_prob/forward on a batch first"
            )
        return self.base

    @staticmethod
    def _sample_context(context: Tensor | None, n: int) -> Tensor | None:
        if context is None:
            return None
        if not isinstance(context, Tensor) or context.dim() < 1:
            raise ValueError(
                f"context must be a tensor of shape [n, ...] or [1, ...], got "
                f"{tuple(context.shape) if isinstance(context, Tensor) else type(context).__name__}"
            )
        if context.shape[0] == n:
            return context
        if context.shape[0] == 1:
            return context.expand(n, *context.shape[1:])
        raise ValueError(
            f"context must have n = {n} rows (one per sample) or 1 row (shared), "
            f"got shape {tuple(context.shape)}"
        )

    def _base_log_prob(self, z: Tensor, context: Tensor | None) -> Tensor:
        base = self._require_base()
        if context is None:
            return base.log_prob(z)
        return base.log_prob(z, context=context)

    def _base_sample(self, n: int, temperature: float, context: Tensor | None) -> Tensor:
        base = self._require_base()
        if context is None:
            return base.sample(n, temperature=temperature)
        return base.sample(n, temperature=temperature, context=context)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The composed transforms, data -> latent: ``(z, log|det dz/dx|)``."""
        self._check_input(x, "x")
        return self.transform(x, context=context)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The composed inverse, latent -> data: ``(x, log|det dx/dz|)``."""
        self._check_input(z, "z")
        return self.transform.inverse(z, context=context)

    def log_prob(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """Log-density of each sample of ``x`` (shape ``[B, *event_shape]``), shape ``[B]``.

        float32 or wider, even for half/bf16 inputs.
        """
        z, logdet = self.forward(x, context=context)
        log_pz = self._base_log_prob(z, context)
        dtype = torch.promote_types(_wide(log_pz.dtype), _wide(logdet.dtype))
        return log_pz.to(dtype) + logdet.to(dtype)

    def sample(
        self, n: int, temperature: float = 1.0, context: Tensor | None = None
    ) -> Tensor:
        """``n`` samples of shape ``(n, *event_shape)``.

        Arguments:
            n: number of samples (>= 1).
            temperature: multiplies the base's standard deviation (Glow's "std x T"; 1.0 draws
                from the model, below 1 concentrates the samples).
            context: ``[n, ...]`` or ``[1, ...]`` for conditional flows.
        """
        n = _check_n(n)
        temperature = _check_temperature(temperature)
        context = self._sample_context(context, n)
        z = self._base_sample(n, temperature, context)
        x, _ = self.transform.inverse(z, context=context)
        return x

    def sample_and_log_prob(
        self, n: int, temperature: float = 1.0, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """``n`` samples and their log-density in one pass (no re-inversion).

        The log-density is that of the model itself (temperature 1), evaluated at the returned
        samples: ``log p_base(z) - log|det dx/dz|``, whatever ``temperature`` drew them.
        Arguments as in :meth:`sample`.
        """
        n = _check_n(n)
        temperature = _check_temperature(temperature)
        context = self._sample_context(context, n)
        z = self._base_sample(n, temperature, context)
        log_pz = self._base_log_prob(z, context)
        x, logdet_inv = self.transform.inverse(z, context=context)
        dtype = torch.promote_types(_wide(log_pz.dtype), _wide(logdet_inv.dtype))
        return x, log_pz.to(dtype) - logdet_inv.to(dtype)
